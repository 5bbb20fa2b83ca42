"""Counting what a call dispatches, for the benchmark scripts (``gpu.py``, ``step_ops.py``).

Every aten operator that reaches the dispatcher from Python counts once, by name (those an
operator calls inside are not counted): the same on every torch version, unlike the CPU
profiler's nesting of its events (torch 2.1 attached some to no parent). The test suite
loads this same class from this file (``tests/_counting.py``), so that the counts it
asserts and those the scripts print come from one piece of code.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from torch.utils._python_dispatch import TorchDispatchMode


class Dispatched(TorchDispatchMode):
    """``ops``: how many times each aten operator was dispatched inside the ``with``."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))
