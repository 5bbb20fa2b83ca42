"""Sine-wave regression: Reptile and MAML with and without gradient agreement.

The README's main job, and the sine experiment of Eshratifar, Eigen & Pedram (2018),
Section 4.1: y = a·sin(x + b), a ~ U[0.1, 5], b ~ U[0, 2π], x ~ U[-5, 5]; an MLP
1→64→64→1 (tanh).

Algorithms (each with every requested weighting, on identical seeds, tasks and budget):

* ``reptile``: each task adapts a copy of θ by 5 SGD steps (lr 0.02) on 5 minibatches of
  10 of its 50 points; ``GradientAgreementAggregator.step`` applies
  θ ← θ + α Σ w_i (θ_i − θ) through SGD, α = ``--outer-lr`` (default 2.0) annealed
  linearly to 0 (Algorithm 1, line 10);
* ``maml`` / ``fomaml``: 5 SGD steps (lr 0.02) on 10 support points, the query loss on 10
  other points; θ ← θ − β Σ w_i ∇L_i(θ_i) through Adam (lr 1e-3 annealed to 0), second or
  first order (Algorithm 1, line 9).

Weightings: ``mean`` (plain batched Reptile/MAML), ``agreement`` (the paper's Eq. 13, for
MAML measured on the inner-loop deltas θ − θ_i as in Algorithm 1, lines 7–9),
``agreement_meta`` (MAML only: measured on the meta-gradients instead; likewise
``geometric_median_meta``), ``nonnegative``
and ``cosine`` (the library's opt-in variants).

The N tasks of a meta-batch are adapted together: every parameter carries a leading task
dimension and the forward pass is a batched matmul. Seeds run in parallel processes.

Corrupted tasks (``--corrupt-fraction RHO``): each training task is corrupted
independently with probability RHO (the same tasks for every weighting under a seed;
evaluation tasks are always clean): ``--corruption noise`` replaces its targets by Gaussian
noise with the clean targets' standard deviation (a direction outlier), ``amplitude``
multiplies them by 10 (a magnitude outlier). The weighting ``oracle`` averages the clean
tasks only; ``results.json`` records each run's ``corrupted_weight_share``.

Evaluation: 1000 unseen tasks from a fixed seed (the same for every run); fine-tune θ on
K = 10 points with SGD (lr 0.02) for 5 and 32 steps; MSE on 100 evenly spaced points over
[-5, 5]; mean ± 95 % CI over tasks per seed, and over seeds.

    python examples/paper/sine_regression.py --out results/sine             # the default run
    python examples/paper/sine_regression.py --quick --out /tmp/sine        # seconds, for CI
    python examples/paper/sine_regression.py --algorithms reptile maml fomaml \\
        --weightings mean agreement nonnegative cosine agreement_meta --seeds 0 1 2 3 4
    python examples/paper/sine_regression.py --corrupt-fraction 0.2 --corruption noise \\
        --weightings mean oracle leave_one_out geometric_median --out results/sine-noise
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from _common import (
    WEIGHTINGS,
    Corruption,
    check_combination,
    combines,
    make_weighting,
    mean_ci,
    measures_meta_gradients,
    meta_train,
    outer_optimizer,
    pyplot,
    run_jobs,
)
from torch import Tensor

from ga_optim import GradientAgreementAggregator

ALGORITHMS = ("reptile", "maml", "fomaml")
CORRUPTIONS = ("noise", "amplitude")


@dataclass(frozen=True)
class Config:
    algorithm: str = "reptile"
    iterations: int = 10_000
    meta_batch: int = 10
    inner_steps: int = 5
    inner_batch: int = 10  # Reptile: points per inner step (5 steps over 50 points)
    inner_lr: float = 0.02
    # Reptile: SGD α (2.0: the best stable value of a sweep for the Mean baseline, see
    # docs/RESULTS.md); MAML: Adam β (1e-3, see for_algorithm).
    outer_lr: float = 2.0
    shots: int = 10  # MAML support (and query) points per task
    eval_tasks: int = 1000
    eval_shots: int = 10
    eval_steps: tuple[int, ...] = (5, 32)
    eval_seed: int = 12345
    corrupt_fraction: float = 0.0  # probability that a training task is corrupted
    corruption: str = "noise"  # "noise" (targets → Gaussian noise) or "amplitude" (× 10)

    @staticmethod
    def for_algorithm(algorithm: str, **overrides: Any) -> Config:
        defaults: dict[str, Any] = {"algorithm": algorithm}
        if algorithm != "reptile":
            defaults.update(iterations=8_000, outer_lr=1e-3)
        defaults.update({k: v for k, v in overrides.items() if v is not None})
        return Config(**defaults)


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


def task_losses(params: list[Tensor], x: Tensor, y: Tensor) -> Tensor:
    """Per-task MSE [n]; their sum keeps each task's gradient its own."""
    return ((forward(params, x) - y) ** 2).mean(dim=(1, 2))


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
        grads = torch.autograd.grad(task_losses(fast, xb, yb).sum(), fast)
        with torch.no_grad():
            for p, g in zip(fast, grads):
                p.sub_(lr * g)
    return [p.detach() for p in fast]


