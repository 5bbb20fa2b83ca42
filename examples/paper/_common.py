"""What the examples share: the weightings they compare, corrupted training tasks and the
oracle that knows them, the meta-training loop's bookkeeping (weight statistics,
divergence, the weight given to corrupted tasks), confidence intervals, progress bars and
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
    GeometricMedian,
    LeaveOneOutAgreement,
    Mean,
    NonFiniteError,
    NonNegativeAgreement,
    Weighting,
    from_torchjd,
)

__all__ = [
    "WEIGHTINGS",
    "Corruption",
    "Oracle",
    "check_combination",
    "combines",
    "make_weighting",
    "mean_ci",
    "measures_meta_gradients",
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


class Corruption:
    """Which training tasks of each meta-batch are corrupted, and how much weight they get.

    Each task is corrupted independently with probability ``fraction``, drawn from a
    generator of its own (seeded from the run's seed), so that under a seed every weighting
    sees the same corrupted tasks (and every corruption kind the same mask) and a run with
    ``fraction = 0`` draws exactly the tasks of a run without corruption. What replaces a
    corrupted task's targets is drawn from a second generator, :attr:`noise`.
    :meth:`record` keeps the share of the weight the corrupted tasks got,
    ``Σ_{i corrupted}|w_i| / Σ_i|w_i|``, averaged by :attr:`weight_share` over the steps.
    """

    def __init__(self, fraction: float, seed: int) -> None:
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"`--corrupt-fraction` should be in [0, 1]. Found {fraction!r}.")
        self.fraction = fraction
        self.generator = torch.Generator().manual_seed(1_000_003 + seed)
        self.noise = torch.Generator().manual_seed(2_000_003 + seed)
        self.mask: Tensor | None = None  # the current meta-batch's corrupted tasks
        self._share_sum: Tensor | float = 0.0  # on the weights' device: no read per step
        self._steps = 0

    def draw(self, tasks: int) -> Tensor:
        """A new meta-batch: which of its ``tasks`` are corrupted (bool ``[tasks]``)."""
        self.mask = torch.rand(tasks, generator=self.generator) < self.fraction
        return self.mask

    def record(self, weights: Tensor) -> None:
        assert self.mask is not None and self.mask.shape == weights.shape
        magnitude = weights.detach().abs().double()
        mask = self.mask.to(magnitude.device)
        self._share_sum = self._share_sum + (magnitude * mask).sum() / magnitude.sum()
        self._steps += 1

    @property
    def weight_share(self) -> float:
        """The mean over the recorded steps of the corrupted tasks' weight share."""
        return float(self._share_sum) / self._steps if self._steps else math.nan


class Oracle(Weighting):
    """Mean over the clean tasks of each meta-batch: knows what no real method knows (which
    tasks are corrupted), the upper bound of a study. Uniform when every task is corrupted."""

    needs = "count"

    def __init__(self) -> None:
        self.corruption: Corruption | None = None

    def from_scores(self, scores: Tensor) -> Tensor:
        if self.corruption is None or self.corruption.mask is None:
            raise RuntimeError("The oracle needs the run's Corruption (see make_weighting).")
        clean = (~self.corruption.mask).to(scores.device, scores.dtype)
        if clean.shape != scores.shape:
            raise ValueError(
                f"The oracle knows {clean.numel()} tasks; the batch has {scores.numel()}."
            )
        count = clean.sum()
        return clean / count if count > 0 else torch.full_like(scores, 1.0 / scores.numel())


#: The weightings the examples compare. ``agreement_meta`` is the paper's Eq. 13 measured
#: on MAML's meta-gradients instead of the inner-loop deltas (MAML only; so is
#: ``geometric_median_meta``, the median of the meta-gradients themselves); ``upgrad``,
#: ``mgda`` and ``dualproj`` are TorchJD's (``pip install 'ga-optim[torchjd]'``);
#: ``oracle`` is Mean over the clean tasks (for ``--corrupt-fraction`` studies).
WEIGHTINGS: dict[str, Callable[[], Weighting]] = {
    "mean": Mean,
    "agreement": Agreement,
    "agreement_meta": Agreement,
    "nonnegative": NonNegativeAgreement,
    "cosine": CosineAgreement,
    "leave_one_out": LeaveOneOutAgreement,
    "leave_one_out_nonnegative": lambda: LeaveOneOutAgreement(non_negative=True),
    "geometric_median": GeometricMedian,
    "geometric_median_meta": GeometricMedian,
    "oracle": Oracle,
    "upgrad": _torchjd("UPGradWeighting"),
    "mgda": _torchjd("MGDAWeighting"),
    "dualproj": _torchjd("DualProjWeighting"),
}


def make_weighting(name: str, corruption: Corruption) -> Weighting:
    """The weighting ``name``; the oracle is told the run's corrupted tasks."""
    weighting = WEIGHTINGS[name]()
    if isinstance(weighting, Oracle):
        weighting.corruption = corruption
    return weighting


def combines(algorithm: str, weighting: str) -> bool:
    """Whether ``weighting`` applies to ``algorithm`` (the ``*_meta`` ones are MAML only)."""
    return not (measures_meta_gradients(weighting) and algorithm == "reptile")


def measures_meta_gradients(weighting: str) -> bool:
    """Whether the weights are measured on MAML's meta-gradients (the ``*_meta`` names)
    instead of the inner-loop deltas θ − θ_i (Algorithm 1, lines 7–9)."""
    return weighting.endswith("_meta")


def check_combination(algorithm: str, weighting: str) -> None:
    if not combines(algorithm, weighting):
        raise ValueError(f"`{weighting}` measures the weights on MAML's meta-gradients.")


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
    corruption: Corruption | None = None,
) -> dict[str, Any]:
    """Run ``step`` (one meta-iteration, returning the task weights) ``iterations`` times.

    Returns the weights' history (min, max, share of negative weights at 200 points),
    ``diverged_at`` (the aggregator refuses non-finite task vectors before touching θ, so
    a run that diverges stops there and is recorded as a result instead of raising) and,
    with a ``corruption``, ``corrupted_weight_share``: the mean over the steps of the
    weight share of the corrupted tasks.
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
        if corruption is not None:
            corruption.record(weights)
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
    if corruption is not None:
        history["corrupted_weight_share"] = corruption.weight_share
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
