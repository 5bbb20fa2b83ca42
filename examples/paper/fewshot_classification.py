"""Few-shot classification: MAML and Reptile with and without gradient agreement.

The classification experiments of Eshratifar, Eigen & Pedram (2018), Section 4.2: N-way
K-shot episodes and the 4-block convolutional network of Finn et al. (2017): each block a
3×3 convolution, batch norm, ReLU and 2×2 max-pool; 64 filters for Omniglot (28×28), 32
for miniImageNet (84×84) and for the 8×8 digits (whose last block has no pool left to
take); a linear head over the flattened features. Batch norm uses the statistics of the
batch it sees (support or query set), as in Finn et al.'s code.

Algorithms (each with every requested weighting, on identical seeds, episodes and budget),
all with the meta-batch adapted at once by ``torch.func.vmap`` and the outer update
applied by :class:`ga_optim.adapters.func.FuncAgreement`:

* ``maml``: SGD inner loop on the support set, θ ← θ − β Σ w_i ∇L_i(θ_i) on the query set
  through Adam (second order; Algorithm 1, line 9), agreement measured on the inner-loop
  deltas θ − θ_i (lines 7–9);
* ``fomaml``: the same, first order;
* ``reptile``: SGD inner loop on the support and query sets together,
  θ ← θ + α Σ w_i (θ_i − θ) through SGD (Algorithm 1, line 10).

Corrupted tasks (``--corrupt-fraction RHO``): each training episode is corrupted
independently with probability RHO (the same episodes for every weighting under a seed):
its labels are resampled uniformly among the ``ways`` classes, in the support and the query
set alike (the protocol of Yao et al., *Adaptive Task Scheduler*, 2021). Evaluation
episodes are always clean. The weighting ``oracle`` averages the clean tasks only;
``results.json`` records each run's ``corrupted_weight_share``.

Outer learning rates decay linearly to 0. Evaluation: ``eval_episodes`` episodes from
the test classes and a fixed seed; fine-tune on the support set for ``eval_steps`` SGD
steps; accuracy on the query set; mean ± 95 % CI over episodes per seed, and over seeds.

    python examples/paper/fewshot_classification.py --out results/digits          # offline run
    python examples/paper/fewshot_classification.py --quick --out /tmp/digits      # for CI
    python examples/paper/fewshot_classification.py --dataset omniglot --data-root DATA \\
        --ways 5 --shots 1 --algorithms maml --weightings mean agreement      # your data
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
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
from fewshot_data import (
    FewShotSplit,
    load_digits,
    load_mini_imagenet,
    load_omniglot,
    sample_episodes,
)
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from ga_optim.adapters.func import FuncAgreement, reptile_deltas

ALGORITHMS = ("maml", "fomaml", "reptile")
DATASETS = ("digits", "omniglot", "miniimagenet")
Params = dict[str, Tensor]


@dataclass(frozen=True)
class Config:
    dataset: str = "digits"
    data_root: str | None = None
    algorithm: str = "maml"
    ways: int = 5
    shots: int = 1
    train_queries: int = 5  # query images per class in a training episode
    eval_queries: int = 15  # … and in an evaluation episode
    hidden: int = 32
    iterations: int = 300
    meta_batch: int = 8
    inner_steps: int = 5
    inner_lr: float = 0.1
    outer_lr: float = 1e-3  # MAML: Adam β; Reptile: SGD α (see for_run)
    eval_steps: int = 10
    eval_episodes: int = 600
    eval_chunk: int = 100  # episodes fine-tuned at once in evaluation
    eval_seed: int = 12345
    device: str = "cpu"  # episodes are drawn on the CPU, then moved here
    corrupt_fraction: float = 0.0  # probability that a training episode's labels are noise

    @staticmethod
    def for_run(dataset: str, algorithm: str, **overrides: Any) -> Config:
        """The settings of a dataset: Finn et al.'s (2017, Section 5.2) for Omniglot (5-way
        and 20-way) and miniImageNet; for the digits, Finn et al.'s miniImageNet inner loop
        with a smaller budget (inner lr 0.1 chosen on the Mean baseline)."""
        defaults: dict[str, Any] = {"dataset": dataset, "algorithm": algorithm}
        if dataset == "omniglot" and (overrides.get("ways") or Config.ways) >= 20:
            defaults.update(
                hidden=64, iterations=60_000, meta_batch=16, inner_steps=5, inner_lr=0.1,
                eval_steps=5, eval_episodes=600,
            )  # fmt: skip
        elif dataset == "omniglot":
            defaults.update(
                hidden=64, iterations=60_000, meta_batch=32, inner_steps=1, inner_lr=0.4,
                eval_steps=3, eval_episodes=600,
            )  # fmt: skip
        elif dataset == "miniimagenet":
            defaults.update(
                hidden=32, iterations=60_000, meta_batch=4, inner_steps=5, inner_lr=0.01,
                eval_steps=10, eval_episodes=600, eval_chunk=20, train_queries=15,
            )  # fmt: skip
        if algorithm == "reptile":
            defaults.update(outer_lr=1.0)
        defaults.update({k: v for k, v in overrides.items() if v is not None})
        return Config(**defaults)


@functools.lru_cache(maxsize=4)
def load_split(dataset: str, data_root: str | None, split: str) -> FewShotSplit:
    """The split of a dataset (cached per process: workers load it once)."""
    if dataset == "digits":
        return load_digits(split)
    if data_root is None:
        raise ValueError(f"`--data-root` is required for {dataset}: nothing is downloaded.")
    if dataset == "omniglot":
        return load_omniglot(data_root, split)
    return load_mini_imagenet(data_root, split)


# -- the network ---------------------------------------------------------------------------


class ConvNet(nn.Module):
    """Finn et al.'s 4-block CNN: [conv 3×3, batch norm, ReLU, max-pool 2×2] ×4, linear."""

    def __init__(self, ways: int, channels: int, hidden: int, image_size: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        size = image_size
        for block in range(4):
            layers += [
                nn.Conv2d(channels if block == 0 else hidden, hidden, 3, padding=1),
                nn.BatchNorm2d(hidden, track_running_stats=False),
                nn.ReLU(),
            ]
            if size >= 2:  # the 8×8 digits run out of pixels after three pools
                layers.append(nn.MaxPool2d(2))
                size //= 2
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(hidden * size * size, ways)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).flatten(1))


