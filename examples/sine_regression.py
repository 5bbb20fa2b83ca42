"""Sine-wave regression: Reptile with and without gradient agreement (the README's main job).

Tasks as in Eshratifar, Eigen & Pedram (2018), Section 4.1: y = a·sin(x + b) with
a ~ U[0.1, 5], b ~ U[0, 2π], x ~ U[-5, 5]; an MLP 1→64→64→1 (tanh). Each meta-iteration
samples N tasks; every task adapts a copy of θ by 5 SGD steps on 5 minibatches of 10 of
its 50 points (Reptile), and ``GradientAgreementAggregator.step`` applies
θ ← θ + α Σ w_i (θ_i − θ) through an SGD outer optimizer (α annealed linearly to 0).
The N tasks are adapted together: each parameter carries a leading task dimension and the
forward pass is a batched matmul.

Evaluation: 1000 unseen tasks from a fixed seed (the same for every run); fine-tune the
learned θ on K = 10 points with SGD (lr 0.02) for 5 and 32 steps; MSE on 100 evenly spaced
points over [-5, 5]; mean ± 95 % CI over tasks, then over seeds. Every weighting sees the
same seeds, the same task stream and the same budget.

    python examples/sine_regression.py --out results/sine            # default run
    python examples/sine_regression.py --quick --out /tmp/sine       # seconds, for CI
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from ga_optim import Agreement, GradientAgreementAggregator, Mean, NonNegativeAgreement, Weighting

WEIGHTINGS: dict[str, type[Weighting]] = {
    "mean": Mean,
    "agreement": Agreement,
    "nonnegative": NonNegativeAgreement,
}


@dataclass(frozen=True)
class Config:
    iterations: int = 10_000
    meta_batch: int = 10
    inner_steps: int = 5
    inner_batch: int = 10
    inner_lr: float = 0.02
    outer_lr: float = 0.1
    eval_tasks: int = 1000
    eval_shots: int = 10
    eval_steps: tuple[int, ...] = (5, 32)
    eval_seed: int = 12345


# -- tasks and the batched MLP -------------------------------------------------------------


def sample_tasks(
    n: int, points: int, gen: torch.Generator
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Amplitudes, phases, inputs [n, points, 1] and targets [n, points, 1]."""
    amplitude = torch.empty(n, 1, 1).uniform_(0.1, 5.0, generator=gen)
    phase = torch.empty(n, 1, 1).uniform_(0.0, 2 * math.pi, generator=gen)
    x = torch.empty(n, points, 1).uniform_(-5.0, 5.0, generator=gen)
    return amplitude, phase, x, amplitude * torch.sin(x + phase)


def init_mlp(gen: torch.Generator) -> list[Tensor]:
    """θ for 1→64→64→1 with PyTorch's default Linear initialisation."""
    params = []
    for fan_in, fan_out in ((1, 64), (64, 64), (64, 1)):
        bound = 1.0 / math.sqrt(fan_in)
        params.append(torch.empty(fan_in, fan_out).uniform_(-bound, bound, generator=gen))
        params.append(torch.empty(1, fan_out).uniform_(-bound, bound, generator=gen))
    return params


def forward(params: list[Tensor], x: Tensor) -> Tensor:
    """Batched MLP: params with a leading task dimension [n, ...], x [n, points, 1]."""
    w1, b1, w2, b2, w3, b3 = params
    h = torch.tanh(torch.baddbmm(b1, x, w1))
    h = torch.tanh(torch.baddbmm(b2, h, w2))
    return torch.baddbmm(b3, h, w3)


def adapt(
    params: list[Tensor], x: Tensor, y: Tensor, steps: int, lr: float, batch: int | None
) -> list[Tensor]:
    """SGD on each task's own copy of the weights; one step per minibatch (cycled)."""
    fast = [p.detach().clone().requires_grad_() for p in params]
    points = x.shape[1]
    for step in range(steps):
        if batch is None or batch >= points:
            xb, yb = x, y
        else:
            start = (step * batch) % points
            xb, yb = x[:, start : start + batch], y[:, start : start + batch]
        # Summing the per-task means keeps each task's gradient its own.
        loss = ((forward(fast, xb) - yb) ** 2).mean(dim=(1, 2)).sum()
        grads = torch.autograd.grad(loss, fast)
        with torch.no_grad():
            for p, g in zip(fast, grads):
                p.sub_(lr * g)
    return [p.detach() for p in fast]


# -- training and evaluation ---------------------------------------------------------------


