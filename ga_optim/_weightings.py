"""Weightings: objects that map a meta-batch of task vectors to one weight per task.

A weighting is the *what*; :class:`~ga_optim.GradientAgreementAggregator` is the *how*
(combining, stepping, spreading over processes). A new weighting is one small class with
one public method: :meth:`Weighting.from_gramian`, or, for a weighting that reads only the
agreement scores ``r = G·1``, :meth:`Weighting.from_scores` with ``needs = "scores"``.
"""

from __future__ import annotations

from typing import ClassVar, Literal, get_args

import torch
from torch import Tensor

from ._checks import check_gramian

__all__ = [
    "Agreement",
    "CosineAgreement",
    "GeometricMedian",
    "LeaveOneOutAgreement",
    "Mean",
    "Needs",
    "NonNegativeAgreement",
    "Weighting",
    "agreement_weights",
    "positive_normalize",
    "signed_normalize",
    "to_unit_range",
]

#: What a weighting reads of the task vectors; see :attr:`Weighting.needs`.
Needs = Literal["count", "scores", "unit_scores", "leave_one_out_scores", "gramian"]


class Weighting:
    r"""Base class: weights ``[N]`` from per-task vectors or their Gramian ``G = J Jᵀ``.

    **The contract.** A subclass implements one public method:

    * :meth:`from_gramian` ``(G [N, N]) -> w [N]`` — any weighting (``needs = "gramian"``,
      the default). From vectors, the aggregator builds the full Gramian in float64
      (O(N²·P); in a process group every task's vector is gathered, N × P floats).
    * or :meth:`from_scores` ``(r [N]) -> w [N]`` with ``needs = "scores"`` — a weighting
      whose weights depend on ``G`` only through the agreement scores
      :math:`r = G\mathbf 1`, :math:`r_i = g_i^\top \sum_j g_j`. From vectors this is
      O(N·P) and, in a process group, sends one P-sized sum and N scores. ``from_gramian``
      then comes for free.

    ``needs`` says what the weights read, and so what the aggregator computes and what
    crosses the wire between ranks:

    ========================== ================================= ===========================
    ``needs``                  ``from_scores`` receives          per step, in a process group
    ========================== ================================= ===========================
    ``"count"``                zeros ``[N]`` (only N matters)    the update: P floats (as DDP)
    ``"scores"``               :math:`r = G\mathbf 1`            2 × P floats + N scores
    ``"unit_scores"``          Ĝ·1, Ĝ of the unit vectors        2 × P floats + N scores
    ``"leave_one_out_scores"`` G·1 − diag G, times a power of 2  2 × P + 1 floats + N scores
    ``"gramian"``              (``from_gramian`` gets ``G``)     N × P + P floats
    ========================== ================================= ===========================

    Weights are computed in float64 from float64 statistics where the input is float64,
    and returned in the vectors' accumulation dtype (float32 for fp16/bf16/fp32).

    Example — a weighting of your own (scores ``r`` clamped at 0), checked by
    ``ga_optim.testing``:

        >>> import torch
        >>> from ga_optim import Weighting
        >>> class PositiveScores(Weighting):
        ...     needs: ClassVar[Needs] = "scores"
        ...     def from_scores(self, scores):
        ...         positive, n = scores.clamp(min=0), len(scores)
        ...         total = positive.sum()
        ...         return torch.where(total > 0, positive / total, 1 / n)
        >>> w = PositiveScores()(torch.tensor([[1.0, 0.0], [1.0, 1.0], [-1.0, 0.0]]))
        >>> [round(x, 3) for x in w.tolist()]   # r = G·1 = [1, 2, -1]
        [0.333, 0.667, 0.0]
        >>> from ga_optim.testing import assert_weighting_invariants
        >>> batch = [[torch.randn(3, dtype=torch.float64)] for _ in range(4)]
        >>> assert_weighting_invariants(PositiveScores(), batch, signed=False)
    """

    #: What the weights read: ``"count"``, ``"scores"``, ``"unit_scores"`` or
    #: ``"gramian"`` (the default; see the table above).
    needs: ClassVar[Needs] = "gramian"

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if cls.needs not in get_args(Needs):
            raise TypeError(
                f"`{cls.__name__}.needs` should be one of {get_args(Needs)}. Found {cls.needs!r}."
            )

    def weights(self, task_vectors: object = None, *, gramian: Tensor | None = None) -> Tensor:
        """The weights of ``task_vectors`` (see :func:`ga_optim.agreement_weights` for the
        accepted forms) or of a precomputed ``gramian`` ``[N, N]``; pass exactly one."""
        if (task_vectors is None) == (gramian is None):
            raise TypeError("Pass exactly one of `task_vectors` and `gramian`.")
        if gramian is not None:
            return self.from_gramian(check_gramian(gramian))
        from ._aggregator import weights_of  # the aggregator computes the statistics

        return weights_of(self, task_vectors)

    __call__ = weights

    def from_gramian(self, gramian: Tensor) -> Tensor:
        """Weights ``[N]`` from a validated Gramian ``[N, N]``.

        Implement this (``needs = "gramian"``), or :meth:`from_scores`: for the other
        ``needs`` the default derives the statistic from ``gramian`` and calls it.
        """
        if self.needs == "gramian":
            raise NotImplementedError(
                f"{type(self).__name__} should implement from_gramian(gramian), or set "
                "`needs = 'scores'` and implement from_scores(scores)."
            )
        return self.from_scores(scores_from_gramian(gramian, self.needs))

    def from_scores(self, scores: Tensor) -> Tensor:
        """Weights ``[N]`` from the statistic named by :attr:`needs` (finite, ``[N]``).

        Implement this with ``needs = "scores"``, ``"unit_scores"`` or ``"count"``.
        """
        raise NotImplementedError(
            f"{type(self).__name__} has needs={self.needs!r} and should implement "
            "from_scores(scores)" + (" (or from_gramian)." if self.needs == "gramian" else ".")
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def scores_from_gramian(gramian: Tensor, needs: Needs) -> Tensor:
    """The statistic that ``needs`` names, read off a Gramian ``[N, N]``."""
    dtype = torch.promote_types(gramian.dtype, torch.float32)
    if needs == "count":
        return torch.zeros(gramian.shape[0], dtype=dtype, device=gramian.device)
    if needs == "leave_one_out_scores":
        return (gramian.sum(dim=1) - gramian.diagonal()).to(dtype)
    if needs == "unit_scores":
        norms = gramian.diagonal().clamp(min=0).sqrt()
        tiny = torch.finfo(norms.dtype).tiny
        inverse = torch.where(norms > 0, 1.0 / norms.clamp(min=tiny), 0.0)
        gramian = gramian * inverse[:, None] * inverse[None, :]
    return gramian.sum(dim=1).to(dtype)


def to_unit_range(values: Tensor) -> Tensor:
    """``values`` times the power of two that brings its largest magnitude into
    ``[0.5, 1)``: exact (so sums that cancel still do), and their sum cannot overflow.
    On the device, with no value read back to the host; all zeros stay zeros."""
    _, exponent = torch.frexp(values.abs().amax())
    # The exponent as a float of ``values``' dtype: before torch 2.2 (or so) ``ldexp``
    # with an integer exponent raised 2 to it in float32, which overflows beyond 2**127.
    return torch.ldexp(values, exponent.to(values.dtype).neg())


def signed_normalize(scores: Tensor) -> Tensor:
    """``w_i = r_i / Σ_k |r_k|``; uniform ``1/N`` when every score is zero. Scaled first by
    a power of two (exact) so that ``Σ|r|`` cannot overflow. Branch-free."""
    scaled = to_unit_range(scores)
    denominator = scaled.abs().sum()
    return torch.where(denominator > 0, scaled / denominator, 1.0 / scores.numel())


def positive_normalize(scores: Tensor) -> Tensor:
    """``w_i = max(r_i, 0) / Σ_k max(r_k, 0)``; uniform ``1/N`` when no score is positive.
    Scaled first by a power of two (exact) so that the sum cannot overflow. Branch-free."""
    positive = to_unit_range(scores.clamp(min=0))
    total = positive.sum()
    return torch.where(total > 0, positive / total, 1.0 / scores.numel())


class Mean(Weighting):
    r"""Uniform weights :math:`w_i = 1/N`: plain batched Reptile and MAML.

    The baseline behind the same interface as :class:`Agreement`, so a loop switches
    gradient agreement on and off with one argument. It reads no value of the vectors
    (``needs = "count"``); in a process group it costs one all-reduce of the update (P
    floats), as DDP does, beside the small validation exchange.

    Example:
        >>> import torch
        >>> from ga_optim import Mean
        >>> Mean().weights(torch.randn(4, 3))
        tensor([0.2500, 0.2500, 0.2500, 0.2500])
    """

    needs: ClassVar[Needs] = "count"

    def from_scores(self, scores: Tensor) -> Tensor:
        return torch.full_like(scores, 1.0 / scores.numel())


class Agreement(Weighting):
    r"""The paper's gradient-agreement weights (signed, :math:`\sum_i |w_i| = 1`).

    .. math::

        w_i = \frac{\sum_j g_i^\top g_j}{\sum_k \left|\sum_j g_k^\top g_j\right|}

    Eq. (13) and Algorithm 1, line 8, of Eshratifar, Eigen & Pedram (2018); see
    :func:`ga_optim.agreement_weights`, which this class wraps. O(N·P) from vectors; in a
    process group, one all-reduce of the task sum (P floats), N scores gathered, one
    all-reduce of the update (P floats).
    """

    needs: ClassVar[Needs] = "scores"

    def from_scores(self, scores: Tensor) -> Tensor:
        """``w_i = r_i / Σ_k |r_k|``; uniform when every score is zero."""
        return signed_normalize(scores)


class NonNegativeAgreement(Agreement):
    r"""Agreement weights with negative weights clamped to zero, then renormalised.

    .. math::

        w_i = \frac{\max(0, r_i)}{\sum_k \max(0, r_k)},\qquad r = G\mathbf 1,

    so :math:`w_i \ge 0` and :math:`\sum_i w_i = 1`: a task that opposes the batch is
    dropped rather than ascended. Not in the paper; an opt-in variant for users who do not
    want a disagreeing task's loss to be maximised. All scores ``<= 0`` (which happens only
    when the mean update is zero) give uniform weights. Costs as :class:`Agreement`.
    """

    def from_scores(self, scores: Tensor) -> Tensor:
        return positive_normalize(scores)


def agreement_weights(task_vectors: object = None, *, gramian: Tensor | None = None) -> Tensor:
    r"""Gradient-agreement weights of a meta-batch of tasks.

    Eq. (1)/(13) of Eshratifar, Eigen & Pedram (2018), line 8 of Algorithm 1: each task's
    weight is its update's inner product with the sum of all updates, normalised so that
    the absolute weights sum to one,

    .. math::

        w_i = \frac{\sum_j g_i^\top g_j}{\sum_k \left|\sum_j g_k^\top g_j\right|}
            = \frac{(G\mathbf 1)_i}{\lVert G\mathbf 1\rVert_1},\qquad G = J J^\top,

    so :math:`\sum_i |w_i| = 1` and :math:`w_i \propto g_i^\top \bar g`. A task that agrees
    with the batch gets a larger weight; one that opposes it gets a negative weight.
    Computed as :math:`g_i^\top(\sum_j g_j)`: O(N·P), never the O(N²·P) pairwise Gramian.

    Args:
        task_vectors: the per-task update vectors :math:`g_i` (Reptile: the inner-loop delta
            :math:`\theta - \theta_i`; MAML per Algorithm 1: the same delta, or the
            meta-gradients). Either a tensor ``[N, ...]`` whose first dimension indexes tasks,
            or a sequence of ``N`` per-task sequences of tensors, one per parameter with the
            same shapes across tasks (``None`` counts as zeros).
        gramian: instead of ``task_vectors``, a precomputed Gramian ``[N, N]`` with
            :math:`G_{ij} = g_i^\top g_j`.

    Returns:
        A tensor ``[N]`` of signed weights with ``Σ|w_i| = 1``, in float32 (float64 for
        float64 input; float32 for fp16/bf16, which are accumulated in float32). ``N = 1``
        gives ``[1]``; all-zero vectors, or a zero mean update, give uniform ``1/N``.

    Raises:
        TypeError, ValueError: for non-tensors, empty input, ragged shapes, mixed dtypes or
            devices across tasks, or non-finite values; the message names the task and
            parameter index.

    Example:
        >>> import torch
        >>> from ga_optim import agreement_weights
        >>> g = torch.tensor([[1.0, 0.0], [1.0, 1.0], [-1.0, 0.0]])
        >>> agreement_weights(g)  # G·1 = [1, 2, -1]
        tensor([ 0.2500,  0.5000, -0.2500])

    Reference:
        Eshratifar, Eigen & Pedram, *Gradient Agreement as an Optimization Objective for
        Meta-Learning*, 2018, Eq. (13) and Algorithm 1, line 8.
    """
    return Agreement().weights(task_vectors, gramian=gramian)


class CosineAgreement(Agreement):
    r"""Scale-free agreement: the paper's weights computed on unit-normalised task vectors.

    .. math::

        \hat g_i = g_i / \lVert g_i\rVert,\qquad
        w_i = \frac{\sum_j \hat g_i^\top \hat g_j}
                   {\sum_k \left|\sum_j \hat g_k^\top \hat g_j\right|}

    The paper's :math:`w_i \propto g_i^\top \bar g` grows with the square of a task's update
    norm, so tasks with large updates (large-amplitude sine waves, say) dominate the batch;
    here only directions count. When the unit vectors sum to (numerically) zero, the
    weights are uniform. Not in the paper: an opt-in variant, ablated in
    ``docs/RESULTS.md``. A zero vector counts as a zero direction. Unlike the paper's
    weights, the combined update may oppose the mean of the raw vectors.

    Both paths apply one rule to the scores :math:`\hat r = \hat G\mathbf 1`: when
    :math:`\lVert\sum_i \hat g_i\rVert^2 = \sum_i \hat r_i` is at or below
    :math:`4N^2\varepsilon` (the rounding noise of a Gramian's :math:`N^2` unit-scale
    entries) the directions cancel and the weights are uniform. Costs as
    :class:`Agreement` (the all-reduced sum is of unit vectors).
    """

    needs: ClassVar[Needs] = "unit_scores"

    def from_scores(self, scores: Tensor) -> Tensor:
        n = scores.numel()
        cancelled = scores.sum() <= 4 * n * n * torch.finfo(scores.dtype).eps
        return torch.where(cancelled, torch.full_like(scores, 1.0 / n), signed_normalize(scores))


class LeaveOneOutAgreement(Weighting):
    r"""Agreement with the *rest* of the batch: each task's own term left out of its score.

    .. math::

        r_i = g_i^\top \sum_{j \ne i} g_j = (G\mathbf 1)_i - G_{ii},\qquad
        w_i = \frac{r_i}{\sum_k |r_k|},

    or, with ``non_negative=True``,
    :math:`w_i = \max(r_i, 0) / \sum_k \max(r_k, 0)`.

    The paper's score :math:`(G\mathbf 1)_i` (Eshratifar, Eigen & Pedram, 2018, Eq. 13)
    holds the self term :math:`\lVert g_i\rVert^2`, so a task with a large update that
    agrees with nobody (a corrupted task) still gets the largest weight: three agreeing
    unit tasks and one orthogonal task a thousand times larger give it 99.999 % of
    :class:`Agreement`'s weight and none of this weighting's (the example below). Without
    the self term a task is weighted by how much the *others* pull its way. A large outlier
    still enters every other task's score through :math:`g_i^\top g_{\text{out}}`, so
    only an outlier orthogonal to the rest is ignored outright. Every score zero
    (``N = 1``, mutually orthogonal tasks) gives uniform weights, and so does, with
    ``non_negative=True``, no positive score. Not in the paper; the corrupted-task study in
    ``docs/RESULTS.md`` measures both forms (the signed one weights a batch of nearly
    orthogonal updates by noise of both signs).

    The scores are computed in float64 on the task matrix scaled by a power of two (exact,
    and free of over- and underflow), which is what a weighting with ``needs =
    "leave_one_out_scores"`` receives. O(N·P) from vectors, one float64 copy of the task
    matrix; in a process group as :class:`Agreement` (plus one float: the largest entry).

    Args:
        non_negative: clamp negative scores to zero before normalising (``w_i >= 0``,
            ``Σ w_i = 1``): a task that opposes the rest is dropped, not ascended.

    Example:
        >>> import torch
        >>> from ga_optim import LeaveOneOutAgreement
        >>> from ga_optim import Agreement
        >>> g = torch.tensor([[1.0, 0, 0], [1.0, 0.1, 0], [0.9, -0.1, 0], [0, 0, 1000.0]])
        >>> [round(x, 4) for x in Agreement()(g).tolist()]
        [0.0, 0.0, 0.0, 1.0]
        >>> [round(x, 4) for x in LeaveOneOutAgreement()(g).tolist()]
        [0.3405, 0.3387, 0.3208, 0.0]
    """

    needs: ClassVar[Needs] = "leave_one_out_scores"

    def __init__(self, non_negative: bool = False) -> None:
        if not isinstance(non_negative, bool):
            raise TypeError(f"`non_negative` should be a bool. Found {non_negative!r}.")
        self.non_negative = non_negative

    def from_scores(self, scores: Tensor) -> Tensor:
        return positive_normalize(scores) if self.non_negative else signed_normalize(scores)

    def __repr__(self) -> str:
        return f"LeaveOneOutAgreement(non_negative={self.non_negative})"


class GeometricMedian(Weighting):
    r"""The weights whose combination :math:`\sum_i w_i g_i` is the geometric median.

    The geometric median :math:`z^\star = \arg\min_z \sum_i \lVert g_i - z\rVert` of the
    task vectors, smoothed as in RFA (Pillutla, Kakade & Harchaoui, *Robust Aggregation for
    Federated Learning*, arXiv 1912.13445, Algorithm 3): the weights are Weiszfeld's at
    the minimum :math:`z` of the smoothed objective,

    .. math::

        w_i = \frac{1/\max(d_i, \nu)}{\sum_k 1/\max(d_k, \nu)},\qquad
        d_i = \lVert g_i - z\rVert,\qquad
        z = \arg\min_z \sum_i \phi_\nu(\lVert g_i - z\rVert),\quad
        \phi_\nu(d) = \begin{cases} d & d \ge \nu \\ d^2/(2\nu) + \nu/2 & d < \nu
        \end{cases}

    so that :math:`z = \sum_i w_i g_i` (its optimality condition). A task far from the
    rest gets a weight inversely proportional to its distance, however large its update:
    the median moves by at most a bounded amount when a minority of tasks is corrupted
    (breakdown point 1/2). ``w_i >= 0`` and ``Σ w_i = 1``; identical tasks get ``1/N``.

    From the Gramian alone, in float64: the tasks become points with that Gramian, taken
    about the medoid (the task nearest the others; distances are unchanged, and the
    coordinates are finest near the median), by its eigendecomposition (directions below
    rounding dropped). Two tasks get ½ each, the midpoint, at any scale and in either
    order; the weights do not depend on the tasks' order. :math:`z` is found by
    Newton's method (quadratically convergent, as in Overton, *Math. Programming* 27, 1983)
    with a backtracking line search, a Weiszfeld step where Newton's does not lower the
    objective, starting at the mean; it stops when a step changes no weight by more than
    about ``tolerance`` (relatively) or moves :math:`z` by no more than rounding. The
    weights are then polished by Weiszfeld's iteration above on the weights themselves,
    whose distances :math:`d_i^2 = G_{ii} - 2(Gw)_i + w^\top G w` come from the Gramian
    directly (the eigendecomposition resolves distances only to about √ε of the largest
    norm), until no weight moves by more than ``tolerance``. Weiszfeld's iteration alone
    crawls where the objective is nearly flat around the median (the stress profile found
    four 2-D tasks whose weights were still 0.07 from their limit after 1 000 steps) and
    next to a task; from Newton's point it has nothing left to crawl. Each stage takes at
    most ``max_iterations`` steps.
    :math:`\nu` is ``smoothing`` times the root mean square of the task norms
    :math:`\sqrt{\operatorname{tr} G / N}`, so the weights do not depend on the vectors'
    scale; tasks closer than ν count as one point, and :math:`\sum_i w_i g_i` is the
    geometric median to within about :math:`N\nu` in the objective. A median that is not
    unique (tasks on a line, an even number of them) is the one this path from the mean
    reaches. All-zero vectors give uniform weights (from vectors, so do vectors whose
    squared norms underflow float64, below about ``1e-154``: the Gramian cannot see them).
    It runs on the host: the Gramian ``[N, N]`` is read back once per call (as TorchJD's
    weightings do), and from vectors it costs what every Gramian weighting costs (O(N²·P);
    in a process group every task's vector is gathered).

    Args:
        smoothing: :math:`\nu` relative to the RMS task norm (default ``1e-6``).
        tolerance: stop when a step changes no weight by more than this (default
            ``1e-10``).
        max_iterations: at most this many steps of each stage (default 1000).

    Example:
        >>> import torch
        >>> from ga_optim import GeometricMedian
        >>> g = torch.tensor([[1.0, 0], [0, 1.0], [-1.0, 0], [0, -1.0], [0, 100.0]])
        >>> w = GeometricMedian()(g)   # the far task barely moves the median
        >>> [round(x, 3) for x in w.tolist()]
        [0.183, 0.499, 0.183, 0.134, 0.002]
    """

    def __init__(
        self, *, smoothing: float = 1e-6, tolerance: float = 1e-10, max_iterations: int = 1000
    ) -> None:
        for name, value in (("smoothing", smoothing), ("tolerance", tolerance)):
            if not isinstance(value, (int, float)) or not 0 < value < 1:
                raise ValueError(f"`{name}` should be a number in (0, 1). Found {value!r}.")
        if not isinstance(max_iterations, int) or max_iterations < 1:
            raise ValueError(f"`max_iterations` should be an int >= 1. Found {max_iterations!r}.")
        self.smoothing = float(smoothing)
        self.tolerance = float(tolerance)
        self.max_iterations = max_iterations

    def from_gramian(self, gramian: Tensor) -> Tensor:
        dtype = torch.promote_types(gramian.dtype, torch.float32)
        n = gramian.shape[0]
        g = gramian.detach().to("cpu", torch.float64)
        scale = float(g.diagonal().clamp(min=0).mean())  # the mean squared task norm
        if scale == 0:
            return torch.full((n,), 1.0 / n, dtype=dtype, device=gramian.device)
        # The tasks as points with this Gramian, at unit RMS norm (ν is relative), about
        # the medoid (the task with the least distance to the others): distances do not
        # change, the median is found where the coordinates are finest (near the origin),
        # and two tasks, whichever is the origin, are 0 and D, with the midpoint at D/2
        # exactly (½ each, at any scale and in either order).
        g = g / scale
        own = g.diagonal()  # ‖g_i‖², for the distances ‖g_i − g_j‖ that pick the medoid
        apart = (own[:, None] + own[None, :] - 2 * g).clamp(min=0).sqrt()
        shift = torch.eye(n, dtype=torch.float64)
        shift[:, int(apart.sum(1).argmin())] -= 1.0  # row i: g_i − g_medoid
        g = shift @ g @ shift.T
        g = (g + g.T) / 2
        values, vectors = torch.linalg.eigh(g)
        kept = values > n * 2**-52 * max(float(values.max()), 1.0)
        points = vectors[:, kept] * values[kept].sqrt()
        nu, eye = self.smoothing, torch.eye(points.shape[1], dtype=torch.float64)

        def objective(z: Tensor) -> float:  # Σ φ_ν(d_i)
            d = (points - z).norm(dim=1)
            return float(torch.where(d < nu, d * d / (2 * nu) + nu / 2, d).sum())

        z = points.mean(0)
        for _ in range(self.max_iterations):
            diff = z - points
            d = diff.norm(dim=1)
            inverse = 1.0 / d.clamp(min=nu)
            gradient = (diff * inverse[:, None]).sum(0)
            if float(gradient.norm()) <= 4 * n * 2**-52:  # Σ of unit vectors, at rounding
                break
            unit = diff * (inverse * (d >= nu))[:, None]  # (z − g_i)/d_i outside ν, else 0
            total = inverse.sum()
            hessian = eye * total - (unit * inverse[:, None]).T @ unit  # Σ (I − u uᵀ)/d_i
            # Damped where the objective is flat (a median that is not unique), so that
            # rounding in the gradient does not move z along the flat direction.
            step = -torch.linalg.solve(hessian + eye * (total * 2**-20), gradient)
            now, size = objective(z), 1.0
            while (worse := objective(z + size * step) > now) and size > 2**-10:
                size /= 2
            if worse:  # Weiszfeld's step never raises it
                step, size = -gradient / total, 1.0
            z, moved = z + size * step, float((size * step).norm())
            # A move δ changes a weight by about δ/max(d_i, ν), relatively: stop when that
            # is within the tolerance for every task, or the move is at rounding.
            if moved * float(inverse.max()) <= self.tolerance or moved <= 2**-50 * (
                1 + float(z.norm())
            ):
                break
        inverse = 1.0 / (points - z).norm(dim=1).clamp(min=nu)
        weights: Tensor = inverse / inverse.sum()
        # Polished by Weiszfeld's steps on the weights, whose distances come from the
        # Gramian directly: as exact for tasks close to each other as their own norms allow
        # (the eigendecomposition resolves distances only to about √ε of the largest norm).
        squares = g.diagonal().clamp(min=0)
        for _ in range(self.max_iterations):
            gw = g @ weights
            inverse = 1.0 / (squares - 2 * gw + weights @ gw).clamp(min=0).sqrt().clamp(min=nu)
            previous, weights = weights, inverse / inverse.sum()
            if float((weights - previous).abs().max()) <= self.tolerance:
                break
        return weights.to(gramian.device, dtype)

    def __repr__(self) -> str:
        return (
            f"GeometricMedian(smoothing={self.smoothing}, tolerance={self.tolerance}, "
            f"max_iterations={self.max_iterations})"
        )
