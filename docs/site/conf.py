"""Sphinx configuration of the ga_optim documentation site (`bash scripts/docs.sh`)."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import ga_optim  # noqa: E402

project = "ga_optim"
author = "The ga_optim developers"
copyright = "2026, The ga_optim developers"
release = version = ga_optim.__version__
extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "myst_parser",
]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build"]
html_theme = "furo"
html_title = f"ga_optim {version}"
myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3
# Links in the pages that point into the repository (examples, scripts) stay plain links.
myst_all_links_external = True
autodoc_member_order = "bysource"
# The adapters' libraries are optional (learn2learn does not even build from PyPI on
# Python 3.11): a venv with only `pip install .[docs]` documents their adapters against
# stand-ins (the adapters touch the libraries only when called).
autodoc_mock_imports = ["learn2learn", "higher"]
autodoc_typehints = "description"
autodoc_class_signature = "mixed"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True
# MathJax from a local copy when scripts/docs.sh fetched one (the build is offline).
if os.environ.get("GA_OPTIM_MATHJAX"):
    html_static_path = [os.environ["GA_OPTIM_MATHJAX"]]
    mathjax_path = "es5/tex-mml-chtml.js"


# The README's sections are included in several pages; its links point into the repository
# (relative to its root), which the built site does not hold. A link to a file that is a
# page of the site goes to that page; a link to any other repository file stays its text.
SITE_PAGES = {
    "docs/RESULTS.md": "results",
    "docs/site/install.md": "install",
    "docs/site/guide/pipelines.md": "guide/pipelines",
}
_LINK = re.compile(
    r"\[([^\]]+)\]\(((?:docs|examples|benchmarks|scripts|tests)/[^)#\s]*)(#[^)\s]*)?\)"
)


def _site_links(app: Any, relative_path: Path, parent_docname: str, content: list[str]) -> None:
    if Path(relative_path).name != "README.md":
        return
    up = "../" * app.env.docname.count("/")  # (parent_docname comes without its folder)

    def link(match: re.Match[str]) -> str:
        text, target, anchor = match[1], match[2], match[3] or ""
        page = SITE_PAGES.get(target)
        return f"[{text}]({up}{page}.html{anchor})" if page else text

    parts = re.split(r"(```.*?```)", content[0], flags=re.S)  # code blocks stay as they are
    content[0] = "".join(p if p.startswith("```") else _LINK.sub(link, p) for p in parts)


def setup(app: Any) -> None:
    app.connect("include-read", _site_links)
