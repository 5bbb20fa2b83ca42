"""What crosses the wire: the collectives behind a meta-batch spread over processes.

The aggregator computes everything through a :class:`Collective`. In one process it is the
identity (:class:`Collective`); with a ``torch.distributed`` process group
(:class:`GroupCollective`) each rank holds only its own tasks and the collectives make the
result equal to one process over all tasks concatenated in rank order. What each weighting
needs to see decides what is sent (see :class:`~ga_optim.Weighting`):

* every step: one small all-reduce of ``int64`` [world, 3 + 3·params] (each rank's error
  code, task count, form, dtypes and which parameters its tasks reached), so that bad
  input on any rank raises on every rank before anything is written or reduced;
* ``"count"`` (:class:`~ga_optim.Mean`): the update, one P-sized all-reduce, like DDP;
* ``"scores"`` (:class:`~ga_optim.Agreement`): the task sum (P floats), the N scores, the
  update (P floats);
* ``"unit_scores"`` (:class:`~ga_optim.CosineAgreement`): as ``"scores"``, on the sum of
  unit directions;
* ``"gramian"`` (a weighting with only ``from_gramian``): every task's vector, N × P floats.

Failures found later (a non-finite score or update) are seen identically on every rank,
since they are read from reduced values; every rank then looks for the culprit among its
own tasks and :meth:`Collective.raise_together` raises the same exception everywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["Collective", "GroupCollective", "Signature", "make_collective"]

_DTYPES = (None, torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _dtype_to_code(dtype: torch.dtype | None) -> int:
    """A small integer for a floating dtype (0 for none), to exchange in an int tensor."""
    return _DTYPES.index(dtype) if dtype in _DTYPES else len(_DTYPES)


def _code_to_dtype(code: int) -> torch.dtype | None:
    return _DTYPES[code] if code < len(_DTYPES) else None


Dtypes = tuple[torch.dtype | None, ...]


@dataclass(frozen=True)
class Signature:
    """What a rank says of its part of a meta-batch, before any arithmetic: its task count,
    whether it passed agreement vectors (the MAML form), each parameter's dtype in the task
    vectors and in the agreement vectors (``None``: no task of its has the parameter), and
    which parameters its tasks reached. In one process it is the call's own; from
    :meth:`agree` it describes the whole meta-batch."""

    num_tasks: int
    maml_form: bool
    dtypes: Dtypes
    agreement_dtypes: Dtypes
    reached: tuple[bool, ...]

    def _encode(self) -> list[int]:
        return [
            self.num_tasks,
            int(self.maml_form),
            *map(_dtype_to_code, self.dtypes + self.agreement_dtypes),
            *map(int, self.reached),
        ]

    @staticmethod
    def agree(
        collective: Collective, error: Exception | None, mine: Signature | None, n_params: int
    ) -> tuple[Signature, tuple[int, ...]]:
        """Every rank's signature (one small all-reduce of ``int64`` [world, 3 + 3·params]),
        merged: the whole meta-batch's, and the task count of each rank. Raises on every
        rank, the same exception, if any rank's input was bad (``error``), no rank has a
        task, the ranks mix the two forms, or they disagree on a parameter's dtype."""
        local = [0] * (2 + 3 * n_params) if mine is None else mine._encode()
        rows = collective.agree(error, local)
        counts = tuple(row[0] for row in rows)
        if sum(counts) == 0:
            raise ValueError(
                f"`task_vectors` holds no task on any of the {len(rows)} ranks; at least one "
                "rank should pass a task."
            )
        active = {r: row for r, row in enumerate(rows) if row[0]}
        if len({row[1] for row in active.values()}) > 1:
            raise ValueError(
                f"Ranks {[r for r, row in active.items() if row[1]]} passed "
                "`agreement_vectors` and the other ranks with tasks did not: every rank "
                "should call with the same form (MAML or Reptile)."
            )
        merged = []
        for column in range(2, 2 + 2 * n_params):
            codes = {r: row[column] for r, row in active.items() if row[column]}
            if len(set(codes.values())) > 1:
                r1 = next(iter(codes))
                r2 = next(r for r in codes if codes[r] != codes[r1])
                what = "task_vectors" if column < 2 + n_params else "agreement_vectors"
                raise TypeError(
                    f"`{what}` parameter {(column - 2) % n_params} has dtype "
                    f"{_code_to_dtype(codes[r1])} on rank {r1} and {_code_to_dtype(codes[r2])} on "
                    f"rank {r2}; every rank should pass the same dtypes."
                )
            merged.append(_code_to_dtype(max(codes.values(), default=0)))
        start = 2 + 2 * n_params  # a parameter any rank's task reached
        whole = Signature(
            sum(counts),
            any(row[1] for row in active.values()),
            tuple(merged[:n_params]),
            tuple(merged[n_params:]),
            tuple(any(row[start + p] for row in rows) for p in range(n_params)),
        )
        return whole, counts


