"""The two primitives every weighting and aggregator is built from, per parameter.

* :func:`weighted_sum` — ``Σ_i c_i g_i`` for each parameter (the task sum
  :func:`task_sum`, and the final combination ``Σ_i w_i g_i``);
* :func:`dots_with` — ``g_i · s`` for every task, summed over parameters.

Results stay in the blocks they are computed in (:class:`Blocked`: one flat tensor per
pack of parameters, one tensor per parameter handled alone): the scores read the task
sum block by block, and a finiteness check (:func:`finite_probe`) reads a few blocks, so
the per-parameter views are built only for what leaves the module (the update, or what a
collective sends).

As in ``torch.optim``, two paths are chosen by a ``foreach`` flag and must agree in
float64:

* the per-tensor path: a readable loop, one ``add_`` / ``dot`` per task and parameter;
* the foreach path: medium parameters go through ``torch._foreach_add_`` over lists of
  tensors, one BLAS dot per task and parameter, never a flat ``N × P`` copy of the model;
  on the CPU, parameters above :data:`LARGE_NUMEL` elements are summed parameter by
  parameter, so their output stays in cache across the tasks (measured faster at
  P = 1e7); on an accelerator, where a launch costs more than a cache, they join the
  foreach lists (one call per task for all of them: a fused kernel for the task sum; the
  multiply-add by a device scalar, whose 0-d operands PyTorch does not fuse, still
  launches per tensor inside that call).
  Small parameters (at most :data:`SMALL_NUMEL` elements), where per-call overhead and
  not memory dominates, are packed per dtype and device into ``[N, k]`` matrices of at
  most :data:`PACK_ELEMENTS` entries and handled by one matmul each (measured in
  ``benchmarks/aggregate.py``: 0.15 ms instead of 4.7 ms at N = 32, P = 1e3).

Dot products accumulate in at least float32, so fp16/bf16 inputs whose dots exceed 65504
are exact to float32 precision.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor

from ._checks import TaskBatch

__all__ = [
    "FEW_TENSORS",
    "LARGE_NUMEL",
    "PACK_CACHE_ELEMENTS",
    "PACK_ELEMENTS",
    "SMALL_NUMEL",
    "Blocked",
    "accumulation_dtype",
    "default_foreach",
    "dots_with",
    "finite_probe",
    "finiteness_probe",
    "gramian",
    "materialize",
    "promote",
    "task_sum",
    "weighted_blocks",
    "weighted_sum",
]

#: Parameters with at most this many elements are packed on the foreach path.
SMALL_NUMEL = 1 << 14
#: A pack holds at most this many entries (N × its elements): 4 MiB in float32.
PACK_ELEMENTS = 1 << 20
#: Packs kept for the rest of a call (sum, scores, combination) hold at most this many
#: entries in all: 16 MiB in float32.
PACK_CACHE_ELEMENTS = 1 << 22
#: On the CPU, parameters above this many elements are summed parameter by parameter even
#: on the foreach path: one output stays in cache across the N tasks, and per-call overhead
#: is negligible.
LARGE_NUMEL = 1 << 20


@functools.cache
def promote(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """``torch.promote_types``, remembered: a step asks it per parameter, and each call
    would otherwise be an operator dispatch."""
    return torch.promote_types(a, b)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types, the dtype itself for float32/float64."""
    return promote(dtype, torch.float32)


def default_foreach(batch: TaskBatch) -> bool:
    """The foreach path is the default; it needs at least one materialised parameter."""
    return any(dtype is not None for dtype in batch.dtypes)


@dataclass(frozen=True)
class _Plan:
    packs: list[list[int]]  # parameter indices packed together into one [N, k] matrix
    singles: list[int]  # parameter indices handled tensor by tensor
    firsts: list[int | None]  # per parameter, the first task that has it


