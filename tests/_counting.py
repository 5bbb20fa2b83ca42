"""Counting what a call dispatches: every aten operator, by name (one entry per call that
reaches the dispatcher from Python; what an operator does inside is not counted).

The one counter is the benchmark scripts' (``benchmarks/_dispatched.py``), loaded from its
file: the operation counts the tests assert and those the scripts print come from the
same code.
"""

from __future__ import annotations

from pathlib import Path

from tests._examples import load_script

_DISPATCHED = Path(__file__).resolve().parents[1] / "benchmarks" / "_dispatched.py"

CountOps = load_script(_DISPATCHED, "_benchmarks_dispatched").Dispatched
