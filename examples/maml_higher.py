"""MAML on sine waves with ``higher``, the tasks of each meta-batch weighted by agreement.

The loop of higher's ``examples/maml-omniglot.py`` (per task: ``higher.innerloop_ctx``
with ``copy_initial_weights=False``, differentiable inner SGD steps, the query loss
back-propagated to the model's weights; then one Adam step) with
``ga_optim.adapters.higher.AgreementHigher``. The stock loop differs in three places, shown
in the README: the adapter is built, ``agree.backward(query_loss, fmodel)`` replaces
``query_loss.backward()``, and ``agree.step()`` replaces ``meta_opt.step()``.
``--weighting mean`` is the stock loop, up to rounding.

    pip install ga-optim higher tqdm
    python maml_higher.py                       # gradient agreement (the paper)
    python maml_higher.py --weighting mean      # plain MAML
    python maml_higher.py --quick               # 60 iterations, seconds
"""

from __future__ import annotations

import argparse
import math

import higher
import torch
from torch import Tensor, nn
from tqdm import tqdm

from ga_optim import Agreement, Mean, NonNegativeAgreement
from ga_optim.adapters.higher import AgreementHigher

WEIGHTINGS = {"mean": Mean, "agreement": Agreement, "nonnegative": NonNegativeAgreement}


def sine_task(shots: int, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Support and query points of one task y = a·sin(x + b), a ∈ [0.1, 5], b ∈ [0, π]."""
    amplitude = 0.1 + 4.9 * torch.rand((), generator=gen)
    phase = math.pi * torch.rand((), generator=gen)
    x = 10 * torch.rand(2 * shots, 1, generator=gen) - 5
    y = amplitude * torch.sin(x + phase)
    return x[::2], y[::2], x[1::2], y[1::2]


def meta_test_loss(model: nn.Module, inner_opt, tasks: list, steps: int) -> float:
    """Mean query MSE on held-out tasks after adapting to each one's support set."""
    mse = nn.functional.mse_loss
    total = 0.0
    for x_support, y_support, x_query, y_query in tasks:
        with higher.innerloop_ctx(model, inner_opt, track_higher_grads=False) as (fmodel, diffopt):
            for _ in range(steps):
                diffopt.step(mse(fmodel(x_support), y_support))
            total += mse(fmodel(x_query), y_query).item()
    return total / len(tasks)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--weighting", choices=["mean", "agreement", "nonnegative"], default="agreement"
    )
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--tasks-per-batch", type=int, default=16)
    parser.add_argument("--shots", type=int, default=10)
    parser.add_argument("--inner-steps", type=int, default=5)
    parser.add_argument("--inner-lr", type=float, default=0.01)
    parser.add_argument("--meta-lr", type=float, default=0.001)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="60 iterations")
    args = parser.parse_args(argv)
    if args.quick:
        args.iterations = min(args.iterations, 60)

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    test_gen = torch.Generator().manual_seed(10**6 + args.seed)
    test_tasks = [sine_task(args.shots, test_gen) for _ in range(100)]

    model = nn.Sequential(
        nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1)
    )
    inner_opt = torch.optim.SGD(model.parameters(), lr=args.inner_lr)
    meta_opt = torch.optim.Adam(model.parameters(), lr=args.meta_lr)
    agree = AgreementHigher(model, meta_opt, weighting=WEIGHTINGS[args.weighting]())
    mse = nn.functional.mse_loss

    before = meta_test_loss(model, inner_opt, test_tasks, args.inner_steps)
    bar = tqdm(range(args.iterations), desc=args.weighting)
    for _iteration in bar:
        meta_train_loss = 0.0
        meta_opt.zero_grad()
        for _task in range(args.tasks_per_batch):
            x_support, y_support, x_query, y_query = sine_task(args.shots, gen)
            task_ctx = higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False)
            with task_ctx as (fmodel, diffopt):
                for _ in range(args.inner_steps):
                    diffopt.step(mse(fmodel(x_support), y_support))
                query_loss = mse(fmodel(x_query), y_query)
                agree.backward(query_loss, fmodel)  # this task's meta-gradient and θ − θ_i
                meta_train_loss += query_loss.item()
        agree.step()  # θ ← θ − β Σ w_i ∇L_i(θ_i), w_i from the deltas θ − θ_i
        bar.set_postfix(meta_train_loss=f"{meta_train_loss / args.tasks_per_batch:.3f}")
    after = meta_test_loss(model, inner_opt, test_tasks, args.inner_steps)
    print(f"{args.weighting}: meta-test MSE after adaptation {before:.3f} -> {after:.3f}")
    return {"before": before, "after": after, "model": model}


if __name__ == "__main__":
    main()
