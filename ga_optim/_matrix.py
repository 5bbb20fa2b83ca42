"""The task matrix: a meta-batch as one tensor ``J [N, P]``, one row per task.

Every input form becomes this one matrix (parameters flattened and concatenated in the
parameters' order, in one accumulation dtype, on one device), and everything after it is a
matrix product on it (see :mod:`ga_optim._statistics`). This module holds the layout (where
each parameter's entries sit in a row), the packing of each input form into rows, reusable
row storage whose per-parameter views let a caller write a task straight into its row, and
the scan that names the task and parameter of a non-finite entry.

The accumulation dtype is float32 for fp16/bf16 and the input's own dtype for float32 and
float64, promoted over parameters (:func:`accumulation_dtype`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor

from ._checks import NonFiniteError, Tasks

__all__ = ["Layout", "Rows", "accumulation_dtype", "copy_into", "locate_non_finite", "pack"]

_T = TypeVar("_T")


def accumulation_dtype(dtypes: Sequence[torch.dtype | None]) -> torch.dtype:
    """The dtype the task matrix of vectors of these dtypes is kept in: at least float32."""
    result = torch.float32
    for dtype in dtypes:
        if dtype is not None and dtype != result:
            result = torch.promote_types(result, dtype)
    return result


class Layout:
    """Where each parameter's entries sit in a row: ``row[offsets[p]:offsets[p + 1]]``."""

    def __init__(self, shapes: Sequence[torch.Size]) -> None:
        self.shapes = [tuple(shape) for shape in shapes]
        self.numels = [torch.Size(shape).numel() for shape in shapes]
        self.offsets = list(itertools.accumulate(self.numels, initial=0))
        self.width = self.offsets[-1]

    def split(self, flat: Tensor) -> list[Tensor]:
        """A row ``[P]`` as one view per parameter, shaped like it."""
        return [
            flat[start:stop].view(shape)
            for start, stop, shape in zip(self.offsets, self.offsets[1:], self.shapes)
        ]

    def columns(self, matrix: Tensor) -> list[Tensor]:
        """A matrix ``[N, P]`` as one view ``[N, *shape]`` per parameter."""
        n = matrix.shape[0]
        return [
            matrix[:, start:stop].view(n, *shape)
            for start, stop, shape in zip(self.offsets, self.offsets[1:], self.shapes)
        ]

    def locate(self, column: int) -> tuple[int, tuple[int, ...]]:
        """The parameter and the index inside it of a row's entry ``column``."""
        p = next(p for p, stop in enumerate(self.offsets[1:]) if column < stop)
        flat = column - self.offsets[p]
        index = []
        for size in reversed(self.shapes[p]):
            index.append(flat % size)
            flat //= size
        return p, tuple(reversed(index))


