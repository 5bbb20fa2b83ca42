"""TorchJD interop, both ways: its Gramian weightings in meta-learning loops, ours in its API.

TorchJD (``pip install "torchjd[quadprog-projector]"``) weights the rows of a Jacobian from their
Gramian ``G = J Jᵀ``: UPGrad, MGDA, DualProj, AlignedMTL, IMTL-G, CAGrad, …, each a
``torchjd.aggregation.Weighting`` that maps ``G [m, m]`` to weights ``[m]``. A ga_optim
weighting maps the same Gramian of the tasks' update vectors to weights, so each side's
objects fit the other's contract:

* :func:`from_torchjd` wraps a TorchJD Gramian weighting as a ga_optim
  :class:`~ga_optim.Weighting` (``needs = "gramian"``): it then works in
  :class:`~ga_optim.GradientAgreementAggregator` and every adapter. It reads the whole
  Gramian: O(N²·P) per step, and in a process group every task's vector is gathered.
* :func:`to_torchjd` wraps a ga_optim weighting as a TorchJD
  ``Weighting`` [``PSDMatrix``]; ``torchjd.aggregation.GramianWeightedAggregator`` of it
  is a TorchJD aggregator (for ``torchjd.autojac.jac_to_grad`` after ``mtl_backward``).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ._weightings import Weighting

__all__ = ["from_torchjd", "to_torchjd"]


class _FromTorchJD(Weighting):
    """A TorchJD Gramian weighting seen as a ga_optim weighting."""

    def __init__(self, weighting: Any) -> None:
        self.torchjd_weighting = weighting

    def from_gramian(self, gramian: Tensor) -> Tensor:
        weights: Tensor = self.torchjd_weighting(gramian)
        return weights

    def __repr__(self) -> str:
        return f"from_torchjd({self.torchjd_weighting!r})"


def from_torchjd(weighting: Any) -> Weighting:
    """A TorchJD Gramian weighting (e.g. ``UPGradWeighting()``) as a ga_optim weighting.

    Args:
        weighting: a ``torchjd.aggregation.Weighting`` taking a Gramian ``[m, m]`` (the
            ``...Weighting`` classes; not the ``Aggregator`` ones, which take a Jacobian).

    Returns:
        A :class:`~ga_optim.Weighting` with ``needs = "gramian"``, for any ga_optim
        aggregator or adapter (``weighting=from_torchjd(UPGradWeighting())``).

    Example:
        >>> import torch
        >>> from torchjd.aggregation import UPGradWeighting
        >>> from ga_optim import GradientAgreementAggregator, from_torchjd
        >>> params = [torch.zeros(2, requires_grad=True)]
        >>> upgrad = from_torchjd(UPGradWeighting())
        >>> aggregator = GradientAgreementAggregator(params, weighting=upgrad)
        >>> aggregator.weights(torch.tensor([[-4.0, 1.0], [6.0, 1.0]])).shape
        torch.Size([2])
    """
    if isinstance(weighting, Weighting):
        raise TypeError(
            "`weighting` is already a ga_optim Weighting; from_torchjd wraps a TorchJD one."
        )
    if not callable(weighting):
        raise TypeError(
            "`weighting` should be a TorchJD Gramian weighting (e.g. "
            f"torchjd.aggregation.UPGradWeighting()). Found `{type(weighting).__name__}`."
        )
    return _FromTorchJD(weighting)


def to_torchjd(weighting: Weighting) -> Any:
    r"""A ga_optim weighting (e.g. :class:`~ga_optim.Agreement`) as a TorchJD Gramian
    weighting, for TorchJD's multi-task API.

    Wrap it in ``torchjd.aggregation.GramianWeightedAggregator`` to get an aggregator::

        from torchjd.aggregation import GramianWeightedAggregator
        from torchjd.autojac import jac_to_grad, mtl_backward

        aggregator = GramianWeightedAggregator(to_torchjd(Agreement()))
        mtl_backward(losses, features)            # one row of the Jacobian per task
        jac_to_grad(shared_params, aggregator)    # .grad = w @ J, w from Eq. (13)

    Args:
        weighting: a :class:`~ga_optim.Weighting`.

    Returns:
        A ``torchjd.aggregation.Weighting`` whose ``forward(gramian)`` is
        ``weighting.from_gramian(gramian)`` (in the Gramian's dtype).
    """
    if not isinstance(weighting, Weighting):
        raise TypeError(
            "`weighting` should be a ga_optim Weighting (e.g. Agreement()). "
            f"Found `{type(weighting).__name__}`."
        )
    try:
        from ._torchjd import GaOptimWeighting
    except ImportError as error:  # pragma: no cover - exercised only without torchjd
        raise ImportError(
            "ga_optim.to_torchjd needs torchjd. Install it with: "
            'pip install "torchjd[quadprog-projector]"'
        ) from error
    return GaOptimWeighting(weighting)