def corrupt(y: Tensor, mask: Tensor, kind: str, gen: torch.Generator) -> Tensor:
    """The targets ``y [n, points, 1]`` with the tasks in ``mask`` corrupted: ``noise``
    replaces them by Gaussian noise with each task's own standard deviation, ``amplitude``
    multiplies them by 10. The noise is drawn for every task (and used for the masked
    ones), so the generator advances the same way whatever the mask."""
    if kind == "noise":
        noise = torch.randn(y.shape, generator=gen) * y.std(dim=1, keepdim=True)
        return torch.where(mask.view(-1, 1, 1), noise, y)
    if kind == "amplitude":
        return torch.where(mask.view(-1, 1, 1), 10.0 * y, y)
    raise ValueError(f"`corruption` should be one of {CORRUPTIONS}. Found {kind!r}.")


def _per_task(stacked: list[Tensor]) -> list[list[Tensor]]:
    """[N, ...] per parameter → N per-task lists of views."""
    return [list(row) for row in zip(*(t.unbind(0) for t in stacked))]


# -- one meta-iteration of each algorithm --------------------------------------------------


def reptile_step(
    theta: list[Tensor],
    aggregator: GradientAgreementAggregator,
    cfg: Config,
    gen: torch.Generator,
    corruption: Corruption | None = None,
) -> Tensor:
    _, _, x, y = sample_tasks(cfg.meta_batch, cfg.inner_steps * cfg.inner_batch, gen)
    if corruption is not None:
        y = corrupt(y, corruption.draw(cfg.meta_batch), cfg.corruption, corruption.noise)
    batched = [p.detach().unsqueeze(0).expand(cfg.meta_batch, *p.shape) for p in theta]
    adapted = adapt(batched, x, y, cfg.inner_steps, cfg.inner_lr, cfg.inner_batch)
    deltas = [b - a for b, a in zip(batched, adapted)]  # g_i = θ − θ_i
    return aggregator.step(_per_task(deltas))


def maml_step(
    theta: list[Tensor],
    aggregator: GradientAgreementAggregator,
    cfg: Config,
    gen: torch.Generator,
    on_meta_gradients: bool,
    corruption: Corruption | None = None,
) -> Tensor:
    _, _, x, y = sample_tasks(cfg.meta_batch, 2 * cfg.shots, gen)
    if corruption is not None:  # the support and the query set alike
        y = corrupt(y, corruption.draw(cfg.meta_batch), cfg.corruption, corruption.noise)
    xs, ys, xq, yq = x[:, : cfg.shots], y[:, : cfg.shots], x[:, cfg.shots :], y[:, cfg.shots :]
    # One leaf copy of θ per task: the gradient with respect to it is that task's own.
    start = [
        p.detach().unsqueeze(0).repeat(cfg.meta_batch, *([1] * p.dim())).requires_grad_()
        for p in theta
    ]
    second_order = cfg.algorithm == "maml"
    fast = start
    for _ in range(cfg.inner_steps):
        grads = torch.autograd.grad(
            task_losses(fast, xs, ys).sum(), fast, create_graph=second_order
        )
        fast = [w - cfg.inner_lr * g for w, g in zip(fast, grads)]
    meta = torch.autograd.grad(task_losses(fast, xq, yq).sum(), start)
    deltas = [s.detach() - f.detach() for s, f in zip(start, fast)]
    agreement = None if on_meta_gradients else _per_task(deltas)
    return aggregator.step(_per_task([m.detach() for m in meta]), agreement_vectors=agreement)


