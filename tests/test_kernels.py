"""The per-parameter kernels: foreach and per-tensor paths agree; accumulation dtypes."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ga_optim import TaskStack, _kernels
from ga_optim._checks import TaskBatch, as_task_batch
from ga_optim._kernels import (
    FEW_TENSORS,
    LARGE_NUMEL,
    PACK_CACHE_ELEMENTS,
    SMALL_NUMEL,
    accumulation_dtype,
    dots_with,
    finite_probe,
    gramian,
    materialize,
    task_sum,
    weighted_blocks,
    weighted_sum,
)
from ga_optim.testing import reference_gramian, task_batches
from tests._counting import CountOps


@given(task_batches(scales=(1.0, 1e6)), st.data())
def test_weighted_sum_foreach_equals_per_tensor(
    batch: list[list[torch.Tensor]], data: st.DataObject
) -> None:
    coeffs = data.draw(st.lists(st.floats(-3, 3), min_size=len(batch), max_size=len(batch)))
    checked = as_task_batch(batch)
    fast = weighted_sum(checked, coeffs, foreach=True)
    slow = weighted_sum(checked, coeffs, foreach=False)
    for p, (a, b) in enumerate(zip(fast, slow)):
        expected = sum(c * task[p] for c, task in zip(coeffs, batch))
        # Rounding is relative to the terms, not to a sum that may cancel to zero.
        magnitude = float(sum(abs(c) * task[p].abs().max() for c, task in zip(coeffs, batch)))
        assert a is not None and b is not None
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14 * len(batch) * magnitude)
        torch.testing.assert_close(
            a, torch.as_tensor(expected), rtol=0, atol=1e-14 * len(batch) * magnitude
        )


def test_weighted_sum_skips_none_and_keeps_missing_parameters_none() -> None:
    a = torch.tensor([1.0, 2.0], dtype=torch.float64)
    checked = as_task_batch([[None, a, None], [a, None, None], [2 * a, a, None]])
    for foreach in (True, False):
        out = weighted_sum(checked, [1.0, 10.0, 100.0], foreach=foreach)
        assert out[2] is None
        torch.testing.assert_close(out[0], 210 * a)
        torch.testing.assert_close(out[1], 101 * a)


def test_half_inputs_accumulate_in_float32() -> None:
    assert accumulation_dtype(torch.float16) == torch.float32
    assert accumulation_dtype(torch.bfloat16) == torch.float32
    assert accumulation_dtype(torch.float64) == torch.float64
    vectors = torch.full((3, 1000), 100.0, dtype=torch.float16)
    checked = as_task_batch(vectors)
    total = weighted_sum(checked, [1.0, 1.0, 1.0], foreach=True)
    assert total[0] is not None and total[0].dtype == torch.float32
    sums = task_sum(checked, torch.float32, foreach=True)
    assert sums.params[0] is not None and sums.params[0].dtype == torch.float32
    dots = dots_with(checked, sums, torch.float32, foreach=True)
    assert dots.tolist() == [3e7] * 3  # 100 · 300 · 1000, far beyond fp16's 65504
    back = weighted_sum(checked, [1 / 3] * 3, foreach=True, out_dtype=True)
    assert back[0] is not None and back[0].dtype == torch.float16


@given(task_batches())
def test_gramian_kernel_matches_reference(batch: list[list[torch.Tensor]]) -> None:
    got = gramian(as_task_batch(batch))
    expected = reference_gramian(batch)
    torch.testing.assert_close(
        got, expected, rtol=1e-10, atol=1e-10 * float(expected.abs().max() + 1e-300)
    )


@pytest.mark.parametrize(
    "numel",
    [100, SMALL_NUMEL + 1, LARGE_NUMEL + 1],
    ids=["packed", "foreach-lists", "parameter-major"],
)
def test_each_size_regime_matches_the_per_tensor_path(numel: int) -> None:
    gen = torch.Generator().manual_seed(numel)
    batch = [
        [
            torch.randn(numel, generator=gen, dtype=torch.float64),
            torch.randn(3, generator=gen, dtype=torch.float64),
        ]
        for _ in range(3)
    ]
    checked = as_task_batch(batch)
    coeffs = [0.5, -2.0, 1.5]
    fast = weighted_sum(checked, coeffs, foreach=True)
    slow = weighted_sum(checked, coeffs, foreach=False)
    for p in range(2):
        expected = sum(c * task[p] for c, task in zip(coeffs, batch))
        torch.testing.assert_close(fast[p], expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(slow[p], expected, rtol=1e-12, atol=1e-12)
    total = sum(torch.cat([t for t in task]) for task in batch)
    expected_scores = torch.stack([torch.cat([t for t in task]) @ total for task in batch])
    for foreach in (True, False):
        sums = task_sum(checked, torch.float64, foreach=foreach)
        scores = dots_with(checked, sums, torch.float64, foreach=foreach)
        torch.testing.assert_close(scores, expected_scores, rtol=1e-10, atol=1e-10)


@pytest.fixture(params=["current", "older"])
def torch_age(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run as on this torch, and as on one whose ``_foreach_norm`` takes no ``dtype``
    (before 2.2 or so: mixed dtypes then take one norm per tensor)."""
    if request.param == "older":
        monkeypatch.setattr(_kernels, "_foreach_norm_takes_dtype", lambda: False)
    return str(request.param)


