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
# The copyable examples need tqdm, which the GPU machine may lack and cannot download:
# carry it as a wheel (here: pip download tqdm -d .gpu_wheels; then run this script with
# carry=[".gpu_wheels"]), installed from that folder only.
if ! python -c "import tqdm" 2>/dev/null && [ -d .gpu_wheels ]; then
    python -m pip install -q --no-index --find-links .gpu_wheels tqdm
fi
{
    python -c "import tqdm; print('tqdm', tqdm.__version__)" 2>&1 | tail -1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
} 2>&1 | tee "$out/machine.txt"
# 1. The GPU benchmark (benchmarks/gpu.py): meta-steps, aggregation, the two-pass floor.
timeout 200 python benchmarks/gpu.py 2>&1 | tee "$out/gpu.txt"
# 2. The CUDA tests: one sync per step, weights per dtype, CUDA step = CPU step, gloo on CUDA.
#    And the copyable torch.func example on CUDA (maml_vmap.py --device cuda --quick).
timeout 120 python -m pytest tests/test_fast_path.py tests/test_distributed.py \
    tests/test_examples.py -k "cuda or fast" \
    -q -rs -p no:cacheprovider 2>&1 | tail -30 | tee "$out/cuda_tests.txt"
# 3. The whole suite, as far as the time allows.
timeout 230 python -m pytest tests ga_optim -q -rs -p no:cacheprovider 2>&1 \
    | tail -40 | tee "$out/pytest.txt"
echo "took $(( $(date +%s) - start )) s" | tee -a "$out/machine.txt"