# -- training and evaluation ---------------------------------------------------------------


def train(
    weighting: str, seed: int, cfg: Config, progress: bool = False
) -> tuple[list[Tensor], dict[str, Any]]:
    """Meta-train θ; returns it and the weight statistics over training."""
    check_combination(cfg.algorithm, weighting)
    gen = torch.Generator().manual_seed(seed)
    theta = [p.requires_grad_() for p in init_mlp(gen)]
    outer, schedule = outer_optimizer(theta, cfg.algorithm, cfg.outer_lr, cfg.iterations)
    corruption = Corruption(cfg.corrupt_fraction, seed)
    aggregator = GradientAgreementAggregator(
        theta, outer, weighting=make_weighting(weighting, corruption)
    )

    def step() -> Tensor:
        outer.zero_grad()  # the aggregator adds to .grad, as backward() does
        if cfg.algorithm == "reptile":
            return reptile_step(theta, aggregator, cfg, gen, corruption)
        return maml_step(
            theta, aggregator, cfg, gen, measures_meta_gradients(weighting), corruption
        )

    desc = f"{cfg.algorithm} {weighting} seed {seed}"
    history = meta_train(step, schedule, cfg.iterations, desc, progress, corruption)
    return [p.detach() for p in theta], history


AMPLITUDE_BINS = (0.1, 1.0, 2.0, 3.0, 4.0, 5.0)


def amplitude_bins(cfg: Config, errors: list[float]) -> list[float]:
    """Mean MSE of the evaluation tasks in each amplitude bin of :data:`AMPLITUDE_BINS`."""
    amplitude = sample_tasks(
        cfg.eval_tasks, cfg.eval_shots, torch.Generator().manual_seed(cfg.eval_seed)
    )[0]
    a = amplitude.view(-1)
    values = torch.tensor(errors)
    means = []
    for low, high in itertools.pairwise(AMPLITUDE_BINS):
        inside = (a >= low) & (a < high) if high < AMPLITUDE_BINS[-1] else (a >= low)
        means.append(float(values[inside].mean()) if bool(inside.any()) else math.nan)
    return means


def evaluate(theta: list[Tensor], cfg: Config) -> dict[int, list[float]]:
    """Per-task MSE after each number of fine-tuning steps, on the fixed evaluation tasks."""
    gen = torch.Generator().manual_seed(cfg.eval_seed)
    amplitude, phase, x, y = sample_tasks(cfg.eval_tasks, cfg.eval_shots, gen)
    grid = torch.linspace(-5, 5, 100).view(1, 100, 1).expand(cfg.eval_tasks, 100, 1)
    truth = amplitude * torch.sin(grid + phase)
    current = [p.unsqueeze(0).expand(cfg.eval_tasks, *p.shape) for p in theta]
    results: dict[int, list[float]] = {}
    done = 0
    for steps in sorted(cfg.eval_steps):
        current = adapt(current, x, y, steps - done, cfg.inner_lr, None)
        done = steps
        with torch.no_grad():
            results[steps] = task_losses(current, grid, truth).tolist()
    return results


def run_one(job: tuple[str, int, Config, bool]) -> dict[str, Any]:
    """Train and evaluate one (weighting, seed): the unit a worker process runs."""
    weighting, seed, cfg, progress = job
    torch.set_num_threads(1)
    start = time.perf_counter()
    theta, history = train(weighting, seed, cfg, progress)
    if history["diverged_at"] is None:
        errors = evaluate(theta, cfg)
        by_amplitude = {str(k): amplitude_bins(cfg, v) for k, v in errors.items()}
    else:
        errors = {steps: [math.nan] for steps in cfg.eval_steps}
        by_amplitude = {}
    return {
        "algorithm": cfg.algorithm,
        "weighting": weighting,
        "seed": seed,
        "theta": [t.tolist() for t in theta],
        "history": history,
        "mse": {str(k): mean_ci(v) for k, v in errors.items()},
        "mse_by_amplitude": by_amplitude,
        "corrupted_weight_share": history["corrupted_weight_share"],
        "seconds": time.perf_counter() - start,
    }


