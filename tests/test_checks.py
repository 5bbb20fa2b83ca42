"""The error table: each bad input, the exception type and the message that names it."""

from __future__ import annotations

import pytest
import torch

from ga_optim import GradientAgreementAggregator, Mean, TaskStack, agreement_weights
from ga_optim._checks import as_tasks

v = torch.ones(3)
m = torch.ones(2, 2)

BAD_TASK_VECTORS = [
    (
        "not-a-sequence",
        3.0,
        TypeError,
        r"`task_vectors` should be a tensor \[N, \.\.\.\] or a sequence",
    ),
    ("string", "abc", TypeError, r"Found `str`"),
    ("empty", [], ValueError, r"at least one task\. Found an empty sequence"),
    ("empty-tensor", torch.ones(0, 3), ValueError, r"N >= 1 tasks .* Found shape \(0, 3\)"),
    ("scalar-tensor", torch.tensor(1.0), ValueError, r"Found shape \(\)"),
    (
        "task-is-tensor",
        [v, v],
        TypeError,
        r"`task_vectors\[0\]` should be a sequence .* Found a Tensor of shape \(3,\)",
    ),
    (
        "task-is-number",
        [[v], 1.0],
        TypeError,
        r"`task_vectors\[1\]` should be a sequence .* Found `float`",
    ),
    ("no-params", [[], []], ValueError, r"`task_vectors\[0\]` should hold at least one tensor"),
    (
        "ragged-count",
        [[v, m], [v]],
        ValueError,
        r"`task_vectors\[1\]` holds 1 tensors; expected as many as task 0 \(2\)",
    ),
    (
        "ragged-shape",
        [[v, m], [v, torch.ones(4, 2)]],
        ValueError,
        r"`task_vectors\[1\]\[1\]` has shape \(4, 2\); task 0 has \(2, 2\) for the same parameter",
    ),
    (
        "non-tensor-entry",
        [[v], [[1.0, 2.0, 3.0]]],
        TypeError,
        r"`task_vectors\[1\]\[0\]` should be a Tensor or None\. Found `list`",
    ),
    (
        "integer-dtype",
        [[v], [torch.ones(3, dtype=torch.int64)]],
        TypeError,
        r"`task_vectors\[1\]\[0\]` should have a floating-point dtype\. Found torch\.int64",
    ),
    (
        "mixed-dtype",
        [[v], [v.double()]],
        TypeError,
        r"`task_vectors\[1\]\[0\]` has dtype torch\.float64; task 0 has torch\.float32",
    ),
    (
        "mixed-device",
        [[v], [torch.ones(3, device="meta")]],
        ValueError,
        r"`task_vectors\[1\]\[0\]` is on device meta; task 0 has cpu",
    ),
    (
        "nan",
        [[v], [torch.tensor([1.0, float("nan"), 0.0])]],
        ValueError,
        r"`task_vectors\[1\]\[0\]` should be finite\. Found nan at index \(1,\)",
    ),
    (
        "inf",
        [[v, m], [v, torch.tensor([[0.0, 0.0], [float("-inf"), 1.0]])]],
        ValueError,
        r"`task_vectors\[1\]\[1\]` should be finite\. Found -inf at index \(1, 0\)",
    ),
]


