"""Time agreement aggregation against Mean, a stacked-matrix variant and a naive pairwise one.

For each meta-batch size N and model size P (fp32, split over 4 parameter tensors of
50/30/15/5 % of P), it times ``GradientAgreementAggregator.aggregate`` with ``Agreement``
and with ``Mean``, plus two reference implementations that are *not* in the library:

* stacked: per parameter, copy the N task tensors into one [N, numel] matrix, then
  ``s = M.sum(0)``, ``r = M @ s``, ``update = wᵀ M`` (the "one N×P copy" design);
* pairwise: the O(N²·P) Gramian from all pairs of dot products, then the combination.

Every variant runs in the same process on the same tensors; each time is the median of
``--repeats`` runs after a warm-up. Peak extra memory is measured in a fresh subprocess
per case as the rise of the peak resident set size during one ``aggregate`` call (on
CUDA: of ``torch.cuda.max_memory_allocated``, in this process), in units of one
model-sized fp32 buffer (P·4 bytes); the output itself is one such buffer.

Targets (issue 2): agreement/mean <= 3.5 at N=32, P=1e7; pairwise/agreement >= 10 at
N=32; extra peak memory <= 2 buffers (the output plus one). Run:

    .venv/bin/python benchmarks/aggregate.py            # the full table (a few minutes)
    .venv/bin/python benchmarks/aggregate.py --quick    # tiny sizes, seconds
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from ga_optim import GradientAgreementAggregator, Mean

SPLIT = (0.5, 0.3, 0.15, 0.05)


def make_case(n: int, p: int, device: str) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    sizes = [int(p * f) for f in SPLIT]
    sizes[0] += p - sum(sizes)
    gen = torch.Generator().manual_seed(0)
    params = [torch.zeros(s, device=device, requires_grad=True) for s in sizes]
    direction = [torch.randn(s, generator=gen).to(device) for s in sizes]
    tasks = [
        [d + 2.0 * torch.randn(s, generator=gen).to(device) for d, s in zip(direction, sizes)]
        for _ in range(n)
    ]
    return params, tasks


def stacked(tasks: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    mats = [torch.stack([task[k] for task in tasks]) for k in range(len(tasks[0]))]
    scores = sum(m @ m.sum(0) for m in mats)
    weights = scores / scores.abs().sum()
    return [weights @ m for m in mats]


def pairwise(tasks: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    n = len(tasks)
    gram = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(i, n):
            value = sum(float(torch.dot(a, b)) for a, b in zip(tasks[i], tasks[j]))
            gram[i, j] = gram[j, i] = value
    scores = gram.sum(1)
    weights = (scores / scores.abs().sum()).tolist()
    out = [t * weights[0] for t in tasks[0]]
    for w, task in zip(weights[1:], tasks[1:]):
        torch._foreach_add_(out, task, alpha=w)
    return out


def timeit(
    fn: Callable[[list[list[torch.Tensor]]], object],
    tasks: list[list[torch.Tensor]],
    repeats: int,
    device: str,
) -> float:
    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    fn(tasks)
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(tasks)
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_child(n: int, p: int, weighting: str) -> None:
    """Run in a subprocess: print the peak-RSS rise of one aggregate call, in P·4 bytes.

    Freed set-up memory is handed back to the OS (malloc_trim) and the kernel's peak-RSS
    counter is reset (/proc/self/clear_refs), so the peak measures this call alone.
    """
    params, tasks = make_case(n, p, "cpu")
    aggregator = GradientAgreementAggregator(
        params, weighting=Mean() if weighting == "mean" else None
    )
    # Warm up the kernels on a small copy, so one-off allocations do not count.
    warm = [torch.zeros(16, requires_grad=True) for _ in params]
    GradientAgreementAggregator(warm).aggregate([[t[:16] for t in task] for task in tasks])
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    before = _status_kib("VmRSS")
    out = aggregator.aggregate(tasks)
    peak = _status_kib("VmHWM")
    del out
    print(json.dumps({"buffers": (peak - before) * 1024 / (p * 4)}))


def peak_memory_cuda(
    aggregator: GradientAgreementAggregator, tasks: list[list[torch.Tensor]], p: int
) -> float:
    """On CUDA: the rise of ``torch.cuda.max_memory_allocated`` during one aggregate call
    (after a warm-up call), in P·4 bytes. The caching allocator's peak counter measures
    the tensors the call allocates, whatever the allocator keeps reserved."""
    aggregator.aggregate(tasks)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = aggregator.aggregate(tasks)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del out
    return (peak - before) / (p * 4)


def peak_memory(n: int, p: int, weighting: str) -> float:
    result = subprocess.run(
        [sys.executable, __file__, "--memory-child", str(n), str(p), weighting],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())},
    )
    return float(json.loads(result.stdout.strip().splitlines()[-1])["buffers"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--no-pairwise-above",
        type=float,
        default=float("inf"),
        help="skip the (slow) pairwise reference for P above this",
    )
    parser.add_argument("--memory-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        n, p, weighting = args.memory_child
        peak_memory_child(int(n), int(p), weighting)
        return

    ns = (5, 10, 32)
    ps = (1_000, 10_000) if args.quick else (10_000, 1_000_000, 10_000_000)
    repeats = 2 if args.quick else args.repeats
    print(
        f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, {torch.get_num_threads()} threads, device {args.device}"
    )
    header = (
        "| N | P | mean ms | agreement ms | stacked ms | pairwise ms "
        "| agreement/mean | stacked/mean | pairwise/agreement | extra memory (P-buffers) |"
    )
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    rows = []
    for p in ps:
        for n in ns:
            params, tasks = make_case(n, p, args.device)
            agreement = GradientAgreementAggregator(params)
            mean = GradientAgreementAggregator(params, weighting=Mean())
            t_mean = timeit(mean.aggregate, tasks, repeats, args.device)
            t_agree = timeit(agreement.aggregate, tasks, repeats, args.device)
            t_stack = timeit(stacked, tasks, repeats, args.device)
            t_pair = (
                timeit(pairwise, tasks, max(1, repeats // 2), args.device)
                if p <= args.no_pairwise_above
                else float("nan")
            )
            memory = (
                peak_memory(n, p, "agreement")
                if args.device == "cpu"
                else peak_memory_cuda(agreement, tasks, p)
                if args.device == "cuda"
                else float("nan")
            )
            row = {
                "N": n,
                "P": p,
                "mean_ms": t_mean,
                "agreement_ms": t_agree,
                "stacked_ms": t_stack,
                "pairwise_ms": t_pair,
                "agreement_over_mean": t_agree / t_mean,
                "stacked_over_mean": t_stack / t_mean,
                "pairwise_over_agreement": t_pair / t_agree,
                "extra_memory_buffers": memory,
            }
            rows.append(row)
            print(
                f"| {n} | {p:.0e} | {t_mean:.2f} | {t_agree:.2f} | {t_stack:.2f} "
                f"| {t_pair:.1f} | {row['agreement_over_mean']:.2f} | "
                f"{row['stacked_over_mean']:.2f} | {row['pairwise_over_agreement']:.1f} "
                f"| {memory:.2f} |",
                flush=True,
            )
    target = [r for r in rows if r["N"] == 32 and r["P"] == max(ps)]
    if target:
        r = target[0]
        print(
            f"\nAt N=32, P={max(ps):.0e}: agreement/mean = {r['agreement_over_mean']:.2f} "
            f"(target <= 3.5), pairwise/agreement = {r['pairwise_over_agreement']:.1f} "
            f"(target >= 10), extra memory = {r['extra_memory_buffers']:.2f} P-buffers "
            "(target <= 2: the output plus one)"
        )


if __name__ == "__main__":
    main()
