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
settings.register_profile(
    "stress", max_examples=3000, deadline=None, suppress_health_check=list(HealthCheck)
)
# HYPOTHESIS_PROFILE=stress for a long local search; CI runs the derandomized profile.
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev")
)


def require(module: str, install: str) -> ModuleType:
    """Import an optional library: skip without it on a laptop, fail under CI=true."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{module} is required under CI ({error}); install it with: {install}")
        pytest.skip(f"{module} is not installed; install it with: {install}")
