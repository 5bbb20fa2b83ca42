#!/usr/bin/env bash
# Install everything (scripts/setup.sh) and run the main job: Reptile with and without
# gradient agreement on sine regression, 3 seeds; the table lands in results/sine/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python examples/sine_regression.py --out results/sine "$@"
