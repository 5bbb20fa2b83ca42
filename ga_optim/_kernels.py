"""The two primitives every weighting and aggregator is built from, per parameter.

* :func:`weighted_sum` — ``Σ_i c_i g_i`` for each parameter (the task sum, and the final
  combination ``Σ_i w_i g_i``);
* :func:`dots_with` — ``g_i · s`` for every task, summed over parameters.

As in ``torch.optim``, two paths are chosen by a ``foreach`` flag and must agree in
float64:

* the per-tensor path: a readable loop, one ``add_`` / ``dot`` per task and parameter;
* the foreach path: medium parameters go through ``torch._foreach_add_`` over lists of
  tensors, one BLAS dot per task and parameter, never a flat ``N × P`` copy of the model;
  parameters above :data:`LARGE_NUMEL` elements are summed parameter by parameter, so
  their output stays in cache across the tasks (measured faster at P = 1e7).
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
    "LARGE_NUMEL",
    "PACK_CACHE_ELEMENTS",
    "PACK_ELEMENTS",
    "SMALL_NUMEL",
    "accumulation_dtype",
    "default_foreach",
    "dots_with",
    "finiteness_probe",
    "gramian",
    "materialize",
    "promote",
    "task_sum",
    "weighted_sum",
]

#: Parameters with at most this many elements are packed on the foreach path.
SMALL_NUMEL = 1 << 14
#: A pack holds at most this many entries (N × its elements): 4 MiB in float32.
PACK_ELEMENTS = 1 << 20
#: Packs kept for the rest of a call (sum, scores, combination) hold at most this many
#: entries in all: 16 MiB in float32.
PACK_CACHE_ELEMENTS = 1 << 22
#: Parameters above this many elements are summed parameter by parameter even on the foreach
#: path: one output stays in cache across the N tasks, and per-call overhead is negligible.
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
        _stacked_plan(batch)
        if foreach and batch.stacked is not None
        else _list_plan(batch, foreach)
    )
    batch.cache[key] = plan
    return plan


def _small_packs(batch: TaskBatch, params: list[int]) -> tuple[list[list[int]], list[int]]:
    """Small parameters grouped per dtype and device into packs of at most
    :data:`PACK_ELEMENTS` entries; the others, left out."""
    n = batch.num_tasks
    numels = _numels(batch)
    groups: dict[tuple[torch.dtype | None, torch.device | None], list[list[int]]] = {}
    used: dict[tuple[torch.dtype | None, torch.device | None], int] = {}  # in the last pack
    others = []
    for p in params:
        if numels[p] > SMALL_NUMEL or n * numels[p] > PACK_ELEMENTS:
            others.append(p)
            continue
        kind = (batch.dtypes[p], batch.devices[p])
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
    packs, singles = _small_packs(batch, present)
    return _Plan(packs=packs, singles=singles, firsts=firsts)


def _stacked_plan(batch: TaskBatch) -> _Plan:
    """Stacked input: every parameter is already an ``[N, numel]`` matrix. On an
    accelerator, where each kernel launch costs more than copying a small batch, a batch
    of at most :data:`PACK_CACHE_ELEMENTS` entries in one dtype and device is one pack
    (one copy, kept for the call: each pass is then a single kernel). Otherwise a large
    parameter is a pack of its own (a view, no copy) and small ones are concatenated into
    packs. Every kernel runs per pack, whatever N is."""
    present = [p for p, dtype in enumerate(batch.dtypes) if dtype is not None]
    firsts: list[int | None] = [0 if p in present else None for p in range(batch.num_params)]
    kinds = {(batch.dtypes[p], batch.devices[p]) for p in present}
    numels = _numels(batch)
    entries = batch.num_tasks * sum(numels[p] for p in present)
    on_accelerator = all(device is not None and device.type != "cpu" for _, device in kinds)
    if on_accelerator and len(kinds) == 1 and len(present) > 1 and entries <= PACK_CACHE_ELEMENTS:
        return _Plan(packs=[present], singles=[], firsts=firsts)
    packs, large = _small_packs(batch, present)
    return _Plan(packs=[[p] for p in large] + packs, singles=[], firsts=firsts)


def _numels(batch: TaskBatch) -> list[int]:
    """Each parameter's number of elements (0 where no task has it), once per call."""
    numels = batch.cache.get("numels")
    if numels is None:
        numels = batch.cache["numels"] = [
            0 if shape is None else shape.numel() for shape in batch.shapes
        ]
    return cast(list[int], numels)


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
        columns = [batch.stacked[p].to(dtype) for p in pack]
        return _keep(batch, key, columns[0] if len(columns) == 1 else torch.cat(columns, dim=1))
    columns = []
    for p in pack:
        present = [t for task in batch.tasks if (t := task[p]) is not None]
        zeros = present[0].new_zeros(present[0].shape) if present else None
        rows = [zeros if t[p] is None else t[p] for t in batch.tasks]
        matrix = torch.stack(cast(list[Tensor], rows))
        columns.append(matrix.reshape(batch.num_tasks, -1).to(dtype))
    return _keep(batch, key, columns[0] if len(columns) == 1 else torch.cat(columns, dim=1))