def _plan(batch: TaskBatch, foreach: bool) -> _Plan:
    key = ("plan", foreach)
    if key in batch.cache:
        return cast(_Plan, batch.cache[key])
    plan = (
        _stacked_plan(batch.num_tasks, tuple(batch.shapes), tuple(zip(batch.dtypes, batch.devices)))
        if foreach and batch.stacked is not None
        else _list_plan(batch, foreach)
    )
    batch.cache[key] = plan
    return plan


_Kind = tuple[torch.dtype | None, torch.device | None]


def _small_packs(
    n: int, numels: Sequence[int], kinds: Sequence[_Kind], params: list[int]
) -> tuple[list[list[int]], list[int]]:
    """Small parameters grouped per kind (dtype and device) into packs of at most
    :data:`PACK_ELEMENTS` entries; the others, left out."""
    groups: dict[_Kind, list[list[int]]] = {}
    used: dict[_Kind, int] = {}  # in the last pack
    others = []
    for p in params:
        if numels[p] > SMALL_NUMEL or n * numels[p] > PACK_ELEMENTS:
            others.append(p)
            continue
        kind = kinds[p]
        group = groups.setdefault(kind, [[]])
        if n * (used.get(kind, 0) + numels[p]) > PACK_ELEMENTS:
            group.append([])
            used[kind] = 0
        group[-1].append(p)
        used[kind] = used.get(kind, 0) + numels[p]
    return [pack for group in groups.values() for pack in group], others


def _list_plan(batch: TaskBatch, foreach: bool) -> _Plan:
    firsts = [
        next((i for i, task in enumerate(batch.tasks) if task[p] is not None), None)
        for p in range(batch.num_params)
    ]
    present = [p for p, dtype in enumerate(batch.dtypes) if dtype is not None]  # some task has it
    if not foreach:
        return _Plan(packs=[], singles=present, firsts=firsts)
    kinds = list(zip(batch.dtypes, batch.devices))
    packs, singles = _small_packs(batch.num_tasks, _sizes(batch).numels, kinds, present)
    return _Plan(packs=packs, singles=singles, firsts=firsts)


@dataclass(frozen=True)
class _Sizes:
    """Each parameter's number of elements (0 where no task has it) and its shape as a
    plain tuple (``view`` parses a tuple faster than a ``torch.Size``)."""

    numels: list[int]
    view_shapes: list[tuple[int, ...]]


@functools.lru_cache(maxsize=64)
def _sizes_of(shapes: tuple[torch.Size | None, ...]) -> _Sizes:
    return _Sizes(
        numels=[0 if shape is None else shape.numel() for shape in shapes],
        view_shapes=[() if shape is None else tuple(shape) for shape in shapes],
    )


def _sizes(batch: TaskBatch) -> _Sizes:
    """The batch's :class:`_Sizes`, once per call (and once per layout across calls)."""
    sizes = batch.cache.get("sizes")
    if sizes is None:
        sizes = batch.cache["sizes"] = _sizes_of(tuple(batch.shapes))
    return cast(_Sizes, sizes)


@functools.lru_cache(maxsize=64)
def _stacked_plan(n: int, shapes: tuple[torch.Size | None, ...], kinds: tuple[_Kind, ...]) -> _Plan:
    """Stacked input: every parameter is already an ``[N, numel]`` matrix. On an
    accelerator, where each kernel launch costs more than copying a small batch, a batch
    of at most :data:`PACK_CACHE_ELEMENTS` entries in one dtype and device is one pack
    (one copy, kept for the call: each pass is then a single kernel). Otherwise a large
    parameter is a pack of its own (a view, no copy) and small ones are concatenated into
    packs. Every kernel runs per pack, whatever N is. Computed once per layout (a
    training loop passes the same shapes every step)."""
    numels = _sizes_of(shapes).numels
    present = [p for p, (dtype, _) in enumerate(kinds) if dtype is not None]
    firsts: list[int | None] = [None if dtype is None else 0 for dtype, _ in kinds]
    used = {kinds[p] for p in present}
    entries = n * sum(numels[p] for p in present)
    on_accelerator = all(device is not None and device.type != "cpu" for _, device in used)
    if on_accelerator and len(used) == 1 and len(present) > 1 and entries <= PACK_CACHE_ELEMENTS:
        return _Plan(packs=[present], singles=[], firsts=firsts)
    packs, large = _small_packs(n, numels, kinds, present)
    return _Plan(packs=[[p] for p in large] + packs, singles=[], firsts=firsts)


