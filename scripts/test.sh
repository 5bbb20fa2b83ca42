#!/usr/bin/env bash
# Install everything (scripts/setup.sh), lint and type-check, then run the whole test suite.
# `.ci/run` calls this. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check ga_optim tests benchmarks examples docs
.venv/bin/ruff format --check ga_optim tests benchmarks examples docs
.venv/bin/mypy
.venv/bin/python -m pytest "$@"
