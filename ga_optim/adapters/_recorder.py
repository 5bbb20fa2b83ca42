"""The shared machinery of the MAML-style adapters: record per-task vectors, then step."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from .._aggregator import GradientAgreementAggregator, NonFinitePolicy
from .._matrix import Rows, copy_into
from .._weightings import Weighting
from ._wraps import WrapsAggregator

__all__ = ["MetaGradientRecorder"]

AgreementOn = Literal["deltas", "meta_gradients"]


class MetaGradientRecorder(WrapsAggregator):
    """Keeps each task's meta-gradient and inner-loop delta apart, then applies Algorithm 1.

    The base of the MAML-style adapters (learn2learn, higher), which add a ``backward``
    that knows where their library keeps the adapted weights.

    ``loss.backward()`` would sum the tasks' meta-gradients into ``.grad`` and lose them;
    :meth:`record_task` keeps them per task, each written straight into its row of a task
    matrix (and θ − θ_i into its row of a second one), so :meth:`step` copies no task
    vector. :meth:`step` weights them (by default with agreement measured on the
    inner-loop deltas θ − θ_i, Algorithm 1 lines 7–9), writes Σ w_i ∇L_i(θ_i) into
    ``.grad`` and steps the optimizer (if one was given).

    Under a ``torch.amp.GradScaler`` (``backward(scaler.scale(loss), ...)``) the weights
    do not depend on the loss scale: the deltas are unscaled, and agreement on scaled
    meta-gradients is scale-free too; the ``.grad`` written carries the scale, so
    ``scaler.step(opt)`` unscales it. Build the adapter with ``optimizer=None`` and
    ``non_finite="propagate"`` so that an overflow reaches the scaler as inf (it skips the
    step) instead of raising.
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        optimizer: torch.optim.Optimizer | None = None,
        *,
        weighting: Weighting | None = None,
        agreement_on: AgreementOn = "deltas",
        track_cosines: bool = False,
        non_finite: NonFinitePolicy = "raise",
        process_group: Any = None,
    ) -> None:
        if agreement_on not in ("deltas", "meta_gradients"):
            raise ValueError(
                "`agreement_on` should be 'deltas' (Algorithm 1, lines 7-9) or "
                f"'meta_gradients'. Found {agreement_on!r}."
            )
        self.aggregator = GradientAgreementAggregator(
            params,
            optimizer,
            weighting=weighting,
            track_cosines=track_cosines,
            non_finite=non_finite,
            process_group=process_group,
        )
        self.agreement_on = agreement_on
        self._gradients = Rows.for_params(self.params, self.aggregator.layout)
        self._deltas = Rows.for_params(self.params, self.aggregator.layout)

    @property
    def params(self) -> list[Tensor]:
        return self.aggregator.params

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        return self.aggregator.optimizer

    @property
    def num_recorded(self) -> int:
        return self._gradients.filled

    @property
    def meta_gradients(self) -> Tensor:
        """The recorded meta-gradients, one row per task ``[n, P]`` (parameters flattened
        and concatenated; a parameter the loss did not reach is zeros)."""
        return self._gradients.matrix()

    @property
    def deltas(self) -> Tensor:
        """The recorded inner-loop deltas θ − θ_i, one row per task ``[n, P]``."""
        return self._deltas.matrix()

    def _check_adapted(self, adapted: Sequence[Tensor], what: str) -> None:
        if len(adapted) != len(self.params):
            raise ValueError(
                f"`{what}` has {len(adapted)} parameters; the wrapped model has "
                f"{len(self.params)}. Record a learner cloned from the wrapped model."
            )
        for p, (fast, slow) in enumerate(zip(adapted, self.params)):
            if fast.shape != slow.shape:
                raise ValueError(
                    f"`{what}` parameter {p} has shape {tuple(fast.shape)}; the wrapped "
                    f"model's has {tuple(slow.shape)}. Record a learner cloned from it."
                )

    def _meta_gradient(
        self, loss: Tensor, fallback: Sequence[Tensor] | None
    ) -> list[Tensor | None]:
        """∇_θ loss; with ``fallback`` (first-order loops whose fast weights are detached
        from θ), the gradient with respect to the fast weights instead."""
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(
                "`loss` should be a scalar Tensor (the task's query loss). Found "
                + (
                    f"shape {tuple(loss.shape)}."
                    if isinstance(loss, Tensor)
                    else f"`{type(loss).__name__}`."
                )
            )
        if not loss.requires_grad:
            raise ValueError(
                "`loss` does not depend on the parameters (it does not require grad): "
                "compute it from the adapted learner's forward pass."
            )
        targets = [p for p in self.params if p.requires_grad]
        grads = torch.autograd.grad(
            loss, targets, retain_graph=fallback is not None, allow_unused=True
        )
        by_param = {id(p): g for p, g in zip(targets, grads)}
        result = [by_param.get(id(p)) for p in self.params]
        if all(g is None for g in result) and fallback is not None:
            fast = [t for t in fallback if t.requires_grad]
            fast_grads = torch.autograd.grad(loss, fast, allow_unused=True)
            by_fast = dict(zip(map(id, fast), fast_grads))
            result = [by_fast.get(id(t)) for t in fallback]
        if all(g is None for g in result):
            raise ValueError(
                "`loss` does not depend on the wrapped model's parameters (every gradient "
                "is None): compute it from the adapted learner's forward pass."
            )
        return [None if g is None else g.detach() for g in result]

    def record_task(
        self,
        loss: Tensor,
        adapted: Sequence[Tensor],
        *,
        fallback: bool = False,
        what: str = "learner",
    ) -> None:
        """Record one task: its meta-gradient ∇_θ L_i(θ_i) and its delta θ − θ_i."""
        adapted = list(adapted)
        self._check_adapted(adapted, what)
        meta_gradient = self._meta_gradient(loss, adapted if fallback else None)
        with torch.no_grad():
            copy_into(self._gradients.append(), meta_gradient)
            self._deltas.append_difference(self.params, adapted)

    def step(self, *, accumulate: bool = False) -> Tensor:
        """Weight the recorded tasks, write Σ w_i ∇L_i(θ_i) into ``.grad``, step, clear.

        Without an optimizer (``optimizer=None``) it only writes ``.grad``: the loop's own
        ``clip_grad_norm_`` / ``scaler.step(opt)`` / ``opt.step()`` follows.
        ``accumulate=True`` adds to the ``.grad`` already there instead of replacing it
        (see :meth:`ga_optim.GradientAgreementAggregator.step`).

        Returns the weights (of every rank's tasks, in a process group). If it raises,
        nothing was written and the recorded tasks are kept. In a process group every rank
        calls it, a rank with no recorded task too.
        """
        if not self.num_recorded and not self.aggregator.distributed:
            raise RuntimeError(
                "step() found no recorded task: call backward(loss, learner) once per task "
                "of the meta-batch first."
            )
        measured = self.deltas if self.agreement_on == "deltas" else None
        weights = self.aggregator.step(
            self.meta_gradients, agreement_vectors=measured, accumulate=accumulate
        )
        self.clear()
        return weights

    def clear(self) -> None:
        """Forget the recorded tasks (their rows are reused by the next ones)."""
        self._gradients.filled = self._deltas.filled = 0
