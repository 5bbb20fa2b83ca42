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


def _floating(value: object, where: str, expected: str = "a Tensor") -> Tensor:
    """``value`` if it is a floating-point tensor, else the error naming ``where``."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{where} should be {expected}. Found `{type(value).__name__}`.")
    if not value.is_floating_point():
        raise TypeError(f"{where} should have a floating-point dtype. Found {value.dtype}.")
    return value


def check_params(params: object) -> list[Tensor]:
    """Return ``params`` as a non-empty list of distinct floating-point leaf tensors on one
    device."""
    if isinstance(params, Tensor):
        raise TypeError(
            "`params` should be an iterable of tensors (e.g. model.parameters()). "
            f"Found a single Tensor of shape {_shape(params.shape)}; wrap it in a list."
        )
    try:
        result: list[Tensor] = list(params)  # type: ignore[call-overload]
    except TypeError:
        raise TypeError(
            f"`params` should be an iterable of tensors. Found `{type(params).__name__}`."
        ) from None
    if not result:
        raise ValueError("`params` should hold at least one tensor. Found an empty iterable.")
    seen: dict[int, int] = {}
    for p, param in enumerate(result):
        _floating(param, f"`params[{p}]`")
        if id(param) in seen:
            raise ValueError(f"`params[{p}]` is the same tensor as `params[{seen[id(param)]}]`.")
        seen[id(param)] = p
        if not param.is_leaf:
            raise ValueError(
                f"`params[{p}]` should be a leaf tensor (a parameter). Found a non-leaf "
                "tensor; an optimizer cannot update it."
            )
        if param.device != result[0].device:
            raise ValueError(
                f"`params[{p}]` is on device {param.device}; `params[0]` is on "
                f"{result[0].device}. ga_optim keeps a meta-batch on one device."
            )
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
    _floating(task_vectors, f"`{name}`")
    n, shapes = task_vectors.shape[0], [task_vectors.shape[1:]]
    if params is not None and (len(params) > 1 or shapes[0] != params[0].shape):
        shapes = [param.shape for param in params]
        width = sum(shape.numel() for shape in shapes)
        if task_vectors.dim() != 2 or task_vectors.shape[1] != width:
            raise ValueError(
                f"`{name}` is a tensor of shape {_shape(task_vectors.shape)}; for the "
                f"{len(params)} parameters ({', '.join(str(_shape(s)) for s in shapes)}) "
                f"expected [N, *param.shape] for a single parameter or [N, {width}] "
                "(flattened and concatenated)."
            )
    if params is not None and task_vectors.device != params[0].device:
        raise ValueError(
            f"`{name}` is on device {task_vectors.device}; parameter 0 has {params[0].device}."
        )
    matrix = task_vectors
    if task_vectors.dim() != 2:
        matrix = task_vectors.reshape(n, shapes[0].numel())
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
    for p, column in enumerate(columns):
        where = f"`{name}` parameter {p}"
        _floating(column, where, "a Tensor [N, ...]")
        if column.dim() == 0:
            raise ValueError(f"{where} should be [N, ...] with the tasks along dimension 0.")
        ref = columns[0] if params is None else params[p]
        if column.shape[0] != columns[0].shape[0]:
            raise ValueError(
                f"{where} holds {column.shape[0]} tasks along dimension 0; parameter 0 "
                f"holds {columns[0].shape[0]}. Every parameter should hold the same tasks."
            )
        if params is not None and column.shape[1:] != ref.shape:
            raise ValueError(stacked_shape_message(where, column.shape, ref.shape))
        if column.device != ref.device:
            raise ValueError(
                f"{where} is on device {column.device}; the parameter is on {ref.device}."
            )
    n = columns[0].shape[0]
    if n == 0 and not allow_empty:
        raise ValueError(f"`{name}` should hold at least one task. Found N = 0.")
    shapes = tuple(column.shape[1:] for column in columns)
    dtypes = tuple(column.dtype if n else None for column in columns)
    return Tasks(name, "columns", columns, n, shapes, dtypes, columns[0].device)


def stacked_shape_message(where: str, found: torch.Size, param_shape: torch.Size) -> str:
    """The message for a stacked tensor ``[N, ...]`` whose trailing shape is not the
    parameter's (``where`` names it, e.g. "`adapted['w']`")."""
    return (
        f"{where} has shape {_shape(found)}; expected "
        f"[N, {', '.join(map(str, param_shape))}] for a parameter of shape "
        f"{_shape(param_shape)}."
    )


