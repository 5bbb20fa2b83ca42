"""ANIL on sine waves with learn2learn, the tasks of each meta-batch weighted by agreement.

ANIL (Raghu et al., 2020; learn2learn's ``examples/vision/anil_fc100.py`` loop): a
feature extractor shared by every task sits *outside* the MAML-wrapped head; the inner
loop adapts the head alone, and the outer optimizer trains both. With
``ga_optim.adapters.learn2learn.AgreementMAML`` the edits are the usual four: the
adapter is built from the head and the outer optimizer (so it knows the features are
outer parameters too), each task's query loss goes to ``agree.backward``, and
``agree.step()`` replaces the averaging of ``.grad`` and ``opt.step()``. The features get
Σ w_i ∇L_i through them, with the weights measured on the head's inner-loop deltas (the
features' are zero). ``--weighting mean`` is the stock loop, up to rounding.

    pip install ga-optim learn2learn tqdm
    python anil.py                        # gradient agreement (the paper)
    python anil.py --weighting mean       # plain ANIL, for comparison
    python anil.py --quick                # 60 iterations, seconds
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


def sine_task(shots: int, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Support and query points of one task y = a·sin(x + b), a ∈ [0.1, 5], b ∈ [0, π]."""
    amplitude = 0.1 + 4.9 * torch.rand((), generator=gen)
    phase = math.pi * torch.rand((), generator=gen)
    x = 10 * torch.rand(2 * shots, 1, generator=gen) - 5
    y = amplitude * torch.sin(x + phase)
    return x[::2], y[::2], x[1::2], y[1::2]


def meta_test_loss(
    features: nn.Module, head: l2l.algorithms.MAML, tasks: list, adapt_steps: int
) -> float:
    """Mean query MSE on held-out tasks after adapting the head to each support set."""
    lossfn = nn.MSELoss()
    total = 0.0
    for x_support, y_support, x_query, y_query in tasks:
        learner = head.clone()
        for _ in range(adapt_steps):
            learner.adapt(lossfn(learner(features(x_support)), y_support))
        total += lossfn(learner(features(x_query)), y_query).item()
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
    parser.add_argument("--adapt-lr", type=float, default=0.1)
    parser.add_argument("--meta-lr", type=float, default=0.003)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="60 iterations")
    args = parser.parse_args(argv)
    if args.quick:
        args.iterations = min(args.iterations, 60)

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    test_gen = torch.Generator().manual_seed(10**6 + args.seed)
    test_tasks = [sine_task(args.shots, test_gen) for _ in range(100)]

    features = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU())
    head = l2l.algorithms.MAML(nn.Linear(40, 1), lr=args.adapt_lr)
    all_parameters = list(features.parameters()) + list(head.parameters())
    opt = torch.optim.Adam(all_parameters, lr=args.meta_lr)
    agree = AgreementMAML(head, opt, weighting=WEIGHTINGS[args.weighting]())
    lossfn = nn.MSELoss()

    before = meta_test_loss(features, head, test_tasks, args.adapt_steps)
    bar = tqdm(range(args.iterations), desc=args.weighting)
    for _iteration in bar:
        opt.zero_grad()
        meta_train_loss = 0.0
        for _task in range(args.tasks_per_batch):
            x_support, y_support, x_query, y_query = sine_task(args.shots, gen)
            learner = head.clone()
            for _ in range(args.adapt_steps):
                learner.adapt(lossfn(learner(features(x_support)), y_support))
            query_loss = lossfn(learner(features(x_query)), y_query)
            agree.backward(query_loss, learner)  # was: query_loss.backward()
            meta_train_loss += query_loss.item()
        agree.step()  # was: p.grad.mul_(1 / tasks_per_batch) for every p; opt.step()
        bar.set_postfix(meta_train_loss=f"{meta_train_loss / args.tasks_per_batch:.3f}")
    after = meta_test_loss(features, head, test_tasks, args.adapt_steps)
    print(f"{args.weighting}: meta-test MSE after adaptation {before:.3f} -> {after:.3f}")
    return {"before": before, "after": after, "model": nn.ModuleList([features, head])}


if __name__ == "__main__":
    main()
