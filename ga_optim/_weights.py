"""The math of gradient agreement: task weights from task vectors or from their Gramian.

The numerics policy, for every weighting and both paths (vectors and Gramian):

* **Accumulation.** Sums and dot products run in at least float32: fp16/bf16 vectors are
  accumulated in float32, float32 in float32, float64 in float64
  (:func:`~ga_optim._kernels.accumulation_dtype`); weights come back in that dtype. A
  Gramian built from vectors (the ``needs = "gramian"`` fallback) is float64.
* **Overflow and underflow of the scores.** Scores ``r_i = g_i·Σ g_j`` that are not
  finite, or whose largest magnitude is below ``tiny/eps`` of their dtype (where subnormal
  products lose digits), are recomputed in float64 on the vectors scaled by the power of
  two that brings their largest entry into ``[0.5, 1)``: exact, so sums that cancel
  exactly still do, and the weights are unchanged. Normalisation divides by ``Σ|r|`` after
  scaling the scores by a power of two (:func:`to_unit_range`), so it cannot overflow.
* **Zero denominators.** All scores zero (all-zero vectors, or a zero mean update) give
  uniform ``1/N``; :class:`~ga_optim.NonNegativeAgreement` gives uniform weights when no
  score is positive; :class:`~ga_optim.CosineAgreement` gives uniform weights when
  ``‖Σ ĝ‖² = Σ r̂ ≤ 4·N²·eps`` (the same rule on both paths).
* **Non-finite input** raises :class:`~ga_optim.NonFiniteError` naming the task and
  parameter (``non_finite="propagate"`` lets it through to ``.grad`` instead). On the fast
  path the check is one device flag over what was read and produced; the slow scan that
  names the culprit runs only when the flag is down.
* **What floating point determines.** Weights are determined to about ``κ·N·eps``, with
  ``κ = (Σ‖g_i‖)² / Σ|g_i·Σ g_j|`` counting the cancellation in the task sum
  (:func:`ga_optim.testing.condition_number`); the two paths agree to that, which is what
  the property tests check.
"""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import Tensor

from ._checks import TaskBatch, locate_non_finite
from ._collective import Collective, LocalCollective
from ._kernels import (
    accumulation_dtype,
    default_foreach,
    dots_with,
    materialize,
    promote,
    task_sum,
)

__all__ = [
    "agreement_scores",
    "cosine_agreement_scores",
    "exchanged_scores",
    "signed_normalize",
    "task_cosines",
    "to_unit_range",
    "uniform_weights",
    "weights_dtype_device",
]


_LOCAL = LocalCollective()


def weights_dtype_device(batch: TaskBatch) -> tuple[torch.dtype, torch.device]:
    """The dtype the batch's weights come in (its accumulation dtype, promoted over
    parameters and ranks) and the device they live on; once per call."""
    found = batch.cache.get("weights_dtype_device")
    if found is None:
        dtype = torch.float32
        for p_dtype in set(batch.global_dtypes):
            if p_dtype is not None:
                dtype = promote(dtype, accumulation_dtype(p_dtype))
        device = next((d for d in reversed(batch.devices) if d is not None), None)
        found = batch.cache["weights_dtype_device"] = (dtype, device or torch.device("cpu"))
    return cast(tuple[torch.dtype, torch.device], found)


def uniform_weights(batch: TaskBatch) -> Tensor:
    """``1/N`` for each of the batch's ``N`` tasks, in its accumulation dtype."""
    dtype, device = weights_dtype_device(batch)
    n = batch.total_tasks
    return torch.full((n,), 1.0 / n, dtype=dtype, device=device)


def _unit_scale(batch: TaskBatch, collective: Collective) -> float:
    """A power of two ``c`` with ``c·max|g| ∈ [0.5, 1)``, or 0 for all-zero vectors.

    A power of two scales exactly, so sums that cancel exactly still do. ``max|g|`` is over
    every rank's tasks.
    """
    present = [t for task in batch.tasks for t in task if t is not None and t.numel()]
    local = max((float(t.abs().max()) for t in present), default=0.0)
    _, device = weights_dtype_device(batch)
    largest_t = torch.tensor([local], dtype=torch.float64, device=device)
    collective.max_(largest_t)
    largest = float(largest_t.item())
    if largest == 0.0:
        return 0.0
    # Capped at 2**1000 so that subnormal magnitudes (float64 below 2**-1022) stay in range:
    # scaled, they are still >= 2**-74, whose squares float64 holds.
    return math.ldexp(1.0, min(-math.frexp(largest)[1], 1000))


