"""The documentation site's API page names every public name (scripts/docs.sh builds it,
warnings as errors, in CI)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from ._optional import require

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
    library = {
        "learn2learn": "bash scripts/install_learn2learn.sh",
        "higher": "pip install higher==0.2.1",
    }
    for name, install in library.items():
        if module.endswith(f".{name}"):
            require(name, install)  # the adapter imports its library
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


def test_the_built_site_has_no_broken_relative_link(tmp_path: Path) -> None:
    """The README's sections are included in the site, with links into the repository: a
    link to a file that is a page of the site goes to the page, any other stays its text
    (docs/site/conf.py), so that no relative link of the built site points nowhere."""
    import re
    import subprocess
    import sys

    require("sphinx", "pip install -e '.[docs]'")
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "html"
    done = subprocess.run(
        [sys.executable, "-m", "sphinx", "-b", "html", "-W", "-q", "docs/site", str(out)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    broken, checked = [], 0
    for page in out.rglob("*.html"):
        if {"_static", "_sources"} & set(page.relative_to(out).parts):
            continue
        for href in re.findall(r'href="([^"]+)"', page.read_text()):
            target = href.split("#")[0].split("?")[0]
            if not target or re.match(r"^[a-z]+:", target) or target.startswith("//"):
                continue
            checked += 1
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(out)} -> {href}")
    assert checked > 100, checked  # the scan saw the site's links
    assert not broken, broken
    adapters = (out / "guide" / "adapters.html").read_text()  # the README's link, now the page's
    assert 'href="../guide/pipelines.html">Pipelines page</a>' in adapters
