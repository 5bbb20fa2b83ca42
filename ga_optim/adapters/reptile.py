"""Reptile with gradient agreement for any ``nn.Module`` and any inner optimizer."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from .._aggregator import GradientAgreementAggregator, NonFinitePolicy, Reduction
from .._matrix import Rows
from .._weightings import Weighting
from ._base import AdapterBase

__all__ = ["AgreementReptile"]


class AgreementReptile(AdapterBase):
    r"""Batched Reptile whose outer step weights the tasks by gradient agreement.

    Algorithm 1, line 10, of Eshratifar, Eigen & Pedram (2018):
    :math:`\theta \leftarrow \theta + \alpha \sum_i w_i (\theta_i - \theta)`, with the task
    vectors :math:`g_i = \theta - \theta_i` and :math:`w` from ``weighting`` (default the
    paper's :class:`~ga_optim.Agreement`; :class:`~ga_optim.Mean` gives plain batched
    Reptile). The outer optimizer applies it: with ``SGD(lr=α)`` exactly line 10.

    Usage::

        reptile = AgreementReptile(model, torch.optim.SGD(model.parameters(), lr=0.1))
        for task in meta_batch:
            learner = reptile.clone()            # a copy of the model to adapt
            inner = torch.optim.SGD(learner.parameters(), lr=0.02)
            ...                                  # adapt learner on the task
            reptile.record(learner)              # records θ − θ_i
        weights = reptile.step()                 # θ ← θ + α Σ w_i (θ_i − θ)

    Args:
        model: the meta-model θ.
        optimizer: the outer optimizer over ``model.parameters()``, or ``None``:
            :meth:`step` then only writes ``.grad`` and the loop steps itself (gradient
            clipping, ``scaler.step(opt)`` under a ``torch.amp.GradScaler``).
        weighting: a :class:`~ga_optim.Weighting`; default :class:`~ga_optim.Agreement`.
        reduction: ``"mean"`` (default) or ``"sum"``: with :class:`~ga_optim.Mean`, the
            tasks' average or their sum, as the loop it replaces averages or sums the
            tasks' losses (see :class:`~ga_optim.GradientAgreementAggregator`).
        track_cosines: record each task's cosine with the mean task vector in
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
        weighting: Weighting | None = None,
        reduction: Reduction = "mean",
        track_cosines: bool = False,
        non_finite: NonFinitePolicy = "raise",
        process_group: Any = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` should be a torch.nn.Module. Found `{type(model).__name__}`.")
        self.model = model
        self.aggregator = GradientAgreementAggregator(
            model.parameters(),
            optimizer,
            weighting=weighting,
            reduction=reduction,
            track_cosines=track_cosines,
            non_finite=non_finite,
            process_group=process_group,
        )
        self._deltas = Rows.for_params(self.aggregator.params, self.aggregator.layout)

    @property
    def num_recorded(self) -> int:
        return self._deltas.filled

    @property
    def deltas(self) -> Tensor:
        """The recorded task vectors θ − θ_i, one row per task ``[n, P]``."""
        return self._deltas.matrix()

    def clone(self) -> nn.Module:
        """A detached copy of the model, to adapt on one task with any inner optimizer."""
        return copy.deepcopy(self.model)

    def record(self, learner: nn.Module) -> None:
        """Record one adapted learner: its task vector θ − θ_i, written into its row of the
        task matrix (two multi-tensor operations, no copy of the task kept elsewhere)."""
        if not isinstance(learner, nn.Module):
            raise TypeError(
                f"`learner` should be a torch.nn.Module. Found `{type(learner).__name__}`."
            )
        fast: list[Tensor] = list(learner.parameters())
        slow = self.aggregator.params
        if len(fast) != len(slow) or any(f.shape != s.shape for f, s in zip(fast, slow)):
            raise ValueError(
                f"`learner` has parameters of shapes {[tuple(f.shape) for f in fast]}; the "
                f"wrapped model has {[tuple(s.shape) for s in slow]}. Record a clone()."
            )
        with torch.no_grad():
            self._deltas.append_difference(slow, fast)

    def step(self, *, accumulate: bool = True) -> Tensor:
        """Apply θ ← θ + α Σ w_i (θ_i − θ) through the outer optimizer; return the weights.

        Σ w_i (θ − θ_i) is added to the ``.grad`` already there, as ``backward()`` adds
        (call ``opt.zero_grad()`` once per iteration, where the stock Reptile loop resets
        ``.grad``); a frozen parameter (``requires_grad=False``) is never written. Without
        an optimizer the caller steps. ``accumulate=False`` replaces ``.grad`` instead.

        Clears the recorded learners. If it raises, nothing was written and they are kept.
        In a process group every rank calls it, a rank with no recorded learner too.
        """
        if not self.num_recorded and not self.aggregator.distributed:
            raise RuntimeError(
                "step() found no recorded learner: call record(learner) once per task of "
                "the meta-batch first."
            )
        weights = self.aggregator.step(self.deltas, accumulate=accumulate)
        self._deltas.filled = 0
        return weights