def train(
    weighting: str, seed: int, cfg: Config, progress: bool = True
) -> tuple[list[Tensor], dict[str, list[float]]]:
    """Reptile with the given weighting; returns θ and the weight statistics over training."""
    gen = torch.Generator().manual_seed(seed)
    theta = [p.requires_grad_() for p in init_mlp(gen)]
    outer = torch.optim.SGD(theta, lr=cfg.outer_lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(outer, lambda it: 1.0 - it / cfg.iterations)
    aggregator = GradientAgreementAggregator(theta, outer, weighting=WEIGHTINGS[weighting]())
    history: dict[str, list[float]] = {"iteration": [], "min": [], "max": [], "negative_share": []}
    points = cfg.inner_steps * cfg.inner_batch
    bar = _progress(cfg.iterations, f"{weighting} seed {seed}") if progress else None
    for iteration in range(cfg.iterations):
        _, _, x, y = sample_tasks(cfg.meta_batch, points, gen)
        batched = [p.detach().unsqueeze(0).expand(cfg.meta_batch, *p.shape) for p in theta]
        adapted = adapt(batched, x, y, cfg.inner_steps, cfg.inner_lr, cfg.inner_batch)
        # Reptile's task vectors g_i = θ − θ_i, as views of the stacked [N, ...] deltas.
        deltas = [b - a for b, a in zip(batched, adapted)]
        weights = aggregator.step([[d[i] for d in deltas] for i in range(cfg.meta_batch)])
        schedule.step()
        if iteration % max(1, cfg.iterations // 200) == 0:
            history["iteration"].append(iteration)
            history["min"].append(float(weights.min()))
            history["max"].append(float(weights.max()))
            history["negative_share"].append(float((weights < 0).float().mean()))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return [p.detach() for p in theta], history


def evaluate(theta: list[Tensor], cfg: Config) -> dict[int, list[float]]:
    """Per-task MSE after each number of fine-tuning steps, on the fixed evaluation tasks."""
    gen = torch.Generator().manual_seed(cfg.eval_seed)
    amplitude, phase, x, y = sample_tasks(cfg.eval_tasks, cfg.eval_shots, gen)
    grid = torch.linspace(-5, 5, 100).view(1, 100, 1).expand(cfg.eval_tasks, 100, 1)
    truth = amplitude * torch.sin(grid + phase)
    batched = [p.unsqueeze(0).expand(cfg.eval_tasks, *p.shape) for p in theta]
    results: dict[int, list[float]] = {}
    done, current = 0, batched
    for steps in sorted(cfg.eval_steps):
        current = adapt(current, x, y, steps - done, cfg.inner_lr, None)
        done = steps
        with torch.no_grad():
            results[steps] = ((forward(current, grid) - truth) ** 2).mean(dim=(1, 2)).tolist()
    return results


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of a 95 % normal confidence interval."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan")
    return mean, 1.96 * statistics.stdev(values) / math.sqrt(len(values))


def _progress(total: int, desc: str):  # type: ignore[no-untyped-def]
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, leave=False, mininterval=1.0)


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(
        description="Reptile vs agreement-weighted Reptile on sine tasks."
    )
    parser.add_argument("--out", type=Path, default=Path("results/sine"))
    parser.add_argument(
        "--weightings", nargs="+", default=["mean", "agreement"], choices=sorted(WEIGHTINGS)
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--iterations", type=int, default=Config.iterations)
    parser.add_argument("--meta-batch", type=int, default=Config.meta_batch)
    parser.add_argument("--outer-lr", type=float, default=Config.outer_lr)
    parser.add_argument("--quick", action="store_true", help="a tiny run (seconds), for CI")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest here)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = Config(iterations=args.iterations, meta_batch=args.meta_batch, outer_lr=args.outer_lr)
    if args.quick:
        cfg = Config(
            iterations=60, meta_batch=args.meta_batch, outer_lr=args.outer_lr, eval_tasks=50
        )
        args.seeds = args.seeds[:2]
    args.out.mkdir(parents=True, exist_ok=True)

    results: dict[str, object] = {"config": asdict(cfg), "seeds": args.seeds, "runs": {}}
    runs: dict[str, dict[str, object]] = results["runs"]  # type: ignore[assignment]
    for weighting in args.weightings:
        per_seed: dict[str, list[float]] = {str(s): [] for s in cfg.eval_steps}
        ci_per_seed: dict[str, list[float]] = {str(s): [] for s in cfg.eval_steps}
        histories = []
        start = time.perf_counter()
        for seed in args.seeds:
            theta, history = train(weighting, seed, cfg, progress=not args.quick)
            for steps, errors in evaluate(theta, cfg).items():
                mean, ci = mean_ci(errors)
                per_seed[str(steps)].append(mean)
                ci_per_seed[str(steps)].append(ci)
            histories.append(history)
        summary = {steps: mean_ci(values) for steps, values in per_seed.items()}
        runs[weighting] = {
            "per_seed_mse": per_seed,
            "per_seed_task_ci95": ci_per_seed,
            "mean_mse": {k: v[0] for k, v in summary.items()},
            "ci95_over_seeds": {k: v[1] for k, v in summary.items()},
            "seconds": time.perf_counter() - start,
            "weight_history": histories,
        }

    lines = [
        "| Reptile weighting | MSE, 5 steps | MSE, 32 steps | seeds | time (s) |",
        "|---|---|---|---|---|",
    ]
    for weighting, run in runs.items():
        mean_mse, ci = run["mean_mse"], run["ci95_over_seeds"]  # type: ignore[index]
        cells = [f"{mean_mse[str(s)]:.3f} ± {ci[str(s)]:.3f}" for s in cfg.eval_steps]  # type: ignore[index]
        lines.append(
            f"| {weighting} | {' | '.join(cells)} | {len(args.seeds)} | {run['seconds']:.0f} |"
        )  # type: ignore[index]
    table = "\n".join(lines)
    print(table)
    (args.out / "table.md").write_text(table + "\n")
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
