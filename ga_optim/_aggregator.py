"""The aggregator: weight a meta-batch of task vectors, combine them, step an optimizer."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from ._checks import (
    NonFiniteError,
    TaskBatch,
    as_task_batch,
    check_gramian,
    check_params,
    locate_non_finite,
)
from ._collective import code_dtype, dtype_code, make_collective
from ._kernels import (
    accumulation_dtype,
    default_foreach,
    finite_probe,
    finiteness_probe,
    materialize,
    weighted_blocks,
)
from ._weightings import Agreement, Weighting, weights_of_batch
from ._weights import exchanged_scores, task_cosines, uniform_weights, weights_dtype_device

__all__ = ["AgreementDiagnostics", "GradientAgreementAggregator", "NonFinitePolicy"]

#: What a call does with NaN/Inf values: raise (default) or let them reach ``.grad``.
NonFinitePolicy = Literal["raise", "propagate"]


@dataclass(frozen=True)
class AgreementDiagnostics:
    """What the last :meth:`GradientAgreementAggregator.step` / ``aggregate`` saw, for logging.

    Attributes:
        weights: the task weights ``[N]``.
        num_negative: how many weights are negative (tasks that fought the batch); a
            property, computed when read.
        cosines: each task's cosine with the mean of the agreement vectors ``[N]``, or
            ``None`` unless the aggregator was built with ``track_cosines=True`` (it costs
            one more pass over the vectors). Zero for an all-zero vector.
        bytes_sent: the payload bytes this rank handed to ``torch.distributed`` collectives
            in that call (0 without a process group).

    In a process group every field describes the whole meta-batch and is the same on
    every rank.
    """

    weights: Tensor
    cosines: Tensor | None
    bytes_sent: int = 0

    @property
    def num_negative(self) -> int:
        """How many weights are negative (read on access: the step itself reads nothing
        back from the device)."""
        return int((self.weights < 0).sum())


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
        non_finite: ``"raise"`` (default): NaN/Inf in the vectors raise
            :class:`~ga_optim.NonFiniteError` naming the task and parameter, before
            anything is written. ``"propagate"``: nothing raises for non-finite values;
            they flow into the update (and ``.grad``) so that a
            ``torch.amp.GradScaler`` sees the overflow and skips the step. If the weights
            themselves cannot be computed (a value they read is non-finite) the weights
            and every entry of the update are NaN. Needs ``optimizer=None`` (the caller
            steps, through the scaler).
        process_group: ``None`` (default): one process, even where a default process group
            is initialised. A ``torch.distributed`` process group (e.g.
            ``torch.distributed.group.WORLD``): the meta-batch is spread over its ranks.
            Each rank passes only its own tasks (possibly none: an empty list) to
            :meth:`weights` / :meth:`aggregate` / :meth:`step`, and every rank must call
            them together. The result equals one process over all tasks concatenated in
            rank order; the returned weights ``[N]`` are global (rank order, then local
            order) and identical on every rank, and so is the update, so ranks that start
            from the same parameters and optimizer state stay identical. What is sent per
            step depends on the weighting (see :class:`~ga_optim.Weighting`): for
            :class:`~ga_optim.Agreement` two P-sized all-reduces and N scores, never a
            task's vector. Bad input on any rank raises the same exception on every rank
            (its message names the rank, task and parameter) before anything is written.
            A rank that dies makes the others raise once the process group's ``timeout``
            (``init_process_group(timeout=...)``) runs out, or sooner if the backend sees
            the connection close.

    Distributed use (``torchrun --nproc_per_node 2 train.py``)::

        torch.distributed.init_process_group("gloo")        # "nccl" with one GPU a rank
        aggregator = GradientAgreementAggregator(
            model.parameters(), outer, process_group=torch.distributed.group.WORLD
        )
        weights = aggregator.step(my_tasks_deltas)           # this rank's tasks only

    Do not wrap the model in ``DistributedDataParallel``: DDP averages ``.grad`` during
    ``backward``, which is exactly the one number per parameter that gradient agreement
    cannot use. The aggregator is the synchronisation; pass a DDP-wrapped model's
    ``.module.parameters()`` and compute each task's vectors under ``model.no_sync()``.

    Example:
        >>> import torch
        >>> from ga_optim import GradientAgreementAggregator
        >>> model = torch.nn.Linear(3, 1)
        >>> outer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> aggregator = GradientAgreementAggregator(model.parameters(), outer)
        >>> deltas = [[torch.randn_like(p) for p in model.parameters()] for _ in range(5)]
        >>> weights = aggregator.step(deltas)   # θ ← θ - 0.1·Σ w_i Δ_i
        >>> round(float(weights.abs().sum()), 6)   # Σ|w_i| = 1 (to float32 rounding)
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
        non_finite: NonFinitePolicy = "raise",
        process_group: Any = None,
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
        if non_finite not in ("raise", "propagate"):
            raise ValueError(
                f"`non_finite` should be 'raise' or 'propagate'. Found {non_finite!r}."
            )
        if non_finite == "propagate" and optimizer is not None:
            raise ValueError(
                "`non_finite='propagate'` lets NaN/Inf reach .grad for a GradScaler to see; "
                "it needs `optimizer=None` (step through `scaler.step(optimizer)`), or the "
                "optimizer would step on them."
            )
        if foreach is not None and not isinstance(foreach, bool):
            raise TypeError(f"`foreach` should be a bool or None. Found `{foreach!r}`.")
        self._collective = make_collective(process_group)
        self.process_group = process_group
        self.optimizer = optimizer
        self.weighting = weighting
        self.foreach = foreach
        self.track_cosines = bool(track_cosines)
        self.non_finite: NonFinitePolicy = non_finite
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

    @property
    def distributed(self) -> bool:
        """Whether the meta-batch is spread over a process group."""
        return self.process_group is not None

    def _foreach(self, batch: TaskBatch) -> bool:
        return default_foreach(batch) if self.foreach is None else self.foreach

    def _local(
        self, task_vectors: object, agreement_vectors: object, gramian: Tensor | None
    ) -> tuple[TaskBatch, TaskBatch]:
        """This rank's input, validated: the vectors to combine and those to measure."""
        if gramian is not None and self.distributed:
            raise ValueError(
                "`gramian` cannot be given with a `process_group`: each rank holds only its "
                "own tasks. Pass the task vectors; a weighting that needs the Gramian gets "
                "it assembled across ranks."
            )
        if agreement_vectors is not None and gramian is not None:
            raise TypeError("Pass at most one of `agreement_vectors` and `gramian`.")
        empty = self.distributed
        batch = as_task_batch(task_vectors, "task_vectors", self.params, allow_empty=empty)
        measured = batch
        if agreement_vectors is not None:
            measured = as_task_batch(
                agreement_vectors, "agreement_vectors", self.params, allow_empty=empty
            )
            if measured.num_tasks != batch.num_tasks:
                raise ValueError(
                    f"`agreement_vectors` holds {measured.num_tasks} tasks; `task_vectors` "
                    f"holds {batch.num_tasks}. Both must describe the same meta-batch."
                )
        return batch, measured

    def _prepare(
        self, task_vectors: object, agreement_vectors: object, gramian: Tensor | None
    ) -> tuple[TaskBatch, TaskBatch]:
        """Validate this rank's input; in a process group, agree with every rank (one small
        all-reduce) so that bad input anywhere raises everywhere, before any arithmetic."""
        if not self.distributed:
            return self._local(task_vectors, agreement_vectors, gramian)
        error: Exception | None = None
        signature: list[int] = [0] * (2 + 2 * len(self.params))
        try:
            batch, measured = self._local(task_vectors, agreement_vectors, gramian)
            signature = [
                batch.num_tasks,
                int(agreement_vectors is not None),
                *map(dtype_code, batch.dtypes),
                *map(dtype_code, measured.dtypes),
            ]
        except (TypeError, ValueError) as found:
            error = found
        rows = self._collective.agree(error, signature)
        return self._merge(rows, batch, measured)

    def _merge(
        self, rows: list[list[int]], batch: TaskBatch, measured: TaskBatch
    ) -> tuple[TaskBatch, TaskBatch]:
        """Every rank's signature → the global view (the same on every rank, so any error
        raised here is raised everywhere)."""
        world = len(rows)
        counts = tuple(row[0] for row in rows)
        if sum(counts) == 0:
            raise ValueError(
                f"`task_vectors` holds no task on any of the {world} ranks; at least one "
                "rank should pass a task."
            )
        forms = {row[1] for row, count in zip(rows, counts) if count}
        if len(forms) > 1:
            given = [r for r, row in enumerate(rows) if row[1] and counts[r]]
            raise ValueError(
                f"Ranks {given} passed `agreement_vectors` and the other ranks with tasks did "
                "not: every rank should call with the same form (MAML or Reptile)."
            )
        n_params = len(self.params)
        merged = []
        for what, (local, column) in {
            "task_vectors": (batch, 2),
            "agreement_vectors": (measured, 2 + n_params),
        }.items():
            dtypes: list[torch.dtype | None] = []
            for p in range(n_params):
                codes = {r: row[column + p] for r, row in enumerate(rows) if row[column + p]}
                if len(set(codes.values())) > 1:
                    (r1, c1), (r2, c2) = [
                        next((r, c) for r, c in codes.items() if c == code)
                        for code in sorted(set(codes.values()))[:2]
                    ]
                    raise TypeError(
                        f"`{what}` parameter {p} has dtype {code_dtype(c1)} on rank {r1} and "
                        f"{code_dtype(c2)} on rank {r2}; every rank should pass the same "
                        "dtypes."
                    )
                dtypes.append(code_dtype(next(iter(codes.values()))) if codes else None)
            merged.append(
                dataclasses.replace(
                    local,
                    all_dtypes=dtypes,
                    counts=counts,
                    first_task=sum(counts[: self._collective.rank]),
                    cache={},  # what was kept was computed for this rank alone
                )
            )
        if measured is batch:
            return merged[0], merged[0]
        return merged[0], merged[1]

    def _weights_of(self, measured: TaskBatch, gramian: Tensor | None) -> Tensor:
        """The weighting applied to ``measured`` (every rank's tasks) or to ``gramian``;
        with ``non_finite="propagate"``, NaN weights where a value they read is not finite
        (the error that says so is raised on every rank alike, so all ranks agree)."""
        try:
            weights = self._weighting_of(measured, gramian)
        except NonFiniteError:
            if self.non_finite == "raise":
                raise
            return torch.full_like(uniform_weights(measured), math.nan)
        if weights.shape != (measured.total_tasks,):
            raise ValueError(
                f"{self.weighting!r} returned weights of shape {tuple(weights.shape)}; "
                f"expected ({measured.total_tasks},)."
            )
        if not bool(torch.isfinite(weights).all()):
            raise ValueError(
                f"{self.weighting!r} returned non-finite weights {weights.tolist()} from "
                "finite input."
            )
        return weights

    def _weighting_of(self, measured: TaskBatch, gramian: Tensor | None) -> Tensor:
        if gramian is not None:
            checked = check_gramian(gramian)
            if checked.shape[0] != measured.num_tasks:
                raise ValueError(
                    f"`gramian` is {tuple(checked.shape)}; `task_vectors` holds "
                    f"{measured.num_tasks} tasks, so expected "
                    f"({measured.num_tasks}, {measured.num_tasks})."
                )
            return self.weighting.from_gramian(checked)
        return weights_of_batch(
            self.weighting,
            measured,
            foreach=self._foreach(measured),
            collective=self._collective,
            check_unread=self.non_finite == "raise",
        )

    def weights(self, task_vectors: object = None, *, gramian: Tensor | None = None) -> Tensor:
        """The weights ``[N]`` of ``task_vectors`` (shaped like ``params``) or of a Gramian.

        In a process group, each rank passes its own tasks and gets every task's weight.
        """
        if (task_vectors is None) == (gramian is None):
            raise TypeError("Pass exactly one of `task_vectors` and `gramian`.")
        if gramian is not None:
            if self.distributed:
                raise ValueError(
                    "`gramian` cannot be given with a `process_group`: pass the task vectors."
                )
            return self.weighting.weights(gramian=gramian)
        self._collective.reset_bytes()
        with torch.no_grad():
            _, measured = self._prepare(task_vectors, None, None)
            return self._weights_of(measured, None)

    def _aggregate(
        self,
        task_vectors: object,
        agreement_vectors: object,
        gramian: Tensor | None,
    ) -> tuple[list[Tensor], Tensor, AgreementDiagnostics]:
        self._collective.reset_bytes()
        batch, measured = self._prepare(task_vectors, agreement_vectors, gramian)
        if gramian is None and self.weighting.needs in ("count", "scores"):
            fast = self._fast(batch, measured)
            if fast is not None:
                return fast
        return self._careful(batch, measured, gramian)

    def _fast(
        self, batch: TaskBatch, measured: TaskBatch
    ) -> tuple[list[Tensor], Tensor, AgreementDiagnostics] | None:
        """The whole call as device arithmetic and one value read back to the host: a
        flag over everything read and produced (scores clear of underflow; finite weights
        and update, and, for ``Mean`` with ``agreement_vectors``, finite values it does
        not otherwise read). ``None`` when the flag is down: then :meth:`_careful` redoes
        the call, raising with the culprit's task and parameter or rescaling. In a process
        group the flag is read from reduced values, so every rank agrees."""
        collective = self._collective
        dtype, device = weights_dtype_device(measured)
        n = measured.total_tasks
        clear: Tensor | None = None  # the scores are clear of underflow
        if self.weighting.needs == "count":
            scores = torch.zeros(n, dtype=dtype, device=device)
        else:
            scores = exchanged_scores(measured, 1.0, dtype, self._foreach(measured), collective)
            info = torch.finfo(dtype)
            clear = scores.abs().amax() >= info.tiny / info.eps  # NaN fails it too
        weights = self.weighting.from_scores(scores)
        if weights.shape != (n,):
            return None  # the careful path names the weighting
        if weights.dtype != dtype:
            weights = weights.to(dtype)
        unread: list[Tensor] = []
        if self.weighting.needs == "count" and measured is not batch:
            if self.non_finite == "raise":
                # Mean does not read these values: a device probe that is finite exactly
                # when they are, carried by the update's all-reduce.
                unread.append(
                    finiteness_probe(measured, self._update_dtype(batch, dtype)).reshape(1)
                )
        result, blocks = self._combine(batch, weights, unread)
        # Finite exactly when the weights, the update and the unread values are (barring
        # an overflow of the sums, which only sends the call down the careful path).
        probe = finite_probe([weights, *blocks, *unread], dtype, device)
        ok = probe * 0 == 0
        if clear is not None:
            ok = ok & clear
        if not bool(ok):  # the one value read back to the host
            return None
        cosines = (
            task_cosines(measured, foreach=self._foreach(measured), collective=collective)
            if self.track_cosines
            else None
        )
        return result, weights, AgreementDiagnostics(weights, cosines, collective.bytes_sent)

    def _combine(
        self, batch: TaskBatch, weights: Tensor, extra: list[Tensor]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Σ_i w_i v_i over every rank's tasks (this rank's share, all-reduced with the
        ``extra`` tensors riding along), in the vectors' dtype; zeros for a parameter no
        task has. Also returns the update's blocks: every entry that came from the tasks,
        once, in a few tensors (for a check)."""
        if batch.first_task or batch.num_tasks != weights.shape[0]:
            weights = weights[batch.first_task : batch.first_task + batch.num_tasks]
        blocked = weighted_blocks(batch, weights, foreach=self._foreach(batch))
        local = blocked.params
        combined = materialize(batch, local)
        blocks = blocked.blocks + [
            t for t, mine in zip(combined, local) if mine is None and t is not None
        ]
        if self._collective.exchanges:
            self._collective.sum_(blocked.wire(combined) + extra)
        result = []
        cast_back = False
        for vector, param, dtype in zip(combined, self.params, batch.global_dtypes):
            if vector is None:
                result.append(torch.zeros_like(param))
            elif dtype is not None and vector.dtype != dtype:
                cast_back = True
                result.append(vector.to(dtype))
            else:
                result.append(vector)
        # Cast back to fp16/bf16, the update may overflow: then check what is returned.
        return result, result if cast_back else blocks

    @staticmethod
    def _update_dtype(batch: TaskBatch, fallback: torch.dtype) -> torch.dtype:
        """The dtype the update is accumulated (and all-reduced) in."""
        present = [d for d in batch.global_dtypes if d is not None]
        return accumulation_dtype(present[0]) if present else fallback

    def _careful(
        self, batch: TaskBatch, measured: TaskBatch, gramian: Tensor | None
    ) -> tuple[list[Tensor], Tensor, AgreementDiagnostics]:
        """Step by step, with a check after each: raises naming the rank, task and
        parameter of a non-finite value; rescales scores that over- or underflow."""
        collective = self._collective
        weights = self._weights_of(measured, gramian)
        result, _ = self._combine(batch, weights, [])
        magnitudes = torch.stack(torch._foreach_norm(result, math.inf))
        finite = bool(torch.isfinite(magnitudes).all())
        if not finite and self.non_finite == "raise":

            def find() -> None:
                locate_non_finite(batch)
                if measured is not batch:
                    locate_non_finite(measured)

            collective.raise_together(find)
            raise ValueError(
                "The weighted sum of `task_vectors` overflowed its dtype "
                f"({batch.global_dtypes}); rescale the vectors or use a wider dtype."
            )
        cosines = None
        if self.track_cosines:
            cosines = (
                task_cosines(measured, foreach=self._foreach(measured), collective=collective)
                if finite
                else torch.full_like(weights, math.nan, dtype=torch.float64)
            )
        return result, weights, AgreementDiagnostics(weights, cosines, collective.bytes_sent)

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
        accumulate: bool = False,
    ) -> Tensor:
        r"""Write :math:`\sum_i w_i v_i` into each parameter's ``.grad`` and step the optimizer.

        Everything is validated before anything is written; if ``optimizer.step()`` itself
        raises, the previous ``.grad`` tensors are restored. With ``optimizer=None`` only
        ``.grad`` is written, so the caller's own step follows unchanged
        (``clip_grad_norm_``, ``scaler.step(opt)``, ``opt.step()``).

        Args:
            task_vectors, agreement_vectors, gramian: as in :meth:`aggregate`.
            accumulate: ``False`` (default): ``.grad`` is replaced by the update.
                ``True``: the update is added to the ``.grad`` already there (``None``
                counts as zeros), as ``loss.backward()`` does, for a loop that accumulates
                several meta-batches before stepping.

        Returns:
            The weights ``[N]``.
        """
        if not isinstance(accumulate, bool):
            raise TypeError(f"`accumulate` should be a bool. Found `{accumulate!r}`.")
        with torch.no_grad():
            result, weights, diagnostics = self._aggregate(task_vectors, agreement_vectors, gramian)
        previous = [param.grad for param in self.params]
        with torch.no_grad():
            grads = [
                update if update.dtype == param.dtype else update.to(param.dtype)
                for param, update in zip(self.params, result)
            ]
            if accumulate:
                grads = [g if p.grad is None else p.grad + g for p, g in zip(self.params, grads)]
        for param, grad in zip(self.params, grads):
            param.grad = grad
        if self.optimizer is not None:
            try:
                self.optimizer.step()
            except BaseException:
                for param, old in zip(self.params, previous):
                    param.grad = old
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
