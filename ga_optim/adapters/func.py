"""Helpers for ``torch.func`` loops: per-parameter tensors stacked over tasks by ``vmap``.

A ``vmap``-ed inner loop yields, for each parameter name, one tensor ``[N, *shape]``: the
N adapted weights, or the N meta-gradients. These helpers turn such dicts into what
:class:`~ga_optim.GradientAgreementAggregator` takes, without copying::

    params = dict(model.named_parameters())
    adapted = vmap(inner_loop, in_dims=(None, 0, 0))(params, x, y)   # {name: [N, ...]}
    agree = FuncAgreement(model, torch.optim.SGD(model.parameters(), lr=0.1))
    agree.step(reptile_deltas(params, adapted))                     # Reptile, line 10
    agree.step(meta_grads, agreement_vectors=reptile_deltas(params, adapted))   # MAML
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .._aggregator import GradientAgreementAggregator, NonFinitePolicy, Reduction
from .._checks import TaskStack, stacked_shape_message
from .._weightings import Weighting
from ._base import AdapterBase

__all__ = ["FuncAgreement", "reptile_deltas", "stacked_task_vectors"]

Stacked = Mapping[str, Tensor]


def stacked_task_vectors(
    stacked: Stacked, names: Sequence[str], *, allow_empty: bool = False
) -> list[list[Tensor]]:
    """``{name: [N, *shape]}`` → N per-task lists of views, in the order of ``names``.

    ``allow_empty``: accept N = 0 (a rank of a process group with no task this step).
    """
    _check_names(stacked, names, allow_empty)
    columns = [stacked[name].unbind(0) for name in names]
    return [[column[i] for column in columns] for i in range(stacked[names[0]].shape[0])]


def _check_names(stacked: Stacked, names: Sequence[str], allow_empty: bool) -> None:
    """Every parameter has an entry, nothing else does, and all hold the same N tasks."""
    if len(stacked) != len(names) or any(name not in stacked for name in names):
        missing = [name for name in names if name not in stacked]
        if missing:
            raise ValueError(f"`stacked` has no entry for the parameters {missing}.")
        extra = sorted(set(stacked) - set(names))
        raise ValueError(f"`stacked` has entries {extra} that are not parameters of the model.")
    sizes = [t.shape[0] if t.dim() else 0 for t in map(stacked.__getitem__, names)]
    n = sizes[0]
    if (n == 0 and not allow_empty) or sizes.count(n) != len(sizes):
        # Name the first entry whose N differs from the first entry's (or is 0).
        for name, size in zip(names, sizes):
            if size != n or (size == 0 and not allow_empty):
                raise ValueError(
                    f"`stacked[{name!r}]` has {size} tasks along dimension 0; "
                    f"`stacked[{names[0]!r}]` has {n}. Each entry should be [N, *param.shape]."
                )


def reptile_deltas(params: Mapping[str, Tensor], adapted: Stacked) -> dict[str, Tensor]:
    """The task vectors θ − θ_i, ``{name: [N, *shape]}``, from θ and the stacked θ_i.

    A parameter the inner loop does not adapt (ANIL's feature extractor, a frozen layer)
    may be left out of ``adapted``: its delta is zero, so agreement is measured on the
    adapted parameters alone.
    """
    if not adapted:
        raise ValueError("`adapted` should hold at least one adapted parameter. Found none.")
    extra = sorted(set(adapted) - set(params))
    if extra:
        raise ValueError(f"`adapted` has entries {extra} that are not in `params`.")
    first = next(iter(adapted))
    n = adapted[first].shape[0] if adapted[first].dim() else 0
    deltas = {}
    for name, theta in params.items():
        if name not in adapted:
            deltas[name] = theta.new_zeros((n, *theta.shape))
            continue
        fast = adapted[name]
        if fast.shape[1:] != theta.shape:
            raise ValueError(stacked_shape_message(f"`adapted[{name!r}]`", fast.shape, theta.shape))
        if fast.shape[0] != n:
            raise ValueError(
                f"`adapted[{name!r}]` holds {fast.shape[0]} tasks along dimension 0; "
                f"`adapted[{first!r}]` holds {n}. Every entry should hold the same tasks."
            )
        deltas[name] = theta.detach().unsqueeze(0) - fast.detach()
    return deltas


class FuncAgreement(AdapterBase):
    """:class:`~ga_optim.GradientAgreementAggregator` for dicts of stacked task vectors.

    Args:
        model: the meta-model; its ``named_parameters()`` order is the parameter order.
        optimizer: the outer optimizer over ``model.parameters()`` (or ``None`` to only
            write ``.grad``).
        weighting: a :class:`~ga_optim.Weighting`; default :class:`~ga_optim.Agreement`.
        reduction: ``"mean"`` (default) or ``"sum"``: with :class:`~ga_optim.Mean`, the
            tasks' average or their sum, as the loop it replaces averages or sums the
            tasks' losses (see :class:`~ga_optim.GradientAgreementAggregator`).
        track_cosines: record each task's cosine with the mean agreement vector in
            :attr:`last_diagnostics` (one more pass over the vectors).
        non_finite: ``"raise"`` (default) or ``"propagate"``: let NaN/Inf meta-gradients
            reach ``.grad`` for a ``torch.amp.GradScaler`` to skip the step (needs
            ``optimizer=None``; see :class:`~ga_optim.GradientAgreementAggregator`).
        process_group: ``None`` (one process) or a ``torch.distributed`` process group over
            which the meta-batch is spread: each rank passes its own tasks' stacked
            vectors (``[0, ...]`` when it has none) and every rank calls :meth:`step`
            (see :class:`~ga_optim.GradientAgreementAggregator`).
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
        named = list(model.named_parameters())
        self.names = [name for name, _ in named]
        self.aggregator = GradientAgreementAggregator(
            [p for _, p in named],
            optimizer,
            weighting=weighting,
            reduction=reduction,
            track_cosines=track_cosines,
            non_finite=non_finite,
            process_group=process_group,
        )

    def _tasks(self, stacked: Stacked | None, what: str) -> TaskStack | None:
        """The dict as a :class:`~ga_optim.TaskStack` (no unbinding: the aggregator's
        one multi-tensor copy packs it into the task matrix)."""
        if stacked is None:
            return None
        if not isinstance(stacked, Mapping):
            raise TypeError(
                f"`{what}` should be a dict {{name: [N, *shape]}} (as torch.func returns). "
                f"Found `{type(stacked).__name__}`."
            )
        _check_names(stacked, self.names, self.aggregator.distributed)
        return TaskStack([stacked[name] for name in self.names])

    def aggregate(
        self, task_vectors: Stacked, *, agreement_vectors: Stacked | None = None
    ) -> dict[str, Tensor]:
        """Σ_i w_i v_i as ``{name: tensor}``; see :meth:`GradientAgreementAggregator.aggregate`."""
        tasks = self._tasks(task_vectors, "task_vectors")
        result = self.aggregator.aggregate(
            tasks, agreement_vectors=self._tasks(agreement_vectors, "agreement_vectors")
        )
        return dict(zip(self.names, result))

    def step(
        self,
        task_vectors: Stacked,
        *,
        agreement_vectors: Stacked | None = None,
        accumulate: bool = True,
    ) -> Tensor:
        """Add Σ_i w_i v_i to ``.grad`` and step (if an optimizer was given); return the
        weights. As ``backward()``: added to the ``.grad`` already there (call
        ``opt.zero_grad()`` once per iteration), a frozen parameter never written;
        ``accumulate=False`` replaces ``.grad`` instead.

        Reptile: ``step(reptile_deltas(params, adapted))``. MAML (Algorithm 1, lines 7–9):
        ``step(meta_grads, agreement_vectors=reptile_deltas(params, adapted))``.
        """
        tasks = self._tasks(task_vectors, "task_vectors")
        return self.aggregator.step(
            tasks,
            agreement_vectors=self._tasks(agreement_vectors, "agreement_vectors"),
            accumulate=accumulate,
        )
