"""Input validation for per-task vectors and Gramians, and its messages.

Every public entry point funnels its tensors through :func:`as_tasks` or
:func:`check_gramian` before any arithmetic happens, so a call that raises has
not touched anything; nothing below this boundary checks its input again. Messages
follow one template: the argument (with task and parameter index), what was expected,
what was found.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = [
    "NonFiniteError",
    "TaskStack",
    "Tasks",
    "as_tasks",
    "check_gramian",
    "check_params",
    "stacked_shape_message",
]


class NonFiniteError(ValueError):
    """A task vector (or Gramian) holds NaN or ±Inf; the message names the argument, the task
    and the parameter (and, in a process group, the rank).

    A ``ValueError``, so existing ``except ValueError`` handlers still catch it; a training
    loop that wants to treat divergence as a result catches this type.
    """


class TaskStack:
    """Task vectors stacked over tasks: one tensor ``[N, *param.shape]`` per parameter.

    What ``torch.func.vmap`` returns: the aggregator packs it into its task matrix with one
    multi-tensor copy, never unbinding the tasks.
    :class:`~ga_optim.adapters.func.FuncAgreement` passes its dicts this way.

    Args:
        columns: one tensor per parameter, in the parameters' order, each with the tasks
            along dimension 0.
    """

    def __init__(self, columns: Sequence[Tensor]) -> None:
        if isinstance(columns, Tensor) or not isinstance(columns, Sequence):
            raise TypeError(
                "`columns` should be a sequence of tensors [N, *param.shape], one per "
                f"parameter. Found `{type(columns).__name__}`."
            )
        self.columns = list(columns)

    def __repr__(self) -> str:
        shapes = [tuple(c.shape) if isinstance(c, Tensor) else c for c in self.columns]
        return f"TaskStack({shapes})"


def _shape(shape: torch.Size) -> tuple[int, ...]:
    return tuple(shape)


def check_params(params: object, name: str = "params") -> list[Tensor]:
    """Return ``params`` as a non-empty list of distinct floating-point tensors."""
    if isinstance(params, Tensor):
        raise TypeError(
            f"`{name}` should be an iterable of tensors (e.g. model.parameters()). "
            f"Found a single Tensor of shape {_shape(params.shape)}; wrap it in a list."
        )
    try:
        result: list[Tensor] = list(params)  # type: ignore[call-overload]
    except TypeError:
        raise TypeError(
            f"`{name}` should be an iterable of tensors. Found `{type(params).__name__}`."
        ) from None
    if not result:
        raise ValueError(f"`{name}` should hold at least one tensor. Found an empty iterable.")
    seen: dict[int, int] = {}
    for p, param in enumerate(result):
        if not isinstance(param, Tensor):
            raise TypeError(f"`{name}[{p}]` should be a Tensor. Found `{type(param).__name__}`.")
        if not param.is_floating_point():
            raise TypeError(
                f"`{name}[{p}]` should have a floating-point dtype. Found {param.dtype}."
            )
        if id(param) in seen:
            raise ValueError(f"`{name}[{p}]` is the same tensor as `{name}[{seen[id(param)]}]`.")
        seen[id(param)] = p
    return result


def _stacked_tensor(
    task_vectors: Tensor, name: str, params: list[Tensor] | None, allow_empty: bool
) -> Tasks:
    """A tensor ``[N, ...]`` (one parameter) or ``[N, sum(numel)]`` (several), read as the
    task matrix ``[N, P]`` (a view: no copy)."""
    if task_vectors.dim() == 0 or (task_vectors.shape[0] == 0 and not allow_empty):
        raise ValueError(
            f"`{name}` should be a tensor [N, ...] with N >= 1 tasks along dimension 0. "
            f"Found shape {_shape(task_vectors.shape)}."
        )
    if not task_vectors.is_floating_point():
        raise TypeError(f"`{name}` should have a floating-point dtype. Found {task_vectors.dtype}.")
    n = task_vectors.shape[0]
    matrix = task_vectors
    if params is None or (len(params) == 1 and task_vectors.shape[1:] == params[0].shape):
        shapes = [task_vectors.shape[1:]]
        if task_vectors.dim() != 2:
            matrix = task_vectors.reshape(n, shapes[0].numel())
    else:
        numels = [param.numel() for param in params]
        if task_vectors.dim() != 2 or task_vectors.shape[1] != sum(numels):
            described = ", ".join(str(_shape(param.shape)) for param in params)
            raise ValueError(
                f"`{name}` is a tensor of shape {_shape(task_vectors.shape)}; for the "
                f"{len(params)} parameters ({described}) expected [N, *param.shape] for a "
                f"single parameter or [N, {sum(numels)}] (flattened and concatenated)."
            )
        shapes = [param.shape for param in params]
    if params is not None and task_vectors.device != params[0].device:  # (one device)
        raise ValueError(
            f"`{name}` is on device {task_vectors.device}; parameter 0 has {params[0].device}."
        )
    dtypes = (task_vectors.dtype if n else None,) * len(shapes)
    return Tasks(name, "matrix", matrix, n, tuple(shapes), dtypes, task_vectors.device)


def _task_stack(
    stack: TaskStack, name: str, params: list[Tensor] | None, allow_empty: bool
) -> Tasks:
    """A :class:`TaskStack`: each column ``[N, *param.shape]``, read as it is."""
    columns = stack.columns
    if params is not None and len(columns) != len(params):
        raise ValueError(
            f"`{name}` holds {len(columns)} stacked tensors; expected one per parameter "
            f"({len(params)})."
        )
    if not columns:
        raise ValueError(f"`{name}` should hold at least one stacked tensor. Found none.")
    first = columns[0]
    n = first.shape[0] if isinstance(first, Tensor) and first.dim() else -1
    refs = [first] * len(columns) if params is None else params
    shapes = [c.shape[1:] if isinstance(c, Tensor) and c.dim() else None for c in columns]
    for p, (column, shape, ref) in enumerate(zip(columns, shapes, refs)):
        if (
            shape is not None
            and column.shape[0] == n
            and column.is_floating_point()
            and (params is None or shape == ref.shape)
            and column.device == ref.device
        ):
            continue  # the common case: nothing to say
        where = f"`{name}` parameter {p}"
        if not isinstance(column, Tensor):
            raise TypeError(
                f"{where} should be a Tensor [N, ...]. Found `{type(column).__name__}`."
            )
        if not column.is_floating_point():
            raise TypeError(f"{where} should have a floating-point dtype. Found {column.dtype}.")
        if column.dim() == 0:
            raise ValueError(f"{where} should be [N, ...] with the tasks along dimension 0.")
        if column.shape[0] != n:
            raise ValueError(
                f"{where} holds {column.shape[0]} tasks along dimension 0; parameter 0 "
                f"holds {n}. Every parameter should hold the same tasks."
            )
        param = first if params is None else params[p]
        if params is not None and column.shape[1:] != param.shape:
            raise ValueError(stacked_shape_message(where, column.shape, param.shape))
        if column.device != param.device:
            raise ValueError(
                f"{where} is on device {column.device}; the parameter is on {param.device}."
            )
    if n == 0 and not allow_empty:
        raise ValueError(f"`{name}` should hold at least one task. Found N = 0.")
    dtypes = tuple(column.dtype if n else None for column in columns)
    return Tasks(name, "columns", columns, n, tuple(shapes), dtypes, first.device)  # type: ignore[arg-type]


def stacked_shape_message(where: str, found: torch.Size, param_shape: torch.Size) -> str:
    """The message for a stacked tensor ``[N, ...]`` whose trailing shape is not the
    parameter's (``where`` names it, e.g. "`adapted['w']`")."""
    return (
        f"{where} has shape {_shape(found)}; expected "
        f"[N, {', '.join(map(str, param_shape))}] for a parameter of shape "
        f"{_shape(param_shape)}."
    )