def _keep(batch: TaskBatch, key: object, packed: Tensor) -> Tensor:
    """Keep ``packed`` for the rest of the call while the kept packs fit the budget."""
    used = cast(int, batch.cache.get("pack_entries", 0))
    if used + packed.numel() <= PACK_CACHE_ELEMENTS:
        batch.cache[key] = packed
        batch.cache["pack_entries"] = used + packed.numel()
    return packed


def _unpack(batch: TaskBatch, pack: list[int], flat: Tensor) -> list[Tensor]:
    numels = _numels(batch)
    chunks = torch.split(flat, [numels[p] for p in pack])
    return [chunk.view(cast(torch.Size, batch.shapes[p])) for p, chunk in zip(pack, chunks)]


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
    ``packing=False`` keeps even small parameters on the foreach lists.
    """
    plan = _plan(batch, foreach and packing)
    out: list[Tensor | None] = [None] * batch.num_params
    given = (
        coeffs if isinstance(coeffs, Tensor) else torch.tensor(list(coeffs), dtype=torch.float64)
    )
    by_dtype: dict[tuple[torch.dtype, torch.device], Tensor] = {}

    def cast_to(dtype: torch.dtype, device: torch.device) -> Tensor:
        if (dtype, device) not in by_dtype:
            by_dtype[dtype, device] = given.to(device=device, dtype=dtype)
        return by_dtype[dtype, device]

    for pack in plan.packs:
        dtype = acc_dtype or accumulation_dtype(batch.dtypes[pack[0]])  # type: ignore[arg-type]
        matrix = _packed(batch, pack, dtype)
        weights = cast_to(dtype, matrix.device)
        for p, tensor in zip(pack, _unpack(batch, pack, weights @ matrix)):
            out[p] = tensor

    host = not isinstance(coeffs, Tensor)  # floats already on the host: the alpha path
    floats = list(coeffs) if host else []
    for p in plan.singles:
        f = plan.firsts[p]
        assert f is not None
        first = batch.tasks[f][p]
        assert first is not None
        dtype = acc_dtype or accumulation_dtype(first.dtype)
        scale = floats[f] if host else cast_to(dtype, first.device)[f]
        out[p] = first.to(dtype) * scale

    numels = _numels(batch)
    lists = [p for p in plan.singles if foreach and numels[p] <= LARGE_NUMEL]
    loops = [p for p in plan.singles if not (foreach and numels[p] <= LARGE_NUMEL)]
    if lists:
        for i in range(batch.num_tasks):
            index = [
                p
                for p in lists
                if i > plan.firsts[p] and batch.tasks[i][p] is not None  # type: ignore[operator]
            ]
            if host and index:
                torch._foreach_add_(
                    [cast(Tensor, out[p]) for p in index],
                    [cast(Tensor, batch.tasks[i][p]) for p in index],
                    alpha=floats[i],
                )
                continue
            for (dtype, device), members in _by_dtype(out, index).items():
                # out += task · c_i with c_i a device scalar (broadcast): no value read back
                # to the host and no temporary the size of the task.
                c = cast_to(dtype, device)[i]
                torch._foreach_addcmul_(
                    [cast(Tensor, out[p]) for p in members],
                    [cast(Tensor, batch.tasks[i][p]) for p in members],
                    [c] * len(members),
                )
    for p in loops:
        total = out[p]
        assert total is not None
        for i in range(plan.firsts[p] + 1, batch.num_tasks):  # type: ignore[operator]
            vector = batch.tasks[i][p]
            if vector is None:
                continue
            if host:
                total.add_(vector, alpha=floats[i])
            else:
                total.addcmul_(vector, cast_to(total.dtype, total.device)[i])

    if out_dtype:
        out = [
            t if t is None or t.dtype == dtype else t.to(dtype)
            for t, dtype in zip(out, batch.dtypes)
        ]
    return out


def _by_dtype(
    out: list[Tensor | None], index: list[int]
) -> dict[tuple[torch.dtype, torch.device], list[int]]:
    groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for p in index:
        t = cast(Tensor, out[p])
        groups.setdefault((t.dtype, t.device), []).append(p)
    return groups


def _flat(t: Tensor, dtype: torch.dtype, scale: float = 1.0) -> Tensor:
    flat = t.reshape(-1).to(dtype)
    return flat if scale == 1.0 else flat * scale


def dots_with(
    batch: TaskBatch,
    others: Sequence[Tensor | None],
    dtype: torch.dtype,
    scale: float = 1.0,
    *,
    foreach: bool = False,
) -> Tensor:
    """``r_i = Σ_p (scale · tasks[i][p]) · others[p]`` in ``dtype``, shape ``[N]``.

    On the foreach path each pack of small parameters is built once and takes one
    matrix-vector product; other parameters take one BLAS dot per task, with no temporary
    beyond an upcast of the task tensor for half-precision inputs (or a scaled copy when
    ``scale != 1``).
    """
    plan = _plan(batch, foreach)
    device = next(d for d in batch.devices if d is not None)
    scores = torch.zeros(batch.num_tasks, dtype=dtype, device=device)
    for pack in plan.packs:  # every packed parameter has a sum (see ``materialize``)
        matrix = _packed(batch, pack, dtype)
        if scale != 1.0:
            matrix = matrix * scale
        vector = torch.cat([_flat(cast(Tensor, others[p]), dtype) for p in pack])
        scores += matrix @ vector
    singles = [p for p in plan.singles if others[p] is not None]
    if singles:
        rows: list[Tensor] = []
        for task in batch.tasks:
            terms = [
                torch.dot(_flat(mine, dtype, scale), _flat(cast(Tensor, others[p]), dtype))
                for p in singles
                if (mine := task[p]) is not None
            ]
            rows.append(
                torch.stack(terms).sum() if terms else torch.zeros((), dtype=dtype, device=device)
            )
        scores += torch.stack(rows)
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


def task_sum(
    batch: TaskBatch, dtype: torch.dtype, scale: float = 1.0, *, foreach: bool
) -> list[Tensor | None]:
    """``scale · Σ_i g_i`` for every parameter, in ``dtype`` (``None`` where no task, on any
    rank, has the parameter): a column sum per pack, and the foreach / per-tensor sums of
    the other parameters, with ``scale`` a host float (nothing is read back)."""
    plan = _plan(batch, foreach)
    out: list[Tensor | None] = [None] * batch.num_params
    for pack in plan.packs:
        matrix = _packed(batch, pack, dtype)
        if scale != 1.0:
            matrix = matrix * scale
        for p, column in zip(pack, _unpack(batch, pack, matrix.sum(dim=0))):
            out[p] = column
    if plan.singles:
        singles = TaskBatch(
            tasks=[[task[p] for p in plan.singles] for task in batch.tasks],
            name=batch.name,
            shapes=[batch.shapes[p] for p in plan.singles],
            dtypes=[batch.dtypes[p] for p in plan.singles],
            devices=[batch.devices[p] for p in plan.singles],
        )
        coeffs = [scale] * batch.num_tasks
        summed = weighted_sum(singles, coeffs, foreach=foreach, acc_dtype=dtype, packing=False)
        for p, total in zip(plan.singles, summed):
            out[p] = total
    return materialize(batch, out, dtype)


def finiteness_probe(batch: TaskBatch, dtype: torch.dtype) -> Tensor:
    """A 0-d tensor in ``dtype`` on the batch's device that is finite exactly when every
    entry of ``batch`` is: the sum of each pack's (or tensor's) Euclidean norm. NaN and Inf
    propagate; squares above the dtype's range (|x| > ~1e19 in float32) overflow too, a
    false alarm that only costs the careful path. One multi-tensor reduction, no mask,
    nothing read back to the host. (The 2-norm: on CPU ``_foreach_norm`` computes it
    several times faster than the 1- or ∞-norm.)"""
    device = next(d for d in batch.devices if d is not None)
    if batch.stacked is not None:
        tensors = [
            _packed(batch, pack, cast(torch.dtype, batch.dtypes[pack[0]]))
            for pack in _plan(batch, True).packs
        ]
    else:
        tensors = [t for task in batch.tasks for t in task if t is not None and t.numel()]
    if not tensors:
        return torch.zeros((), dtype=dtype, device=device)
    return torch.stack([n.to(dtype) for n in torch._foreach_norm(tensors, 2)]).sum()


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