def _packed(batch: TaskBatch, pack: list[int], dtype: torch.dtype) -> Tensor:
    """The pack's tensors as one ``[N, k]`` matrix in ``dtype`` (``None`` as zeros).

    Kept in the batch's per-call cache while all kept packs hold at most
    :data:`PACK_CACHE_ELEMENTS` entries, so the task sum, the scores and the combination
    build it once; beyond that it is rebuilt when needed and dropped, so at most one more
    pack (≤ :data:`PACK_ELEMENTS` entries) is alive at a time.
    """
    if batch.stacked is not None and len(pack) == 1:
        if batch.stacked[pack[0]].dtype == dtype:  # a view of the caller's tensor: no copy
            return batch.stacked[pack[0]]
    key = ("pack", tuple(pack), dtype)
    kept = batch.cache.get(key)
    if kept is not None:
        return cast(Tensor, kept)
    if batch.stacked is not None:
        columns = [batch.stacked[p] for p in pack]
        if batch.dtypes[pack[0]] != dtype:  # a pack holds one dtype
            columns = [column.to(dtype) for column in columns]
        return _keep(batch, key, columns[0] if len(columns) == 1 else torch.cat(columns, dim=1))
    columns = []
    for p in pack:  # every packed parameter is present in some task
        rows = [task[p] for task in batch.tasks]
        if any(row is None for row in rows):
            first = next(row for row in rows if row is not None)
            zeros = first.new_zeros(first.shape)
            rows = [zeros if row is None else row for row in rows]
        matrix = torch.stack(cast(list[Tensor], rows)).reshape(batch.num_tasks, -1)
        columns.append(matrix if matrix.dtype == dtype else matrix.to(dtype))
    return _keep(batch, key, columns[0] if len(columns) == 1 else torch.cat(columns, dim=1))


def _keep(batch: TaskBatch, key: object, packed: Tensor) -> Tensor:
    """Keep ``packed`` for the rest of the call while the kept packs fit the budget."""
    used = cast(int, batch.cache.get("pack_entries", 0))
    if used + packed.numel() <= PACK_CACHE_ELEMENTS:
        batch.cache[key] = packed
        batch.cache["pack_entries"] = used + packed.numel()
    return packed


def _unpack(batch: TaskBatch, pack: list[int], flat: Tensor) -> list[Tensor]:
    """The pack's flat result ``[k]`` as views shaped like its parameters."""
    sizes = _sizes(batch)
    shapes = sizes.view_shapes
    if len(pack) == 1:
        return [flat.view(shapes[pack[0]])]
    numels = sizes.numels
    chunks = torch.split(flat, [numels[p] for p in pack])
    return [
        chunk if len(shapes[p]) == 1 else chunk.view(shapes[p])  # 1-d: already shaped
        for p, chunk in zip(pack, chunks)
    ]