def agreement_scores(
    batch: TaskBatch, *, foreach: bool | None = None, collective: Collective = _LOCAL
) -> Tensor:
    """``r_i = Σ_j g_i·g_j = g_i · Σ_j g_j`` for each task, in O(N·P).

    Two passes over the vectors (the task sum, then one dot per task and parameter) in at
    least float32. If that overflows or underflows (fp32 vectors near 1e19, or near 1e-20:
    scores below ``tiny/eps`` of their dtype, where subnormal products lose digits), the
    scores are recomputed in float64 on the vectors scaled by a power of two that brings
    their largest magnitude near 1, which leaves the weights unchanged; ``r`` is then that
    factor squared times the true scores. Non-finite inputs raise ``ValueError`` naming
    the task and parameter.

    With a process group (``collective``), ``batch`` holds this rank's tasks: the task sum
    is all-reduced (P floats) and the scores of every rank's tasks are gathered (N floats),
    so every rank returns the same ``[N]`` scores; the fallback's decision is taken on those
    and is the same everywhere.
    """
    dtype, _ = weights_dtype_device(batch)
    scores = exchanged_scores(batch, 1.0, dtype, foreach, collective)
    finite = bool(torch.isfinite(scores).all())
    info = torch.finfo(dtype)
    # Below tiny/eps the dots may have lost precision to subnormal products: rescale.
    if finite and bool(scores.abs().max() >= info.tiny / info.eps):
        return scores
    if not finite:
        # raises (on every rank) if an input is non-finite
        collective.raise_together(lambda: locate_non_finite(batch))
    scale = _unit_scale(batch, collective)
    if scale == 0.0:
        return torch.zeros_like(scores)
    return exchanged_scores(batch, scale, torch.float64, foreach, collective).to(dtype)


def exchanged_scores(
    batch: TaskBatch,
    scale: float,
    dtype: torch.dtype,
    foreach: bool | None,
    collective: Collective,
) -> Tensor:
    """``scale² · g_i·Σ_j g_j`` accumulated in ``dtype``, for every rank's tasks: the two
    passes of Eq. (13), with the task sum all-reduced between them and the scores
    gathered. No check and no value read back (the callers decide what to check); the
    task sum is freed on return, before any update is built."""
    use_foreach = default_foreach(batch) if foreach is None else foreach
    sums = task_sum(batch, dtype, scale, foreach=use_foreach)
    if collective.exchanges:
        # In parameter order (the same on every rank, whatever each rank's packing).
        collective.sum_(sums.wire(materialize(batch, sums.params, dtype)))
    local = dots_with(batch, sums, dtype, scale, foreach=use_foreach)
    return collective.gather(local, batch.all_counts)


def to_unit_range(values: Tensor) -> Tensor:
    """``values`` times the power of two that brings its largest magnitude into
    ``[0.5, 1)``: exact (so sums that cancel still do), and their sum cannot overflow.
    On the device, with no value read back to the host; all zeros stay zeros."""
    _, exponent = torch.frexp(values.abs().amax())
    # The exponent as a float of ``values``' dtype: before torch 2.2 (or so) ``ldexp``
    # with an integer exponent raised 2 to it in float32, which overflows beyond 2**127.
    return torch.ldexp(values, exponent.to(values.dtype).neg())


def signed_normalize(scores: Tensor) -> Tensor:
    """``w_i = r_i / Σ_k |r_k|``; uniform ``1/N`` when every score is zero.

    The scores are first scaled by a power of two (exact) so that ``Σ|r|`` cannot overflow
    (float64 Gramians near 1e308). Branch-free: no value is read back to the host.
    """
    scaled = to_unit_range(scores)
    denominator = scaled.abs().sum()
    return torch.where(denominator > 0, scaled / denominator, 1.0 / scores.numel())


def _norm64(t: Tensor) -> Tensor:
    """``‖t‖`` in float64, exact in range: squares of entries below ~1e-154 underflow, so
    such a tensor is first divided by its largest magnitude."""
    norm: Tensor = torch.linalg.vector_norm(t, dtype=torch.float64)
    if 1e-140 < float(norm) < 1e140:
        return norm
    largest = t.abs().max().double()
    if largest == 0:
        return norm
    rescaled: Tensor = torch.linalg.vector_norm(t.double() / largest)
    return largest * rescaled


