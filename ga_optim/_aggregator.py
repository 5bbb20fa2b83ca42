"""The aggregator: weight a meta-batch of task vectors, combine them, step an optimizer."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._checks import TaskBatch, as_task_batch, check_gramian, check_params, locate_non_finite
from ._kernels import default_foreach, weighted_sum
from ._weightings import Agreement, Weighting
from ._weights import task_cosines

__all__ = ["AgreementDiagnostics", "GradientAgreementAggregator"]


@dataclass(frozen=True)
class AgreementDiagnostics:
    """What the last :meth:`GradientAgreementAggregator.step` / ``aggregate`` saw, for logging.

    Attributes:
        weights: the task weights ``[N]``.
        num_negative: how many weights are negative (tasks that fought the batch).
        cosines: each task's cosine with the mean of the agreement vectors ``[N]``, or
            ``None`` unless the aggregator was built with ``track_cosines=True`` (it costs
            one more pass over the vectors). Zero for an all-zero vector.
    """

    weights: Tensor
    num_negative: int
    cosines: Tensor | None


class GradientAgreementAggregator:
    r"""Combine per-task updates with gradient-agreement weights and step an optimizer.

    The outer update of Algorithm 1 of Eshratifar, Eigen & Pedram (2018):

    .. math::

        \text{Reptile (line 10):}\quad
        \theta \leftarrow \theta + \alpha \sum_i w_i (\theta_i - \theta)
        \qquad
        \text{MAML (line 9):}\quad
        \theta \leftarrow \theta - \alpha \sum_i w_i \nabla L_i(\theta_i)

    with :math:`w` from ``weighting`` (default :class:`~ga_optim.Agreement`, Eq. 13). The
    aggregate :math:`\sum_i w_i v_i` is written into each parameter's ``.grad`` and
    ``optimizer.step()`` applies it; with ``SGD(lr=α)`` and Reptile deltas
    :math:`v_i = \theta - \theta_i` this is exactly line 10. :class:`~ga_optim.Mean` gives
    plain batched Reptile / MAML.

    Args:
        params: the meta-parameters θ (e.g. ``model.parameters()``), leaf tensors.
        optimizer: the outer optimizer; every parameter must be in one of its groups. With
            ``None``, :meth:`step` writes ``.grad`` and leaves the stepping to the caller.
        weighting: a :class:`~ga_optim.Weighting`; default :class:`~ga_optim.Agreement`.
        foreach: use ``torch._foreach_*`` kernels (default) or the per-tensor loop.
        track_cosines: record each task's cosine with the mean update in
            :attr:`last_diagnostics` (one more pass over the vectors).

    Example:
        >>> import torch
        >>> from ga_optim import GradientAgreementAggregator
        >>> model = torch.nn.Linear(3, 1)
        >>> outer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> aggregator = GradientAgreementAggregator(model.parameters(), outer)
        >>> deltas = [[torch.randn_like(p) for p in model.parameters()] for _ in range(5)]
        >>> weights = aggregator.step(deltas)   # θ ← θ - 0.1·Σ w_i Δ_i
        >>> float(weights.abs().sum())
        1.0
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        optimizer: torch.optim.Optimizer | None = None,
        *,
        weighting: Weighting | None = None,
        foreach: bool | None = None,
        track_cosines: bool = False,
    ) -> None:
        self.params = check_params(params)
        for p, param in enumerate(self.params):
            if not param.is_leaf:
                raise ValueError(
                    f"`params[{p}]` should be a leaf tensor (a parameter). Found a non-leaf "
                    "tensor; an optimizer cannot update it."
                )
        if optimizer is not None:
            if not hasattr(optimizer, "step") or not hasattr(optimizer, "param_groups"):
                raise TypeError(
                    "`optimizer` should be a torch.optim.Optimizer (with `step` and "
                    f"`param_groups`) or None. Found `{type(optimizer).__name__}`."
                )
            managed = {id(t) for group in optimizer.param_groups for t in group["params"]}
            for p, param in enumerate(self.params):
                if id(param) not in managed:
                    raise ValueError(
                        f"`params[{p}]` (shape {tuple(param.shape)}) is in no param group of "
                        "`optimizer`: step() would write its .grad but never update it."
                    )
        if weighting is None:
            weighting = Agreement()
        if not isinstance(weighting, Weighting):
            raise TypeError(
                "`weighting` should be a ga_optim.Weighting (e.g. Agreement() or Mean()). "
                f"Found `{type(weighting).__name__}`."
            )
        if foreach is not None and not isinstance(foreach, bool):
            raise TypeError(f"`foreach` should be a bool or None. Found `{foreach!r}`.")
        self.optimizer = optimizer
        self.weighting = weighting
        self.foreach = foreach
        self.track_cosines = bool(track_cosines)
        self.num_steps = 0
        self.last_weights: Tensor | None = None
        self.last_diagnostics: AgreementDiagnostics | None = None

    def __repr__(self) -> str:
        opt = type(self.optimizer).__name__ if self.optimizer is not None else None
        return (
            f"GradientAgreementAggregator(weighting={self.weighting!r}, optimizer={opt}, "
            f"params={len(self.params)})"
        )

    # -- the three levels: weights, aggregate, step -------------------------------------

    def _batch(self, task_vectors: object, name: str) -> TaskBatch:
        return as_task_batch(task_vectors, name, self.params)

    def _foreach(self, batch: TaskBatch) -> bool:
        return default_foreach(batch) if self.foreach is None else self.foreach

    def _weights_of(
        self, batch: TaskBatch, gramian: Tensor | None, *, combined: bool = False
    ) -> Tensor:
        """The weighting applied to ``batch`` (or to ``gramian``); raises, naming the task
        and parameter, if the values the weights stand for are not finite. ``combined``:
        ``batch`` is also what gets combined, whose output check then covers a weighting
        that does not read the values (``Mean``), so no extra pass is spent on it."""
        if gramian is not None:
            checked = check_gramian(gramian)
            if checked.shape[0] != batch.num_tasks:
                raise ValueError(
                    f"`gramian` is {tuple(checked.shape)}; `task_vectors` holds "
                    f"{batch.num_tasks} tasks, so expected ({batch.num_tasks}, {batch.num_tasks})."
                )
            return self.weighting.from_gramian(checked)
        if not self.weighting.reads_values and not combined:
            locate_non_finite(batch)
        weights = self.weighting._from_batch(batch, foreach=self._foreach(batch))
        if not bool(torch.isfinite(weights).all()):
            locate_non_finite(batch)
        return weights

    def weights(self, task_vectors: object = None, *, gramian: Tensor | None = None) -> Tensor:
        """The weights ``[N]`` of ``task_vectors`` (shaped like ``params``) or of a Gramian."""
        if (task_vectors is None) == (gramian is None):
            raise TypeError("Pass exactly one of `task_vectors` and `gramian`.")
        if gramian is not None:
            return self.weighting.weights(gramian=gramian)
        with torch.no_grad():
            return self._weights_of(self._batch(task_vectors, "task_vectors"), None)

    def _aggregate(
        self,
        task_vectors: object,
        agreement_vectors: object,
        gramian: Tensor | None,
    ) -> tuple[list[Tensor], Tensor, AgreementDiagnostics]:
        if agreement_vectors is not None and gramian is not None:
            raise TypeError("Pass at most one of `agreement_vectors` and `gramian`.")
        batch = self._batch(task_vectors, "task_vectors")
        measured = batch
        if agreement_vectors is not None:
            measured = self._batch(agreement_vectors, "agreement_vectors")
            if measured.num_tasks != batch.num_tasks:
                raise ValueError(
                    f"`agreement_vectors` holds {measured.num_tasks} tasks; `task_vectors` "
                    f"holds {batch.num_tasks}. Both must describe the same meta-batch."
                )
        weights = self._weights_of(measured, gramian, combined=measured is batch)
        foreach = self._foreach(batch)
        combined = weighted_sum(batch, weights.tolist(), foreach=foreach, out_dtype=True)
        result = [
            torch.zeros_like(param) if vector is None else vector
            for vector, param in zip(combined, self.params)
        ]
        magnitudes = torch.stack(torch._foreach_norm(result, math.inf))
        if not bool(torch.isfinite(magnitudes).all()):
            locate_non_finite(batch)
            if measured is not batch:
                locate_non_finite(measured)
            raise ValueError(
                "The weighted sum of `task_vectors` overflowed its dtype "
                f"({batch.dtypes}); rescale the vectors or use a wider dtype."
            )
        cosines = task_cosines(measured, foreach=foreach) if self.track_cosines else None
        diagnostics = AgreementDiagnostics(
            weights=weights, num_negative=int((weights < 0).sum()), cosines=cosines
        )
        return result, weights, diagnostics

    def aggregate(
        self,
        task_vectors: object,
        *,
        agreement_vectors: object = None,
        gramian: Tensor | None = None,
    ) -> list[Tensor]:
        r"""The weighted outer update :math:`\sum_i w_i v_i`, one tensor per parameter.

        Args:
            task_vectors: the vectors :math:`v_i` to combine, shaped like ``params`` (see
                :func:`~ga_optim.agreement_weights` for the accepted forms).
            agreement_vectors: optional vectors to measure agreement on instead, e.g. the
                inner-loop deltas :math:`\theta - \theta_i` while ``task_vectors`` holds the
                meta-gradients (Algorithm 1, lines 7 to 9).
            gramian: optional precomputed Gramian ``[N, N]`` of the agreement vectors.

        Returns:
            One tensor per parameter, shaped like it and in the vectors' dtype (a parameter
            no task touched gives zeros). Also records :attr:`last_weights`.
        """
        with torch.no_grad():
            result, weights, diagnostics = self._aggregate(task_vectors, agreement_vectors, gramian)
        self.last_weights, self.last_diagnostics = weights, diagnostics
        return result

    def step(
        self,
        task_vectors: object,
        *,
        agreement_vectors: object = None,
        gramian: Tensor | None = None,
    ) -> Tensor:
        r"""Write :math:`\sum_i w_i v_i` into each parameter's ``.grad`` and step the optimizer.

        The ``.grad`` is replaced, not accumulated. Everything is validated before anything
        is written; if ``optimizer.step()`` itself raises, the previous ``.grad`` tensors
        are restored. Arguments as in :meth:`aggregate`.

        Returns:
            The weights ``[N]``.
        """
        with torch.no_grad():
            result, weights, diagnostics = self._aggregate(task_vectors, agreement_vectors, gramian)
        previous = [param.grad for param in self.params]
        for param, update in zip(self.params, result):
            param.grad = update.detach().to(param.dtype)
        if self.optimizer is not None:
            try:
                self.optimizer.step()
            except BaseException:
                for param, grad in zip(self.params, previous):
                    param.grad = grad
                raise
        self.num_steps += 1
        self.last_weights, self.last_diagnostics = weights, diagnostics
        return weights

    # -- checkpointing -----------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state plus the aggregator's own counters."""
        return {
            "optimizer": None if self.optimizer is None else self.optimizer.state_dict(),
            "num_steps": self.num_steps,
            "last_weights": None if self.last_weights is None else self.last_weights.clone(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`, so a checkpointed run continues identically."""
        if not isinstance(state_dict, dict):
            raise TypeError(f"`state_dict` should be a dict. Found `{type(state_dict).__name__}`.")
        missing = {"optimizer", "num_steps", "last_weights"} - state_dict.keys()
        if missing:
            raise ValueError(f"`state_dict` is missing the keys {sorted(missing)}.")
        saved = state_dict["optimizer"]
        if (saved is None) != (self.optimizer is None):
            raise ValueError(
                "`state_dict['optimizer']` is "
                + ("None" if saved is None else "an optimizer state")
                + " but this aggregator has "
                + ("no optimizer." if self.optimizer is None else "one.")
            )
        if self.optimizer is not None:
            self.optimizer.load_state_dict(saved)
        self.num_steps = int(state_dict["num_steps"])
        last = state_dict["last_weights"]
        self.last_weights = None if last is None else last.clone()
