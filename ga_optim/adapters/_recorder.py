"""The shared machinery of the MAML-style adapters: record per-task vectors, then step."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from .._aggregator import GradientAgreementAggregator, NonFinitePolicy, Reduction
from .._matrix import Rows, copy_into
from .._weightings import Weighting
from ._base import AdapterBase

__all__ = ["MetaGradientRecorder"]

AgreementOn = Literal["deltas", "meta_gradients"]


class MetaGradientRecorder(AdapterBase):
    """Keeps each task's meta-gradient and inner-loop delta apart, then applies Algorithm 1.

    The base of the MAML-style adapters (learn2learn, higher), which add a ``backward``
    that knows where their library keeps the adapted weights.

    ``loss.backward()`` would sum the tasks' meta-gradients into ``.grad`` and lose them;
    :meth:`record_task` keeps them per task, each written straight into its row of a task
    matrix (and θ − θ_i into its row of a second one), so :meth:`step` copies no task
    vector. :meth:`step` weights them (by default with agreement measured on the
    inner-loop deltas θ − θ_i, Algorithm 1 lines 7–9), adds Σ w_i ∇L_i(θ_i) to ``.grad``
    and steps the optimizer (if one was given).

    **Which parameters.** The outer parameters are every parameter the outer optimizer
    holds (or ``params``, or, with neither, the wrapped model's). A task's meta-gradient
    is the gradient of its loss with respect to all of them, as the stock loop's
    ``loss.backward()`` computes it: parameters outside the wrapped learner that the loss
    passes through (ANIL's feature extractor, any shared module) get their weighted
    meta-gradient too. Their inner-loop delta is zero (the inner loop does not adapt
    them), so agreement is measured on the adapted parameters' deltas; with
    ``agreement_on="meta_gradients"`` it is measured on the meta-gradients of every outer
    parameter instead. A frozen parameter is never written, and one no task's loss
    reached keeps its ``.grad`` (``None`` after ``zero_grad()``), as autograd leaves it.

    Under a ``torch.amp.GradScaler`` (``backward(scaler.scale(loss), ...)``) the weights
    do not depend on the loss scale: the deltas are unscaled, and agreement on scaled
    meta-gradients is scale-free too; the ``.grad`` written carries the scale, so
    ``scaler.step(opt)`` unscales it. Build the adapter with ``optimizer=None`` and
    ``non_finite="propagate"`` so that an overflow reaches the scaler as inf (it skips the
    step) instead of raising.
    """

    def __init__(
        self,
        module_params: Iterable[Tensor],
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
        if agreement_on not in ("deltas", "meta_gradients"):
            raise ValueError(
                "`agreement_on` should be 'deltas' (Algorithm 1, lines 7-9) or "
                f"'meta_gradients'. Found {agreement_on!r}."
            )
        self._module_params = list(module_params)
        self.aggregator = GradientAgreementAggregator(
            _outer_params(self._module_params, optimizer, params),
            optimizer,
            weighting=weighting,
            reduction=reduction,
            track_cosines=track_cosines,
            non_finite=non_finite,
            process_group=process_group,
        )
        self.agreement_on = agreement_on
        adapted_at = {id(p): j for j, p in enumerate(self._module_params)}
        # For each outer parameter, its place among the adapted ones (None: not adapted).
        self._sources = [adapted_at.get(id(p)) for p in self.params]
        # With no optimizer and no params, a loss may reach a parameter the loop steps
        # that the adapter does not know: looked for once, at the first task.
        self._look_for_unknown = optimizer is None and params is None
        self._reached = [False] * len(self.params)
        self._gradients = Rows.for_params(self.params, self.aggregator.layout)
        self._deltas = Rows.for_params(self.params, self.aggregator.layout)

    @property
    def params(self) -> list[Tensor]:
        """The outer parameters, in the order of the recorded rows."""
        return self.aggregator.params

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        return self.aggregator.optimizer

    @property
    def num_recorded(self) -> int:
        return self._gradients.filled

    @property
    def meta_gradients(self) -> Tensor:
        """The recorded meta-gradients, one row per task ``[n, P]`` (the outer parameters
        flattened and concatenated; a parameter the loss did not reach is zeros)."""
        return self._gradients.matrix()

    @property
    def deltas(self) -> Tensor:
        """The recorded inner-loop deltas θ − θ_i, one row per task ``[n, P]`` (zeros for
        an outer parameter outside the adapted learner)."""
        return self._deltas.matrix()

    def _check_adapted(self, adapted: Sequence[Tensor], what: str) -> None:
        slow_params = self._module_params
        if len(adapted) != len(slow_params):
            raise ValueError(
                f"`{what}` has {len(adapted)} parameters; the wrapped model has "
                f"{len(slow_params)}. Record a learner cloned from the wrapped model."
            )
        for p, (fast, slow) in enumerate(zip(adapted, slow_params)):
            if fast.shape != slow.shape:
                raise ValueError(
                    f"`{what}` parameter {p} has shape {tuple(fast.shape)}; the wrapped "
                    f"model's has {tuple(slow.shape)}. Record a learner cloned from it."
                )

    def _meta_gradient(
        self, loss: Tensor, adapted: Sequence[Tensor], fallback: bool
    ) -> list[Tensor | None]:
        """∇ loss for every outer parameter, as ``loss.backward()`` computes it (``None``
        where the loss does not reach it); with ``fallback`` (first-order loops whose fast
        weights are detached from θ), an adapted parameter that the loss reaches only
        through its fast weight gets the gradient with respect to the fast weight."""
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
        if self._look_for_unknown:
            _check_no_unknown_leaf(loss, [*self.params, *adapted])
            self._look_for_unknown = False
        targets = [p for p in self.params if p.requires_grad]
        fast = [t for t in adapted if t.requires_grad] if fallback else []
        if not targets and not fast:
            raise ValueError(
                f"None of the {len(self.params)} outer parameters requires grad: there is "
                "nothing to train (unfreeze a parameter, or give the optimizer one that is)."
            )
        grads = torch.autograd.grad(loss, targets + fast, allow_unused=True)
        by_param = {id(p): g for p, g in zip(targets, grads)}
        result = [by_param.get(id(p)) for p in self.params]
        by_fast = {id(t): g for t, g in zip(fast, grads[len(targets) :])}
        for k, j in enumerate(self._sources):
            if j is not None and result[k] is None:
                result[k] = by_fast.get(id(adapted[j]))
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
        meta_gradient = self._meta_gradient(loss, adapted, fallback)
        with torch.no_grad():
            copy_into(self._gradients.append(), meta_gradient)
            # θ − θ_i for the adapted parameters, zeros for the others.
            self._deltas.append_difference(
                [None if j is None else p for p, j in zip(self.params, self._sources)],
                [None if j is None else adapted[j] for j in self._sources],
            )
        for k, g in enumerate(meta_gradient):
            self._reached[k] = self._reached[k] or g is not None

    def step(self, *, accumulate: bool = True) -> Tensor:
        """Weight the recorded tasks, add Σ w_i ∇L_i(θ_i) to ``.grad``, step, clear.

        As ``loss.backward()`` and ``opt.step()`` would: the update is added to the
        ``.grad`` already there (call ``opt.zero_grad()`` once per iteration, as the stock
        loop does; a penalty back-propagated by the loop is kept), and a parameter that no
        task's loss reached keeps its ``.grad``. Without an optimizer (``optimizer=None``)
        it only writes ``.grad``: the loop's own ``clip_grad_norm_`` /
        ``scaler.step(opt)`` / ``opt.step()`` follows. ``accumulate=False`` replaces
        ``.grad`` instead (see :meth:`ga_optim.GradientAgreementAggregator.step`).

        Returns the weights (of every rank's tasks, in a process group). If it raises,
        nothing was written and the recorded tasks are kept. In a process group every rank
        calls it, a rank with no recorded task too.
        """
        if not self.num_recorded and not self.aggregator.distributed:
            raise RuntimeError(
                "step() found no recorded task: call backward(loss, learner) once per task "
                "of the meta-batch first."
            )
        agreement = self.deltas if self.agreement_on == "deltas" else None
        weights = self.aggregator.step(
            self.meta_gradients,
            agreement_vectors=agreement,
            accumulate=accumulate,
            reached=self._reached,
        )
        self.clear()
        return weights

    def clear(self) -> None:
        """Forget the recorded tasks (their rows are reused by the next ones)."""
        self._gradients.filled = self._deltas.filled = 0
        self._reached = [False] * len(self.params)


def _outer_params(
    module_params: list[Tensor],
    optimizer: torch.optim.Optimizer | None,
    params: Iterable[Tensor] | None,
) -> list[Tensor]:
    """The parameters the outer step updates: ``params``; else every parameter the
    optimizer holds, in its groups' order; else the wrapped model's."""
    if params is not None:
        return list(params)
    groups = getattr(optimizer, "param_groups", None)
    if optimizer is None or not isinstance(groups, list):
        return module_params  # (a wrong optimizer is named by the aggregator)
    held: dict[int, Tensor] = {}
    for group in groups:
        for param in group["params"]:
            held.setdefault(id(param), param)
    return list(held.values())


def _check_no_unknown_leaf(loss: Tensor, known: Sequence[Tensor]) -> None:
    """Raise if ``loss`` reaches a tensor that requires grad and is a leaf (a parameter)
    but is not ``known``: with no optimizer to say which parameters the loop steps, its
    meta-gradient would otherwise be silently left out."""
    ids = {id(t) for t in known}
    seen: set[int] = set()
    stack = [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        leaf = getattr(node, "variable", None)
        if isinstance(leaf, Tensor) and id(leaf) not in ids:
            raise ValueError(
                f"`loss` reaches a parameter of shape {tuple(leaf.shape)} that is not in the "
                "wrapped model (e.g. a feature extractor outside the MAML-wrapped head, as "
                "in ANIL). Without an optimizer the adapter cannot know that your outer "
                "step updates it: pass every parameter your outer step updates as `params=` "
                "(e.g. params=[*features.parameters(), *maml.parameters()]), or the outer "
                "optimizer."
            )
        stack.extend(next_node for next_node, _ in node.next_functions)