def _task_norms(batch: TaskBatch, scale: float) -> Tensor:
    """``‖scale · g_i‖`` for each of this rank's tasks, in float64."""
    _, device = weights_dtype_device(batch)
    zero = torch.zeros((), dtype=torch.float64, device=device)
    norms = []
    for task in batch.tasks:
        parts = [_norm64(t) * scale for t in task if t is not None and t.numel()]
        norms.append(_norm64(torch.stack(parts)) if parts else zero)
    if not norms:
        return torch.zeros(0, dtype=torch.float64, device=device)
    return torch.stack(norms)


def _times_power_of_two(t: Tensor, exponent: int) -> Tensor:
    """``t · 2**exponent`` in float64, exactly (in steps, so the factor never overflows)."""
    result = t.double()
    while exponent:
        step = max(-1000, min(1000, exponent))
        result = result * math.ldexp(1.0, step)
        exponent -= step
    return result


def _unit_direction(task: list[Tensor | None]) -> list[Tensor | None] | None:
    """``g / ‖g‖`` per parameter in float64 (None for a task whose vector is zero).

    The task is first brought to unit magnitude by an exact power of two, so its norm
    neither over- nor underflows whatever its scale (subnormal entries included).
    """
    present = [t for t in task if t is not None and t.numel()]
    largest = max((float(t.abs().max()) for t in present), default=0.0)
    if largest == 0.0:
        return None
    exponent = -math.frexp(largest)[1]
    scaled = [None if t is None else _times_power_of_two(t, exponent) for t in task]
    norm = math.sqrt(sum(float((u * u).sum()) for u in scaled if u is not None))
    return [None if u is None else u / norm for u in scaled]


def cosine_agreement_scores(
    batch: TaskBatch, *, foreach: bool | None = None, collective: Collective = _LOCAL
) -> Tensor:
    """``ĝ_i · Σ_j ĝ_j`` with ``ĝ_i = g_i / ‖g_i‖`` (0 for a zero vector), in O(N·P), in
    float64.

    Two passes, one task's float64 unit vector alive at a time beside the sum: exact in
    range for any magnitudes. A sum of unit vectors below ``4·N²·eps`` (exactly opposite
    directions) gives all scores 0; :class:`~ga_optim.CosineAgreement` applies its own
    rounding-noise rule to the scores. ``foreach`` is accepted for symmetry with
    :func:`agreement_scores` and unused. With a process group the sum of unit vectors is
    all-reduced and the scores gathered, as in :func:`agreement_scores`.
    """
    _, device = weights_dtype_device(batch)
    n = batch.total_tasks
    total: list[Tensor | None] = [None] * batch.num_params
    for task in batch.tasks:
        unit = _unit_direction(task)
        for p, u in enumerate(unit or []):
            if u is not None:
                current = total[p]
                total[p] = u if current is None else current.add_(u)
    total = materialize(batch, total, torch.float64)
    collective.sum_([t for t in total if t is not None])
    present = [t for t in total if t is not None]
    total_norm = math.sqrt(sum(float((t * t).sum()) for t in present))
    if not math.isfinite(total_norm):
        collective.raise_together(lambda: locate_non_finite(batch))
    if total_norm <= 4 * n * n * torch.finfo(torch.float64).eps:
        return torch.zeros(n, dtype=torch.float64, device=device)
    scores = []
    for task in batch.tasks:
        unit = _unit_direction(task) or []
        scores.append(
            sum(
                float(torch.dot(u.reshape(-1), s.reshape(-1)))
                for u, s in zip(unit, total)
                if u is not None and s is not None
            )
        )
    local = torch.tensor(scores, dtype=torch.float64, device=device)
    return collective.gather(local, batch.all_counts)


def task_cosines(
    batch: TaskBatch, *, foreach: bool | None = None, collective: Collective = _LOCAL
) -> Tensor:
    """``cos(g_i, ḡ)`` for each task (every rank's), in float64; 0 for a zero vector or a
    zero mean.

    Uses ``r_i = g_i·s`` and ``‖s‖² = Σ_i r_i`` (with ``s = Σ_j g_j``), so the only extra
    pass is the task norms.
    """
    _, device = weights_dtype_device(batch)
    scale = _unit_scale(batch, collective)
    if scale == 0.0:
        return torch.zeros(batch.total_tasks, dtype=torch.float64, device=device)
    scores = exchanged_scores(batch, scale, torch.float64, foreach, collective)
    norms = collective.gather(_task_norms(batch, scale), batch.all_counts)
    denominator = norms * scores.sum().clamp(min=0).sqrt()
    safe = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    return torch.where(denominator > 0, scores / safe, torch.zeros_like(scores)).clamp(-1.0, 1.0)
