"""Hand-written Algorithm 1 (float64, torch.func) that the adapters are checked against."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ga_optim.testing import reference_agreement_weights

Task = tuple[Tensor, Tensor, Tensor, Tensor]


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1)).double()


def make_tasks(seed: int, n: int = 4) -> list[Task]:
    gen = torch.Generator().manual_seed(seed)
    tasks = []
    for _ in range(n):
        a = torch.empty(1).uniform_(0.5, 3.0, generator=gen).double()
        b = torch.empty(1).uniform_(0.0, 3.0, generator=gen).double()
        xs = torch.empty(10, 1).uniform_(-3, 3, generator=gen).double()
        xq = torch.empty(10, 1).uniform_(-3, 3, generator=gen).double()
        tasks.append((xs, a * torch.sin(xs + b), xq, a * torch.sin(xq + b)))
    return tasks


def mse(pred: Tensor, target: Tensor) -> Tensor:
    return ((pred - target) ** 2).mean()


def maml_reference(
    model: nn.Module,
    tasks: list[Task],
    inner_lr: float,
    inner_steps: int,
    outer_lr: float,
    first_order: bool,
    weights: str | Callable[[list[list[Tensor]]], Tensor] = "agreement",
) -> tuple[list[Tensor], Tensor]:
    """θ after one SGD outer step of Algorithm 1 (lines 7–9), and the weights used:
    ``"agreement"``, ``"mean"``, or a function of the deltas θ − θ_i."""
    names = [n for n, _ in model.named_parameters()]
    theta = [p.detach().clone().requires_grad_() for p in model.parameters()]
    meta_grads, deltas = [], []
    for xs, ys, xq, yq in tasks:
        fast = list(theta)
        for _ in range(inner_steps):
            loss = mse(functional_call(model, dict(zip(names, fast)), (xs,)), ys)
            grads = torch.autograd.grad(loss, fast, create_graph=not first_order)
            if first_order:
                grads = [g.detach() for g in grads]
            fast = [w - inner_lr * g for w, g in zip(fast, grads)]
        query = mse(functional_call(model, dict(zip(names, fast)), (xq,)), yq)
        # First order: the inner gradients were detached, so this is the gradient at θ_i.
        meta_grads.append([g.detach() for g in torch.autograd.grad(query, theta)])
        deltas.append([(t - f).detach() for t, f in zip(theta, fast)])
    n = len(tasks)
    if callable(weights):
        w = weights(deltas)
    elif weights == "agreement":
        w = reference_agreement_weights(deltas)
    else:
        w = torch.full((n,), 1 / n, dtype=torch.float64)
    new = [
        t.detach() - outer_lr * sum(wi * g[k] for wi, g in zip(w, meta_grads))
        for k, t in enumerate(theta)
    ]
    return new, w


def reptile_reference(
    theta: list[Tensor], adapted: list[list[Tensor]], outer_lr: float
) -> tuple[list[Tensor], Tensor]:
    """Algorithm 1, line 10, in float64: θ + α Σ w_i (θ_i − θ)."""
    deltas = [[t - a for t, a in zip(theta, task)] for task in adapted]
    w = reference_agreement_weights(deltas)
    new = [
        t + outer_lr * sum(wi * (task[k] - t) for wi, task in zip(w, adapted))
        for k, t in enumerate(theta)
    ]
    return new, w