@pytest.mark.parametrize("count", [1, FEW_TENSORS, FEW_TENSORS + 3], ids=["one", "few", "many"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_finite_probe_is_finite_exactly_when_every_entry_is(
    count: int, bad: float, torch_age: str
) -> None:
    gen = torch.Generator().manual_seed(count)
    dtypes = [torch.float16, torch.float32, torch.float64]
    tensors = [torch.randn(3 + k, generator=gen).to(dtypes[k % 3]) * 100 for k in range(count)] + [
        torch.zeros(0)
    ]  # an empty tensor is skipped
    probe = finite_probe(tensors, torch.float32, torch.device("cpu"))
    assert probe.shape == () and probe.dtype == torch.float32 and math.isfinite(float(probe))
    for k in range(count):
        spoiled = [t.clone() for t in tensors]
        spoiled[k][1] = bad
        assert not math.isfinite(float(finite_probe(spoiled, torch.float32, torch.device("cpu"))))


def test_finite_probe_accumulates_half_precision_in_float32(torch_age: str) -> None:
    # 1000 entries of 1000 sum to 1e6, far above fp16's 65504: no false alarm.
    halves = [torch.full((1000,), 1000.0, dtype=torch.float16)]
    assert float(finite_probe(halves, torch.float32, torch.device("cpu"))) == 1e6
    many = halves * (FEW_TENSORS + 1)
    assert math.isfinite(float(finite_probe(many, torch.float32, torch.device("cpu"))))
    assert float(finite_probe([], torch.float64, torch.device("cpu"))) == 0.0


def _as_if_on(batch: TaskBatch, device: str) -> TaskBatch:
    """The same batch, described as living on ``device`` (the plan reads only the
    description; the arithmetic still runs where the tensors are)."""
    return dataclasses.replace(batch, devices=[torch.device(device)] * batch.num_params, cache={})


def test_an_accelerator_packs_a_small_stacked_batch_into_one_matrix() -> None:
    """On an accelerator a stacked batch of at most PACK_CACHE_ELEMENTS entries in one
    dtype is one pack (one kernel per pass), large parameters included; above that, or
    on the CPU, large parameters stay views of their own and the small ones are packed."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(SMALL_NUMEL + 5,), (3, 4), (7,)]
    small = [torch.randn(4, *s, generator=gen, dtype=torch.float64) for s in shapes]
    coeffs = torch.tensor([0.5, -1.0, 2.0, 0.25], dtype=torch.float64)
    expected = [(coeffs.reshape(4, *[1] * len(s)) * c).sum(0) for s, c in zip(shapes, small)]
    layouts = {}
    for device in ("cpu", "cuda"):
        batch = as_task_batch(TaskStack(small))
        if device != "cpu":
            batch = _as_if_on(batch, device)
        blocked = weighted_blocks(batch, coeffs, foreach=True)
        layouts[device] = len(blocked.flats)
        for got, want in zip(blocked.params, expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert layouts == {"cpu": 2, "cuda": 1}
    big = [torch.zeros(4, PACK_CACHE_ELEMENTS // 4 + 1), torch.zeros(4, 3), torch.zeros(4, 5)]
    blocked = weighted_blocks(
        _as_if_on(as_task_batch(TaskStack(big)), "cuda"), coeffs.float(), foreach=True
    )
    assert len(blocked.flats) == 2  # the large parameter alone (a view), the small two packed
    mixed = [small[0], small[1].float(), small[2]]
    blocked = weighted_blocks(
        _as_if_on(as_task_batch(TaskStack(mixed)), "cuda"), coeffs, foreach=True
    )
    assert len(blocked.flats) == 3  # two dtypes: no single pack


def test_wire_sends_the_same_entries_in_parameter_order() -> None:
    """What a collective gets for the task sum is, concatenated, the per-parameter sums in
    parameter order — whether this rank packs its parameters into one block (then that
    block alone, reduced in place) or lacks one (views and zeros)."""
    gen = torch.Generator().manual_seed(7)
    shapes = [(4, 3), (4,), (2, 4), (2,)]
    full = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes] for _ in range(3)]
    lacking = [[None if p == 1 else t for p, t in enumerate(task)] for task in full]
    params = [torch.zeros(s, dtype=torch.float64) for s in shapes]
    sent = {}
    for name, tasks in (("full", full), ("lacking", lacking)):
        batch = as_task_batch(tasks, "task_vectors", params)
        # Another rank has parameter 1: the collective needs its zeros here.
        batch = dataclasses.replace(batch, all_dtypes=[torch.float64] * 4, cache={})
        sums = task_sum(batch, torch.float64, foreach=True)
        sent[name] = sums.wire(materialize(batch, sums.params, torch.float64))
        expected = torch.cat(
            [
                sum(
                    (task[p] for task in tasks if task[p] is not None),
                    torch.zeros(s, dtype=torch.float64),
                ).reshape(-1)
                for p, s in enumerate(shapes)
            ]
        )
        got = torch.cat([t.reshape(-1) for t in sent[name]])
        torch.testing.assert_close(got, expected, rtol=1e-14, atol=1e-14)
        if name == "full":
            assert len(sent[name]) == 1 and sent[name][0] is sums.flats[0]  # one block
    assert len(sent["lacking"]) == 4  # packed [0, 2, 3] is not a run: views and zeros


def test_an_accelerator_puts_large_parameters_on_the_foreach_lists_too() -> None:
    """On the CPU a parameter above LARGE_NUMEL is summed tensor by tensor (its output
    stays in cache); on an accelerator it joins the multi-tensor lists, one call per task
    for every unpacked parameter. The same sums either way."""
    gen = torch.Generator().manual_seed(1)
    tasks = [
        [
            torch.randn(LARGE_NUMEL + 1, generator=gen, dtype=torch.float64),
            torch.randn(SMALL_NUMEL + 1, generator=gen, dtype=torch.float64),
        ]
        for _ in range(3)
    ]
    coeffs = torch.tensor([0.5, -2.0, 1.5], dtype=torch.float64)
    expected = [sum(c * task[p] for c, task in zip(coeffs, tasks)) for p in range(2)]
    counted = {}
    for device in ("cpu", "cuda"):
        batch = as_task_batch(tasks)
        if device != "cpu":
            batch = _as_if_on(batch, device)
        with CountOps() as counter:
            got = weighted_sum(batch, coeffs, foreach=True)
        counted[device] = counter.ops
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)
    assert counted["cpu"]["aten.addcmul_.default"] == 2  # the large one, tasks 1 and 2
    assert counted["cuda"]["aten.addcmul_.default"] == 0
    assert counted["cuda"]["aten._foreach_addcmul_.Scalar"] == 2  # both, per task