class Blocked:
    """Per-parameter results kept in the blocks they were computed in: one flat tensor
    ``[k]`` per pack of the batch's plan (its parameters' entries concatenated) and one
    tensor per parameter computed on its own.

    The blocks are what a check or a dot product reads (a few tensors, whatever the
    number of parameters); :attr:`params`, the per-parameter views, is built on first
    read (only what is returned to the caller, or sent to other ranks, needs it).
    """

    def __init__(
        self,
        batch: TaskBatch,
        packs: list[list[int]],
        flats: list[Tensor],
        singles: dict[int, Tensor],
    ) -> None:
        self._batch, self._packs = batch, packs
        self.flats = flats
        self.singles = singles
        self._params: list[Tensor | None] | None = None

    @property
    def blocks(self) -> list[Tensor]:
        """Every block once: the packs' flats, then the single parameters' tensors."""
        return [*self.flats, *self.singles.values()]

    @property
    def params(self) -> list[Tensor | None]:
        """One tensor per parameter (views of the blocks; ``None`` where no task has it)."""
        if self._params is None:
            out: list[Tensor | None] = [None] * self._batch.num_params
            for pack, flat in zip(self._packs, self.flats):
                for p, view in zip(pack, _unpack(self._batch, pack, flat)):
                    out[p] = view
            for p, tensor in self.singles.items():
                out[p] = tensor
            self._params = out
        return self._params

    def wire(self, tensors: Sequence[Tensor | None]) -> list[Tensor]:
        """``tensors`` (one per parameter: :attr:`params`, with zeros where this rank has
        no task with the parameter) as a collective should send them: in parameter order,
        each pack of consecutive parameters as its flat block. The same entries in the
        same order (ranks that pack differently still agree, since a collective
        concatenates what it gets), and one contiguous block is reduced in place: no
        concatenation, no copy back into per-parameter views."""
        runs = {
            pack[0]: (len(pack), flat)
            for pack, flat in zip(self._packs, self.flats)
            if pack[-1] - pack[0] + 1 == len(pack)  # a pack's indices increase
        }
        out: list[Tensor] = []
        p = 0
        while p < len(tensors):
            if p in runs:
                length, flat = runs[p]
                out.append(flat)
                p += length
                continue
            tensor = tensors[p]
            if tensor is not None:
                out.append(tensor)
            p += 1
        return out


def weighted_sum(
    batch: TaskBatch,
    coeffs: Tensor | Sequence[float],
    *,
    foreach: bool,
    acc_dtype: torch.dtype | None = None,
    out_dtype: bool = False,
    packing: bool = True,
) -> list[Tensor | None]:
    """``Σ_i coeffs[i] · tasks[i][p]`` for every parameter ``p``.

    ``coeffs`` is a tensor ``[N]`` (it stays where it is: no value is read back to the
    host) or a sequence of floats. Accumulates in ``acc_dtype`` (default:
    :func:`accumulation_dtype` of each parameter's dtype). With ``out_dtype=True`` the
    result is cast back to the tasks' dtype. A parameter that no task has gives ``None``.
    ``packing=False`` keeps even small parameters on the foreach lists. The same sums as
    :func:`weighted_blocks`, one tensor per parameter.
    """
    out = weighted_blocks(
        batch, coeffs, foreach=foreach, acc_dtype=acc_dtype, packing=packing
    ).params
    if out_dtype:
        out = [
            t if t is None or t.dtype == dtype else t.to(dtype)
            for t, dtype in zip(out, batch.dtypes)
        ]
    return out


