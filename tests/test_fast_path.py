"""The path that never waits on the host: kernels independent of N, one value read back.

Counted with a ``TorchDispatchMode``: every aten op a ``step`` dispatches, and the
``aten._local_scalar_dense`` calls among them (each one a device-to-host read: a sync on
CUDA). Where CUDA is present, ``torch.cuda.set_sync_debug_mode`` counts the syncs.
"""

from __future__ import annotations

import warnings
from collections import Counter
from typing import Any

import pytest
import torch

from ga_optim import Agreement, GradientAgreementAggregator, Mean, NonNegativeAgreement
from ga_optim.adapters.func import FuncAgreement
from ga_optim.adapters.reptile import AgreementReptile
from ga_optim.testing import reference_agreement_weights
from tests._counting import CountOps

SCALAR_READ = "aten._local_scalar_dense.default"


def _model(device: str = "cpu") -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 26 * 26, 5),
    ).to(device)


def _stacked(model: torch.nn.Module, n: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        name: (torch.randn(n, *p.shape, generator=gen) + 0.5).to(p.device)
        for name, p in model.named_parameters()
    }


def _step_ops(weighting: Any, form: str, n: int) -> Counter[str]:
    model = _model()
    agree = FuncAgreement(model, None, weighting=weighting)
    vectors, deltas = _stacked(model, n, 1), _stacked(model, n, 2)
    agree.step(vectors, agreement_vectors=deltas if form == "maml" else None)  # warm-up
    with CountOps() as counter:
        agree.step(vectors, agreement_vectors=deltas if form == "maml" else None)
    return counter.ops


@pytest.mark.parametrize("form", ["reptile", "maml"])
@pytest.mark.parametrize("weighting", [Mean(), Agreement()], ids=["mean", "agreement"])
def test_stacked_step_runs_the_same_ops_for_4_and_32_tasks(weighting: Any, form: str) -> None:
    few, many = _step_ops(weighting, form, 4), _step_ops(weighting, form, 32)
    assert few == many, f"ops that grow with N: {(many - few) + (few - many)}"
    # 6 parameters: Mean 22 / 31 ops, Agreement 40 / 43 (Reptile / MAML form), views
    # included; no per-parameter work beyond the views of the packed results.
    assert sum(few.values()) <= 50, sum(few.values())
    assert few[SCALAR_READ] == 1  # the one flag


@pytest.mark.parametrize("form", ["reptile", "maml"])
def test_mean_dispatches_fewer_ops_than_agreement(form: str) -> None:
    mean, agreement = _step_ops(Mean(), form, 8), _step_ops(Agreement(), form, 8)
    assert sum(mean.values()) < sum(agreement.values()), (mean, agreement)


def test_a_flat_tensor_is_read_as_stacked_columns_too() -> None:
    params = [torch.zeros(3, 4, requires_grad=True), torch.zeros(5, requires_grad=True)]
    counts = []
    for n in (4, 32):
        flat = torch.randn(n, 17, generator=torch.Generator().manual_seed(n)) + 0.5
        aggregator = GradientAgreementAggregator(params)
        aggregator.step(flat)
        for param in params:
            param.grad = None  # zero_grad(): the step writes .grad afresh
        with CountOps() as counter:
            weights = aggregator.step(flat)
        counts.append(counter.ops)
        torch.testing.assert_close(weights, reference_agreement_weights(flat).float())
        expected = (weights[:, None] * flat).sum(0)
        torch.testing.assert_close(torch.cat([p.grad.reshape(-1) for p in params]), expected)
    assert counts[0] == counts[1]


@pytest.mark.parametrize("form", ["reptile", "maml"])
@pytest.mark.parametrize(
    "weighting", [Mean(), Agreement(), NonNegativeAgreement()], ids=["mean", "agree", "nonneg"]
)
def test_a_list_step_reads_one_value_back(weighting: Any, form: str) -> None:
    model = _model()
    outer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(3)
    tasks = [
        [torch.randn(p.shape, generator=gen) + 0.5 for p in model.parameters()] for _ in range(6)
    ]
    deltas = [
        [torch.randn(p.shape, generator=gen) + 0.5 for p in model.parameters()] for _ in range(6)
    ]
    aggregator = GradientAgreementAggregator(model.parameters(), outer, weighting=weighting)
    extra = {"agreement_vectors": deltas} if form == "maml" else {}
    aggregator.step(tasks, **extra)
    with CountOps() as counter:
        aggregator.step(tasks, **extra)
    assert counter.ops[SCALAR_READ] == 1, counter.ops[SCALAR_READ]


def _list_step_ops(weighting: Any, form: str, n: int) -> Counter[str]:
    model = _model()
    gen = torch.Generator().manual_seed(3)
    shapes = [p.shape for p in model.parameters()]
    tasks = [[torch.randn(s, generator=gen) + 0.5 for s in shapes] for _ in range(n)]
    deltas = [[torch.randn(s, generator=gen) + 0.5 for s in shapes] for _ in range(n)]
    aggregator = GradientAgreementAggregator(model.parameters(), weighting=weighting)
    extra = {"agreement_vectors": deltas} if form == "maml" else {}
    aggregator.step(tasks, **extra)
    with CountOps() as counter:
        aggregator.step(tasks, **extra)
    return counter.ops


