"""MAML on sine waves with learn2learn, the tasks of each meta-batch weighted by agreement.

learn2learn's ``examples/maml_sine.py`` loop (a 3-layer MLP, 16 tasks a meta-batch, 5
adaptation steps, second-order MAML, Adam outer step) with
``ga_optim.adapters.learn2learn.AgreementMAML``. The stock loop differs in four places,
shown in the README: the adapter is built, each task's query loss goes to
``agree.backward`` instead of into one summed loss, and ``agree.step()`` replaces the
``backward`` / ``opt.step()`` pair. ``--weighting mean`` is the stock loop, up to rounding.

    pip install ga-optim learn2learn tqdm
    python maml_learn2learn.py                        # gradient agreement (the paper)
    python maml_learn2learn.py --weighting mean       # plain MAML, for comparison
    python maml_learn2learn.py --quick                # 60 iterations, seconds
"""

from __future__ import annotations

import argparse
import math

import learn2learn as l2l
import torch
from torch import Tensor, nn
from tqdm import tqdm

from ga_optim import Agreement, Mean, NonNegativeAgreement
from ga_optim.adapters.learn2learn import AgreementMAML

WEIGHTINGS = {"mean": Mean, "agreement": Agreement, "nonnegative": NonNegativeAgreement}


class SineModel(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.hidden1 = nn.Linear(1, dim)
        self.hidden2 = nn.Linear(dim, dim)
        self.hidden3 = nn.Linear(dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = nn.functional.relu(self.hidden1(x))
        x = nn.functional.relu(self.hidden2(x))
        return self.hidden3(x)


def sine_task(shots: int, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Support and query points of one task y = a·sin(x + b), a ∈ [0.1, 5], b ∈ [0, π]."""
    amplitude = 0.1 + 4.9 * torch.rand((), generator=gen)
    phase = math.pi * torch.rand((), generator=gen)
    x = 10 * torch.rand(2 * shots, 1, generator=gen) - 5
    y = amplitude * torch.sin(x + phase)
    return x[::2], y[::2], x[1::2], y[1::2]


def meta_test_loss(maml: l2l.algorithms.MAML, tasks: list, adapt_steps: int) -> float:
    """Mean query MSE on held-out tasks after adapting to each one's support set."""
    lossfn = nn.MSELoss()
    total = 0.0
    for x_support, y_support, x_query, y_query in tasks:
        learner = maml.clone()
        for _ in range(adapt_steps):
            learner.adapt(lossfn(learner(x_support), y_support))
        total += lossfn(learner(x_query), y_query).item()
    return total / len(tasks)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--weighting", choices=["mean", "agreement", "nonnegative"], default="agreement"
    )
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--tasks-per-batch", type=int, default=16)
    parser.add_argument("--shots", type=int, default=10)
    parser.add_argument("--adapt-steps", type=int, default=5)
    parser.add_argument("--adapt-lr", type=float, default=0.01)
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

    model = SineModel(dim=32)
    maml = l2l.algorithms.MAML(model, lr=args.adapt_lr, first_order=False)
    opt = torch.optim.Adam(maml.parameters(), args.meta_lr)
    agree = AgreementMAML(maml, opt, weighting=WEIGHTINGS[args.weighting]())
    lossfn = nn.MSELoss()

    before = meta_test_loss(maml, test_tasks, args.adapt_steps)
    bar = tqdm(range(args.iterations), desc=args.weighting)
    for _iteration in bar:
        meta_train_loss = 0.0
        for _task in range(args.tasks_per_batch):
            x_support, y_support, x_query, y_query = sine_task(args.shots, gen)
            learner = maml.clone()
            for _ in range(args.adapt_steps):
                learner.adapt(lossfn(learner(x_support), y_support))
            query_loss = lossfn(learner(x_query), y_query)
            agree.backward(query_loss, learner)  # this task's meta-gradient and θ − θ_i
            meta_train_loss += query_loss.item()
        opt.zero_grad()
        agree.step()  # θ ← θ − β Σ w_i ∇L_i(θ_i), w_i from the deltas θ − θ_i
        bar.set_postfix(meta_train_loss=f"{meta_train_loss / args.tasks_per_batch:.3f}")
    after = meta_test_loss(maml, test_tasks, args.adapt_steps)
    print(f"{args.weighting}: meta-test MSE after adaptation {before:.3f} -> {after:.3f}")
    return {"before": before, "after": after, "model": model}


if __name__ == "__main__":
    main()