class Rows:
    """Reusable storage for up to ``capacity`` task rows, with cached per-parameter views.

    A training loop passes meta-batches of one size step after step: the storage and its
    views are made once. :meth:`append` hands out the next row's views (a recorder writes
    a task straight into them); :meth:`matrix` is the filled rows ``[n, P]``.
    """

    def __init__(self, layout: Layout, dtype: torch.dtype, device: torch.device) -> None:
        self.layout, self.dtype, self.device = layout, dtype, device
        self.storage = torch.empty(0, layout.width, dtype=dtype, device=device)
        self.filled = 0
        self._views: dict[tuple[str, int], Any] = {}  # made once per storage

    @classmethod
    def for_params(cls, params: Sequence[Tensor], layout: Layout) -> Rows:
        """Rows for task vectors of ``params``: in their accumulation dtype, on their
        device."""
        return cls(layout, accumulation_dtype([p.dtype for p in params]), params[0].device)

    def reserve(self, n: int, *, keep: int = 0) -> None:
        """Room for ``n`` rows, the first ``keep`` of them kept."""
        if n > self.storage.shape[0]:
            size = (max(n, 2 * self.storage.shape[0]), self.layout.width)
            grown = torch.empty(size, dtype=self.dtype, device=self.device)
            grown[:keep] = self.storage[:keep]
            self.storage, self._views = grown, {}

    def _cached(self, kind: str, n: int, make: Callable[[], _T]) -> _T:
        if (kind, n) not in self._views:
            self._views[kind, n] = make()
        found: _T = self._views[kind, n]
        return found

    def row(self, i: int) -> list[Tensor]:
        """Row ``i``'s views, one per parameter, shaped like it."""
        return self._cached("row", i, lambda: self.layout.split(self.storage[i]))

    def flat_views(self, n: int) -> list[Tensor]:
        """Rows ``0 … n-1``'s views, one after the other (row-major)."""
        return self._cached("flat", n, lambda: [v for i in range(n) for v in self.row(i)])

    def column_views(self, n: int) -> list[Tensor]:
        """The first ``n`` rows as one view ``[n, *shape]`` per parameter."""
        return self._cached("columns", n, lambda: self.layout.columns(self.storage[:n]))

    def append(self) -> list[Tensor]:
        """The next free row's views (its values are left to the caller to write)."""
        self.reserve(self.filled + 1, keep=self.filled)
        self.filled += 1
        return self.row(self.filled - 1)

    def append_difference(
        self, minuend: Sequence[Tensor | None], subtrahend: Sequence[Tensor | None]
    ) -> None:
        """Write ``minuend − subtrahend`` (per parameter; θ − θ_i for a task) into the next
        row: two multi-tensor operations, no temporary. ``None`` counts as zeros (a
        parameter the inner loop did not adapt: zeros in both)."""
        row = self.append()
        copy_into(row, minuend)
        pairs = [(part, s) for part, s in zip(row, subtrahend) if s is not None]
        if pairs:
            torch._foreach_sub_([part for part, _ in pairs], [s for _, s in pairs])

    def matrix(self, n: int | None = None) -> Tensor:
        """The first ``n`` rows (default: those appended) as ``[n, P]``."""
        n = self.filled if n is None else n
        return self._cached("matrix", n, lambda: self.storage[:n])


def pack(tasks: Tasks, layout: Layout, dtype: torch.dtype, rows: Rows | None = None) -> Tensor:
    """The task matrix ``[N, P]`` in ``dtype``: a given ``[N, P]`` tensor as it is (cast if
    needed), the other forms copied into ``rows`` (or a new matrix) by one multi-tensor
    copy, ``None`` entries as zeros."""
    n = tasks.num_tasks
    if tasks.form == "matrix":
        matrix: Tensor = tasks.data
        return matrix if matrix.dtype == dtype else matrix.to(dtype)
    if rows is None:
        rows = Rows(layout, dtype, tasks.device)
    rows.reserve(n)
    if tasks.form == "columns":
        copy_into(rows.column_views(n), tasks.data)
    else:
        copy_into(rows.flat_views(n), [vector for task in tasks.data for vector in task])
    return rows.matrix(n)


def copy_into(targets: list[Tensor], sources: Sequence[Tensor | None]) -> None:
    """Each source into its target view, by one multi-tensor copy; ``None`` as zeros."""
    present = [source for source in sources if source is not None]
    if len(present) < len(targets):
        torch._foreach_zero_([t for t, s in zip(targets, sources) if s is None])
        targets = [t for t, s in zip(targets, sources) if s is not None]
    if present:
        torch._foreach_copy_(targets, present)


def locate_non_finite(matrix: Tensor, layout: Layout, name: str) -> None:
    """Raise :class:`~ga_optim.NonFiniteError` naming the first non-finite entry of
    ``matrix`` (the argument ``name``) by task and parameter, if there is one."""
    bad = (~torch.isfinite(matrix)).nonzero()
    if bad.numel():
        i, column = bad[0].tolist()
        p, index = layout.locate(column)
        raise NonFiniteError(
            f"`{name}[{i}][{p}]` should be finite. Found "
            f"{matrix[i, column].item()} at index {index}."
        )
