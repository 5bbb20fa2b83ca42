"""What the examples share: the weightings they compare, the meta-training loop's
bookkeeping (weight statistics, divergence), confidence intervals, progress bars and
running (weighting, seed) jobs in parallel processes."""

from __future__ import annotations

import math
import multiprocessing
import statistics
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from ga_optim import (
    Agreement,
    CosineAgreement,
    Mean,
    NonFiniteError,
    NonNegativeAgreement,
    Weighting,
    from_torchjd,
)

__all__ = [
    "WEIGHTINGS",
    "check_combination",
    "combines",
    "mean_ci",
    "meta_train",
    "outer_optimizer",
    "progress",
    "run_jobs",
]


def _torchjd(name: str) -> Callable[[], Weighting]:
    """A TorchJD Gramian weighting by name, made when asked (torchjd is an extra)."""

    def make() -> Weighting:
        from torchjd import aggregation

        return from_torchjd(getattr(aggregation, name)())

    return make


#: The weightings the examples compare. ``agreement_meta`` is the paper's Eq. 13 measured
#: on MAML's meta-gradients instead of the inner-loop deltas (MAML only); ``upgrad``,
#: ``mgda`` and ``dualproj`` are TorchJD's (``pip install 'ga-optim[torchjd]'``).
WEIGHTINGS: dict[str, Callable[[], Weighting]] = {
    "mean": Mean,
    "agreement": Agreement,
    "agreement_meta": Agreement,
    "nonnegative": NonNegativeAgreement,
    "cosine": CosineAgreement,
    "upgrad": _torchjd("UPGradWeighting"),
    "mgda": _torchjd("MGDAWeighting"),
    "dualproj": _torchjd("DualProjWeighting"),
}


def combines(algorithm: str, weighting: str) -> bool:
    """Whether ``weighting`` applies to ``algorithm`` (``agreement_meta`` is MAML only)."""
    return not (weighting == "agreement_meta" and algorithm == "reptile")


def check_combination(algorithm: str, weighting: str) -> None:
    if not combines(algorithm, weighting):
        raise ValueError("`agreement_meta` measures agreement on MAML's meta-gradients.")


def outer_optimizer(
    params: Iterable[Tensor], algorithm: str, lr: float, iterations: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """SGD (Reptile's α) or Adam (MAML's β), its learning rate annealed linearly to 0."""
    optimizer: torch.optim.Optimizer
    if algorithm == "reptile":
        optimizer = torch.optim.SGD(params, lr=lr)
    else:
        optimizer = torch.optim.Adam(params, lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 1.0 - it / iterations)
    return optimizer, schedule


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of a 95 % normal confidence interval (NaN if any is NaN)."""
    if any(math.isnan(v) for v in values):
        return math.nan, math.nan
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan")
    return mean, 1.96 * statistics.stdev(values) / math.sqrt(len(values))


def progress(total: int, desc: str, enabled: bool) -> Any:
    """A tqdm bar, or ``None`` when disabled or tqdm is not installed."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, leave=False, mininterval=2.0)


def meta_train(
    step: Callable[[], Tensor],
    schedule: torch.optim.lr_scheduler.LRScheduler,
    iterations: int,
    desc: str,
    show_progress: bool,
) -> dict[str, Any]:
    """Run ``step`` (one meta-iteration, returning the task weights) ``iterations`` times.

    Returns the weights' history (min, max, share of negative weights at 200 points) and
    ``diverged_at``: the aggregator refuses non-finite task vectors before touching θ, so
    a run that diverges stops there and is recorded as a result instead of raising.
    """
    history: dict[str, Any] = {"iteration": [], "min": [], "max": [], "negative_share": []}
    history["diverged_at"] = None
    bar = progress(iterations, desc, show_progress)
    for iteration in range(iterations):
        try:
            weights = step()
        except NonFiniteError:
            history["diverged_at"] = iteration
            break
        schedule.step()
        if iteration % max(1, iterations // 200) == 0:
            history["iteration"].append(iteration)
            history["min"].append(float(weights.min()))
            history["max"].append(float(weights.max()))
            history["negative_share"].append(float((weights < 0).float().mean()))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return history


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend, or ``None`` (with a note) when
    matplotlib is not installed: the figures are optional, the tables are not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no figures")
        return None
    return plt


def run_jobs(
    run_one: Callable[[Any], dict[str, Any]], jobs: list[Any], workers: int, quiet: bool
) -> list[dict[str, Any]]:
    """``run_one`` over ``jobs``, in ``workers`` spawned processes when more than one."""
    if workers > 1 and len(jobs) > 1:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            return _with_bar(pool.imap_unordered(run_one, jobs), len(jobs), quiet)
    return _with_bar(map(run_one, jobs), len(jobs), quiet)


def _with_bar(iterator: Iterable[dict[str, Any]], total: int, quiet: bool) -> list[dict[str, Any]]:
    bar = progress(total, "runs (algorithm × weighting × seed)", not quiet)
    runs = []
    for run in iterator:
        runs.append(run)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return runs
