"""A ga_optim weighting as a TorchJD ``Weighting``: the one class :func:`~ga_optim.to_torchjd`
returns, defined once at module level so that its objects pickle (checkpoints,
multiprocessing) as TorchJD's own weightings do.

This module imports torchjd; :mod:`ga_optim._interop` imports it only when
:func:`~ga_optim.to_torchjd` is called, so ``import ga_optim`` never needs torchjd.
"""

from __future__ import annotations

from torch import Tensor
from torchjd.aggregation import Weighting as TorchJDWeighting

from ._checks import check_gramian
from ._weightings import Weighting

__all__ = ["GaOptimWeighting"]


class GaOptimWeighting(TorchJDWeighting):  # type: ignore[type-arg]
    """A ga_optim weighting as a TorchJD ``Weighting`` [``PSDMatrix``]: ``forward(gramian)``
    is ``weighting.from_gramian(gramian)``, in the Gramian's dtype."""

    def __init__(self, weighting: Weighting) -> None:
        super().__init__()
        self.ga_optim_weighting = weighting

    def forward(self, gramian: Tensor, /) -> Tensor:
        checked = check_gramian(gramian)
        return self.ga_optim_weighting.from_gramian(checked).to(gramian.dtype)

    def extra_repr(self) -> str:
        return repr(self.ga_optim_weighting)