@pytest.mark.parametrize(
    ("bad", "error", "match"),
    [case[1:] for case in BAD_TASK_VECTORS],
    ids=[case[0] for case in BAD_TASK_VECTORS],
)
def test_agreement_weights_rejects(bad: object, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        agreement_weights(bad)


def test_mean_rejects_non_finite_too() -> None:
    with pytest.raises(ValueError, match=r"`task_vectors\[2\]\[0\]` should be finite"):
        Mean().weights([[v], [v], [torch.tensor([0.0, float("inf"), 0.0])]])


def test_mean_aggregator_rejects_non_finite_agreement_vectors() -> None:
    # Mean never reads the agreement vectors' values; they must still be finite.
    param = torch.zeros(3, requires_grad=True)
    aggregator = GradientAgreementAggregator([param], weighting=Mean())
    bad = [[v], [torch.tensor([0.0, float("nan"), 0.0])]]
    with pytest.raises(ValueError, match=r"`agreement_vectors\[1\]\[0\]` should be finite"):
        aggregator.step([[v], [v]], agreement_vectors=bad)
    assert param.grad is None and aggregator.num_steps == 0
    with pytest.raises(ValueError, match=r"`task_vectors\[1\]\[0\]` should be finite"):
        aggregator.weights(bad)


BAD_GRAMIANS = [
    ("list", [[1.0]], TypeError, r"`gramian` should be a Tensor \[N, N\]\. Found `list`"),
    ("not-square", torch.ones(2, 3), ValueError, r"square matrix .* Found shape \(2, 3\)"),
    ("empty", torch.ones(0, 0), ValueError, r"N >= 1\. Found shape \(0, 0\)"),
    (
        "integer",
        torch.ones(2, 2, dtype=torch.int32),
        TypeError,
        r"floating-point dtype\. Found torch\.int32",
    ),
    (
        "nan",
        torch.tensor([[1.0, 0.0], [0.0, float("nan")]]),
        ValueError,
        r"should be finite\. Found nan at \[1, 1\]",
    ),
]


@pytest.mark.parametrize(
    ("bad", "error", "match"), [c[1:] for c in BAD_GRAMIANS], ids=[c[0] for c in BAD_GRAMIANS]
)
def test_gramian_rejects(bad: object, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        agreement_weights(gramian=bad)  # type: ignore[arg-type]


def test_exactly_one_input() -> None:
    with pytest.raises(TypeError, match="exactly one of `task_vectors` and `gramian`"):
        agreement_weights()
    with pytest.raises(TypeError, match="exactly one of `task_vectors` and `gramian`"):
        agreement_weights(torch.ones(2, 2), gramian=torch.eye(2))


def _model() -> torch.nn.Module:
    return torch.nn.Linear(3, 2)


def test_aggregator_constructor_errors() -> None:
    model = _model()
    with pytest.raises(
        TypeError, match=r"`params` should be an iterable of tensors .* single Tensor"
    ):
        GradientAgreementAggregator(model.weight)
    with pytest.raises(ValueError, match=r"`params` should hold at least one tensor"):
        GradientAgreementAggregator([])
    with pytest.raises(TypeError, match=r"`params\[1\]` should be a Tensor\. Found `int`"):
        GradientAgreementAggregator([model.weight, 3])
    with pytest.raises(TypeError, match=r"`params\[0\]` should have a floating-point dtype"):
        GradientAgreementAggregator([torch.ones(2, dtype=torch.int64)])
    with pytest.raises(ValueError, match=r"`params\[1\]` is the same tensor as `params\[0\]`"):
        GradientAgreementAggregator([model.weight, model.weight])
    with pytest.raises(ValueError, match=r"`params\[0\]` should be a leaf tensor"):
        GradientAgreementAggregator([model.weight * 2])
    outer = torch.optim.SGD([model.weight], lr=0.1)
    with pytest.raises(
        ValueError, match=r"`params\[1\]` \(shape \(2,\)\) is in no param group of `optimizer`"
    ):
        GradientAgreementAggregator(model.parameters(), outer)
    with pytest.raises(
        TypeError, match=r"`optimizer` should be a torch\.optim\.Optimizer .* Found `str`"
    ):
        GradientAgreementAggregator(model.parameters(), "sgd")  # type: ignore[arg-type]
    with pytest.raises(
        TypeError, match=r"`weighting` should be a ga_optim\.Weighting .* Found `str`"
    ):
        GradientAgreementAggregator(model.parameters(), weighting="mean")  # type: ignore[arg-type]
    elsewhere = torch.zeros(2, device="meta", requires_grad=True)
    with pytest.raises(
        ValueError, match=r"`params\[1\]` is on device meta; `params\[0\]` is on cpu"
    ):
        GradientAgreementAggregator([model.weight, elsewhere])


def test_aggregator_input_errors_name_parameter() -> None:
    model = _model()
    aggregator = GradientAgreementAggregator(model.parameters())
    good = [torch.zeros(2, 3), torch.zeros(2)]
    with pytest.raises(
        ValueError, match=r"`task_vectors\[1\]\[0\]` has shape \(3, 2\); parameter 0 has \(2, 3\)"
    ):
        aggregator.aggregate([good, [torch.zeros(3, 2), torch.zeros(2)]])
    with pytest.raises(
        ValueError, match=r"`task_vectors\[0\]` holds 1 tensors; expected one per parameter \(2\)"
    ):
        aggregator.aggregate([[torch.zeros(2, 3)]])
    with pytest.raises(
        ValueError, match=r"`agreement_vectors` holds 1 tasks; `task_vectors` holds 2"
    ):
        aggregator.aggregate([good, good], agreement_vectors=[good])
    with pytest.raises(ValueError, match=r"`gramian` is \(3, 3\); `task_vectors` holds 2 tasks"):
        aggregator.aggregate([good, good], gramian=torch.eye(3))
    with pytest.raises(TypeError, match=r"at most one of `agreement_vectors` and `gramian`"):
        aggregator.aggregate([good, good], agreement_vectors=[good, good], gramian=torch.eye(2))
    with pytest.raises(
        ValueError, match=r"`task_vectors` is a tensor of shape \(2, 7\); .* \[N, 8\]"
    ):
        aggregator.aggregate(torch.zeros(2, 7))
    nan = [torch.zeros(2, 3), torch.tensor([0.0, float("nan")])]
    with pytest.raises(ValueError, match=r"`task_vectors\[1\]\[1\]` should be finite"):
        aggregator.aggregate([good, nan], agreement_vectors=[good, good])
    with pytest.raises(ValueError, match=r"`agreement_vectors\[0\]\[1\]` should be finite"):
        aggregator.aggregate([good, good], agreement_vectors=[nan, good])


def _stack_params() -> list[torch.Tensor]:
    return [torch.zeros(2, 3, requires_grad=True), torch.zeros(2, requires_grad=True)]


BAD_STACKS = [
    ("count", [torch.ones(4, 2, 3)], ValueError, r"holds 1 stacked tensors; expected one per"),
    ("none", [], ValueError, r"holds 0 stacked tensors"),
    ("not-a-tensor", [torch.ones(4, 2, 3), [1.0]], TypeError, r"parameter 1 should be a Tensor"),
    (
        "integer",
        [torch.ones(4, 2, 3), torch.ones(4, 2, dtype=torch.int64)],
        TypeError,
        r"`task_vectors` parameter 1 should have a floating-point dtype\. Found torch\.int64",
    ),
    (
        "scalar-first",
        [torch.tensor(1.0), torch.ones(4, 2)],
        ValueError,
        r"`task_vectors` parameter 0 should be \[N, \.\.\.\] with the tasks along dimension 0",
    ),
    (
        "ragged-n",
        [torch.ones(4, 2, 3), torch.ones(5, 2)],
        ValueError,
        r"parameter 1 holds 5 tasks along dimension 0; parameter 0 holds 4",
    ),
    (
        "shape",
        [torch.ones(4, 3, 2), torch.ones(4, 2)],
        ValueError,
        r"parameter 0 has shape \(4, 3, 2\); expected \[N, 2, 3\] for a parameter of shape \(2, 3\)",
    ),
    (
        "device",
        [torch.ones(4, 2, 3), torch.ones(4, 2, device="meta")],
        ValueError,
        r"parameter 1 is on device meta; the parameter is on cpu",
    ),
    (
        "no-task",
        [torch.ones(0, 2, 3), torch.ones(0, 2)],
        ValueError,
        r"at least one task\. Found N = 0",
    ),
]


@pytest.mark.parametrize(
    ("columns", "error", "match"), [c[1:] for c in BAD_STACKS], ids=[c[0] for c in BAD_STACKS]
)
def test_task_stack_rejects_and_leaves_everything_untouched(
    columns: list[object], error: type[Exception], match: str
) -> None:
    params = _stack_params()
    outer = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    aggregator = GradientAgreementAggregator(params, outer)
    with pytest.raises(error, match=match):
        aggregator.step(TaskStack(columns))  # type: ignore[arg-type]
    assert all(p.grad is None and not p.any() for p in params)
    assert outer.state_dict()["state"] == {} and aggregator.num_steps == 0


def test_task_stack_reads_each_column_as_its_parameter() -> None:
    # 1-d, 2-d and 3-d columns (2-d ones are used as they are, the others reshaped).
    params = [torch.zeros(2, 3), torch.zeros(2), torch.zeros(())]
    gen = torch.Generator().manual_seed(0)
    columns = [torch.randn(5, *p.shape, generator=gen, dtype=torch.float64) for p in params]
    aggregator = GradientAgreementAggregator([p.requires_grad_() for p in params])
    got = aggregator.aggregate(TaskStack(columns))
    flat = torch.cat([column.reshape(5, -1) for column in columns], dim=1)  # by hand
    scores = flat @ flat.sum(0)
    weights = scores / scores.abs().sum()
    for g, column in zip(got, columns, strict=True):
        expected = (weights[:, None] * column.reshape(5, -1)).sum(0).reshape(column.shape[1:])
        torch.testing.assert_close(g, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(3, 4), (), (5,)])
def test_a_rank_with_no_task_passes_an_empty_stacked_tensor(shape: tuple[int, ...]) -> None:
    # In a process group a rank may hold no task: [0, *shape] is read as a [0, P] matrix.
    param = torch.zeros(shape, requires_grad=True)
    tasks = as_tasks(torch.zeros(0, *shape), params=[param], allow_empty=True)
    assert tasks.num_tasks == 0 and tasks.data.shape == (0, param.numel())
    assert tasks.dtypes == (None,)
    with pytest.raises(ValueError, match=r"N >= 1 tasks along dimension 0"):
        as_tasks(torch.zeros(0, *shape), params=[param])