def build_model(cfg: Config, image_shape: tuple[int, int, int], seed: int) -> ConvNet:
    torch.manual_seed(seed)
    return ConvNet(cfg.ways, image_shape[0], cfg.hidden, image_shape[1]).to(cfg.device)


# -- the inner loop and one meta-iteration of each algorithm -------------------------------


def _loss(model: nn.Module, params: Params, x: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(functional_call(model, params, (x,)), y)


def adapt(model: nn.Module, steps: int, lr: float) -> Callable[[Params, Tensor, Tensor], Params]:
    """One task's inner loop, ``steps`` SGD steps: a function of (θ, x, y), for ``vmap``."""

    def inner(params: Params, x: Tensor, y: Tensor) -> Params:
        for _ in range(steps):
            grads = grad(functools.partial(_loss, model))(params, x, y)
            params = {name: p - lr * grads[name] for name, p in params.items()}
        return params

    return inner


def corrupt_labels(
    labels: tuple[Tensor, Tensor], mask: Tensor, ways: int, gen: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Support and query labels ``[tasks, ·]`` with the tasks in ``mask`` given labels drawn
    uniformly from ``0 … ways−1`` (drawn for every task, so that the generator advances the
    same way whatever the mask)."""
    return tuple(  # type: ignore[return-value]
        torch.where(mask.view(-1, 1), torch.randint(ways, y.shape, generator=gen), y)
        for y in labels
    )


def meta_step(
    model: nn.Module,
    agreement: FuncAgreement,
    cfg: Config,
    episodes: tuple[Tensor, Tensor, Tensor, Tensor],
    on_meta_gradients: bool = False,
) -> Tensor:
    """One meta-iteration over a meta-batch of episodes; returns the task weights."""
    xs, ys, xq, yq = episodes
    params = {name: p.detach() for name, p in model.named_parameters()}
    inner = adapt(model, cfg.inner_steps, cfg.inner_lr)
    if cfg.algorithm == "reptile":
        x, y = torch.cat([xs, xq], dim=1), torch.cat([ys, yq], dim=1)
        adapted = vmap(inner, in_dims=(None, 0, 0))(params, x, y)
        return agreement.step(reptile_deltas(params, adapted))  # g_i = θ − θ_i
    if cfg.algorithm == "maml":

        def query_loss(p: Params, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> Any:
            fast = inner(p, xs, ys)
            return _loss(model, fast, xq, yq), fast

        meta, adapted = vmap(grad(query_loss, has_aux=True), in_dims=(None, 0, 0, 0, 0))(
            params, xs, ys, xq, yq
        )
    else:
        adapted = vmap(inner, in_dims=(None, 0, 0))(params, xs, ys)
        meta = vmap(grad(functools.partial(_loss, model)))(adapted, xq, yq)
    deltas = None if on_meta_gradients else reptile_deltas(params, adapted)
    return agreement.step(meta, agreement_vectors=deltas)


# -- training and evaluation ---------------------------------------------------------------


def train(
    model: nn.Module, weighting: str, seed: int, cfg: Config, progress: bool = False
) -> dict[str, Any]:
    """Meta-train ``model`` in place; returns the weight statistics over training."""
    check_combination(cfg.algorithm, weighting)
    split = load_split(cfg.dataset, cfg.data_root, "train")
    gen = torch.Generator().manual_seed(seed)
    outer, schedule = outer_optimizer(
        model.parameters(), cfg.algorithm, cfg.outer_lr, cfg.iterations
    )
    corruption = Corruption(cfg.corrupt_fraction, seed)
    agreement = FuncAgreement(model, outer, weighting=make_weighting(weighting, corruption))

    def step() -> Tensor:
        xs, ys, xq, yq = sample_episodes(
            split, cfg.meta_batch, cfg.ways, cfg.shots, cfg.train_queries, gen
        )
        mask = corruption.draw(cfg.meta_batch)
        ys, yq = corrupt_labels((ys, yq), mask, cfg.ways, corruption.noise)
        on_device = tuple(t.to(cfg.device) for t in (xs, ys, xq, yq))
        outer.zero_grad()  # the adapter adds to .grad, as backward() does
        return meta_step(model, agreement, cfg, on_device, measures_meta_gradients(weighting))

    desc = f"{cfg.algorithm} {cfg.shots}-shot {weighting} seed {seed}"
    return meta_train(step, schedule, cfg.iterations, desc, progress, corruption)


def evaluate(model: nn.Module, cfg: Config) -> list[float]:
    """Query accuracy of each evaluation episode after fine-tuning on its support set."""
    split = load_split(cfg.dataset, cfg.data_root, "test")
    gen = torch.Generator().manual_seed(cfg.eval_seed)
    params = {name: p.detach() for name, p in model.named_parameters()}
    inner = adapt(model, cfg.eval_steps, cfg.inner_lr)

    def accuracy(p: Params, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> Tensor:
        fast = inner(p, xs, ys)
        predicted = functional_call(model, fast, (xq,)).argmax(-1)
        return (predicted == yq).float().mean()

    accuracies: list[float] = []
    while len(accuracies) < cfg.eval_episodes:
        n = min(cfg.eval_chunk, cfg.eval_episodes - len(accuracies))
        episodes = sample_episodes(split, n, cfg.ways, cfg.shots, cfg.eval_queries, gen)
        on_device = [t.to(cfg.device) for t in episodes]
        accuracies += vmap(accuracy, in_dims=(None, 0, 0, 0, 0))(params, *on_device).tolist()
    return accuracies


def run_one(job: tuple[str, int, Config, bool]) -> dict[str, Any]:
    """Train and evaluate one (weighting, seed): the unit a worker process runs."""
    weighting, seed, cfg, progress = job
    torch.set_num_threads(1)
    start = time.perf_counter()
    image_shape = load_split(cfg.dataset, cfg.data_root, "train").image_shape
    model = build_model(cfg, image_shape, seed)
    history = train(model, weighting, seed, cfg, progress)
    if history["diverged_at"] is None:
        accuracy = mean_ci(evaluate(model, cfg))
    else:
        accuracy = (float("nan"), float("nan"))
    return {
        "algorithm": cfg.algorithm,
        "shots": cfg.shots,
        "weighting": weighting,
        "seed": seed,
        "history": history,
        "accuracy": accuracy,
        "corrupted_weight_share": history["corrupted_weight_share"],
        "seconds": time.perf_counter() - start,
    }


# -- output --------------------------------------------------------------------------------


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """``{"<algorithm> <shots>-shot": {weighting: per-seed and over-seed accuracy}}``."""
    summary: dict[str, Any] = {}
    for run in runs:
        key = f"{run['algorithm']} {run['shots']}-shot"
        entry = summary.setdefault(key, {}).setdefault(
            run["weighting"],
            {
                "seeds": [],
                "per_seed_accuracy": [],
                "per_seed_episode_ci95": [],
                "seconds": 0.0,
                "diverged": 0,
                "weight_history": [],
                "per_seed_corrupted_weight_share": [],
            },
        )
        entry["seeds"].append(run["seed"])
        entry["per_seed_corrupted_weight_share"].append(run["corrupted_weight_share"])
        entry["per_seed_accuracy"].append(run["accuracy"][0])
        entry["per_seed_episode_ci95"].append(run["accuracy"][1])
        entry["seconds"] += run["seconds"]
        entry["diverged"] += run["history"]["diverged_at"] is not None
        entry["weight_history"].append(run["history"])
    for by_weighting in summary.values():
        for entry in by_weighting.values():
            entry["accuracy"], entry["ci95_over_seeds"] = mean_ci(entry["per_seed_accuracy"])
            entry["corrupted_weight_share"] = mean_ci(entry["per_seed_corrupted_weight_share"])
    return summary


def table(summary: dict[str, Any], cfg: Config) -> str:
    lines = [
        f"| {cfg.dataset} {cfg.ways}-way | weighting | accuracy (%) | seeds | CPU time (s) |",
        "|---|---|---|---|---|",
    ]
    for key, by_weighting in summary.items():
        for weighting, entry in by_weighting.items():
            if entry["diverged"]:
                cell = f"diverged in {entry['diverged']} of {len(entry['seeds'])} seeds"
            else:
                cell = f"{100 * entry['accuracy']:.1f} ± {100 * entry['ci95_over_seeds']:.1f}"
            lines.append(
                f"| {key} | {weighting} | {cell} | {len(entry['seeds'])} | {entry['seconds']:.0f} |"
            )
    return "\n".join(lines)


def plot(results: dict[str, dict[str, Any]], title: str, path: Path, dpi: int = 110) -> bool:
    """Accuracy ± 95 % CI per configuration and weighting, and the share of negative
    weights over training (mean over seeds); ``results`` as in ``results.json``. False
    (and no file) without matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
    keys = list(results)
    weightings = list(dict.fromkeys(w for k in keys for w in results[k]))
    fig, (bars, negative) = plt.subplots(1, 2, figsize=(11, 3.6))
    width = 0.8 / len(weightings)
    for j, weighting in enumerate(weightings):
        xs = [i + (j - (len(weightings) - 1) / 2) * width for i in range(len(keys))]
        entries = [results[k].get(weighting) for k in keys]
        heights = [100 * e["accuracy"] if e else 0.0 for e in entries]
        errors = [100 * e["ci95_over_seeds"] if e else 0.0 for e in entries]
        bars.bar(xs, heights, width, yerr=errors, capsize=3, label=weighting)
    bars.set_xticks(range(len(keys)), keys)
    low = min(100 * e["accuracy"] for k in keys for e in results[k].values())
    bars.set_ylim(max(0.0, low - 10), 100)
    bars.set_ylabel("accuracy on the test classes (%)")
    bars.legend(fontsize=7)
    bars.set_title(f"{title}: mean ± 95 % CI over seeds")
    for key in keys:
        for weighting, entry in results[key].items():
            if weighting == "mean":
                continue
            histories = entry["weight_history"]
            share = [statistics.fmean(h) for h in zip(*(h["negative_share"] for h in histories))]
            negative.plot(histories[0]["iteration"], share, label=f"{key}, {weighting}")
    negative.set_xlabel("meta-iteration")
    negative.set_ylabel("share of negative weights")
    negative.set_title("negative task weights (mean over seeds)")
    negative.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description="Few-shot classification with and without gradient agreement."
    )
    parser.add_argument("--dataset", default="digits", choices=DATASETS)
    parser.add_argument("--data-root", help="the folder holding the data (not for digits)")
    parser.add_argument("--out", type=Path, default=Path("results/digits"))
    parser.add_argument("--algorithms", nargs="+", default=["maml", "reptile"], choices=ALGORITHMS)
    parser.add_argument(
        "--weightings", nargs="+", default=["mean", "agreement"], choices=sorted(WEIGHTINGS)
    )
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--train-queries", type=int, help="query images per class in training")
    parser.add_argument("--eval-queries", type=int, help="… and in evaluation (default 15)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--iterations", type=int)
    parser.add_argument("--meta-batch", type=int)
    parser.add_argument("--outer-lr", type=float)
    parser.add_argument(
        "--corrupt-fraction",
        type=float,
        default=0.0,
        metavar="RHO",
        help="probability that a training episode's labels are resampled (evaluation is clean)",
    )
    parser.add_argument("--eval-episodes", type=int, help="default: 600")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (one thread each)")
    parser.add_argument("--device", help="e.g. cuda (default: cpu)")
    parser.add_argument("--quick", action="store_true", help="a tiny run (seconds), for CI")
    args = parser.parse_args(argv)
    if not 0.0 <= args.corrupt_fraction <= 1.0:
        parser.error(f"--corrupt-fraction should be in [0, 1]. Found {args.corrupt_fraction}.")

    overrides = {
        "device": args.device,
        "data_root": args.data_root,
        "ways": args.ways,
        "train_queries": args.train_queries,
        "eval_queries": args.eval_queries,
        "iterations": args.iterations,
        "meta_batch": args.meta_batch,
        "outer_lr": args.outer_lr,
        "eval_episodes": args.eval_episodes,
        "corrupt_fraction": args.corrupt_fraction,
    }
    if args.quick:
        overrides.update(iterations=args.iterations or 10, eval_episodes=20)
        args.seeds = args.seeds[:2]
    jobs = [
        (
            w,
            s,
            Config.for_run(args.dataset, a, shots=k, **overrides),
            not args.quick and args.jobs == 1,  # bars of parallel runs would interleave
        )
        for a in args.algorithms
        for k in args.shots
        for w in args.weightings
        if combines(a, w)
        for s in args.seeds
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    runs = run_jobs(run_one, jobs, args.jobs, args.quick)
    runs.sort(
        key=lambda r: (
            args.algorithms.index(r["algorithm"]),
            r["shots"],
            args.weightings.index(r["weighting"]),
            r["seed"],
        )
    )
    summary = summarize(runs)
    text = table(summary, jobs[0][2])
    print(text)
    (args.out / "table.md").write_text(text + "\n")
    configs = {f"{cfg.algorithm} {cfg.shots}-shot": asdict(cfg) for _, _, cfg, _ in jobs}
    results = {
        "wall_seconds": time.perf_counter() - started,
        "configs": configs,
        "results": summary,
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    figure = args.out / "figure.png"
    title = f"{args.ways}-way {args.dataset}"
    if plot(summary, title, figure, dpi=50 if args.quick else 110):
        print(f"wrote {figure}")
    return results


if __name__ == "__main__":
    main()
