#!/usr/bin/env bash
# Set up .venv for ga_optim on a fresh machine: torch, ga_optim itself (editable) with its
# development extras. Idempotent: a second run only checks that everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
pip_install() {
    # pip's notes about the local mirror's missing folders are noise; real errors still fail.
    .venv/bin/python -m pip install --disable-pip-version-check -q "$@" 2>&1 \
        | { grep -v -E "Location '.*' is ignored" || true; }
    return "${PIPESTATUS[0]}"
}
# torch with a torchvision that imports beside it (learn2learn needs torchvision).
pip_install "torch==2.14.1" "torchvision==0.29.1"
pip_install -e ".[dev]"
# The optional libraries the adapters wrap; their tests must run (CI fails without them).
pip_install "higher==0.2.1"
bash scripts/install_learn2learn.sh
