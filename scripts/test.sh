#!/usr/bin/env bash
# Install everything (scripts/setup.sh), lint and type-check, then run the whole test suite.
# `.ci/run` calls this. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
trap 'echo "== $(basename "$0"): $(( (SECONDS - start) / 60 )) min $(( (SECONDS - start) % 60 )) s"' EXIT
echo "== installing into .venv (scripts/setup.sh)"
bash scripts/setup.sh
echo "== setup done after $(( SECONDS - start )) s; now lint, types and the test suite"
.venv/bin/ruff check ga_optim tests benchmarks examples docs
.venv/bin/ruff format --check ga_optim tests benchmarks examples docs
.venv/bin/mypy
echo "== the documentation site (scripts/docs.sh): offline, warnings are errors"
bash scripts/docs.sh
.venv/bin/python -m pytest "$@"