def weighted_blocks(
    batch: TaskBatch,
    coeffs: Tensor | Sequence[float],
    *,
    foreach: bool,
    acc_dtype: torch.dtype | None = None,
    packing: bool = True,
) -> Blocked:
    """:func:`weighted_sum` in the blocks it is computed in: one matrix-vector product per
    pack, a foreach multiply-add per task over the other parameters (or, on the
    per-tensor path and on the CPU above :data:`LARGE_NUMEL` elements, one per task and
    tensor)."""
    plan = _plan(batch, foreach and packing)
    given = (
        coeffs if isinstance(coeffs, Tensor) else torch.tensor(list(coeffs), dtype=torch.float64)
    )
    by_dtype: dict[tuple[torch.dtype, torch.device], Tensor] = {}

    def cast_to(dtype: torch.dtype, device: torch.device) -> Tensor:
        if (dtype, device) not in by_dtype:
            by_dtype[dtype, device] = (
                given
                if given.dtype == dtype and given.device == device
                else given.to(device=device, dtype=dtype)
            )
        return by_dtype[dtype, device]

    scalars: dict[tuple[torch.dtype, torch.device], tuple[Tensor, ...]] = {}

    def scalars_of(dtype: torch.dtype, device: torch.device) -> tuple[Tensor, ...]:
        """The coefficients as N device scalars (one ``unbind``, not a select per use)."""
        if (dtype, device) not in scalars:
            scalars[dtype, device] = cast_to(dtype, device).unbind(0)
        return scalars[dtype, device]

    flats = []
    for pack in plan.packs:
        dtype = acc_dtype or accumulation_dtype(batch.dtypes[pack[0]])  # type: ignore[arg-type]
        matrix = _packed(batch, pack, dtype)
        flats.append(cast_to(dtype, matrix.device) @ matrix)

    out: dict[int, Tensor] = {}
    host = not isinstance(coeffs, Tensor)  # floats already on the host: the alpha path
    floats = list(coeffs) if host else []
    for p in plan.singles:
        f = plan.firsts[p]
        assert f is not None
        first = batch.tasks[f][p]
        assert first is not None
        dtype = acc_dtype or accumulation_dtype(first.dtype)
        scale = floats[f] if host else scalars_of(dtype, first.device)[f]
        out[p] = first.to(dtype) * scale

    numels = _sizes(batch).numels
    devices = batch.devices
    listed = [
        foreach and (numels[p] <= LARGE_NUMEL or cast(torch.device, devices[p]).type != "cpu")
        for p in plan.singles
    ]
    lists = [p for p, yes in zip(plan.singles, listed) if yes]
    loops = [p for p, yes in zip(plan.singles, listed) if not yes]
    if lists:
        for i in range(batch.num_tasks):
            index = [
                p
                for p in lists
                if i > plan.firsts[p] and batch.tasks[i][p] is not None  # type: ignore[operator]
            ]
            if host and index:
                torch._foreach_add_(
                    [out[p] for p in index],
                    [cast(Tensor, batch.tasks[i][p]) for p in index],
                    alpha=floats[i],
                )
                continue
            for (dtype, device), members in _by_dtype(out, index).items():
                # out += task · c_i with c_i a device scalar (broadcast): no value read back
                # to the host and no temporary the size of the task.
                c = scalars_of(dtype, device)[i]
                torch._foreach_addcmul_(
                    [out[p] for p in members],
                    [cast(Tensor, batch.tasks[i][p]) for p in members],
                    [c] * len(members),
                )
    for p in loops:
        total = out[p]
        for i in range(plan.firsts[p] + 1, batch.num_tasks):  # type: ignore[operator]
            vector = batch.tasks[i][p]
            if vector is None:
                continue
            if host:
                total.add_(vector, alpha=floats[i])
            else:
                total.addcmul_(vector, scalars_of(total.dtype, total.device)[i])
    return Blocked(batch, plan.packs, flats, out)


def _by_dtype(
    out: dict[int, Tensor], index: list[int]
) -> dict[tuple[torch.dtype, torch.device], list[int]]:
    groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for p in index:
        t = out[p]
        groups.setdefault((t.dtype, t.device), []).append(p)
    return groups


def _flat(t: Tensor, dtype: torch.dtype, scale: float = 1.0) -> Tensor:
    flat = t if t.dim() == 1 else t.reshape(-1)
    if flat.dtype != dtype:
        flat = flat.to(dtype)
    return flat if scale == 1.0 else flat * scale


