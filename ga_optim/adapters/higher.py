"""Gradient agreement for ``higher.innerloop_ctx`` MAML loops.

::

    agree = AgreementHigher(model, meta_opt)
    for task in meta_batch:
        ctx = higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False)
        with ctx as (fmodel, diffopt):
            for _ in range(inner_steps):
                diffopt.step(support_loss(fmodel))
            agree.backward(query_loss(fmodel), fmodel)   # was: query_loss.backward()
    agree.step()                                         # was: meta_opt.step()

``copy_initial_weights=False`` is what lets the query loss reach ``model``'s parameters
(second order). With ``track_higher_grads=False`` (first order) the fast weights are
detached from θ and the gradient with respect to the fast weights is used instead.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .._aggregator import NonFinitePolicy, Reduction
from .._weightings import Weighting
from ._recorder import AgreementOn, MetaGradientRecorder

try:
    import higher as _higher
except ImportError as error:  # pragma: no cover - exercised only without higher
    raise ImportError(
        "ga_optim.adapters.higher needs higher. Install it with: pip install higher==0.2.1"
    ) from error

__all__ = ["AgreementHigher"]


class AgreementHigher(MetaGradientRecorder):
    r"""Record each ``higher`` task's meta-gradient and inner delta; step with agreement.

    Algorithm 1, lines 7–9, of Eshratifar, Eigen & Pedram (2018), as in
    :class:`ga_optim.adapters.learn2learn.AgreementMAML`.

    Args:
        model: the meta-model θ (the module given to ``higher.innerloop_ctx``).
        optimizer: the outer optimizer over ``model.parameters()``, or ``None``:
            :meth:`step` then only writes ``.grad`` and the loop steps itself (gradient
            clipping, ``scaler.step(opt)`` under a ``torch.amp.GradScaler``).
        params: the outer parameters, when the loop steps them itself
            (``optimizer=None``) and they are more than the wrapped model's (ANIL's
            features outside the MAML-wrapped head); default: every parameter
            ``optimizer`` holds, or without one the wrapped model's. Each task's
            meta-gradient covers all of them.
        weighting: a :class:`~ga_optim.Weighting`; default :class:`~ga_optim.Agreement`.
        agreement_on: ``"deltas"`` (the paper: the adapted parameters' inner-loop deltas)
            or ``"meta_gradients"`` (every outer parameter's meta-gradient).
        reduction: ``"mean"`` (default) or ``"sum"``: with :class:`~ga_optim.Mean`, the
            tasks' average or their sum, as the loop it replaces averages or sums the
            tasks' losses (see :class:`~ga_optim.GradientAgreementAggregator`).
        track_cosines: record each task's cosine with the mean agreement vector in
            :attr:`last_diagnostics` (one more pass over the vectors).
        non_finite: ``"raise"`` (default) or ``"propagate"``: let NaN/Inf meta-gradients
            reach ``.grad`` for a ``torch.amp.GradScaler`` to skip the step (needs
            ``optimizer=None``; see :class:`~ga_optim.GradientAgreementAggregator`).
        process_group: ``None`` (one process) or a ``torch.distributed`` process group over
            which the meta-batch is spread: each rank records its own tasks and every rank
            calls :meth:`step` (see :class:`~ga_optim.GradientAgreementAggregator`).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        params: Iterable[Tensor] | None = None,
        weighting: Weighting | None = None,
        agreement_on: AgreementOn = "deltas",
        reduction: Reduction = "mean",
        track_cosines: bool = False,
        non_finite: NonFinitePolicy = "raise",
        process_group: Any = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` should be a torch.nn.Module. Found `{type(model).__name__}`.")
        self.model = model
        super().__init__(
            model.parameters(),
            optimizer,
            params=params,
            weighting=weighting,
            agreement_on=agreement_on,
            reduction=reduction,
            track_cosines=track_cosines,
            non_finite=non_finite,
            process_group=process_group,
        )

    def backward(self, loss: Tensor, fmodel: nn.Module) -> None:
        """Replace ``loss.backward()`` inside the ``innerloop_ctx``: record this task."""
        if not isinstance(fmodel, _higher.patch._MonkeyPatchBase):
            raise TypeError(
                "`fmodel` should be the functional model from higher.innerloop_ctx. "
                f"Found `{type(fmodel).__name__}`."
            )
        self.record_task(loss, list(fmodel.parameters()), fallback=True, what="fmodel")
