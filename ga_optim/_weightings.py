"""Weightings: objects that map a meta-batch of task vectors to one weight per task.

A weighting is the *what*; :class:`~ga_optim.GradientAgreementAggregator` is the *how*
(combining and stepping). A new weighting is a small class: implement
:meth:`Weighting.from_gramian`, and optionally an O(N·P) path from the vectors.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from ._checks import TaskBatch, as_task_batch, check_gramian, locate_non_finite
from ._kernels import accumulation_dtype, gramian
from ._weights import (
    agreement_scores,
    cosine_agreement_scores,
    signed_normalize,
    uniform_weights,
)

__all__ = ["Agreement", "Mean", "NonNegativeAgreement", "Weighting", "agreement_weights"]


class Weighting(ABC):
    """Base class: weights ``[N]`` from per-task vectors or their Gramian ``G = J Jᵀ``.

    Subclasses implement :meth:`from_gramian`. The default path from vectors builds the
    full Gramian (O(N²·P)) in float64 — exact in range for fp32/fp16/bf16 vectors, whose
    squares float64 holds — and returns the weights in the vectors' accumulation dtype;
    weightings that need less override :meth:`_from_batch`.
    """

    #: Whether the weights depend on the vectors' values. A weighting that reads only their
    #: number (``Mean``) sets it to False, and callers then check the values are finite.
    reads_values: bool = True

    def weights(
        self,
        task_vectors: object = None,
        *,
        gramian: Tensor | None = None,
        foreach: bool | None = None,
    ) -> Tensor:
        """The weights of ``task_vectors`` (see :func:`ga_optim.agreement_weights` for the
        accepted forms) or of a precomputed ``gramian`` ``[N, N]``; pass exactly one."""
        if (task_vectors is None) == (gramian is None):
            raise TypeError("Pass exactly one of `task_vectors` and `gramian`.")
        if gramian is not None:
            return self.from_gramian(check_gramian(gramian))
        batch = as_task_batch(task_vectors)
        if not self.reads_values:
            locate_non_finite(batch)
        return self._from_batch(batch, foreach=foreach)

    __call__ = weights

    @abstractmethod
    def from_gramian(self, gramian: Tensor) -> Tensor:
        """Weights ``[N]`` from a validated Gramian ``[N, N]``."""

    def _from_batch(self, batch: TaskBatch, *, foreach: bool | None) -> Tensor:
        matrix = gramian(batch, torch.float64)
        if not bool(torch.isfinite(matrix).all()):
            locate_non_finite(batch)
        return self.from_gramian(matrix).to(uniform_weights(batch).dtype)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Mean(Weighting):
    r"""Uniform weights :math:`w_i = 1/N`: plain batched Reptile and MAML.

    The baseline behind the same interface as :class:`Agreement`, so a loop switches
    gradient agreement on and off with one argument.

    Example:
        >>> import torch
        >>> from ga_optim import Mean
        >>> Mean().weights(torch.randn(4, 3))
        tensor([0.2500, 0.2500, 0.2500, 0.2500])
    """

    reads_values = False

    def from_gramian(self, gramian: Tensor) -> Tensor:
        n = gramian.shape[0]
        return torch.full(
            (n,), 1.0 / n, dtype=accumulation_dtype(gramian.dtype), device=gramian.device
        )

    def _from_batch(self, batch: TaskBatch, *, foreach: bool | None) -> Tensor:
        return uniform_weights(batch)


class Agreement(Weighting):
    r"""The paper's gradient-agreement weights (signed, :math:`\sum_i |w_i| = 1`).

    .. math::

        w_i = \frac{\sum_j g_i^\top g_j}{\sum_k \left|\sum_j g_k^\top g_j\right|}

    Eq. (13) and Algorithm 1, line 8, of Eshratifar, Eigen & Pedram (2018); see
    :func:`ga_optim.agreement_weights`, which this class wraps. O(N·P) from vectors.
    """

    def from_gramian(self, gramian: Tensor) -> Tensor:
        return self._normalize(gramian.sum(dim=1).to(accumulation_dtype(gramian.dtype)))

    def _from_batch(self, batch: TaskBatch, *, foreach: bool | None) -> Tensor:
        return self._normalize(agreement_scores(batch, foreach=foreach))

    def _normalize(self, scores: Tensor) -> Tensor:
        """Map the agreement scores ``r = G·1`` to weights."""
        return signed_normalize(scores)


class NonNegativeAgreement(Agreement):
    r"""Agreement weights with negative weights clamped to zero, then renormalised.

    .. math::

        w_i = \frac{\max(0, r_i)}{\sum_k \max(0, r_k)},\qquad r = G\mathbf 1,

    so :math:`w_i \ge 0` and :math:`\sum_i w_i = 1`: a task that opposes the batch is
    dropped rather than ascended. Not in the paper; an opt-in variant for users who do not
    want a disagreeing task's loss to be maximised. All scores ``<= 0`` (which happens only
    when the mean update is zero) give uniform weights.
    """

    def _normalize(self, scores: Tensor) -> Tensor:
        positive = scores.clamp(min=0)
        total = positive.sum()
        if not bool(total > 0):
            return torch.full_like(scores, 1.0 / scores.numel())
        if not bool(torch.isfinite(total)):
            positive = positive / positive.max()
            total = positive.sum()
        return positive / total


def agreement_weights(
    task_vectors: object = None, *, gramian: Tensor | None = None, foreach: bool | None = None
) -> Tensor:
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
        foreach: use the ``torch._foreach_*`` kernels (default) or the per-tensor loop.

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
    return Agreement().weights(task_vectors, gramian=gramian, foreach=foreach)


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
    """

    def from_gramian(self, gramian: Tensor) -> Tensor:
        norms = gramian.diagonal().clamp(min=0).sqrt()
        inverse = torch.where(norms > 0, 1.0 / norms.clamp(min=torch.finfo(norms.dtype).tiny), 0.0)
        unit = gramian * inverse[:, None] * inverse[None, :]
        # ‖Σ ĝ‖² = 1ᵀĜ1 sums N² rounded entries: below 4·N²·eps it is rounding noise.
        n = gramian.shape[0]
        if float(unit.sum()) <= 4 * n * n * torch.finfo(unit.dtype).eps:
            return torch.full((n,), 1.0 / n, dtype=unit.dtype, device=unit.device)
        return super().from_gramian(unit)

    def _from_batch(self, batch: TaskBatch, *, foreach: bool | None) -> Tensor:
        return self._normalize(cosine_agreement_scores(batch, foreach=foreach))
