"""Optional libraries in tests: skip without them on a laptop, fail under CI=true."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest


def require(module: str, install: str) -> ModuleType:
    """Import an optional library: skip without it on a laptop, fail under CI=true."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{module} is required under CI ({error}); install it with: {install}")
        pytest.skip(
            f"{module} is not installed; install it with: {install}", allow_module_level=True
        )