def dots_with(
    batch: TaskBatch,
    sums: Blocked,
    dtype: torch.dtype,
    scale: float = 1.0,
    *,
    foreach: bool = False,
) -> Tensor:
    """``r_i = Σ_p (scale · tasks[i][p]) · sums[p]`` in ``dtype``, shape ``[N]``, for
    ``sums`` from :func:`task_sum` on the same batch and ``foreach``.

    On the foreach path each pack of small parameters (built once for the call) takes one
    matrix-vector product with its block of ``sums``, as it is; other parameters take one
    BLAS dot per task, with no temporary beyond an upcast of the task tensor for
    half-precision inputs (or a scaled copy when ``scale != 1``).
    """
    plan = _plan(batch, foreach)
    scores: Tensor | None = None
    for pack, flat in zip(plan.packs, sums.flats):
        matrix = _packed(batch, pack, dtype)
        if scale != 1.0:
            matrix = matrix * scale
        product = matrix @ flat
        scores = product if scores is None else scores + product
    zero: Tensor | None = None
    for p in plan.singles:  # one dot per task, gathered per parameter
        total = _flat(sums.singles[p], dtype)
        terms = []
        for task in batch.tasks:
            mine = task[p]
            if mine is None:
                if zero is None:
                    zero = total.new_zeros(())
                terms.append(zero)
            else:
                terms.append(torch.dot(_flat(mine, dtype, scale), total))
        product = torch.stack(terms)
        scores = product if scores is None else scores + product
    if scores is None:  # no task on this rank
        device = next(d for d in batch.devices if d is not None)
        return torch.zeros(batch.num_tasks, dtype=dtype, device=device)
    return scores


def materialize(
    batch: TaskBatch, tensors: list[Tensor | None], dtype: torch.dtype | None = None
) -> list[Tensor | None]:
    """Zeros for each parameter that this rank's tasks lack but another rank's have.

    A collective needs the same tensors on every rank. In ``dtype``, or the accumulation
    dtype of the parameter's dtype across ranks. In one process nothing changes.
    """
    out = list(tensors)
    for p, (t, global_dtype) in enumerate(zip(tensors, batch.global_dtypes)):
        if t is None and global_dtype is not None:
            shape, device = batch.shapes[p], batch.devices[p]
            assert shape is not None
            out[p] = torch.zeros(
                shape, dtype=dtype or accumulation_dtype(global_dtype), device=device
            )
    return out


def task_sum(batch: TaskBatch, dtype: torch.dtype, scale: float = 1.0, *, foreach: bool) -> Blocked:
    """``scale · Σ_i g_i`` for every parameter this rank's tasks have, in ``dtype``: a
    column sum per pack, and the foreach / per-tensor sums of the other parameters, with
    ``scale`` a host float (nothing is read back). ``.params`` gives ``None`` where no
    local task has the parameter (see :func:`materialize` for a collective)."""
    plan = _plan(batch, foreach)
    flats = []
    for pack in plan.packs:
        matrix = _packed(batch, pack, dtype)
        if scale != 1.0:
            matrix = matrix * scale
        flats.append(matrix.sum(dim=0))
    singles: dict[int, Tensor] = {}
    if plan.singles:
        sub = TaskBatch(
            tasks=[[task[p] for p in plan.singles] for task in batch.tasks],
            name=batch.name,
            shapes=[batch.shapes[p] for p in plan.singles],
            dtypes=[batch.dtypes[p] for p in plan.singles],
            devices=[batch.devices[p] for p in plan.singles],
        )
        coeffs = [scale] * batch.num_tasks
        summed = weighted_sum(sub, coeffs, foreach=foreach, acc_dtype=dtype, packing=False)
        for p, total in zip(plan.singles, summed):
            assert total is not None
            singles[p] = total
    return Blocked(batch, plan.packs, flats, singles)


#: Up to this many tensors, :func:`finite_probe` sums each one (a kernel apiece); beyond,
#: it takes one multi-tensor 2-norm.
FEW_TENSORS = 4