def _sequence(value: object, where: str, expected: str) -> list[Any]:
    """``value`` as a list if it is a sequence (not a string or a tensor), else the error."""
    if isinstance(value, (str, bytes, Tensor)) or not isinstance(value, Sequence):
        found = f"`{type(value).__name__}`"
        if isinstance(value, Tensor):
            found = f"a Tensor of shape {_shape(value.shape)}; wrap it in a list, or pass "
            found += "one stacked tensor [N, ...]"
        raise TypeError(f"{where} should be {expected}. Found {found}.")
    return list(value)


def _list_columns(
    tasks: list[list[Any]], name: str, params: list[Tensor] | None, num_params: int
) -> list[tuple[torch.Size | None, torch.dtype | None, torch.device | None]]:
    """Each parameter's shape, dtype and device across per-task lists, or the error that
    names the first task and parameter that disagree. Shapes and devices must match the
    parameter (or, without one, the first task that has it); dtypes must agree across
    tasks but may differ from the parameter's (e.g. fp16 gradients of fp32 weights)."""
    found: list[tuple[torch.Size | None, torch.dtype | None, torch.device | None]] = []
    for p in range(num_params):
        column = [task[p] for task in tasks]
        first_task = next((i for i, vector in enumerate(column) if vector is not None), None)
        if first_task is None:
            found.append((None, None, None))
            continue
        first = _floating(column[first_task], f"`{name}[{first_task}][{p}]`", "a Tensor or None")
        ref = first if params is None else params[p]
        shape, dtype, device = ref.shape, first.dtype, ref.device
        found.append((shape, dtype, device))
        for i, vector in enumerate(column):
            if vector is None or (
                isinstance(vector, Tensor)
                and vector.shape == shape
                and vector.dtype == dtype
                and vector.device == device
            ):
                continue  # the common case: nothing to say
            where = f"`{name}[{i}][{p}]`"
            _floating(vector, where, "a Tensor or None")
            has = f"task {first_task} has" if params is None else f"parameter {p} has"
            if vector.shape != shape:
                raise ValueError(
                    f"{where} has shape {_shape(vector.shape)}; {has} {_shape(shape)} for the "
                    "same parameter."
                )
            if vector.device != device:
                raise ValueError(
                    f"{where} is on device {vector.device}; {has} {device} for the same parameter."
                )
            raise TypeError(
                f"{where} has dtype {vector.dtype}; task {first_task} has {dtype} for the same "
                "parameter."
            )
    return found


def check_gramian(gramian: object) -> Tensor:
    """Return ``gramian`` if it is a finite floating-point ``[N, N]`` tensor with N >= 1."""
    gramian = _floating(gramian, "`gramian`", "a Tensor [N, N]")
    if gramian.dim() != 2 or gramian.shape[0] != gramian.shape[1] or gramian.shape[0] == 0:
        raise ValueError(
            "`gramian` should be a square matrix [N, N] with N >= 1. "
            f"Found shape {_shape(gramian.shape)}."
        )
    bad = (~torch.isfinite(gramian)).nonzero()
    if bad.numel():
        i, j = bad[0].tolist()
        raise NonFiniteError(
            f"`gramian` should be finite. Found {gramian[i, j].item()} at [{i}, {j}]."
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
    expected = "a tensor [N, ...] or a sequence of N per-task sequences of tensors"
    tasks = _sequence(task_vectors, f"`{name}`", expected)
    if not tasks and not empty:
        raise ValueError(f"`{name}` should hold at least one task. Found an empty sequence.")
    tasks = [
        _sequence(task, f"`{name}[{i}]`", "a sequence of per-parameter tensors")
        for i, task in enumerate(tasks)
    ]
    num_params = len(params) if params is not None else len(tasks[0])
    for i, task in enumerate(tasks):
        if len(task) != num_params:
            expected = f"as many as task 0 ({num_params})"
            if params is not None:
                expected = f"one per parameter ({num_params})"
            raise ValueError(f"`{name}[{i}]` holds {len(task)} tensors; expected {expected}.")
    if num_params == 0:
        raise ValueError(f"`{name}[0]` should hold at least one tensor. Found an empty sequence.")
    shapes, dtypes, devices = zip(*_list_columns(tasks, name, params, num_params))
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
