#!/usr/bin/env bash
# The test suite on another torch release (e.g. the oldest that pyproject.toml admits), in
# a virtual environment of its own. Optional libraries (learn2learn, higher, torchjd) are
# not installed there: outside CI their tests skip, the rest run against the checkout.
# Usage: bash scripts/check_torch.sh 2.1.2 [pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:?usage: bash scripts/check_torch.sh TORCH_VERSION [pytest arguments]}
shift
venv=${TORCH_VENV:-/tmp/ga_optim-torch-$version}
start=$SECONDS
trap 'echo "== $(basename "$0"): $(( (SECONDS - start) / 60 )) min $(( (SECONDS - start) % 60 )) s"' EXIT
echo "== torch $version and the test requirements into $venv"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
# numpy 1.x: torch releases before 2.3 were built against it.
"$venv/bin/python" -m pip install -q "torch==$version" "numpy<2" pytest hypothesis tqdm \
    matplotlib scikit-learn pillow
"$venv/bin/python" -c "import torch; print('== torch', torch.__version__)"
PYTHONPATH=$PWD GLOO_SOCKET_IFNAME=lo "$venv/bin/python" -m pytest tests ga_optim -q -rfs \
    -p no:cacheprovider "$@"
