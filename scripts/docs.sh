#!/usr/bin/env bash
# Build the documentation site (Sphinx, furo theme, MyST pages, autodoc of the public API)
# into docs/_build/html, offline, failing on any warning. Installs the docs extra into
# .venv (scripts/setup.sh first, if .venv is missing) and MathJax 3 from the npm registry
# once into .mathjax/, so that the pages render their math without a network.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh
.venv/bin/python -m pip install --disable-pip-version-check -q -e ".[docs]" 2>&1 \
    | { grep -v -E "Location '.*' is ignored" || true; }
if [ ! -f .mathjax/es5/tex-mml-chtml.js ]; then
    work=$(mktemp -d)
    (cd "$work" && npm pack --silent mathjax@3.2.2 >/dev/null && tar xzf mathjax-3.2.2.tgz)
    mkdir -p .mathjax && cp -r "$work/package/es5" .mathjax/
    rm -rf "$work"
fi
rm -rf docs/_build/html
GA_OPTIM_MATHJAX="$PWD/.mathjax" .venv/bin/python -m sphinx -b html -W --keep-going -q \
    docs/site docs/_build/html
echo "== docs: docs/_build/html/index.html"