def _sequence_tasks(
    task_vectors: object, name: str, allow_empty: bool
) -> list[list[Tensor | None]]:
    if isinstance(task_vectors, (str, bytes)) or not isinstance(task_vectors, Sequence):
        raise TypeError(
            f"`{name}` should be a tensor [N, ...] or a sequence of N per-task sequences of "
            f"tensors. Found `{type(task_vectors).__name__}`."
        )
    if len(task_vectors) == 0 and not allow_empty:
        raise ValueError(f"`{name}` should hold at least one task. Found an empty sequence.")
    tasks: list[list[Tensor | None]] = []
    for i, task in enumerate(task_vectors):
        if isinstance(task, Tensor):
            raise TypeError(
                f"`{name}[{i}]` should be a sequence of per-parameter tensors. Found a Tensor of "
                f"shape {_shape(task.shape)}; wrap it in a list, or pass one stacked tensor "
                f"[N, ...] as `{name}`."
            )
        if isinstance(task, (str, bytes)) or not isinstance(task, Sequence):
            raise TypeError(
                f"`{name}[{i}]` should be a sequence of per-parameter tensors. "
                f"Found `{type(task).__name__}`."
            )
        tasks.append(list(task))
    return tasks


def _list_columns(
    tasks: list[list[Tensor | None]], name: str, params: list[Tensor] | None, num_params: int
) -> tuple[list[torch.Size | None], list[torch.dtype | None], list[torch.device | None]]:
    """Each parameter's shape, dtype and device across per-task lists, or the error that
    names the first task and parameter that disagree. Shapes and devices must match the
    parameter (or, without one, the first task that has it); dtypes must agree across
    tasks but may differ from the parameter's (e.g. fp16 gradients of fp32 weights)."""
    shapes: list[torch.Size | None] = []
    dtypes: list[torch.dtype | None] = []
    devices: list[torch.device | None] = []
    for p in range(num_params):
        column = [task[p] for task in tasks]
        first = next((v for v in column if v is not None), None)
        if isinstance(first, Tensor) and first.is_floating_point():  # one sweep first
            ref = first if params is None else params[p]
            shape, dtype, device = ref.shape, first.dtype, ref.device
            if all(
                v is None
                or (
                    isinstance(v, Tensor)
                    and v.shape == shape
                    and v.dtype == dtype
                    and v.device == device
                )
                for v in column
            ):
                shapes.append(shape)
                dtypes.append(dtype)
                devices.append(device)
                continue
        first = None
        for i, vector in enumerate(column):
            if vector is None:
                continue
            if not isinstance(vector, Tensor) or not vector.is_floating_point():
                where = f"`{name}[{i}][{p}]`"
                if not isinstance(vector, Tensor):
                    found = type(vector).__name__
                    raise TypeError(f"{where} should be a Tensor or None. Found `{found}`.")
                raise TypeError(
                    f"{where} should have a floating-point dtype. Found {vector.dtype}."
                )
            if first is None:
                first, first_task = vector, i
            ref = first if params is None else params[p]
            if (
                vector.shape != ref.shape
                or vector.device != ref.device
                or vector.dtype != first.dtype
            ):
                where = f"`{name}[{i}][{p}]`"
                ref_what = f"task {first_task} has" if params is None else f"parameter {p} has"
                if vector.shape != ref.shape:
                    raise ValueError(
                        f"{where} has shape {_shape(vector.shape)}; {ref_what} "
                        f"{_shape(ref.shape)} for the same parameter."
                    )
                if vector.device != ref.device:
                    raise ValueError(
                        f"{where} is on device {vector.device}; {ref_what} {ref.device} "
                        "for the same parameter."
                    )
                raise TypeError(
                    f"{where} has dtype {vector.dtype}; task {first_task} has {first.dtype} "
                    "for the same parameter."
                )
        reference = first if params is None else params[p]
        shapes.append(None if reference is None else reference.shape)
        dtypes.append(None if first is None else first.dtype)
        devices.append(None if reference is None else reference.device)
    return shapes, dtypes, devices


