"""The aggregator: weight a meta-batch of task vectors, combine them, step an optimizer.

One path for every input form: the validated input (:mod:`ga_optim._checks`) is packed
into the task matrix ``J [N, P]`` (:mod:`ga_optim._matrix`), the weighting reads its
statistic (:mod:`ga_optim._statistics`), and the update ``u = Jᵀw`` is one matrix-vector
product into a flat buffer whose views become the parameters' ``.grad``. One value is read
back to the host per call: a flag that is up when everything read and produced is finite
and the scores are clear of underflow. When it is down, the same computation reruns with a
check after each stage (GradScaler's ``found_inf`` discipline): it names the rank, task and
parameter of a non-finite input, or recomputes the scores in float64 on the matrix scaled
by a power of two.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from torch import Tensor

from ._checks import Tasks, as_tasks, check_gramian, check_params
from ._collective import Signature, make_collective
from ._matrix import Layout, Rows, accumulation_dtype, locate_non_finite, pack
from ._statistics import cosines, scaled, statistic
from ._weightings import Agreement, Weighting

__all__ = [
    "AgreementDiagnostics",
    "GradientAgreementAggregator",
    "NonFinitePolicy",
    "Reduction",
    "weights_of",
]

#: What a call does with NaN/Inf values: raise (default) or let them reach ``.grad``.
NonFinitePolicy = Literal["raise", "propagate"]
#: How the tasks' weighted vectors make the update: their weighted mean or N times it.
Reduction = Literal["mean", "sum"]
_Mode = Literal["weights", "aggregate", "step"]


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

    .. math::

        \text{MAML (line 9):}\quad
        \theta \leftarrow \theta - \alpha \sum_i w_i \nabla L_i(\theta_i)

    with :math:`w` from ``weighting`` (default :class:`~ga_optim.Agreement`, Eq. 13). The
    aggregate :math:`\sum_i w_i v_i` is added to each parameter's ``.grad`` and
    ``optimizer.step()`` applies it; with ``SGD(lr=α)`` and Reptile deltas
    :math:`v_i = \theta - \theta_i` this is exactly line 10. :class:`~ga_optim.Mean` gives
    plain batched Reptile / MAML.

    ``.grad`` follows torch's conventions, so that the loop equals the one it replaces: the
    update is *added* to the ``.grad`` already there (a penalty or auxiliary loss the loop
    back-propagated itself is kept; call ``optimizer.zero_grad()`` each iteration, as the
    stock loop does), a parameter with ``requires_grad=False`` is never written, and a
    parameter that no task reached (``None`` in every task's list) keeps its ``.grad``
    (``None`` after ``zero_grad()``, so the optimizer skips it, weight decay included).

    Args:
        params: the meta-parameters θ (e.g. ``model.parameters()``), leaf tensors. Frozen
            ones (``requires_grad=False``) may be among them: their ``.grad`` is never
            written.
        optimizer: the outer optimizer; every parameter that requires grad must be in one
            of its groups. With ``None``, :meth:`step` writes ``.grad`` and leaves the
            stepping to the caller.
        weighting: a :class:`~ga_optim.Weighting`; default :class:`~ga_optim.Agreement`.
        reduction: ``"mean"`` (default): the update is :math:`\sum_i w_i v_i`; with
            :class:`~ga_optim.Mean` the tasks' average, as in a loop that averages its
            tasks' losses. ``"sum"``: :math:`N \sum_i w_i v_i` (N the tasks of the
            meta-batch, over every rank); with :class:`~ga_optim.Mean` the tasks' sum, as in
            a loop that sums them (higher's and torch.func's MAML examples). The weights
            returned and recorded stay normalised.
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

    Attributes:
        last_weights: the weights ``[N]`` of the last :meth:`step` or :meth:`aggregate`
            (``None`` before the first).
        last_diagnostics: what that call saw, an :class:`~ga_optim.AgreementDiagnostics`
            (``None`` before the first).
        num_steps: how many :meth:`step` calls have completed (kept by :meth:`state_dict`).

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
        reduction: Reduction = "mean",
        track_cosines: bool = False,
        non_finite: NonFinitePolicy = "raise",
        process_group: Any = None,
    ) -> None:
        self.params = check_params(params)
        if optimizer is not None:
            if not hasattr(optimizer, "step") or not hasattr(optimizer, "param_groups"):
                raise TypeError(
                    "`optimizer` should be a torch.optim.Optimizer (with `step` and "
                    f"`param_groups`) or None. Found `{type(optimizer).__name__}`."
                )
            managed = {id(t) for group in optimizer.param_groups for t in group["params"]}
            for p, param in enumerate(self.params):
                if param.requires_grad and id(param) not in managed:
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
        if reduction not in ("mean", "sum"):
            raise ValueError(f"`reduction` should be 'mean' or 'sum'. Found {reduction!r}.")
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
        self._collective = make_collective(process_group)
        self.process_group = process_group
        self.optimizer = optimizer
        self.weighting = weighting
        self.reduction: Reduction = reduction
        self.track_cosines = bool(track_cosines)
        self.non_finite: NonFinitePolicy = non_finite
        self.num_steps = 0
        self.last_weights: Tensor | None = None
        self.last_diagnostics: AgreementDiagnostics | None = None
        self.layout = Layout([param.shape for param in self.params])
        self._rows: dict[tuple[str, torch.dtype], Rows] = {}  # packing space for lists
        self._updates: dict[torch.dtype, list[tuple[Tensor, list[Tensor]]]] = {}
        self._turn = 0  # which of the two update buffers the next call writes

    def __repr__(self) -> str:
        opt = type(self.optimizer).__name__ if self.optimizer is not None else None
        return (
            f"GradientAgreementAggregator(weighting={self.weighting!r}, optimizer={opt}, "
            f"params={len(self.params)})"
        )

    @property
    def distributed(self) -> bool:
        """Whether the meta-batch is spread over a process group."""
        return self.process_group is not None

    # -- the boundary: validate this rank's input, agree with every rank -----------------

    def _prepare(
        self,
        task_vectors: object,
        agreement_vectors: object,
        gramian: Tensor | None,
        reached: object = None,
    ) -> _MetaBatch:
        """Validate this rank's input; in a process group, agree with every rank (one small
        all-reduce) so that bad input anywhere raises everywhere, before any arithmetic."""
        error: Exception | None = None
        try:
            if gramian is not None and self.distributed:
                raise ValueError(
                    "`gramian` cannot be given with a `process_group`: each rank holds only "
                    "its own tasks. Pass the task vectors; a weighting that needs the "
                    "Gramian gets it assembled across ranks."
                )
            if agreement_vectors is not None and gramian is not None:
                raise TypeError("Pass at most one of `agreement_vectors` and `gramian`.")
            empty = self.distributed
            tasks = agreement = as_tasks(task_vectors, params=self.params, allow_empty=empty)
            if agreement_vectors is not None:
                agreement = as_tasks(
                    agreement_vectors, "agreement_vectors", self.params, allow_empty=empty
                )
                if agreement.num_tasks != tasks.num_tasks:
                    raise ValueError(
                        f"`agreement_vectors` holds {agreement.num_tasks} tasks; "
                        f"`task_vectors` holds {tasks.num_tasks}. Both must describe the "
                        "same meta-batch."
                    )
            mine = Signature(
                tasks.num_tasks,
                agreement_vectors is not None,
                tasks.dtypes,
                agreement.dtypes,
                _reached(reached, tasks.dtypes),
            )
        except (TypeError, ValueError) as found:
            if not self.distributed:
                raise
            error, mine = found, None
        if mine is not None and not self.distributed:
            return _MetaBatch(tasks, agreement, (tasks.num_tasks,), 0, mine.reached)
        whole, counts = Signature.agree(self._collective, error, mine, len(self.params))
        same, tasks = agreement is tasks, replace(tasks, dtypes=whole.dtypes)
        agreement = tasks if same else replace(agreement, dtypes=whole.agreement_dtypes)
        first = sum(counts[: self._collective.rank])
        return _MetaBatch(tasks, agreement, counts, first, whole.reached)

    # -- one computation: pack, statistic, weights, update, one flag ---------------------

    def _pack(self, tasks: Tasks) -> Tensor:
        dtype = accumulation_dtype(tasks.dtypes)
        key = (tasks.name, dtype)
        if tasks.form != "matrix" and key not in self._rows:
            self._rows[key] = Rows(self.layout, dtype, self.params[0].device)
        return pack(tasks, self.layout, dtype, self._rows.get(key))

    def _weigh(
        self, call: _MetaBatch, agreement: Tensor, gramian: Tensor | None, rescale: bool = False
    ) -> tuple[str, Tensor, Tensor]:
        """What the weighting reads (``rescale``: the scores in float64 on the matrix
        scaled by a power of two), and the weights ``[N]`` in the matrix's dtype."""
        n = sum(call.counts)
        if gramian is not None:
            needs, stat = "gramian", check_gramian(gramian)
            if stat.shape[0] != n:
                raise ValueError(
                    f"`gramian` is {tuple(stat.shape)}; `task_vectors` holds {n} tasks, so "
                    f"expected ({n}, {n})."
                )
        else:
            needs = self.weighting.needs
            source = agreement
            if rescale and needs == "scores":
                source = scaled(agreement, self._collective)
            # The task sum lives in the update buffer until the update overwrites it.
            scratch = self._buffer(source.dtype)[0] if needs == "scores" and not rescale else None
            stat = statistic(source, needs, self._collective, call.counts, scratch)
        weights = (
            self.weighting.from_gramian(stat)
            if needs == "gramian"
            else self.weighting.from_scores(stat)
        )
        return (
            needs,
            stat,
            weights if weights.dtype == agreement.dtype else weights.to(agreement.dtype),
        )

    def _run(self, call: _MetaBatch, gramian: Tensor | None, mode: _Mode) -> _Result:
        """The call's weights and update, with one value read back (:meth:`_healthy`).
        When that flag is down, :meth:`_run_checked` does the same computation again, with
        a check after each stage."""
        matrix = agreement = self._pack(call.tasks)
        if call.agreement is not call.tasks:
            agreement = self._pack(call.agreement)
        needs, stat, weights = self._weigh(call, agreement, gramian)
        if weights.shape == (sum(call.counts),):
            update, outputs = self._produce(matrix, weights, call, mode)
            if self._healthy(needs, stat, weights, update, outputs, matrix, agreement, mode):
                return self._result(call, agreement, weights, outputs)
        return self._run_checked(call, gramian, mode, matrix, agreement)

    def _run_checked(
        self,
        call: _MetaBatch,
        gramian: Tensor | None,
        mode: _Mode,
        matrix: Tensor,
        agreement: Tensor,
    ) -> _Result:
        """The computation of :meth:`_run` with a check after each stage. ``"raise"``: a
        non-finite value raises on every rank, naming the rank, task and parameter; a
        weighting whose weights are wrong is named; an update that overflowed its dtype
        raises. ``"propagate"``: weights that read a non-finite value are NaN, and so is
        the update. The scores are computed in float64 on the matrix scaled by a power of
        two (so that scores that over- or underflowed are right)."""
        n = sum(call.counts)
        unreadable = False
        if self.non_finite == "raise":

            def find() -> None:
                locate_non_finite(matrix, self.layout, call.tasks.name)
                locate_non_finite(agreement, self.layout, call.agreement.name)

            self._collective.raise_together(find)
        else:
            bad = (~torch.isfinite(agreement)).any().double().reshape(1)
            self._collective.max_(bad)
            unreadable = self.weighting.needs != "count" and bool(bad)
        if unreadable:
            weights = torch.full((n,), math.nan, dtype=agreement.dtype, device=agreement.device)
        else:
            weights = self._weigh(call, agreement, gramian, rescale=True)[2]
            if weights.shape != (n,) or not bool(torch.isfinite(weights).all()):
                raise ValueError(
                    f"{self.weighting!r} returned weights {weights.tolist()} of shape "
                    f"{tuple(weights.shape)} from finite input; expected ({n},), finite."
                )
        update, outputs = self._produce(matrix, weights, call, mode)
        if update is not None and outputs is not None and self.non_finite == "raise":
            if not all(bool(part.isfinite().all()) for part in (update, *outputs)):
                raise ValueError(
                    "The weighted sum of `task_vectors` overflowed its dtype "
                    f"({update.dtype}); rescale the vectors or use a wider dtype."
                )
        return self._result(call, agreement, weights, outputs)

    def _produce(
        self, matrix: Tensor, weights: Tensor, call: _MetaBatch, mode: _Mode
    ) -> tuple[Tensor | None, list[Tensor] | None]:
        """The update ``[P]`` and what the call hands back of it (none for ``weights``)."""
        if mode == "weights":
            return None, None
        update = self._combine(matrix, weights, call)
        return update, self._outputs(update, mode, call)

    def _healthy(
        self,
        needs: str,
        stat: Tensor,
        weights: Tensor,
        update: Tensor | None,
        outputs: list[Tensor] | None,
        matrix: Tensor,
        agreement: Tensor,
        mode: _Mode,
    ) -> bool:
        """The one value read back: whether everything read and produced is finite (a probe
        whose sum is finite exactly then; an overflow of its own sum is a false alarm that
        only costs the checked path) and the scores are clear of underflow."""
        probe = weights.sum() if update is None else update.sum()
        for part in outputs or []:  # a cast to fp16/bf16 may overflow
            if update is not None and part.dtype.itemsize < update.dtype.itemsize:
                probe = probe + part.sum()
        if needs == "count" and self.non_finite == "raise":  # values Mean does not read
            if agreement is not matrix or mode == "weights":
                unread = agreement.sum().reshape(1)
                self._collective.sum_(unread)
                probe = probe + unread
        if needs == "scores":
            info = torch.finfo(stat.dtype)
            largest = stat.abs().amax()
            finite = (probe + largest) * 0 == 0
            return bool(finite & (largest >= info.tiny / info.eps))
        if needs != "count":
            probe = probe + stat.sum()
        return bool(probe * 0 == 0)

    def _combine(self, matrix: Tensor, weights: Tensor, call: _MetaBatch) -> Tensor:
        """``u = Jᵀw`` over every rank's tasks (this rank's share, all-reduced), into the
        update buffer that no ``.grad`` views now (two alternate, so a call that raises
        leaves the last step's ``.grad`` as it was)."""
        local = weights[call.first : call.first + matrix.shape[0]] if self.distributed else weights
        if local.dtype != matrix.dtype:
            local = local.to(matrix.dtype)
        update = torch.mv(matrix.T, local, out=self._buffer(matrix.dtype)[0])
        self._collective.sum_(update)
        if self.reduction == "sum":
            update.mul_(sum(call.counts))
        return update

    def _buffer(self, dtype: torch.dtype) -> tuple[Tensor, list[Tensor]]:
        """The flat update buffer ``[P]`` (and its per-parameter views) that no ``.grad``
        views now."""
        if dtype not in self._updates:
            device = self.params[0].device
            flats = [torch.empty(self.layout.width, dtype=dtype, device=device) for _ in range(2)]
            self._updates[dtype] = [(flat, self.layout.split(flat)) for flat in flats]
        return self._updates[dtype][self._turn]

    def _outputs(self, update: Tensor, mode: _Mode, call: _MetaBatch) -> list[Tensor]:
        """The update per parameter: for ``step``, views of the update buffer (cast where a
        parameter has another dtype); for ``aggregate``, a copy in the vectors' dtypes."""
        if mode == "step":
            views = self._buffer(update.dtype)[1]
            return [v if v.dtype == p.dtype else v.to(p.dtype) for v, p in zip(views, self.params)]
        wanted = [d or p.dtype for d, p in zip(call.tasks.dtypes, self.params)]
        return [part.to(dtype, copy=True) for part, dtype in zip(self.layout.split(update), wanted)]

    def _result(
        self, call: _MetaBatch, agreement: Tensor, weights: Tensor, outputs: list[Tensor] | None
    ) -> _Result:
        collective = self._collective
        found = cosines(agreement, collective, call.counts) if self.track_cosines else None
        return _Result(
            weights,
            outputs,
            AgreementDiagnostics(weights, found, collective.bytes_sent),
            call.reached,
        )

    # -- the three levels: weights, aggregate, step -------------------------------------

    def weights(self, task_vectors: object = None, *, gramian: Tensor | None = None) -> Tensor:
        """The weights ``[N]`` of ``task_vectors`` (shaped like ``params``) or of a Gramian.

        In a process group, each rank passes its own tasks and gets every task's weight.
        """
        if self.distributed or (task_vectors is not None and gramian is None):
            return self._call(task_vectors, None, gramian, "weights").weights
        return self.weighting.weights(task_vectors, gramian=gramian)

    def _call(
        self,
        task_vectors: object,
        agreement_vectors: object,
        gramian: Tensor | None,
        mode: _Mode,
        reached: object = None,
    ) -> _Result:
        self._collective.reset_bytes()
        with torch.no_grad():
            call = self._prepare(task_vectors, agreement_vectors, gramian, reached)
            return self._run(call, gramian, mode)

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
        result = self._call(task_vectors, agreement_vectors, gramian, "aggregate")
        self.last_weights, self.last_diagnostics = result.weights, result.diagnostics
        assert result.outputs is not None
        return result.outputs

    def step(
        self,
        task_vectors: object,
        *,
        agreement_vectors: object = None,
        gramian: Tensor | None = None,
        accumulate: bool = True,
        reached: Sequence[bool] | None = None,
    ) -> Tensor:
        r"""Add :math:`\sum_i w_i v_i` to each parameter's ``.grad`` and step the optimizer.

        As ``loss.backward()`` would: the update is added to the ``.grad`` already there
        (``None`` counts as zeros), a parameter with ``requires_grad=False`` is never
        written, and one that no task reached keeps its ``.grad``. Everything is validated
        before anything is written; if ``optimizer.step()`` itself raises, the previous
        ``.grad`` tensors are restored. With ``optimizer=None`` only ``.grad`` is written,
        so the caller's own step follows unchanged (``clip_grad_norm_``,
        ``scaler.step(opt)``, ``opt.step()``).

        The ``.grad`` tensors are views of one flat buffer (as DDP's
        ``gradient_as_bucket_view``); two buffers alternate from step to step, so keep a
        ``.grad`` across steps only as a copy.

        Args:
            task_vectors, agreement_vectors, gramian: as in :meth:`aggregate`.
            accumulate: ``True`` (default): add the update to ``.grad``, as ``backward()``
                does (call ``optimizer.zero_grad()`` once per iteration, as the stock loop
                does; several meta-batches before one step accumulate). ``False``: replace
                ``.grad`` by the update, dropping whatever the loop put there (a parameter
                no task reached gets ``None``).
            reached: which parameters the tasks reached, one bool per parameter; a
                parameter marked ``False`` is not written (as autograd leaves a parameter
                that no loss reached). Default: those that some task gives a tensor for (a
                stacked tensor or ``TaskStack`` reaches every parameter). In a process
                group, a parameter any rank's task reached counts as reached.

        Returns:
            The weights ``[N]``.
        """
        if not isinstance(accumulate, bool):
            raise TypeError(f"`accumulate` should be a bool. Found `{accumulate!r}`.")
        result = self._call(task_vectors, agreement_vectors, gramian, "step", reached)
        grads = result.outputs
        assert grads is not None
        previous = [param.grad for param in self.params]
        written = [hit and param.requires_grad for hit, param in zip(result.reached, self.params)]
        if accumulate:
            kept = zip(grads, previous, written)
            pairs = [(g, old) for g, old, write in kept if write and old is not None]
            if pairs:
                with torch.no_grad():
                    torch._foreach_add_([g for g, _ in pairs], [old for _, old in pairs])
        for param, grad, write in zip(self.params, grads, written):
            if write:
                param.grad = grad
            elif not accumulate and param.requires_grad:
                param.grad = None
        if self.optimizer is not None:
            try:
                self.optimizer.step()
            except BaseException:
                for param, old in zip(self.params, previous):
                    param.grad = old
                raise
        self._turn ^= 1
        self.num_steps += 1
        self.last_weights, self.last_diagnostics = result.weights, result.diagnostics
        return result.weights

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


