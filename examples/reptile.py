"""Reptile on sine waves, the tasks of each meta-batch weighted by gradient agreement.

The shape of learn2learn's ``examples/vision/reptile_miniimagenet.py`` loop (per task: a
copy of the model, an inner optimizer of your choice, a few steps; then one outer SGD step
on the averaged θ − θ_i) with ``ga_optim.adapters.reptile.AgreementReptile``. The stock
loop differs in four places, shown in the README: ``reptile.clone()`` for
``copy.deepcopy(model)``, ``reptile.record(learner)`` for the ``.grad`` bookkeeping, and
``reptile.step()`` for the averaging and ``opt.step()``. Plain PyTorch: no learn2learn
needed. ``--weighting mean`` is the stock loop, up to rounding.

    pip install ga-optim tqdm
    python reptile.py                          # gradient agreement (the paper)
    python reptile.py --weighting mean         # plain batched Reptile
    python reptile.py --inner-opt adam --quick # another inner optimizer, 100 iterations
"""

from __future__ import annotations

import argparse
import copy
import math

import torch
from torch import Tensor, nn
from tqdm import tqdm

from ga_optim import Agreement, Mean, NonNegativeAgreement
from ga_optim.adapters.reptile import AgreementReptile

WEIGHTINGS = {"mean": Mean, "agreement": Agreement, "nonnegative": NonNegativeAgreement}


def sine_task(shots: int, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Support and query points of one task y = a·sin(x + b), a ∈ [0.1, 5], b ∈ [0, π]."""
    amplitude = 0.1 + 4.9 * torch.rand((), generator=gen)
    phase = math.pi * torch.rand((), generator=gen)
    x = 10 * torch.rand(2 * shots, 1, generator=gen) - 5
    y = amplitude * torch.sin(x + phase)
    return x[::2], y[::2], x[1::2], y[1::2]


def inner_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    if name == "adam":  # as in learn2learn's Reptile example: no first-moment momentum
        return torch.optim.Adam(params, lr=lr, betas=(0.0, 0.999))
    return torch.optim.SGD(params, lr=lr)


def fast_adapt(learner: nn.Module, adapt_opt, x: Tensor, y: Tensor, steps: int) -> Tensor:
    """``steps`` steps of ``adapt_opt`` on the task's support set; the last loss."""
    for _ in range(steps):
        adapt_opt.zero_grad()
        error = nn.functional.mse_loss(learner(x), y)
        error.backward()
        adapt_opt.step()
    return error.detach()


def meta_test_loss(model: nn.Module, tasks: list, steps: int, lr: float) -> float:
    """Mean query MSE on held-out tasks after ``steps`` SGD steps on each support set."""
    total = 0.0
    for x_support, y_support, x_query, y_query in tasks:
        learner = copy.deepcopy(model)
        adapt_opt = torch.optim.SGD(learner.parameters(), lr=lr)
        fast_adapt(learner, adapt_opt, x_support, y_support, steps)
        with torch.no_grad():
            total += nn.functional.mse_loss(learner(x_query), y_query).item()
    return total / len(tasks)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--weighting", choices=["mean", "agreement", "nonnegative"], default="agreement"
    )
    parser.add_argument("--iterations", type=int, default=3000)
    parser.add_argument("--tasks-per-batch", type=int, default=8)
    parser.add_argument("--shots", type=int, default=10)
    parser.add_argument("--inner-opt", choices=["sgd", "adam"], default="sgd")
    parser.add_argument("--inner-steps", type=int, default=5)
    parser.add_argument("--inner-lr", type=float, default=0.02)
    parser.add_argument("--meta-lr", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="100 iterations")
    args = parser.parse_args(argv)
    if args.quick:
        args.iterations = min(args.iterations, 100)

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    test_gen = torch.Generator().manual_seed(10**6 + args.seed)
    test_tasks = [sine_task(args.shots, test_gen) for _ in range(100)]

    model = nn.Sequential(
        nn.Linear(1, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1)
    )
    opt = torch.optim.SGD(model.parameters(), lr=args.meta_lr)
    reptile = AgreementReptile(model, opt, weighting=WEIGHTINGS[args.weighting]())

    before = meta_test_loss(model, test_tasks, args.inner_steps, args.inner_lr)
    bar = tqdm(range(args.iterations), desc=args.weighting)
    for _iteration in bar:
        opt.zero_grad()
        meta_train_loss = 0.0
        for _task in range(args.tasks_per_batch):
            x, y, _, _ = sine_task(args.shots, gen)  # Reptile trains on the support set
            learner = reptile.clone()
            adapt_opt = inner_optimizer(args.inner_opt, learner.parameters(), args.inner_lr)
            meta_train_loss += fast_adapt(learner, adapt_opt, x, y, args.inner_steps)
            reptile.record(learner)  # θ − θ_i
        reptile.step()  # θ ← θ + α Σ w_i (θ_i − θ)
        bar.set_postfix(meta_train_loss=f"{meta_train_loss / args.tasks_per_batch:.3f}")
    after = meta_test_loss(model, test_tasks, args.inner_steps, args.inner_lr)
    print(f"{args.weighting}: meta-test MSE after adaptation {before:.3f} -> {after:.3f}")
    return {"before": before, "after": after, "model": model}


if __name__ == "__main__":
    main()
