"""The documentation site's API page names every public name (scripts/docs.sh builds it,
warnings as errors, in CI)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

API = (Path(__file__).resolve().parents[1] / "docs" / "site" / "api.md").read_text()
MODULES = [
    "ga_optim",
    "ga_optim.adapters.reptile",
    "ga_optim.adapters.func",
    "ga_optim.adapters.learn2learn",
    "ga_optim.adapters.higher",
]


@pytest.mark.parametrize("module", MODULES)
def test_api_page_names_every_public_name(module: str) -> None:
    names = importlib.import_module(module).__all__
    public = "ga_optim" if module == "ga_optim" else module
    missing = [
        name
        for name in names
        if name != "__version__"
        and f"{public}.{name}" not in API
        # the learn2learn module re-exports AgreementReptile, documented under reptile
        and not (name == "AgreementReptile" and "adapters.reptile.AgreementReptile" in API)
    ]
    assert not missing, f"docs/site/api.md does not document {missing} of {module}"


def test_api_page_documents_the_testing_module() -> None:
    assert ".. automodule:: ga_optim.testing" in API
