"""Distributed MAML with gradient agreement: the meta-batch spread over processes.

The shape of learn2learn's ``examples/vision/distributed_maml.py``: every rank adapts its
share of the meta-batch, then one outer step. Here the outer step is
``AgreementMAML.step()`` with ``process_group=dist.group.WORLD``: the tasks' weights are
computed over the whole meta-batch (every rank's tasks), and every rank applies the same
update, so the model stays identical across ranks without DDP. Sine-wave regression, so
it runs offline.

    torchrun --nproc_per_node 2 examples/distributed_maml.py                   # 2 processes
    torchrun --nproc_per_node 2 examples/distributed_maml.py --weighting mean  # plain MAML
    python examples/distributed_maml.py --quick                                # 1 process

Several machines (run on each, with its own --node_rank):

    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 4 \\
        --rdzv_backend c10d --rdzv_endpoint HOST:29500 examples/distributed_maml.py

Tasks are drawn by their index in the meta-batch, not by rank, so any number of
processes trains the same model (up to the order of floating-point sums).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import socket

import learn2learn as l2l
import torch
import torch.distributed as dist
from torch import nn

from ga_optim import Agreement, Mean, NonNegativeAgreement
from ga_optim.adapters.learn2learn import AgreementMAML

WEIGHTINGS = {"mean": Mean, "agreement": Agreement, "nonnegative": NonNegativeAgreement}


def sine_task(seed: int, shots: int) -> tuple[torch.Tensor, ...]:
    """Support and query points of one task y = a·sin(x + b)."""
    gen = torch.Generator().manual_seed(seed)
    amplitude = 0.1 + 4.9 * torch.rand((), generator=gen)
    phase = 2 * math.pi * torch.rand((), generator=gen)
    x = 10 * torch.rand(2 * shots, 1, generator=gen) - 5
    y = amplitude * torch.sin(x + phase)
    return x[:shots], y[:shots], x[shots:], y[shots:]


def my_share(meta_batch: int, rank: int, world: int) -> range:
    """This rank's task indices: a contiguous block, the first ranks one task more."""
    base, extra = divmod(meta_batch, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weighting", choices=sorted(WEIGHTINGS), default="agreement")
    parser.add_argument("--meta-batch", type=int, default=16, help="tasks over all ranks")
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--shots", type=int, default=10)
    parser.add_argument("--adapt-steps", type=int, default=1)
    parser.add_argument("--fast-lr", type=float, default=0.01)
    parser.add_argument("--meta-lr", type=float, default=0.001)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--backend", default="gloo", help="gloo (CPU), or nccl (a GPU a rank)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds a collective waits")
    parser.add_argument("--quick", action="store_true", help="a few iterations, for CI")
    parser.add_argument("--save", help="rank 0 writes the trained parameters here")
    args = parser.parse_args()
    if args.quick:
        args.iterations = 60

    if "RANK" not in os.environ:  # plain `python`: a group of one on this machine
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ["MASTER_PORT"] = str(port)
    # A peer that dies makes the others raise after `timeout` instead of waiting forever.
    dist.init_process_group(args.backend, timeout=datetime.timedelta(seconds=args.timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cpu")
    if args.backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)

    torch.manual_seed(args.seed)  # the same initial model on every rank
    model = nn.Sequential(
        nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1)
    )
    model.to(device)
    maml = l2l.algorithms.MAML(model, lr=args.fast_lr, first_order=False)
    opt = torch.optim.Adam(maml.parameters(), lr=args.meta_lr)
    agree = AgreementMAML(
        maml, opt, weighting=WEIGHTINGS[args.weighting](), process_group=dist.group.WORLD
    )
    loss_fn = nn.MSELoss()
    mine = my_share(args.meta_batch, rank, world)

    def evaluate() -> float:
        """Query MSE after adaptation on 100 fixed held-out tasks (rank 0's view)."""
        total = 0.0
        for index in range(100):
            xs, ys, xq, yq = (t.to(device) for t in sine_task(10**6 + index, args.shots))
            learner = maml.clone()
            for _ in range(args.adapt_steps):
                learner.adapt(loss_fn(learner(xs), ys))
            total += loss_fn(learner(xq), yq).item()
        return total / 100

    before = evaluate()
    bar = None
    if rank == 0:
        try:
            from tqdm import tqdm

            bar = tqdm(
                total=args.iterations, desc=f"{args.weighting}, {world} ranks", mininterval=1.0
            )
        except ImportError:
            pass
    for iteration in range(args.iterations):
        opt.zero_grad()
        meta_loss = torch.zeros((), device=device)
        for index in mine:  # this rank's tasks
            seed = args.seed * 10**7 + iteration * args.meta_batch + index
            xs, ys, xq, yq = (t.to(device) for t in sine_task(seed, args.shots))
            learner = agree.clone()
            for _ in range(args.adapt_steps):
                learner.adapt(loss_fn(learner(xs), ys))
            query_loss = loss_fn(learner(xq), yq)
            agree.backward(query_loss, learner)  # was: query_loss.backward()
            meta_loss += query_loss.detach()
        agree.step()  # every rank, even one with no task; weights over the whole batch
        dist.all_reduce(meta_loss)  # for the log only
        if bar is not None:
            bar.update()
            bar.set_postfix(meta_loss=f"{float(meta_loss) / args.meta_batch:.3f}")
    if bar is not None:
        bar.close()
    after = evaluate()
    if rank == 0:
        print(f"ranks {world}, weighting {args.weighting}, tasks per step {args.meta_batch}")
        print(f"meta-test MSE before {before:.4f}, after {after:.4f}")
        if args.save:
            torch.save([p.detach().cpu() for p in model.parameters()], args.save)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