def check_gramian(gramian: object, name: str = "gramian") -> Tensor:
    """Return ``gramian`` if it is a finite floating-point ``[N, N]`` tensor with N >= 1."""
    if not isinstance(gramian, Tensor):
        raise TypeError(f"`{name}` should be a Tensor [N, N]. Found `{type(gramian).__name__}`.")
    if gramian.dim() != 2 or gramian.shape[0] != gramian.shape[1] or gramian.shape[0] == 0:
        raise ValueError(
            f"`{name}` should be a square matrix [N, N] with N >= 1. "
            f"Found shape {_shape(gramian.shape)}."
        )
    if not gramian.is_floating_point():
        raise TypeError(f"`{name}` should have a floating-point dtype. Found {gramian.dtype}.")
    bad = (~torch.isfinite(gramian)).nonzero()
    if bad.numel():
        i, j = bad[0].tolist()
        raise NonFiniteError(
            f"`{name}` should be finite. Found {gramian[i, j].item()} at [{i}, {j}]."
        )
    return gramian


@dataclass(frozen=True)
class Tasks:
    """Validated per-task vectors, before packing into the task matrix.

    ``form`` says what ``data`` is: ``"lists"``, N per-task lists of tensors (``None`` for
    zeros); ``"matrix"``, one tensor ``[N, P]`` (the parameters flattened and
    concatenated); ``"columns"``, one tensor ``[N, *shape]`` per parameter. ``dtypes`` has
    ``None`` where no task has the parameter; ``name`` is the argument, for messages.
    """

    name: str
    form: Literal["lists", "matrix", "columns"]
    data: Any
    num_tasks: int
    shapes: tuple[torch.Size, ...]
    dtypes: tuple[torch.dtype | None, ...]
    device: torch.device


