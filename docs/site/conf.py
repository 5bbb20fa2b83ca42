"""Sphinx configuration of the ga_optim documentation site (`bash scripts/docs.sh`)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

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
