"""Time a distributed agreement step against a distributed Mean step, and count the bytes.

Two gloo processes on this machine (loopback), N tasks split evenly between them, a model
of P fp32 entries in 4 tensors (50/30/15/5 % of P). Per round, interleaved on the same
tensors: ``GradientAgreementAggregator.step`` with ``Mean`` and with ``Agreement``
(``process_group=WORLD``, ``optimizer=None``: the update is written to ``.grad``), and, as
the floor both are measured against, *DDP-style*: each rank sums its tasks / N and runs one
``all_reduce`` of that update, which is all DDP would do. Times are rank 0's medians over
``--repeats`` rounds after a warm-up (each step starts with a barrier); bytes are the
payload each rank hands to collectives per step (``last_diagnostics.bytes_sent``).

Targets (issue 8), at P = 1e7: Agreement / Mean <= 2.5 in time and <= 2.0 (+ O(N)) in bytes.

    .venv/bin/python benchmarks/distributed.py            # P = 1e6 and 1e7 (a few minutes)
    .venv/bin/python benchmarks/distributed.py --quick    # tiny sizes, seconds
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ga_optim import Agreement, GradientAgreementAggregator, Mean

SPLIT = (0.5, 0.3, 0.15, 0.05)


def _tasks(n: int, p: int, rank: int) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    sizes = [int(p * f) for f in SPLIT]
    sizes[0] += p - sum(sizes)
    gen = torch.Generator().manual_seed(rank)
    params = [torch.zeros(s, requires_grad=True) for s in sizes]
    direction = [torch.randn(s, generator=torch.Generator().manual_seed(99)) for s in sizes]
    tasks = [
        [d + 2.0 * torch.randn(s, generator=gen) for d, s in zip(direction, sizes)]
        for _ in range(n)
    ]
    return params, tasks


def _time_case(
    n: int, p: int, rank: int, world: int, repeats: int
) -> tuple[dict[str, float], dict[str, int]]:
    """Median ms per step of each variant, and the bytes each aggregator sent per step."""
    params, tasks = _tasks(n // world, p, rank)
    group = dist.group.WORLD
    mean = GradientAgreementAggregator(params, weighting=Mean(), process_group=group)
    agree = GradientAgreementAggregator(params, weighting=Agreement(), process_group=group)

    def ddp_style() -> None:
        update = [t.clone() for t in tasks[0]]
        for task in tasks[1:]:
            torch._foreach_add_(update, task)
        flat = torch.cat(update) / n
        dist.all_reduce(flat)

    runs: dict[str, Any] = {
        "ddp": ddp_style,
        "mean": lambda: mean.step(tasks, accumulate=False),
        "agreement": lambda: agree.step(tasks, accumulate=False),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(repeats + 1):
        for name, run in runs.items():
            dist.barrier()
            start = time.perf_counter()
            run()
            elapsed = time.perf_counter() - start
            if round_:  # the first round warms up
                times[name].append(elapsed * 1e3)
    assert mean.last_diagnostics is not None and agree.last_diagnostics is not None
    sent = {
        "mean": mean.last_diagnostics.bytes_sent,
        "agreement": agree.last_diagnostics.bytes_sent,
    }
    return {k: statistics.median(v) for k, v in times.items()}, sent


def _rank(rank: int, world: int, folder: str, cases: list[tuple[int, int]], repeats: int) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{folder}/rendezvous",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=600),
    )
    rows = [(n, p, *_time_case(n, p, rank, world, repeats)) for n, p in cases]
    if rank == 0:
        print(
            "| N | P | DDP-style ms | Mean ms | Agreement ms | Agreement/Mean time | "
            "Mean/DDP-style time | Mean bytes | Agreement bytes | Agreement/Mean bytes |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|")
        for n, p, t, sent in rows:
            print(
                f"| {n} | {p:.0e} | {t['ddp']:.2f} | {t['mean']:.2f} | {t['agreement']:.2f} | "
                f"{t['agreement'] / t['mean']:.2f} | {t['mean'] / t['ddp']:.2f} | "
                f"{sent['mean']} | {sent['agreement']} | "
                f"{sent['agreement'] / sent['mean']:.3f} |"
            )
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--tasks", type=int, default=32, help="N, over both ranks")
    args = parser.parse_args()
    sizes = [10_000, 100_000] if args.quick else [1_000_000, 10_000_000]
    repeats = 2 if args.quick else args.repeats
    cases = [(args.tasks, p) for p in sizes]
    print(
        f"# 2 gloo ranks (1 torch thread each), {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}; medians of {repeats} rounds"
    )
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_rank, args=(2, folder, cases, repeats), nprocs=2, join=True)


if __name__ == "__main__":
    main()
