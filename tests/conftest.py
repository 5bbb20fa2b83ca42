"""Shared test configuration: hypothesis profiles and the optional-library rule."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    derandomize=True,
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.register_profile(
    "dev", max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


def require(module: str, install: str) -> ModuleType:
    """Import an optional library: skip without it on a laptop, fail under CI=true."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{module} is required under CI ({error}); install it with: {install}")
        pytest.skip(f"{module} is not installed; install it with: {install}")
