"""Root pytest configuration: doctest collection of the optional adapters.

The adapters import their library at import time. Without it, a laptop skips collecting
their docstrings; under CI=true nothing is skipped, so a missing library fails the run.
"""

from __future__ import annotations

import importlib.util
import os

collect_ignore: list[str] = []
if os.environ.get("CI", "").lower() not in ("1", "true", "yes"):
    for module, path in (
        ("learn2learn", "adapters/learn2learn.py"),
        ("higher", "adapters/higher.py"),
        ("torchjd", "_interop.py"),  # its doctest uses torchjd
        ("torchjd", "_torchjd.py"),  # imported by to_torchjd alone; it subclasses torchjd's
    ):
        if importlib.util.find_spec(module) is None:
            collect_ignore.append(f"ga_optim/{path}")
