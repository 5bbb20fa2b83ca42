"""The two primitives every weighting and aggregator is built from, per parameter.

* :func:`weighted_sum` — ``Σ_i c_i g_i`` for each parameter (the task sum, and the final
  combination ``Σ_i w_i g_i``);
* :func:`dots_with` — ``g_i · s`` for every task, summed over parameters.

Both work tensor by tensor, never on a flat ``N × P`` copy of the model. As in
``torch.optim``, a ``torch._foreach_*`` path over lists of tensors and a readable
per-tensor path are chosen by a ``foreach`` flag and must agree in float64. Dot products
accumulate in at least float32, so fp16/bf16 inputs whose dots exceed 65504 are exact
to float32 precision.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._checks import TaskBatch

__all__ = ["accumulation_dtype", "dots_with", "gramian", "weighted_sum", "default_foreach"]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types, the dtype itself for float32/float64."""
    return torch.promote_types(dtype, torch.float32)


def default_foreach(batch: TaskBatch) -> bool:
    """The foreach path is the default; it needs at least one materialised parameter."""
    return any(shape is not None for shape in batch.shapes)


def _first_tasks(batch: TaskBatch) -> list[int | None]:
    """For each parameter, the index of the first task that has a tensor for it."""
    firsts: list[int | None] = []
    for p in range(batch.num_params):
        firsts.append(next((i for i, t in enumerate(batch.tasks) if t[p] is not None), None))
    return firsts


def weighted_sum(
    batch: TaskBatch,
    coeffs: Sequence[float],
    *,
    foreach: bool,
    acc_dtype: torch.dtype | None = None,
    out_dtype: bool = False,
) -> list[Tensor | None]:
    """``Σ_i coeffs[i] · tasks[i][p]`` for every parameter ``p``.

    Accumulates in ``acc_dtype`` (default: :func:`accumulation_dtype` of each parameter's
    dtype). With ``out_dtype=True`` the result is cast back to the tasks' dtype. A parameter
    that no task has gives ``None``.
    """
    firsts = _first_tasks(batch)
    out: list[Tensor | None] = []
    for p, f in enumerate(firsts):
        if f is None:
            out.append(None)
            continue
        vector = batch.tasks[f][p]
        assert vector is not None
        acc = acc_dtype or accumulation_dtype(vector.dtype)
        out.append(torch.mul(vector.to(acc), coeffs[f]))

    if foreach:
        for i in range(batch.num_tasks):
            index = [
                p
                for p, f in enumerate(firsts)
                if f is not None and i > f and batch.tasks[i][p] is not None
            ]
            if index:
                torch._foreach_add_(
                    [out[p] for p in index],  # type: ignore[misc]
                    [batch.tasks[i][p] for p in index],  # type: ignore[misc]
                    alpha=coeffs[i],
                )
    else:
        for p, f in enumerate(firsts):
            total = out[p]
            if f is None or total is None:
                continue
            for i in range(f + 1, batch.num_tasks):
                vector = batch.tasks[i][p]
                if vector is not None:
                    total.add_(vector, alpha=coeffs[i])

    if out_dtype:
        out = [
            t if t is None or t.dtype == dtype else t.to(dtype)
            for t, dtype in zip(out, batch.dtypes)
        ]
    return out


def _flat(t: Tensor, dtype: torch.dtype, scale: float = 1.0) -> Tensor:
    flat = t.reshape(-1).to(dtype)
    return flat if scale == 1.0 else flat * scale


def dots_with(
    batch: TaskBatch, others: Sequence[Tensor | None], dtype: torch.dtype, scale: float = 1.0
) -> Tensor:
    """``r_i = Σ_p (scale · tasks[i][p]) · others[p]`` in ``dtype``, shape ``[N]``.

    One BLAS dot per task and parameter, no temporary beyond an upcast of the task tensor
    for half-precision inputs (or a scaled copy when ``scale != 1``).
    """
    device = next(t.device for t in others if t is not None)
    rows: list[Tensor] = []
    for task in batch.tasks:
        terms = [
            torch.dot(_flat(vector, dtype, scale), _flat(other, dtype))
            for vector, other in zip(task, others)
            if vector is not None and other is not None
        ]
        rows.append(torch.stack(terms).sum() if terms else torch.zeros((), dtype=dtype, device=device))
    return torch.stack(rows)


def gramian(batch: TaskBatch, dtype: torch.dtype | None = None) -> Tensor:
    """The full Gramian ``G_ij = g_i · g_j`` (O(N²·P)): the fallback for custom weightings."""
    present = [t for task in batch.tasks for t in task if t is not None]
    if not present:
        return torch.zeros(batch.num_tasks, batch.num_tasks)
    acc = dtype or accumulation_dtype(present[0].dtype)
    for t in present:
        acc = torch.promote_types(acc, accumulation_dtype(t.dtype))
    n = batch.num_tasks
    result = torch.zeros(n, n, dtype=acc, device=present[0].device)
    for p in range(batch.num_params):
        rows = [task[p] for task in batch.tasks]
        if all(r is None for r in rows):
            continue
        numel = next(r for r in rows if r is not None).numel()
        matrix = torch.stack(
            [
                torch.zeros(numel, dtype=acc, device=result.device)
                if r is None
                else _flat(r, acc)
                for r in rows
            ]
        )
        result += matrix @ matrix.T
    return result
