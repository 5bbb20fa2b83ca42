"""MAML on sine waves with ``torch.func``: the meta-batch adapted at once by ``vmap``, the
tasks weighted by gradient agreement.

``vmap(grad(query_loss))`` gives every task's meta-gradient and adapted weights as
``{name: [N, ...]}`` dicts in one batched call; ``ga_optim.adapters.func.FuncAgreement``
takes them as they are (a number of kernels that does not grow with the meta-batch, one
value read back from the device per step). Without ga_optim the step would be
``p.grad = meta_grads[name].mean(0)`` and ``opt.step()``; ``--weighting mean`` is exactly
that, up to rounding. Plain PyTorch: nothing else to install.

    pip install ga-optim tqdm
    python maml_vmap.py                          # gradient agreement (the paper)
    python maml_vmap.py --weighting mean         # plain MAML
    python maml_vmap.py --device cuda --quick    # on a GPU, 60 iterations
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from tqdm import tqdm

from ga_optim import Agreement, Mean, NonNegativeAgreement
from ga_optim.adapters.func import FuncAgreement, reptile_deltas

WEIGHTINGS = {"mean": Mean, "agreement": Agreement, "nonnegative": NonNegativeAgreement}


def sine_tasks(n: int, shots: int, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Support and query points of ``n`` tasks y = a·sin(x + b), a ∈ [0.1, 5], b ∈ [0, π],
    stacked: ``[n, shots, 1]`` each."""
    amplitude = 0.1 + 4.9 * torch.rand(n, 1, 1, generator=gen)
    phase = math.pi * torch.rand(n, 1, 1, generator=gen)
    x = 10 * torch.rand(n, 2 * shots, 1, generator=gen) - 5
    y = amplitude * torch.sin(x + phase)
    return x[:, ::2], y[:, ::2], x[:, 1::2], y[:, 1::2]


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
    parser.add_argument("--device", default="cpu", help="e.g. cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="60 iterations")
    args = parser.parse_args(argv)
    if args.quick:
        args.iterations = min(args.iterations, 60)
    device = torch.device(args.device)

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)  # tasks drawn on the CPU: any device, same tasks
    test_gen = torch.Generator().manual_seed(10**6 + args.seed)
    test_tasks = [t.to(device) for t in sine_tasks(100, args.shots, test_gen)]

    model = nn.Sequential(
        nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1)
    ).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.meta_lr)
    agree = FuncAgreement(model, opt, weighting=WEIGHTINGS[args.weighting]())

    def loss(params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return nn.functional.mse_loss(functional_call(model, params, (x,)), y)

    def adapt(params: dict[str, Tensor], x: Tensor, y: Tensor) -> dict[str, Tensor]:
        for _ in range(args.inner_steps):  # differentiable inner SGD steps
            grads = grad(loss)(params, x, y)
            params = {name: params[name] - args.inner_lr * grads[name] for name in params}
        return params

    def query_loss(params, x_support, y_support, x_query, y_query):  # one task
        adapted = adapt(params, x_support, y_support)
        value = loss(adapted, x_query, y_query)
        return value, (value, adapted)

    meta_gradient = vmap(grad(query_loss, has_aux=True), in_dims=(None, 0, 0, 0, 0))

    def meta_test_loss() -> float:
        params = {name: p.detach() for name, p in model.named_parameters()}
        losses, _ = vmap(query_loss, in_dims=(None, 0, 0, 0, 0))(params, *test_tasks)
        return losses.mean().item()

    before = meta_test_loss()
    bar = tqdm(range(args.iterations), desc=args.weighting)
    for iteration in bar:
        tasks = (t.to(device) for t in sine_tasks(args.tasks_per_batch, args.shots, gen))
        params = {name: p.detach() for name, p in model.named_parameters()}
        meta_grads, (losses, adapted) = meta_gradient(params, *tasks)  # {name: [N, ...]}
        opt.zero_grad()
        agree.step(meta_grads, agreement_vectors=reptile_deltas(params, adapted))
        if iteration % 20 == 0:  # reading the loss waits for the device: not every step
            bar.set_postfix(meta_train_loss=f"{losses.mean().item():.3f}")
    after = meta_test_loss()
    print(f"{args.weighting}: meta-test MSE after adaptation {before:.3f} -> {after:.3f}")
    return {"before": before, "after": after, "model": model}


if __name__ == "__main__":
    main()