@pytest.mark.parametrize("form", ["reptile", "maml"])
@pytest.mark.parametrize("weighting", [Mean(), Agreement()], ids=["mean", "agreement"])
def test_a_list_step_runs_the_same_ops_for_4_and_32_tasks(weighting: Any, form: str) -> None:
    """Per-task lists are packed into the task matrix by one multi-tensor copy: nothing
    after it depends on N."""
    few, many = _list_step_ops(weighting, form, 4), _list_step_ops(weighting, form, 32)
    assert few == many, f"ops that grow with N: {(many - few) + (few - many)}"


def test_reptile_adapter_step_reads_one_value_back() -> None:
    model = _model()
    reptile = AgreementReptile(model, torch.optim.SGD(model.parameters(), lr=0.5))
    gen = torch.Generator().manual_seed(4)
    for _ in range(5):
        learner = reptile.clone()
        with torch.no_grad():
            for p in learner.parameters():
                p.add_(torch.randn(p.shape, generator=gen))
        reptile.record(learner)
    with CountOps() as counter:
        reptile.step()
    assert counter.ops[SCALAR_READ] == 1


def test_the_flag_down_takes_the_careful_path() -> None:
    """All-zero vectors (uniform weights), an underflowing batch (rescaled) and NaN (raises
    naming task and parameter) leave the fast path; the results are the careful ones."""
    params = [torch.zeros(4, requires_grad=True)]
    aggregator = GradientAgreementAggregator(params)
    torch.testing.assert_close(aggregator.step(torch.zeros(3, 4)), torch.full((3,), 1 / 3))
    tiny = torch.tensor([[1e-30, 0, 0, 0], [2e-30, 1e-30, 0, 0], [-1e-30, 0, 0, 0]])
    torch.testing.assert_close(aggregator.weights(tiny), reference_agreement_weights(tiny).float())
    torch.testing.assert_close(aggregator.step(tiny), reference_agreement_weights(tiny).float())
    bad = torch.ones(3, 4)
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"`task_vectors\[2\]\[0\]` should be finite"):
        aggregator.step(bad)
    mean = GradientAgreementAggregator(params, weighting=Mean())
    with pytest.raises(ValueError, match=r"`agreement_vectors\[2\]\[0\]` should be finite"):
        mean.step(torch.ones(3, 4), agreement_vectors=bad)


# -- CUDA (skipped, with this reason, on a machine without a GPU) --------------------------

cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU; this machine has none"
)


@pytest.fixture
def no_sync_debug() -> Any:
    """Each CUDA test starts and ends with the sync debug mode off. (Setting the mode
    warns, once per process, that it is a prototype: not a failure.)"""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Synchronization debug mode is a prototype")
        torch.cuda.set_sync_debug_mode(0)
    yield
    torch.cuda.set_sync_debug_mode(0)


@cuda
@pytest.mark.parametrize("form", ["reptile", "maml"])
@pytest.mark.parametrize("weighting", [Mean(), Agreement()], ids=["mean", "agreement"])
def test_cuda_step_syncs_at_most_once(weighting: Any, form: str, no_sync_debug: Any) -> None:
    model = _model("cuda")
    agree = FuncAgreement(model, torch.optim.SGD(model.parameters(), lr=0.1), weighting=weighting)
    vectors, deltas = _stacked(model, 32, 1), _stacked(model, 32, 2)
    extra = {"agreement_vectors": deltas} if form == "maml" else {}
    agree.step(vectors, **extra)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode(1)  # warn on every synchronizing operation
        try:
            agree.step(vectors, **extra)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "called a synchronizing CUDA operation" in str(w.message)]
    assert len(syncs) <= 1, [str(w.message) for w in syncs]


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_weights_match_float64_on_the_cpu(dtype: torch.dtype, no_sync_debug: Any) -> None:
    gen = torch.Generator().manual_seed(5)
    vectors = torch.randn(16, 1000, generator=gen, dtype=torch.float64) + 0.3
    expected = reference_agreement_weights(vectors)
    got = Agreement().weights(vectors.to("cuda", dtype))
    assert got.device.type == "cuda" and got.dtype == torch.float32
    # fp16/bf16 inputs are rounded on the way in; the sums run in float32.
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(got.cpu().double(), expected, rtol=tol, atol=tol / 16)


@cuda
def test_cuda_step_equals_the_cpu_step(no_sync_debug: Any) -> None:
    results = []
    for device in ("cpu", "cuda"):
        model = _model(device)
        agree = FuncAgreement(model, torch.optim.SGD(model.parameters(), lr=0.1))
        stacked = _stacked(model, 8, 6)
        weights = agree.step(stacked, agreement_vectors=_stacked(model, 8, 7))
        results.append((weights.cpu(), [p.detach().cpu() for p in model.parameters()]))
    (w_cpu, p_cpu), (w_cuda, p_cuda) = results
    torch.testing.assert_close(w_cuda, w_cpu, rtol=1e-5, atol=1e-6)
    for a, b in zip(p_cuda, p_cpu):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