class Collective:
    """The operations the aggregator needs across ranks; this base class is one process,
    where every collective is the identity. :class:`GroupCollective` spans a process
    group."""

    rank = 0
    world_size = 1

    def __init__(self) -> None:
        #: Payload bytes this rank handed to collectives since :meth:`reset_bytes`.
        self.bytes_sent = 0

    def reset_bytes(self) -> None:
        self.bytes_sent = 0

    def agree(self, error: Exception | None, signature: list[int]) -> list[list[int]]:
        """Exchange each rank's validation outcome and ``signature`` (a list of ints of the
        same length everywhere); raise the first rank's error on every rank, or return
        every rank's signature."""
        if error is not None:
            raise error
        return [signature]

    def sum_(self, tensor: Tensor) -> None:
        """All-reduce (sum) ``tensor`` in place."""

    def max_(self, tensor: Tensor) -> None:
        """All-reduce (max) ``tensor`` in place."""

    def gather(self, local: Tensor, counts: Sequence[int]) -> Tensor:
        """Concatenate each rank's ``local`` (``[counts[rank], ...]``) in rank order."""
        return local

    def raise_together(self, find: Callable[[], None]) -> None:
        """Every rank runs ``find`` (which raises if it finds a culprit among its own
        tasks); the first rank's exception is raised on every rank (through
        :meth:`agree`). Returns only if no rank raised. Call it on every rank or none."""
        error: Exception | None = None
        try:
            find()
        except (TypeError, ValueError) as found:
            error = found
        self.agree(error, [])


def _rebuild(kind: type[Exception], message: str) -> Exception:
    try:
        return kind(message)
    except Exception:  # an exception type whose constructor wants more than a message
        return RuntimeError(message)


class GroupCollective(Collective):
    """A ``torch.distributed`` process group (gloo, NCCL, ...).

    P-sized tensors travel on their own device (NCCL needs CUDA tensors; gloo moves CPU
    and CUDA tensors); the small control tensors travel on the CPU for gloo and on the
    current CUDA device otherwise. A group of one rank still runs every collective.
    """

    def __init__(self, group: Any) -> None:
        import torch.distributed as dist

        super().__init__()
        self._dist = dist
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        backend = str(dist.get_backend(group)).lower()
        self._control_device = (
            torch.device("cpu")
            if "gloo" in backend or not torch.cuda.is_available()
            else torch.device("cuda", torch.cuda.current_device())
        )

    def _count(self, tensor: Tensor) -> None:
        self.bytes_sent += tensor.numel() * tensor.element_size()

    def agree(self, error: Exception | None, signature: list[int]) -> list[list[int]]:
        table = torch.zeros(self.world_size, 1 + len(signature), dtype=torch.int64)
        table[self.rank] = torch.tensor(
            [1, *[0] * len(signature)] if error is not None else [0, *signature]
        )
        table = table.to(self._control_device)
        self._count(table)
        self._dist.all_reduce(table, group=self.group)
        rows = table.cpu().tolist()
        if any(row[0] for row in rows):
            self._raise_first(error)
        return [row[1:] for row in rows]

    def _raise_first(self, error: Exception | None) -> None:
        """All ranks: gather every rank's error and raise the first one everywhere."""
        mine = None if error is None else (type(error), str(error))
        everyone: list[Any] = [None] * self.world_size
        self._dist.all_gather_object(everyone, mine, group=self.group)
        for rank, found in enumerate(everyone):
            if found is not None:
                kind, message = found
                raised = _rebuild(kind, f"On rank {rank} of {self.world_size}: {message}")
                raise raised from error
        raise RuntimeError("A rank reported an error but sent no message.")  # pragma: no cover

    def sum_(self, tensor: Tensor) -> None:
        self._count(tensor)
        self._dist.all_reduce(tensor, group=self.group)

    def max_(self, tensor: Tensor) -> None:
        self._count(tensor)
        self._dist.all_reduce(tensor, op=self._dist.ReduceOp.MAX, group=self.group)

    def gather(self, local: Tensor, counts: Sequence[int]) -> Tensor:
        # all_gather needs equal sizes: pad every rank's block to the largest count.
        padded = local.new_zeros((max(counts), *local.shape[1:]))
        padded[: local.shape[0]] = local
        blocks = [torch.empty_like(padded) for _ in range(self.world_size)]
        self._count(padded)
        self._dist.all_gather(blocks, padded.contiguous(), group=self.group)
        return torch.cat([block[:count] for block, count in zip(blocks, counts)])


def make_collective(process_group: object) -> Collective:
    """``None`` → one process (:class:`Collective`); a process group →
    :class:`GroupCollective`."""
    if process_group is None:
        return Collective()
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(
            "`process_group` was given but torch.distributed is not initialised: call "
            "torch.distributed.init_process_group(...) first (torchrun sets up the "
            "environment), or pass process_group=None for one process."
        )
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(
            "`process_group` should be a torch.distributed.ProcessGroup (e.g. "
            f"torch.distributed.group.WORLD) or None. Found `{type(process_group).__name__}`."
        )
    return GroupCollective(process_group)
