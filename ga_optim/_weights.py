"""The math of gradient agreement: task weights from task vectors or from their Gramian."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._checks import TaskBatch, locate_non_finite
from ._kernels import accumulation_dtype, agreement_scores_raw, default_foreach

__all__ = ["agreement_scores", "signed_normalize", "task_cosines", "uniform_weights"]


def _batch_dtype_device(batch: TaskBatch) -> tuple[torch.dtype, torch.device]:
    dtype = torch.float32
    device = torch.device("cpu")
    for p_dtype, p_device in zip(batch.dtypes, batch.devices):
        if p_dtype is not None:
            dtype = torch.promote_types(dtype, accumulation_dtype(p_dtype))
        if p_device is not None:
            device = p_device
    return dtype, device


def uniform_weights(batch: TaskBatch) -> Tensor:
    """``1/N`` for each of the batch's ``N`` tasks, in its accumulation dtype."""
    dtype, device = _batch_dtype_device(batch)
    n = batch.num_tasks
    return torch.full((n,), 1.0 / n, dtype=dtype, device=device)


def _unit_scale(batch: TaskBatch) -> float:
    """A power of two ``c`` with ``c·max|g| ∈ [0.5, 1)``, or 0 for all-zero vectors.

    A power of two scales exactly, so sums that cancel exactly still do.
    """
    present = [t for task in batch.tasks for t in task if t is not None and t.numel()]
    largest = max((float(t.abs().max()) for t in present), default=0.0)
    if largest == 0.0:
        return 0.0
    # Capped at 2**1000 so that subnormal magnitudes (float64 below 2**-1022) stay in range:
    # scaled, they are still >= 2**-74, whose squares float64 holds.
    return math.ldexp(1.0, min(-math.frexp(largest)[1], 1000))


def agreement_scores(batch: TaskBatch, *, foreach: bool | None = None) -> Tensor:
    """``r_i = Σ_j g_i·g_j = g_i · Σ_j g_j`` for each task, in O(N·P).

    Two passes over the vectors (the task sum, then one dot per task and parameter) in at
    least float32. If that overflows or underflows (fp32 vectors near 1e19, or near 1e-20:
    scores below ``tiny/eps`` of their dtype, where subnormal products lose digits), the
    scores are recomputed in float64 on the vectors scaled by a power of two that brings
    their largest magnitude near 1, which leaves the weights unchanged; ``r`` is then that
    factor squared times the true scores. Non-finite inputs raise ``ValueError`` naming
    the task and parameter.
    """
    dtype, _ = _batch_dtype_device(batch)
    scores = _scores(batch, 1.0, dtype, foreach)
    finite = bool(torch.isfinite(scores).all())
    info = torch.finfo(dtype)
    # Below tiny/eps the dots may have lost precision to subnormal products: rescale.
    if finite and bool(scores.abs().max() >= info.tiny / info.eps):
        return scores
    if not finite:
        locate_non_finite(batch)  # raises if an input is non-finite
    scale = _unit_scale(batch)
    if scale == 0.0:
        return torch.zeros_like(scores)
    return _scores(batch, scale, torch.float64, foreach).to(dtype)


def _scores(batch: TaskBatch, scale: float, dtype: torch.dtype, foreach: bool | None) -> Tensor:
    """``scale² · g_i·Σ_j g_j`` accumulated in ``dtype``."""
    use_foreach = default_foreach(batch) if foreach is None else foreach
    return agreement_scores_raw(batch, dtype, scale, foreach=use_foreach)


def signed_normalize(scores: Tensor) -> Tensor:
    """``w_i = r_i / Σ_k |r_k|``; uniform ``1/N`` when every score is zero."""
    denominator = scores.abs().sum()
    if bool(denominator == 0) or not bool(torch.isfinite(denominator)):
        # Scores that are all zero (the mean update is zero) leave no preference, and
        # scores too large to sum (float64 Gramians near 1e308) are first brought down.
        if bool(denominator == 0):
            return torch.full_like(scores, 1.0 / scores.numel())
        scores = scores / scores.abs().max()
        denominator = scores.abs().sum()
    return scores / denominator


def task_cosines(batch: TaskBatch, *, foreach: bool | None = None) -> Tensor:
    """``cos(g_i, ḡ)`` for each task, in float64; 0 for a zero vector or a zero mean.

    Uses ``r_i = g_i·s`` and ``‖s‖² = Σ_i r_i`` (with ``s = Σ_j g_j``), so the only extra
    pass is the task norms.
    """
    _, device = _batch_dtype_device(batch)
    scale = _unit_scale(batch)
    if scale == 0.0:
        return torch.zeros(batch.num_tasks, dtype=torch.float64, device=device)
    scores = _scores(batch, scale, torch.float64, foreach)
    norms = torch.stack(
        [
            torch.linalg.vector_norm(
                torch.stack(
                    [
                        torch.linalg.vector_norm(t, dtype=torch.float64) * scale
                        for t in task
                        if t is not None
                    ]
                    or [torch.zeros((), dtype=torch.float64, device=device)]
                )
            )
            for task in batch.tasks
        ]
    )
    denominator = norms * scores.sum().clamp(min=0).sqrt()
    safe = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    return torch.where(denominator > 0, scores / safe, torch.zeros_like(scores)).clamp(-1.0, 1.0)
