"""What every adapter shows of the aggregator it wraps."""

from __future__ import annotations

from torch import Tensor

from .._aggregator import AgreementDiagnostics, GradientAgreementAggregator

__all__ = ["AdapterBase"]


class AdapterBase:
    """Base of the adapters: the wrapped aggregator's last weights and diagnostics."""

    aggregator: GradientAgreementAggregator

    @property
    def last_weights(self) -> Tensor | None:
        """The weights ``[N]`` of the last :meth:`step`."""
        return self.aggregator.last_weights

    @property
    def last_diagnostics(self) -> AgreementDiagnostics | None:
        """What the last :meth:`step` saw (see :class:`~ga_optim.AgreementDiagnostics`)."""
        return self.aggregator.last_diagnostics