def as_tasks(
    task_vectors: object,
    name: str = "task_vectors",
    params: list[Tensor] | None = None,
    *,
    allow_empty: bool = False,
) -> Tasks:
    """Validate per-task vectors (every accepted form) and describe them as :class:`Tasks`.

    Accepts a tensor ``[N, ...]`` (one parameter; or ``[N, sum(numel)]`` when ``params``
    has several), a :class:`TaskStack`, or a sequence of ``N`` sequences of tensors
    (``None`` counts as zeros). Checks types, counts, shapes, dtypes and devices (every
    tensor on one device); values are checked later, from the results. ``allow_empty`` (a
    rank of a process group with no task this step, ``params`` given) accepts zero tasks.
    """
    empty = allow_empty and params is not None
    if isinstance(task_vectors, Tensor):
        return _stacked_tensor(task_vectors, name, params, empty)
    if isinstance(task_vectors, TaskStack):
        return _task_stack(task_vectors, name, params, empty)
    tasks = _sequence_tasks(task_vectors, name, empty)
    num_params = len(params) if params is not None else len(tasks[0])
    for i, task in enumerate(tasks):
        if len(task) != num_params:
            expected = (
                f"one per parameter ({num_params})"
                if params is not None
                else f"as many as task 0 ({num_params})"
            )
            raise ValueError(f"`{name}[{i}]` holds {len(task)} tensors; expected {expected}.")
    if num_params == 0:
        raise ValueError(f"`{name}[0]` should hold at least one tensor. Found an empty sequence.")
    shapes, dtypes, devices = _list_columns(tasks, name, params, num_params)
    placed = [(p, d) for p, d in enumerate(devices) if d is not None]
    for p, device in placed:
        if device != placed[0][1]:
            raise ValueError(
                f"`{name}` parameter {p} is on device {device}; parameter {placed[0][0]} is "
                f"on {placed[0][1]}. ga_optim keeps a meta-batch on one device."
            )
    return Tasks(
        name,
        "lists",
        tasks,
        len(tasks),
        tuple(torch.Size([0]) if shape is None else shape for shape in shapes),
        tuple(dtypes),
        placed[0][1] if placed else torch.device("cpu"),
    )
