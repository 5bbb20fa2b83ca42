r"""What a weighting reads of a meta-batch, as matrix products on the task matrix.

For the task matrix :math:`J` ``[N, P]`` (one row :math:`g_i` per task; in a process group
each rank holds its own rows, and what crosses the wire is named below):

* ``"scores"``: the task sum :math:`s = J^\top\mathbf 1` (all-reduced, P floats) and the
  agreement scores :math:`r = J s`, :math:`r_i = g_i^\top\sum_j g_j = (G\mathbf 1)_i`
  (gathered, N floats): Eq. (13) of Eshratifar, Eigen & Pedram (2018) in O(N·P);
* ``"unit_scores"``: the same on the unit rows :math:`\hat g_i = g_i/\lVert g_i\rVert`,
  with :math:`\hat s = J^\top(1/\lVert g_i\rVert)`: no unit matrix is formed beside the
  row-scaled float64 copy;
* ``"leave_one_out_scores"``: :math:`r_i - \lVert g_i\rVert^2 = g_i^\top\sum_{j\ne i} g_j`
  in float64, on the matrix scaled by the power of two that brings its largest entry
  (over every rank: one more float all-reduced) into ``[0.5, 1)``;
* ``"gramian"``: :math:`G = J J^\top` in float64 (every rank's rows gathered, N × P floats);
* ``"count"``: nothing but N.

**Numerics: one policy, for every weighting and both paths (vectors and Gramian).**

* *Accumulation.* The task matrix is kept in at least float32 (fp16/bf16 vectors are
  accumulated in float32, float32 in float32, float64 in float64); scores and weights
  come in the matrix's dtype. Unit scores and a Gramian built from vectors are float64.
* *Overflow and underflow of the scores.* Scores that are not finite, or whose largest
  magnitude falls below ``tiny/eps`` of their dtype (subnormal products lose digits),
  send the call to the aggregator's careful path, which recomputes them in float64 on the
  matrix scaled by a power of two (:func:`scaled`): exact, so the weights do not
  change and sums that cancel exactly still do. Unit scores scale each row by its own
  power of two first, so no norm under- or overflows whatever a task's magnitude.
  Normalising divides by ``Σ|r|`` after a power-of-two scaling
  (:func:`~ga_optim._weightings.to_unit_range`), so it cannot overflow.
* *Zero denominators.* All scores zero (all-zero vectors, or a zero mean update) give
  uniform ``1/N``; :class:`~ga_optim.NonNegativeAgreement` gives uniform weights when no
  score is positive; :class:`~ga_optim.CosineAgreement` when ``Σ r̂ ≤ 4·N²·eps`` (the
  same rule from vectors and from a Gramian).
* *Non-finite input* raises :class:`~ga_optim.NonFiniteError` naming the task and
  parameter (``non_finite="propagate"`` lets it through to ``.grad`` instead). The check
  is one device flag over what a step read and produced; the scan that names the culprit
  (:func:`~ga_optim._matrix.locate_non_finite`) runs only when the flag is down.
* *What floating point determines.* Weights are determined to about ``κ·N·eps``, with
  ``κ = (Σ‖g_i‖)² / Σ|g_i·Σ g_j|`` counting the cancellation in the task sum
  (:func:`ga_optim.testing.condition_number`); the two paths agree to that, which is what
  the property tests check.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._collective import Collective

__all__ = ["cosines", "scaled", "statistic"]


def statistic(
    matrix: Tensor,
    needs: str,
    collective: Collective,
    counts: Sequence[int],
    scratch: Tensor | None = None,
) -> Tensor:
    """The statistic ``needs`` names (see :class:`~ga_optim.Weighting`) of every rank's
    tasks, from this rank's rows ``matrix``: scores ``[N]``, or the Gramian ``[N, N]``.
    ``scratch`` (``[P]``, the matrix's dtype) holds the task sum instead of a new tensor."""
    if needs == "count":
        return matrix.new_zeros(sum(counts))
    if needs == "gramian":
        rows = collective.gather(matrix.double(), counts)
        return rows @ rows.T
    inverse = own = None
    if needs == "leave_one_out_scores":
        matrix = scaled(matrix, collective)
        own = torch.linalg.vecdot(matrix, matrix)  # the self terms ‖g_i‖², left out
    if needs == "unit_scores":
        matrix = scaled(matrix, None)
        norms = torch.linalg.vector_norm(matrix, dim=1)
        inverse = torch.where(norms > 0, 1.0 / norms, 0.0)
        total = matrix.T @ inverse
    else:
        total = matrix.sum(0) if scratch is None else torch.sum(matrix, 0, out=scratch)
    collective.sum_(total)
    scores = matrix @ total
    if inverse is not None:
        scores = inverse * scores
    elif own is not None:
        scores = scores - own
    return collective.gather(scores, counts)


def scaled(matrix: Tensor, collective: Collective | None) -> Tensor:
    """``matrix`` in float64 times the power of two that brings its largest magnitude
    (over every rank's rows; with ``collective=None``, each row's own) into ``[0.5, 1)``:
    exact, on the device, so nothing over- or underflows and sums that cancel still do.
    The factor is capped at ``2**1000`` so that it stays finite for subnormal entries."""
    matrix = matrix.double()
    if collective is None:
        largest = matrix.abs().amax(dim=1, keepdim=True)
    else:
        largest = (matrix.abs().amax() if matrix.numel() else matrix.new_zeros(())).reshape(1)
        collective.max_(largest)
    _, exponent = torch.frexp(largest)
    return torch.ldexp(matrix, exponent.clamp(min=-1000).neg().double())


def cosines(matrix: Tensor, collective: Collective, counts: Sequence[int]) -> Tensor:
    """``cos(g_i, Σ_j g_j)`` for every rank's tasks, in float64 (0 for a zero vector or a
    zero sum), from the scores and ``‖s‖² = Σ_i r_i``: one more pass for the row norms."""
    matrix = scaled(matrix, collective)
    scores = statistic(matrix, "scores", collective, counts)
    norms = collective.gather(torch.linalg.vector_norm(matrix, dim=1), counts)
    denominator = norms * scores.sum().clamp(min=0).sqrt()
    return torch.where(denominator > 0, scores / denominator, 0.0).clamp(-1.0, 1.0)
