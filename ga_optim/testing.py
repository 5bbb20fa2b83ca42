"""Property-testing tools for task weightings: hypothesis strategies and invariant checks.

Property-test your own pipeline (or a weighting of your own) the way ga_optim tests its
own::

    from hypothesis import given
    from ga_optim import Agreement
    from ga_optim.testing import assert_weighting_invariants, task_batches

    @given(task_batches())
    def test_my_weighting(batch):
        assert_weighting_invariants(Agreement(), batch)

Every assertion recomputes what it needs in float64 from the dense Gramian
``G = J Jᵀ`` — independently of the O(N·P) matrix products ga_optim runs — and works on
any object with a ``weights(task_vectors)`` method (a :class:`~ga_optim.Weighting` or a
:class:`~ga_optim.GradientAgreementAggregator`). Needs hypothesis:
``pip install hypothesis``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, Protocol

import torch
from torch import Tensor

try:
    from hypothesis import strategies as st
except ImportError as error:  # pragma: no cover - exercised only without hypothesis
    raise ImportError(
        "ga_optim.testing needs hypothesis. Install it with: pip install hypothesis"
    ) from error

__all__ = [
    "PATTERNS",
    "HasWeights",
    "TaskVectors",
    "assert_identical_tasks_uniform",
    "assert_normalized",
    "assert_permutation_equivariant",
    "assert_scale_invariant",
    "assert_update_aligned_with_mean",
    "assert_weighting_invariants",
    "condition_number",
    "reference_agreement_weights",
    "reference_gramian",
    "scale_fits",
    "task_batches",
]

TaskVectors = list[list[Tensor]]

#: The batch shapes :func:`task_batches` draws: independent vectors, and the degenerate
#: cases where implementations break.
PATTERNS = ("random", "identical", "opposite", "zeros", "parallel", "one_dominant", "one_task")


class HasWeights(Protocol):
    """Anything with the weighting interface."""

    def weights(self, task_vectors: Any = ..., **kwargs: Any) -> Tensor: ...


# -- strategies ---------------------------------------------------------------------------


def task_batches(
    *,
    min_tasks: int = 1,
    max_tasks: int = 6,
    max_params: int = 3,
    max_side: int = 4,
    dtype: torch.dtype = torch.float64,
    scales: Sequence[float] = (0.0, 1e-6, 1.0, 1e3, 1e15),
    patterns: Sequence[str] = PATTERNS,
) -> st.SearchStrategy[TaskVectors]:
    """A meta-batch: ``N`` tasks, each a list of per-parameter tensors of common shapes.

    Draws the number of tasks and parameters, the shapes (0-d to 2-d), one of
    :data:`PATTERNS` and a common scale from ``scales``; values are mixed-sign floats in
    ``[-1, 1]`` times the scale, in ``dtype``. Shrinks towards few small tasks.
    """
    unknown = set(patterns) - set(PATTERNS)
    if unknown:
        raise ValueError(f"`patterns` has unknown entries {sorted(unknown)}; known: {PATTERNS}.")
    allowed = [p for p in patterns if p != "one_task" or min_tasks <= 1]
    if (
        not allowed
        or min_tasks < 1
        or max_tasks < max(min_tasks, 2 if allowed != ["one_task"] else 1)
    ):
        raise ValueError(
            f"No batch fits min_tasks={min_tasks}, max_tasks={max_tasks}, "
            f"patterns={tuple(patterns)}."
        )
    if max_params < 1 or max_side < 1 or not scales:
        raise ValueError(
            f"`max_params` and `max_side` should be >= 1 and `scales` non-empty. Found "
            f"max_params={max_params}, max_side={max_side}, scales={tuple(scales)}."
        )
    return _task_batches(
        allowed=tuple(allowed),
        min_tasks=min_tasks,
        max_tasks=max_tasks,
        max_params=max_params,
        max_side=max_side,
        dtype=dtype,
        scales=tuple(scales),
    )


@st.composite
def _task_batches(
    draw: st.DrawFn,
    *,
    allowed: tuple[str, ...],
    min_tasks: int,
    max_tasks: int,
    max_params: int,
    max_side: int,
    dtype: torch.dtype,
    scales: tuple[float, ...],
) -> TaskVectors:
    pattern = draw(st.sampled_from(allowed))
    if pattern == "one_task":
        n = 1
    else:
        n = draw(st.integers(max(min_tasks, 2), max_tasks))
    num_params = draw(st.integers(1, max_params))
    shapes = [
        tuple(draw(st.lists(st.integers(1, max_side), min_size=0, max_size=2)))
        for _ in range(num_params)
    ]
    scale = draw(st.sampled_from(list(scales)))
    width: Literal[32, 64] = 32 if dtype in (torch.float32, torch.float16, torch.bfloat16) else 64
    element = st.floats(-1.0, 1.0, allow_nan=False, allow_subnormal=False, width=width)

    def vector() -> list[Tensor]:
        result = []
        for shape in shapes:
            numel = 1
            for side in shape:
                numel *= side
            values = draw(st.lists(element, min_size=numel, max_size=numel))
            result.append(torch.tensor(values, dtype=torch.float64).reshape(shape))
        return result

    if pattern in ("random", "one_task", "one_dominant"):
        tasks = [vector() for _ in range(n)]
        if pattern == "one_dominant":
            tasks[0] = [t * 100.0 for t in tasks[0]]
    elif pattern == "identical":
        base = vector()
        tasks = [[t.clone() for t in base] for _ in range(n)]
    elif pattern == "opposite":
        base = vector()
        tasks = [[t * (1.0 if i % 2 == 0 else -1.0) for t in base] for i in range(n)]
    elif pattern == "zeros":
        tasks = [[torch.zeros(shape, dtype=torch.float64) for shape in shapes] for _ in range(n)]
    else:  # parallel: signed multiples of one direction
        base = vector()
        factors = draw(st.lists(st.floats(-2.0, 2.0, width=width), min_size=n, max_size=n))
        tasks = [[t * c for t in base] for c in factors]
    return [[(t * scale).to(dtype) for t in task] for task in tasks]


# -- independent float64 reference --------------------------------------------------------


def _flat64(task_vectors: Any) -> Tensor:
    """The task vectors as a dense float64 matrix J [N, P] (None counts as zeros)."""
    if isinstance(task_vectors, Tensor):
        return task_vectors.detach().reshape(task_vectors.shape[0], -1).double().cpu()
    rows = []
    numels: dict[int, int] = {}
    for task in task_vectors:
        for p, t in enumerate(task):
            if t is not None:
                numels[p] = t.numel()
    for task in task_vectors:
        parts = [
            torch.zeros(numels.get(p, 0), dtype=torch.float64)
            if t is None
            else t.detach().reshape(-1).double().cpu()
            for p, t in enumerate(task)
        ]
        rows.append(torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64))
    return torch.stack(rows)


def reference_gramian(task_vectors: Any) -> Tensor:
    """``G = J Jᵀ`` in float64 from a dense copy of the vectors: the O(N²·P) reference."""
    matrix = _flat64(task_vectors)
    return matrix @ matrix.T


def _unit_scaled(task_vectors: Any) -> Tensor:
    """J divided by its largest magnitude: the weights are scale-free, float64 is not."""
    matrix = _flat64(task_vectors)
    largest = matrix.abs().max() if matrix.numel() else torch.zeros((), dtype=torch.float64)
    return matrix / largest if largest > 0 else matrix


def reference_agreement_weights(task_vectors: Any) -> Tensor:
    """Eq. (13) of the paper straight from the dense float64 Gramian (uniform if G·1 = 0).

    The vectors are first divided by their largest magnitude, which leaves Eq. (13)
    unchanged and keeps float64 from overflowing or underflowing (1e-260² is 0).
    """
    matrix = _unit_scaled(task_vectors)
    scores = (matrix @ matrix.T).sum(dim=1)
    total = scores.abs().sum()
    if total == 0:
        return torch.full_like(scores, 1.0 / scores.numel())
    return scores / total


def condition_number(task_vectors: Any) -> float:
    """``κ = (Σ_i ‖g_i‖)² / Σ_i |g_i·s|`` with ``s = Σ_j g_j`` (≥ 1; ``inf`` when the scores
    cancel to zero, 1 for all-zero vectors).

    Rounding perturbs the sum ``s`` by up to about ``N · eps · Σ_j ‖g_j‖`` and each score
    ``g_i·s`` by ``‖g_i‖`` times that, so the agreement weights move by about
    ``κ · N · eps``: a batch whose mean update nearly vanishes, or whose sum cancels
    (``[1, 1e-72, -1]``), has ill-determined weights. Tolerances here scale with it.
    """
    return _kappa(_unit_scaled(task_vectors))


def _kappa(matrix: Tensor) -> float:
    if not bool(matrix.any()):
        return 1.0  # all-zero vectors: uniform weights, exactly
    scores = matrix @ matrix.sum(dim=0)
    mass = float(matrix.norm(dim=1).sum())
    denominator = float(scores.abs().sum())
    return mass * mass / denominator if denominator > 0 else float("inf")


def _eps(weights: Tensor) -> float:
    return float(torch.finfo(weights.dtype).eps)


def _weighting_of(weighting: object) -> object:
    """The weighting itself, also when given an aggregator (which holds one)."""
    return getattr(weighting, "weighting", weighting)


def _leave_one_out_kappa(matrix: Tensor, positive: bool) -> float:
    """κ of the self-excluded scores ``g_i·Σ_{j≠i} g_j``: rounding moves each by about
    ``eps·‖g_i‖·Σ_j‖g_j‖`` (``inf`` when they are all zero, as for orthogonal tasks).
    ``positive``: of their positive parts, which a clamp at zero normalises (``inf`` when
    none is positive: a score at zero may then round either way)."""
    if not bool(matrix.any()):
        return 1.0
    gramian = matrix @ matrix.T
    scores = gramian.sum(dim=1) - gramian.diagonal()
    mass = float(matrix.norm(dim=1).sum())
    denominator = float((scores.clamp(min=0) if positive else scores.abs()).sum())
    return mass * mass / denominator if denominator > 0 else float("inf")


def _tolerance(
    task_vectors: Any, weights: Tensor, slack: float = 64.0, weighting: object = None
) -> float:
    """``slack · N · eps · κ`` with the larger of the batch's κ and its directions' κ: a
    scale-free weighting (``CosineAgreement``) is conditioned by the unit vectors; a
    weighting of the self-excluded scores (``needs = "leave_one_out_scores"``) also by
    theirs (by their positive parts for one with ``non_negative=True``)."""
    matrix = _unit_scaled(task_vectors)
    # Each row by its own largest magnitude first: a tiny task beside a large one (1e-200
    # against 1e-3) would otherwise square to 0 and look like a zero direction.
    largest = matrix.abs().amax(dim=1, keepdim=True)
    rows = torch.where(largest > 0, matrix / largest.clamp_min(torch.finfo(torch.float64).tiny), 0)
    norms = rows.norm(dim=1, keepdim=True)
    directions = torch.where(norms > 0, rows / norms.clamp_min(torch.finfo(torch.float64).tiny), 0)
    kappa = max(_kappa(matrix), _kappa(directions))
    underlying = _weighting_of(weighting)
    if getattr(underlying, "needs", None) == "leave_one_out_scores":
        positive = bool(getattr(underlying, "non_negative", False))
        kappa = max(kappa, _leave_one_out_kappa(matrix, positive))
    return slack * weights.numel() * _eps(weights) * min(kappa, 1e300)


# -- assertions ---------------------------------------------------------------------------


def assert_normalized(weighting: HasWeights, task_vectors: Any, *, signed: bool = True) -> Tensor:
    """``N`` finite weights with ``Σ|w_i| = 1`` (and ``w_i >= 0`` unless ``signed``)."""
    weights = weighting.weights(task_vectors)
    n = _flat64(task_vectors).shape[0]
    assert weights.shape == (n,), f"expected weights of shape ({n},), got {tuple(weights.shape)}"
    assert bool(torch.isfinite(weights).all()), f"non-finite weights {weights.tolist()}"
    total = float(weights.double().abs().sum())
    assert abs(total - 1.0) <= 8 * n * _eps(weights), f"Σ|w| = {total!r}, expected 1"
    if not signed:
        assert bool((weights >= 0).all()), f"negative weights {weights.tolist()}"
    return weights


def scale_fits(task_vectors: TaskVectors, scale: float) -> bool:
    """Whether ``scale`` keeps every nonzero entry a normal, finite number of its dtype.

    Scaling into the subnormal range drops mantissa bits (and past it, to zero or
    infinity), so the scaled batch would no longer be a multiple of the original.
    """
    for task in task_vectors:
        for t in task:
            if t is None or not bool(t.any()):
                continue
            info = torch.finfo(t.dtype)
            magnitudes = t.detach().abs().double()
            smallest = float(magnitudes[magnitudes > 0].min()) * scale
            largest = float(magnitudes.max()) * scale
            if smallest < info.tiny or largest > info.max / 2:
                return False
    return True


def assert_scale_invariant(
    weighting: HasWeights, task_vectors: TaskVectors, scale: float, *, atol: float = 0.0
) -> None:
    """Multiplying every task vector by ``scale > 0`` leaves the weights unchanged.

    ``scale`` must keep the entries normal numbers (see :func:`scale_fits`). The weights
    may move by what floating point leaves undetermined (``κ·N·eps``) or by ``atol``,
    whichever is larger: give an iterative weighting its stopping tolerance there.
    """
    if not scale > 0:
        raise ValueError(f"`scale` should be positive. Found {scale!r}.")
    if not scale_fits(task_vectors, scale):
        raise ValueError(
            f"`scale` = {scale!r} takes some entries out of their dtype's normal range; "
            "the scaled batch would not be an exact multiple. Check with scale_fits()."
        )
    scaled = [[None if t is None else t * scale for t in task] for task in task_vectors]
    before = weighting.weights(task_vectors)
    after = weighting.weights(scaled)
    tol = max(_tolerance(task_vectors, before, weighting=weighting), atol)
    gap = float((before.double() - after.double()).abs().max())
    assert gap <= tol, f"weights changed by {gap:.3g} (> {tol:.3g}) under a scale of {scale}"


def assert_permutation_equivariant(
    weighting: HasWeights,
    task_vectors: TaskVectors,
    permutation: Sequence[int],
    *,
    atol: float = 0.0,
) -> None:
    """Reordering the tasks reorders the weights the same way (to ``κ·N·eps`` or
    ``atol``, whichever is larger)."""
    if sorted(permutation) != list(range(len(task_vectors))):
        raise ValueError(
            f"`permutation` should reorder range({len(task_vectors)}). Found {list(permutation)}."
        )
    weights = weighting.weights(task_vectors)
    permuted = weighting.weights([task_vectors[i] for i in permutation])
    expected = weights[list(permutation)]
    tol = max(_tolerance(task_vectors, weights, weighting=weighting), atol)
    gap = float((permuted.double() - expected.double()).abs().max())
    assert gap <= tol, f"permuted weights differ by {gap:.3g} (> {tol:.3g})"


def assert_identical_tasks_uniform(
    weighting: HasWeights, vector: Sequence[Tensor], num_tasks: int
) -> None:
    """``num_tasks`` copies of one vector get ``1/N`` each."""
    batch = [[t.clone() for t in vector] for _ in range(num_tasks)]
    weights = weighting.weights(batch)
    expected = torch.full_like(weights.double(), 1.0 / num_tasks)
    gap = float((weights.double() - expected).abs().max())
    tol = 8 * num_tasks * _eps(weights)
    assert gap <= tol, f"identical tasks got weights {weights.tolist()}, expected 1/{num_tasks}"


def assert_update_aligned_with_mean(weighting: HasWeights, task_vectors: Any) -> None:
    """The combined update never opposes the mean: ``ḡ·Σ w_i g_i >= 0`` (in float64).

    For the paper's weights ``ḡ·Jᵀw = ‖G·1‖² / (N·‖G·1‖₁)``.
    """
    matrix = _unit_scaled(task_vectors)
    weights = weighting.weights(task_vectors)
    mean = matrix.mean(dim=0)
    update = weights.double().cpu() @ matrix
    alignment = float(mean @ update)
    scale = float(mean.norm() * matrix.norm(dim=1).max()) if matrix.numel() else 0.0
    tol = _tolerance(task_vectors, weights, weighting=weighting) * scale
    assert alignment >= -tol, f"update opposes the mean: ḡ·update = {alignment:.3g}"


def assert_weighting_invariants(
    weighting: HasWeights,
    task_vectors: TaskVectors,
    *,
    signed: bool = True,
    aligned: bool = True,
    atol: float = 0.0,
) -> None:
    """All invariants above that apply to ``weighting`` on one batch.

    Normalisation (non-negativity unless ``signed``), invariance to positive scales (those
    of 2⁻³⁰, 3, 2⁴⁰ that :func:`scale_fits` the batch), equivariance under a reversal and a
    rotation of the tasks, and, when ``aligned``, ``ḡ·update >= 0``. ``atol``: how far an
    iterative weighting's stopping rule lets the weights of a rescaled or reordered batch
    move (e.g. :class:`~ga_optim.GeometricMedian`'s ``tolerance``); 0 for a closed form.
    """
    assert_normalized(weighting, task_vectors, signed=signed)
    for scale in (2.0**-30, 3.0, 2.0**40):
        if scale_fits(task_vectors, scale):
            assert_scale_invariant(weighting, task_vectors, scale, atol=atol)
    n = len(task_vectors)
    reverse, rotate = list(reversed(range(n))), [(i + 1) % n for i in range(n)]
    assert_permutation_equivariant(weighting, task_vectors, reverse, atol=atol)
    assert_permutation_equivariant(weighting, task_vectors, rotate, atol=atol)
    if aligned:
        assert_update_aligned_with_mean(weighting, task_vectors)
