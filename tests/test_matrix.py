"""The task matrix: layout, packing of every input form, reusable rows, the culprit scan."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given

from ga_optim import NonFiniteError, TaskStack
from ga_optim._checks import as_tasks
from ga_optim._matrix import Layout, Rows, accumulation_dtype, locate_non_finite, pack
from ga_optim.testing import task_batches
from tests._counting import CountOps

SHAPES = [torch.Size([2, 3]), torch.Size([]), torch.Size([4])]


def test_layout_places_each_parameter_and_locates_an_entry() -> None:
    layout = Layout(SHAPES)
    assert layout.offsets == [0, 6, 7, 11] and layout.width == 11
    flat = torch.arange(11.0)
    parts = layout.split(flat)
    assert [p.shape for p in parts] == SHAPES
    assert parts[0][1, 2] == 5 and parts[1] == 6 and parts[2][3] == 10
    columns = layout.columns(torch.stack([flat, -flat]))
    assert [c.shape for c in columns] == [torch.Size([2, *s]) for s in SHAPES]
    assert columns[2][1, 0] == -7
    assert layout.locate(5) == (0, (1, 2))
    assert layout.locate(6) == (1, ())
    assert layout.locate(9) == (2, (2,))


def test_accumulation_dtype_is_at_least_float32_promoted_over_parameters() -> None:
    assert accumulation_dtype([torch.float16, None, torch.bfloat16]) == torch.float32
    assert accumulation_dtype([torch.float16, torch.float64]) == torch.float64
    assert accumulation_dtype([None]) == torch.float32


@given(task_batches())
def test_every_form_packs_the_rows_by_hand(batch: list[list[torch.Tensor]]) -> None:
    """Row i is task i's tensors flattened and concatenated, in the accumulation dtype."""
    dtype = accumulation_dtype([t.dtype for t in batch[0]])
    expected = torch.stack([torch.cat([t.reshape(-1).to(dtype) for t in task]) for task in batch])
    layout = Layout([t.shape for t in batch[0]])
    assert torch.equal(pack(as_tasks(batch), layout, dtype), expected)
    columns = [torch.stack([task[p] for task in batch]) for p in range(len(batch[0]))]
    assert torch.equal(pack(as_tasks(TaskStack(columns)), layout, dtype), expected)
    assert torch.equal(pack(as_tasks(expected), Layout([expected.shape[1:]]), dtype), expected)


def test_none_entries_are_zeros_and_a_given_matrix_is_not_copied() -> None:
    a = torch.tensor([1.0, 2.0])
    tasks = as_tasks([[None, a], [a, None]])
    rows = Rows(Layout([a.shape, a.shape]), torch.float32, a.device)
    rows.storage = torch.full((2, 4), 7.0)  # stale values from an earlier call
    packed = pack(tasks, rows.layout, torch.float32, rows)
    assert packed.tolist() == [[0.0, 0.0, 1.0, 2.0], [1.0, 2.0, 0.0, 0.0]]
    matrix = torch.randn(3, 4)
    assert pack(as_tasks(matrix), Layout([torch.Size([4])]), torch.float32) is matrix


def test_lists_pack_with_one_copy_whatever_n() -> None:
    layout = Layout(SHAPES)
    rows = Rows(layout, torch.float32, torch.device("cpu"))
    counts = []
    for n in (4, 32, 32):
        batch = [[torch.randn(s) for s in SHAPES] for _ in range(n)]
        tasks = as_tasks(batch)
        with CountOps() as counter:
            pack(tasks, layout, torch.float32, rows)
        counts.append(counter.ops)
    # Once the rows of that size exist (views and slice cached), one operation.
    assert counts[2] == {"aten._foreach_copy_.default": 1}, counts[2]


def test_rows_keep_earlier_rows_when_they_grow() -> None:
    layout = Layout([torch.Size([3])])
    rows = Rows(layout, torch.float64, torch.device("cpu"))
    for i in range(5):
        rows.append()[0].fill_(i)
    assert rows.filled == 5 and rows.storage.shape[0] >= 5
    assert rows.matrix().tolist() == [[float(i)] * 3 for i in range(5)]


def test_locate_names_task_parameter_and_index() -> None:
    layout = Layout(SHAPES)
    matrix = torch.zeros(3, 11)
    locate_non_finite(matrix, layout, "task_vectors")  # nothing to report
    matrix[2, 4] = float("inf")
    with pytest.raises(
        NonFiniteError,
        match=r"`task_vectors\[2\]\[0\]` should be finite\. Found inf at index \(1, 1\)",
    ):
        locate_non_finite(matrix, layout, "task_vectors")
