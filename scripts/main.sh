#!/usr/bin/env bash
# Install everything (scripts/setup.sh) and run the main job: Reptile with and without
# gradient agreement on sine regression, 3 seeds; the table lands in results/sine/.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
trap 'echo "== $(basename "$0"): $(( (SECONDS - start) / 60 )) min $(( (SECONDS - start) % 60 )) s"' EXIT
echo "== installing into .venv (scripts/setup.sh)"
bash scripts/setup.sh
echo "== setup done after $(( SECONDS - start )) s; now the main job (sine regression: Reptile, mean vs agreement, 3 seeds)"
.venv/bin/python examples/paper/sine_regression.py --out results/sine "$@"