# -- output --------------------------------------------------------------------------------


def summarize(runs: list[dict[str, Any]], cfgs: dict[str, Config]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for run in runs:
        entry = summary.setdefault(run["algorithm"], {}).setdefault(
            run["weighting"],
            {
                "seeds": [],
                "per_seed_mse": {},
                "per_seed_task_ci95": {},
                "seconds": 0.0,
                "weight_history": [],
                "per_seed_mse_by_amplitude": [],
                "per_seed_corrupted_weight_share": [],
            },
        )
        entry["seeds"].append(run["seed"])
        entry["per_seed_corrupted_weight_share"].append(run["corrupted_weight_share"])
        entry["seconds"] += run["seconds"]
        entry["weight_history"].append(run["history"])
        entry["per_seed_mse_by_amplitude"].append(run["mse_by_amplitude"])
        for steps, (mean, ci) in run["mse"].items():
            entry["per_seed_mse"].setdefault(steps, []).append(mean)
            entry["per_seed_task_ci95"].setdefault(steps, []).append(ci)
    summary["amplitude_bins"] = list(AMPLITUDE_BINS)
    for algorithm, by_weighting in summary.items():
        if algorithm == "amplitude_bins":
            continue
        for entry in by_weighting.values():
            entry["mean_mse"] = {k: mean_ci(v)[0] for k, v in entry["per_seed_mse"].items()}
            entry["ci95_over_seeds"] = {k: mean_ci(v)[1] for k, v in entry["per_seed_mse"].items()}
            entry["corrupted_weight_share"] = mean_ci(entry["per_seed_corrupted_weight_share"])
        by_weighting["config"] = asdict(cfgs[algorithm])
    return summary


def table(summary: dict[str, Any]) -> str:
    lines = [
        "| algorithm | weighting | MSE after 5 steps | MSE after 32 steps | seeds | CPU time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for algorithm, by_weighting in summary.items():
        if algorithm == "amplitude_bins":
            continue
        for weighting, entry in by_weighting.items():
            if weighting == "config":
                continue
            diverged = sum(h["diverged_at"] is not None for h in entry["weight_history"])
            if diverged:
                cells = [f"diverged in {diverged} of {len(entry['seeds'])} seeds"] * 2
            else:
                cells = [
                    f"{entry['mean_mse'][s]:.3f} ± {entry['ci95_over_seeds'][s]:.3f}"
                    for s in ("5", "32")
                ]
            lines.append(
                f"| {algorithm} | {weighting} | {cells[0]} | {cells[1]} | "
                f"{len(entry['seeds'])} | {entry['seconds']:.0f} |"
            )
    return "\n".join(lines)


def plot(
    runs: list[dict[str, Any]], cfgs: dict[str, Config], out: Path, dpi: int = 110
) -> list[Path]:
    """Figure 1 of the paper (one unseen task: the initialisation before training and
    after each weighting, each with its fine-tuned fit) and the weights over training;
    none without matplotlib."""
    plt = pyplot()
    if plt is None:
        return []
    written = []
    first_seed = min(run["seed"] for run in runs)
    for algorithm, cfg in cfgs.items():
        chosen = [r for r in runs if r["algorithm"] == algorithm and r["seed"] == first_seed]
        gen = torch.Generator().manual_seed(cfg.eval_seed + 1)
        amplitude, phase, x, y = sample_tasks(1, cfg.eval_shots, gen)
        grid = torch.linspace(-5, 5, 200).view(1, 200, 1)
        panels = [("before training", init_mlp(torch.Generator().manual_seed(first_seed)))]
        panels += [(r["weighting"], [torch.tensor(t) for t in r["theta"]]) for r in chosen]
        fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), sharey=True)
        for ax, (title, theta) in zip(axes, panels):
            single = [p.unsqueeze(0) for p in theta]
            tuned = adapt(single, x, y, 5, cfg.inner_lr, None)
            with torch.no_grad():
                ax.plot(
                    grid[0, :, 0], (amplitude * torch.sin(grid + phase))[0, :, 0], "k", label="true"
                )
                ax.plot(grid[0, :, 0], forward(single, grid)[0, :, 0], ":", label="initialisation")
                ax.plot(grid[0, :, 0], forward(tuned, grid)[0, :, 0], "-", label="after 5 steps")
            ax.scatter(x[0, :, 0], y[0, :, 0], marker="^", color="C3", label="10 shots")
            ax.set_title(f"{algorithm}: {title}")
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        path = out / f"figure1_{algorithm}.png"
        fig.savefig(path, dpi=dpi)
        plt.close(fig)
        written.append(path)

        fig, ax = plt.subplots(figsize=(6, 3.2))
        for r in chosen:
            if r["weighting"] == "mean":
                continue
            h = r["history"]
            ax.plot(h["iteration"], h["min"], label=f"{r['weighting']}: min w")
            ax.plot(h["iteration"], h["max"], "--", label=f"{r['weighting']}: max w")
            ax.plot(h["iteration"], h["negative_share"], ":", label=f"{r['weighting']}: share < 0")
        ax.axhline(1 / cfg.meta_batch, color="k", lw=0.5)
        ax.set_xlabel("meta-iteration")
        ax.set_title(f"{algorithm}: task weights over training (seed {first_seed})")
        ax.legend(fontsize=6)
        fig.tight_layout()
        path = out / f"weights_{algorithm}.png"
        fig.savefig(path, dpi=dpi)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description="Reptile / MAML with and without gradient agreement on sine tasks."
    )
    parser.add_argument("--out", type=Path, default=Path("results/sine"))
    parser.add_argument("--algorithms", nargs="+", default=["reptile"], choices=ALGORITHMS)
    parser.add_argument(
        "--weightings", nargs="+", default=["mean", "agreement"], choices=sorted(WEIGHTINGS)
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--iterations", type=int, help="default: 10000 (Reptile), 8000 (MAML)")
    parser.add_argument("--meta-batch", type=int)
    parser.add_argument(
        "--outer-lr", type=float, help="default: 2.0 (Reptile SGD), 1e-3 (MAML Adam)"
    )
    parser.add_argument(
        "--corrupt-fraction",
        type=float,
        default=0.0,
        metavar="RHO",
        help="probability that a training task is corrupted (evaluation stays clean)",
    )
    parser.add_argument(
        "--corruption",
        default="noise",
        choices=CORRUPTIONS,
        help="noise: targets replaced by Gaussian noise; amplitude: targets × 10",
    )
    parser.add_argument("--eval-tasks", type=int, help="default: 1000")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (one thread each)")
    parser.add_argument("--quick", action="store_true", help="a tiny run (seconds), for CI")
    args = parser.parse_args(argv)
    if not 0.0 <= args.corrupt_fraction <= 1.0:
        parser.error(f"--corrupt-fraction should be in [0, 1]. Found {args.corrupt_fraction}.")

    cfgs = {
        a: Config.for_algorithm(
            a,
            iterations=args.iterations,
            meta_batch=args.meta_batch,
            outer_lr=args.outer_lr,
            eval_tasks=args.eval_tasks,
            corrupt_fraction=args.corrupt_fraction,
            corruption=args.corruption,
        )
        for a in args.algorithms
    }
    if args.quick:
        cfgs = {a: replace(c, iterations=40, eval_tasks=50) for a, c in cfgs.items()}
        args.seeds = args.seeds[:2]
    jobs = [
        (w, s, cfgs[a], not args.quick and args.jobs == 1)
        for a in args.algorithms
        for w in args.weightings
        if combines(a, w)
        for s in args.seeds
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    runs = run_jobs(run_one, jobs, args.jobs, args.quick)
    runs.sort(
        key=lambda r: (
            ALGORITHMS.index(r["algorithm"]),
            args.weightings.index(r["weighting"]),
            r["seed"],
        )
    )

    summary = summarize(runs, cfgs)
    text = table(summary)
    print(text)
    (args.out / "table.md").write_text(text + "\n")
    results = {"wall_seconds": time.perf_counter() - started, "results": summary}
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    figures = plot(runs, cfgs, args.out, dpi=50 if args.quick else 110)
    for path in figures:
        print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
