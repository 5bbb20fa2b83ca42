"""Overhead of AgreementMAML over the unwrapped learn2learn MAML loop, per meta-iteration.

Two scales:

* omniglot: the 4-block conv net of Finn et al. (3×3 conv, 64 filters, batch norm, ReLU,
  2×2 max-pool; 28×28 grey inputs), 5-way 1-shot (5 support and 5 query images per task),
  32 tasks per meta-batch, 1 inner step, second order — the paper's Omniglot setting;
* sine: the MLP 1→64→64→1 (tanh), 10 tasks, 10 shots, 5 inner steps, second order.

Variants, on identical data: the stock loop (``loss.backward()`` per task, ``.grad /= N``,
``opt.step()``), ``AgreementMAML`` with ``Agreement``, and with ``Mean``. Runs are
interleaved, the order rotating every round, so that drift hits all alike; each time is
the median over ``--repeats`` rounds. The overhead is the median, with its interquartile
range, of the per-round ratio to the stock run of the same round. Target (issue 3): ≤ 5 %
added time at the Omniglot scale. Data is random: only time is measured.

    .venv/bin/python benchmarks/adapters.py            # both scales, a few minutes
    .venv/bin/python benchmarks/adapters.py --quick    # tiny, for a smoke run
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time
from collections.abc import Callable

import learn2learn as l2l
import torch
from torch import nn

from ga_optim import Agreement, Mean
from ga_optim.adapters.learn2learn import AgreementMAML

Batch = list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]


def conv4(ways: int, filters: int = 64) -> nn.Module:
    layers: list[nn.Module] = []
    channels = 1
    for _ in range(4):
        layers += [
            nn.Conv2d(channels, filters, 3, padding=1),
            nn.BatchNorm2d(filters),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 28 → 14 → 7 → 3 → 1
        ]
        channels = filters
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(filters, ways))


def omniglot_case(tasks: int) -> tuple[nn.Module, Batch, Callable, int, float]:
    gen = torch.Generator().manual_seed(0)
    batch = []
    for _ in range(tasks):
        xs, xq = torch.randn(5, 1, 28, 28, generator=gen), torch.randn(5, 1, 28, 28, generator=gen)
        labels = torch.arange(5)
        batch.append((xs, labels, xq, labels))
    return conv4(5), batch, nn.functional.cross_entropy, 1, 0.4


def sine_case(tasks: int) -> tuple[nn.Module, Batch, Callable, int, float]:
    gen = torch.Generator().manual_seed(0)
    batch = []
    for _ in range(tasks):
        xs, xq = (
            torch.rand(10, 1, generator=gen) * 10 - 5,
            torch.rand(10, 1, generator=gen) * 10 - 5,
        )
        batch.append((xs, torch.sin(xs), xq, torch.sin(xq)))
    model = nn.Sequential(
        nn.Linear(1, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1)
    )
    return model, batch, nn.functional.mse_loss, 5, 0.02


def stock_iteration(
    maml: nn.Module, opt: torch.optim.Optimizer, batch: Batch, loss_fn: Callable, steps: int
) -> None:
    opt.zero_grad()
    for xs, ys, xq, yq in batch:
        learner = maml.clone()
        for _ in range(steps):
            learner.adapt(loss_fn(learner(xs), ys))
        loss_fn(learner(xq), yq).backward()
    for p in maml.parameters():
        p.grad.mul_(1.0 / len(batch))
    opt.step()


def agreement_iteration(
    agree: AgreementMAML, opt: torch.optim.Optimizer, batch: Batch, loss_fn: Callable, steps: int
) -> None:
    opt.zero_grad()
    for xs, ys, xq, yq in batch:
        learner = agree.clone()
        for _ in range(steps):
            learner.adapt(loss_fn(learner(xs), ys))
        agree.backward(loss_fn(learner(xq), yq), learner)
    agree.step()


def measure(name: str, case: Callable, tasks: int, repeats: int) -> dict[str, float]:
    model, batch, loss_fn, steps, lr = case(tasks)
    runners: dict[str, Callable[[], None]] = {}
    maml = l2l.algorithms.MAML(copy.deepcopy(model), lr=lr)
    opt = torch.optim.Adam(maml.parameters(), lr=1e-3)
    runners["stock"] = lambda: stock_iteration(maml, opt, batch, loss_fn, steps)
    for label, weighting in (("agreement", Agreement()), ("mean", Mean())):
        m = l2l.algorithms.MAML(copy.deepcopy(model), lr=lr)
        o = torch.optim.Adam(m.parameters(), lr=1e-3)
        a = AgreementMAML(m, o, weighting=weighting)
        runners[label] = lambda a=a, o=o: agreement_iteration(a, o, batch, loss_fn, steps)
    for run in runners.values():  # warm-up
        run()
    times: dict[str, list[float]] = {k: [] for k in runners}
    labels = list(runners)
    for round_ in range(repeats):
        # Rotate the order every round, so no variant always runs first or last.
        for label in labels[round_ % 3 :] + labels[: round_ % 3]:
            start = time.perf_counter()
            runners[label]()
            times[label].append(time.perf_counter() - start)
    medians = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    # Paired ratios: each round's variant against the stock run of the same round, which
    # cancels the slow drift of this shared machine (±15 % between rounds).
    overhead = {}
    for label in ("agreement", "mean"):
        ratios = sorted(a / s - 1 for a, s in zip(times[label], times["stock"]))
        q1, q2, q3 = statistics.quantiles(ratios, n=4)
        overhead[label] = (q2, q1, q3)
    params = sum(p.numel() for p in model.parameters())
    cells = [
        f"{100 * q2:+.1f} % [{100 * q1:+.1f}, {100 * q3:+.1f}]" for q2, q1, q3 in overhead.values()
    ]
    print(
        f"| {name} | {tasks} | {params} | {medians['stock']:.1f} | {medians['agreement']:.1f} "
        f"| {medians['mean']:.1f} | {cells[0]} | {cells[1]} |",
        flush=True,
    )
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    repeats = 3 if args.quick else args.repeats
    print(
        f"# torch {torch.__version__}, learn2learn {l2l.__version__}, {platform.machine()}, "
        f"{os.cpu_count()} CPUs, {torch.get_num_threads()} threads"
    )
    print(
        "| scale | tasks | parameters | stock ms | AgreementMAML ms | AgreementMAML(Mean) ms "
        "| agreement overhead, median [IQR] | mean overhead, median [IQR] |"
    )
    print("|---|---|---|---|---|---|---|---|")
    measure("omniglot conv4, 5-way 1-shot, 1 step", omniglot_case, 4 if args.quick else 32, repeats)
    measure("sine MLP, 10 shots, 5 steps", sine_case, 10, repeats)


if __name__ == "__main__":
    main()