def finite_probe(tensors: Sequence[Tensor], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A 0-d tensor in ``dtype`` on ``device`` that is finite exactly when every entry of
    ``tensors`` is: each tensor's sum (for up to :data:`FEW_TENSORS` tensors) or their
    Euclidean norms (one multi-tensor reduction), added up in at least float32. NaN and
    Inf propagate; a sum or square beyond the range overflows too (|x| > ~1e19 in float32
    for the norm), a false alarm that only costs the careful path. No mask, nothing read
    back to the host. (The 2-norm: on CPU ``_foreach_norm`` computes it several times
    faster than the 1- or ∞-norm.)"""
    present = [t for t in tensors if t.numel()]
    if not present:
        return torch.zeros((), dtype=dtype, device=device)
    acc = torch.float32
    for found in {t.dtype for t in present}:
        acc = promote(acc, found)
    if len(present) <= FEW_TENSORS:
        total = present[0].sum(dtype=acc)
        for t in present[1:]:
            total = total + t.sum(dtype=acc)
    else:
        total = torch.stack(_norms(present, acc)).sum()
    return total if total.dtype == dtype else total.to(dtype)


@functools.cache
def _foreach_norm_takes_dtype() -> bool:
    """Whether this torch's ``_foreach_norm`` accepts ``dtype=`` (older ones do not)."""
    try:
        torch._foreach_norm([torch.zeros(1)], 2, dtype=torch.float32)
    except TypeError:
        return False
    return True


def _norms(tensors: list[Tensor], dtype: torch.dtype) -> list[Tensor]:
    """The 2-norm of each tensor, accumulated in ``dtype``: one multi-tensor reduction (on
    a torch whose ``_foreach_norm`` takes no ``dtype``, only when every tensor is already in
    ``dtype``; else one reduction per tensor)."""
    if all(t.dtype == dtype for t in tensors):
        return list(torch._foreach_norm(tensors, 2))
    if _foreach_norm_takes_dtype():
        return list(torch._foreach_norm(tensors, 2, dtype=dtype))
    return [torch.linalg.vector_norm(t, dtype=dtype) for t in tensors]


def finiteness_probe(batch: TaskBatch, dtype: torch.dtype) -> Tensor:
    """:func:`finite_probe` over every entry of ``batch``, read as the foreach plan reads
    it: each pack of small parameters as one matrix (so per-task lists of many small
    tensors are a few tensors, not N per parameter), the other parameters per task."""
    device = next(d for d in batch.devices if d is not None)
    plan = _plan(batch, True)
    tensors = [
        _packed(batch, pack, cast(torch.dtype, batch.dtypes[pack[0]])) for pack in plan.packs
    ]
    if plan.singles:  # (stacked input has none: its per-task rows are never built)
        tensors += [t for task in batch.tasks for p in plan.singles if (t := task[p]) is not None]
    return finite_probe(tensors, dtype, device)


def gramian(
    batch: TaskBatch,
    dtype: torch.dtype | None = None,
    gather: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """The full Gramian ``G_ij = g_i · g_j`` (O(N²·P)): the fallback for custom weightings.

    ``gather`` (a function ``[n_local, k] -> [N, k]``, from a collective) brings every
    rank's rows of one parameter together; by default this rank's tasks are all the tasks.
    """
    acc = dtype or torch.float32
    for d in batch.global_dtypes:
        if d is not None:
            acc = promote(acc, accumulation_dtype(d))
    device = next(d for d in batch.devices if d is not None)
    result: Tensor | None = None
    for p in range(batch.num_params):
        if batch.global_dtypes[p] is None:
            continue
        numel = cast(torch.Size, batch.shapes[p]).numel()
        if batch.dtypes[p] is None:  # no local task has it: zeros, to take part in gather
            matrix = torch.zeros(batch.num_tasks, numel, dtype=acc, device=device)
        else:
            matrix = _packed(batch, [p], acc)  # one parameter's block alive at a time
        if gather is not None:
            matrix = gather(matrix)
        product = matrix @ matrix.T
        result = product if result is None else result + product
    if result is None:
        return torch.zeros(batch.num_tasks, batch.num_tasks, dtype=acc, device=device)
    return result
