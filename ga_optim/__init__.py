"""ga_optim: gradient agreement for meta-learning (Eshratifar, Eigen & Pedram, 2018).

Users import from here and from ``ga_optim.adapters.*``; modules starting with ``_`` are
private.
"""

from ._aggregator import AgreementDiagnostics, GradientAgreementAggregator
from ._checks import NonFiniteError, TaskStack
from ._interop import from_torchjd, to_torchjd
from ._weightings import (
    Agreement,
    CosineAgreement,
    GeometricMedian,
    LeaveOneOutAgreement,
    Mean,
    Needs,
    NonNegativeAgreement,
    Weighting,
    agreement_weights,
)

__version__ = "0.1.0"

__all__ = [
    "Agreement",
    "AgreementDiagnostics",
    "CosineAgreement",
    "GeometricMedian",
    "GradientAgreementAggregator",
    "LeaveOneOutAgreement",
    "Mean",
    "Needs",
    "NonFiniteError",
    "NonNegativeAgreement",
    "TaskStack",
    "Weighting",
    "__version__",
    "agreement_weights",
    "from_torchjd",
    "to_torchjd",
]
