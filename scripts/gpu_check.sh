#!/usr/bin/env bash
# The checks that need a GPU, as one script for a lent GPU machine (which has torch,
# pytest and hypothesis but not learn2learn or higher: their tests skip there, outside CI).
# Writes what it finds to ${OUT:-/tmp/gpu_check}/. Usage: bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu_check}
mkdir -p "$out"
export PYTHONPATH=$PWD GLOO_SOCKET_IFNAME=lo
start=$(date +%s)
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
} 2>&1 | tee "$out/machine.txt"
# The whole suite (CUDA tests included; learn2learn/higher tests skip without them).
timeout 400 python -m pytest tests ga_optim -q -rs -p no:cacheprovider 2>&1 \
    | tail -60 | tee "$out/pytest.txt"
python benchmarks/distributed.py --quick 2>&1 | tee "$out/distributed_quick.txt"
echo "took $(( $(date +%s) - start )) s" | tee -a "$out/machine.txt"