@dataclass(frozen=True)
class _MetaBatch:
    """One call's validated meta-batch and what every rank agreed on: ``tasks``, the
    vectors to combine; ``agreement``, the vectors agreement is measured on (``tasks``
    itself unless ``agreement_vectors`` were given); the tasks per rank, this rank's first
    task, the parameters some task reached. In a process group each parameter's dtype in
    ``tasks.dtypes`` and ``agreement.dtypes`` is the one on any rank (``None``: no task has
    it)."""

    tasks: Tasks
    agreement: Tasks
    counts: tuple[int, ...]
    first: int
    reached: tuple[bool, ...]


@dataclass(frozen=True)
class _Result:
    weights: Tensor
    outputs: list[Tensor] | None
    diagnostics: AgreementDiagnostics
    reached: tuple[bool, ...]


def _reached(reached: object, dtypes: tuple[torch.dtype | None, ...]) -> tuple[bool, ...]:
    """Which parameters this rank's tasks reached: given (one bool per parameter), and a
    parameter no task gives a tensor for (its dtype ``None``) is never reached."""
    if reached is None:
        return tuple(dtype is not None for dtype in dtypes)
    if isinstance(reached, (str, bytes, Tensor)) or not isinstance(reached, Sequence):
        raise TypeError(
            f"`reached` should be a sequence of bools, one per parameter. Found "
            f"`{type(reached).__name__}`."
        )
    if len(reached) != len(dtypes) or not all(isinstance(r, bool) for r in reached):
        raise ValueError(
            f"`reached` should hold {len(dtypes)} bools, one per parameter. Found {reached!r}."
        )
    return tuple(r and dtype is not None for r, dtype in zip(reached, dtypes))


def weights_of(weighting: Weighting, task_vectors: object) -> Tensor:
    """The weights of ``task_vectors`` in one process, without parameters: the layout is
    read off the vectors (what :meth:`ga_optim.Weighting.weights` computes)."""
    tasks = as_tasks(task_vectors)
    params = [
        torch.zeros((), dtype=dtype or torch.float32, device=tasks.device).expand(shape)
        for shape, dtype in zip(tasks.shapes, tasks.dtypes)
    ]
    return GradientAgreementAggregator(params, weighting=weighting).weights(task_vectors)
