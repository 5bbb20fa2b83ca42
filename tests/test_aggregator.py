"""GradientAgreementAggregator: aggregate, step (Algorithm 1), atomicity, checkpointing."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import example, given

from ga_optim import (
    Agreement,
    GradientAgreementAggregator,
    Mean,
    NonNegativeAgreement,
    TaskStack,
    Weighting,
    agreement_weights,
)
from ga_optim.testing import reference_agreement_weights, task_batches


def _params_like(batch: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    return [torch.zeros(t.shape, dtype=t.dtype, requires_grad=True) for t in batch[0]]


def _weighted_sum64(weights: torch.Tensor, batch: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    return [
        sum(
            (w * task[p].double() for w, task in zip(weights.double().tolist(), batch)),
            torch.zeros(()),
        )
        for p in range(len(batch[0]))
    ]


@given(task_batches(scales=(1e-3, 1.0, 1e3)))
def test_aggregate_is_the_weighted_sum(batch: list[list[torch.Tensor]]) -> None:
    aggregator = GradientAgreementAggregator(_params_like(batch))
    result = aggregator.aggregate(batch)
    weights = aggregator.last_weights
    assert weights is not None
    torch.testing.assert_close(weights, agreement_weights(batch))
    for got, expected, param in zip(result, _weighted_sum64(weights, batch), aggregator.params):
        assert got.shape == param.shape
        torch.testing.assert_close(got, expected.reshape(param.shape), rtol=1e-9, atol=1e-9 * 1e3)


@given(task_batches(scales=(1.0,)))
def test_mean_aggregate_is_plain_averaging(batch: list[list[torch.Tensor]]) -> None:
    aggregator = GradientAgreementAggregator(_params_like(batch), weighting=Mean())
    result = aggregator.aggregate(batch)
    for p, got in enumerate(result):
        expected = torch.stack([task[p] for task in batch]).mean(dim=0)
        torch.testing.assert_close(got, expected)


@given(task_batches(scales=(1.0,)))
@example([[torch.tensor(v, dtype=torch.float64)] for v in (0.0, 0.0, 1.0, 1.3363e-72, -1.0)])
def test_lists_and_stacked_columns_aggregate_alike(batch: list[list[torch.Tensor]]) -> None:
    """Both forms are packed into one task matrix: bitwise the same update and weights."""
    params = _params_like(batch)
    aggregator = GradientAgreementAggregator(params)
    from_lists = aggregator.aggregate(batch)
    weights = aggregator.last_weights
    columns = [torch.stack([task[p] for task in batch]) for p in range(len(params))]
    from_stack = aggregator.aggregate(TaskStack(columns))
    assert torch.equal(aggregator.last_weights, weights)
    for a, b in zip(from_lists, from_stack, strict=True):
        assert torch.isfinite(a).all() and torch.equal(a, b)


def _reptile_setup(
    seed: int = 0,
) -> tuple[torch.nn.Module, list[list[torch.Tensor]], list[list[torch.Tensor]]]:
    """A model θ and five tasks' adapted weights θ_i, in float64."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(2, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)
    ).double()
    theta = [p.detach().clone() for p in model.parameters()]
    adapted = [[t + 0.1 * torch.randn_like(t) for t in theta] for _ in range(5)]
    return model, [theta], adapted


def test_step_is_algorithm_1_line_10_reptile() -> None:
    model, (theta,), adapted = _reptile_setup()
    alpha = 0.3
    outer = torch.optim.SGD(model.parameters(), lr=alpha)
    aggregator = GradientAgreementAggregator(model.parameters(), outer)
    deltas = [[t - ti for t, ti in zip(theta, task)] for task in adapted]  # g_i = θ − θ_i
    weights = aggregator.step(deltas)

    # By hand in float64: w from the dense Gramian, θ ← θ + α Σ w_i (θ_i − θ).
    expected_w = reference_agreement_weights(deltas)
    torch.testing.assert_close(weights, expected_w)
    for p, param in enumerate(model.parameters()):
        expected = theta[p] + alpha * sum(
            w * (task[p] - theta[p]) for w, task in zip(expected_w, adapted)
        )
        torch.testing.assert_close(param.detach(), expected)
    assert aggregator.num_steps == 1
    assert torch.equal(aggregator.last_weights, weights)  # type: ignore[arg-type]


def test_step_with_mean_is_plain_batched_reptile() -> None:
    model, (theta,), adapted = _reptile_setup(1)
    outer = torch.optim.SGD(model.parameters(), lr=0.5)
    aggregator = GradientAgreementAggregator(model.parameters(), outer, weighting=Mean())
    weights = aggregator.step([[t - ti for t, ti in zip(theta, task)] for task in adapted])
    assert weights.tolist() == [0.2] * 5
    for p, param in enumerate(model.parameters()):
        mean_adapted = torch.stack([task[p] for task in adapted]).mean(0)
        torch.testing.assert_close(param.detach(), theta[p] + 0.5 * (mean_adapted - theta[p]))


def test_maml_weights_from_deltas_applied_to_meta_gradients() -> None:
    # Algorithm 1, lines 7-9: w from g_i = θ − θ_i, update θ ← θ − α Σ w_i ∇L_i(θ_i).
    model, (theta,), adapted = _reptile_setup(2)
    torch.manual_seed(3)
    meta_grads = [[torch.randn_like(t) for t in theta] for _ in adapted]
    deltas = [[t - ti for t, ti in zip(theta, task)] for task in adapted]
    outer = torch.optim.SGD(model.parameters(), lr=0.1)
    aggregator = GradientAgreementAggregator(model.parameters(), outer)
    weights = aggregator.step(meta_grads, agreement_vectors=deltas)
    expected_w = reference_agreement_weights(deltas)
    torch.testing.assert_close(weights, expected_w)
    assert not torch.allclose(weights, reference_agreement_weights(meta_grads))
    for p, param in enumerate(model.parameters()):
        update = sum(w * g[p] for w, g in zip(expected_w, meta_grads))
        torch.testing.assert_close(param.detach(), theta[p] - 0.1 * update)


def test_gramian_keyword_in_aggregate() -> None:
    model, (theta,), adapted = _reptile_setup(4)
    deltas = [[t - ti for t, ti in zip(theta, task)] for task in adapted]
    flat = torch.stack([torch.cat([t.reshape(-1) for t in d]) for d in deltas])
    aggregator = GradientAgreementAggregator(model.parameters())
    from_gramian = aggregator.aggregate(deltas, gramian=flat @ flat.T)
    from_vectors = aggregator.aggregate(deltas)
    for a, b in zip(from_gramian, from_vectors):
        torch.testing.assert_close(a, b)


def test_flat_matrix_input_is_split_per_parameter() -> None:
    model, (theta,), adapted = _reptile_setup(5)
    deltas = [[t - ti for t, ti in zip(theta, task)] for task in adapted]
    flat = torch.stack([torch.cat([t.reshape(-1) for t in d]) for d in deltas])
    aggregator = GradientAgreementAggregator(model.parameters())
    for a, b in zip(aggregator.aggregate(flat), aggregator.aggregate(deltas)):
        torch.testing.assert_close(a, b)


def test_optimizer_none_writes_grad_only() -> None:
    model, (theta,), adapted = _reptile_setup(6)
    aggregator = GradientAgreementAggregator(model.parameters())
    deltas = [[t - ti for t, ti in zip(theta, task)] for task in adapted]
    expected = aggregator.aggregate(deltas)
    aggregator.step(deltas)
    for param, t, e in zip(model.parameters(), theta, expected):
        assert torch.equal(param.detach(), t)  # not stepped
        torch.testing.assert_close(param.grad, e)


def test_a_parameter_no_task_reached_keeps_its_grad_and_none_counts_as_zero() -> None:
    """As autograd: a parameter no task reached keeps ``.grad`` (None: optimizers, weight
    decay included, skip it); a task's None counts as zeros in the weights."""
    a = torch.zeros(2, requires_grad=True, dtype=torch.float64)
    b = torch.zeros(3, requires_grad=True, dtype=torch.float64)
    aggregator = GradientAgreementAggregator([a, b], torch.optim.AdamW([a, b], weight_decay=0.5))
    g1, g2 = (
        torch.tensor([1.0, 2.0], dtype=torch.float64),
        torch.tensor([3.0, 0.0], dtype=torch.float64),
    )
    aggregator.step([[g1, None], [g2, None]])
    assert b.grad is None and torch.equal(b.detach(), torch.zeros(3, dtype=torch.float64))
    assert not torch.equal(a.detach(), torch.zeros(2, dtype=torch.float64))
    aggregator.optimizer.zero_grad()
    b.grad = torch.full((3,), 7.0, dtype=torch.float64)  # the loop's own gradient: kept
    plain = GradientAgreementAggregator([a, b])
    plain.step([[g1, None], [g2, None]])
    # s = (4, 2): r = (8, 12) → w = (0.4, 0.6)
    torch.testing.assert_close(a.grad, 0.4 * g1 + 0.6 * g2)
    torch.testing.assert_close(b.grad, torch.full((3,), 7.0, dtype=torch.float64))
    plain.step([[g1, None], [g2, None]], accumulate=False)  # replace: unreached is None
    torch.testing.assert_close(a.grad, 0.4 * g1 + 0.6 * g2)
    assert b.grad is None


def test_frozen_parameters_are_never_written_nor_need_an_optimizer_group() -> None:
    """A parameter with requires_grad=False keeps .grad None: AdamW's decay never moves it."""
    torch.manual_seed(0)
    frozen = torch.nn.Parameter(torch.randn(4, dtype=torch.float64), requires_grad=False)
    live = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    before = frozen.detach().clone()
    for held in ([frozen, live], [live]):
        live.grad = None
        opt = torch.optim.AdamW(held, lr=0.1, weight_decay=0.1)
        aggregator = GradientAgreementAggregator([frozen, live], opt)
        vectors = torch.randn(3, 7, dtype=torch.float64)
        aggregator.step(vectors)
        assert frozen.grad is None and torch.equal(frozen.detach(), before)
        torch.testing.assert_close(live.grad, agreement_update(vectors)[4:])
    with pytest.raises(ValueError, match=r"`params\[1\]` \(shape \(3,\)\) is in no param group"):
        GradientAgreementAggregator([frozen, live], torch.optim.SGD([frozen], lr=0.1))


def agreement_update(vectors: torch.Tensor) -> torch.Tensor:
    """Σ w_i v_i with the paper's weights, in float64 by hand."""
    w = reference_agreement_weights(vectors.double())
    return (w[:, None] * vectors.double()).sum(0)


def test_sum_reduction_scales_the_update_by_n_and_keeps_the_weights() -> None:
    torch.manual_seed(1)
    vectors = torch.randn(5, 6, dtype=torch.float64)
    for weighting in (Mean(), Agreement()):
        param = torch.zeros(6, dtype=torch.float64, requires_grad=True)
        mean = GradientAgreementAggregator([param], weighting=weighting)
        total = GradientAgreementAggregator([param], weighting=weighting, reduction="sum")
        w_mean = mean.step(vectors, accumulate=False)
        update = param.grad.clone()
        w_sum = total.step(vectors, accumulate=False)
        torch.testing.assert_close(w_sum, w_mean, rtol=0, atol=0)
        torch.testing.assert_close(param.grad, 5 * update, rtol=1e-15, atol=1e-15)
    param = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    GradientAgreementAggregator([param], weighting=Mean(), reduction="sum").step(vectors)
    torch.testing.assert_close(param.grad, vectors.sum(0), rtol=1e-14, atol=1e-14)
    with pytest.raises(ValueError, match=r"`reduction` should be 'mean' or 'sum'\. Found 'avg'"):
        GradientAgreementAggregator([param], reduction="avg")  # type: ignore[arg-type]


def test_reached_marks_parameters_and_is_checked() -> None:
    a = torch.zeros(2, requires_grad=True, dtype=torch.float64)
    b = torch.zeros(3, requires_grad=True, dtype=torch.float64)
    aggregator = GradientAgreementAggregator([a, b], weighting=Mean())
    vectors = torch.ones(2, 5, dtype=torch.float64)
    aggregator.step(vectors, reached=[True, False])
    torch.testing.assert_close(a.grad, torch.ones(2, dtype=torch.float64))
    assert b.grad is None
    with pytest.raises(ValueError, match=r"`reached` should hold 2 bools, one per parameter"):
        aggregator.step(vectors, reached=[True])
    with pytest.raises(TypeError, match=r"`reached` should be a sequence of bools"):
        aggregator.step(vectors, reached=True)  # type: ignore[arg-type]
    assert b.grad is None and torch.equal(a.grad, torch.ones(2, dtype=torch.float64))


def test_half_precision_vectors_into_float32_parameters() -> None:
    param = torch.zeros(100, requires_grad=True)
    aggregator = GradientAgreementAggregator([param])
    torch.manual_seed(7)
    vectors = (torch.randn(4, 100) * 300).half()  # dots far beyond fp16's 65504
    aggregator.step([[row] for row in vectors])
    assert param.grad is not None and param.grad.dtype == torch.float32
    expected_w = reference_agreement_weights(vectors.double())
    expected = (expected_w[:, None] * vectors.double()).sum(0)
    torch.testing.assert_close(param.grad.double(), expected, rtol=2e-3, atol=0.5)


def test_non_negative_weighting_in_aggregator() -> None:
    model, (theta,), adapted = _reptile_setup(8)
    deltas = [[t - ti for t, ti in zip(theta, task)] for task in adapted]
    mean = [sum(task[p] for task in deltas) / len(deltas) for p in range(len(theta))]
    deltas.append([-0.3 * m for m in mean])  # a task that fights the batch
    aggregator = GradientAgreementAggregator(model.parameters(), weighting=NonNegativeAgreement())
    weights = aggregator.weights(deltas)
    scores = reference_agreement_weights(deltas)
    assert scores[-1] < 0 and weights[-1] == 0
    expected = scores.clamp(min=0) / scores.clamp(min=0).sum()
    torch.testing.assert_close(weights, expected)


def _snapshot(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[list[torch.Tensor], list[torch.Tensor | None], dict]:
    return (
        [p.detach().clone() for p in model.parameters()],
        [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        copy.deepcopy(optimizer.state_dict()),
    )


def _assert_same(before: tuple, after: tuple) -> None:
    for x, y in zip(before[0], after[0]):
        assert torch.equal(x, y)
    for x, y in zip(before[1], after[1]):
        assert (x is None and y is None) or torch.equal(x, y)
    assert before[2]["param_groups"] == after[2]["param_groups"]
    for key, state in before[2]["state"].items():
        for name, value in state.items():
            assert torch.equal(
                torch.as_tensor(value), torch.as_tensor(after[2]["state"][key][name])
            )


def test_failed_calls_leave_everything_untouched() -> None:
    model, (theta,), adapted = _reptile_setup(9)
    outer = torch.optim.Adam(model.parameters(), lr=0.01)
    aggregator = GradientAgreementAggregator(model.parameters(), outer, track_cosines=True)
    deltas = [[t - ti for t, ti in zip(theta, task)] for task in adapted]
    aggregator.step(deltas)  # Adam now has state, every param a .grad
    weights_before = aggregator.last_weights
    before = _snapshot(model, outer)
    nan_last = [list(d) for d in deltas]
    nan_last[-1][-1] = torch.full_like(nan_last[-1][-1], float("nan"))
    bad_calls = [
        (lambda: aggregator.step(nan_last), ValueError),
        (lambda: aggregator.step([*deltas[:-1], deltas[-1][:-1]]), ValueError),
        (lambda: aggregator.step(deltas, agreement_vectors=nan_last), ValueError),
        (lambda: aggregator.step(nan_last, weighting_unused=1), TypeError),  # type: ignore[call-arg]
        (
            lambda: aggregator.step(
                [[d.float() for d in task] for task in deltas[:2]] + deltas[2:]
            ),
            TypeError,
        ),
    ]
    for call, error in bad_calls:
        with pytest.raises(error):
            call()
        _assert_same(before, _snapshot(model, outer))
        assert aggregator.num_steps == 1 and aggregator.last_weights is weights_before


class _Broken(Weighting):
    """A weighting of one's own that gets its weights wrong: too few, or NaN."""

    needs = "scores"

    def __init__(self, result: str) -> None:
        self.result = result

    def from_scores(self, scores: torch.Tensor) -> torch.Tensor:
        if self.result == "short":
            return scores[:-1] / scores.abs().sum()
        return torch.full_like(scores, float("nan"))


@pytest.mark.parametrize(
    ("result", "match"),
    [
        ("short", r"of shape \(2,\) .* expected \(3,\)"),
        ("nan", r"\[nan, nan, nan\] of shape \(3,\)"),
    ],
)
def test_wrong_weights_from_a_weighting_raise_naming_it(result: str, match: str) -> None:
    param = torch.zeros(2, requires_grad=True)
    outer = torch.optim.SGD([param], lr=0.1)
    aggregator = GradientAgreementAggregator([param], outer, weighting=_Broken(result))
    tasks = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    for call in (aggregator.step, aggregator.aggregate, aggregator.weights):
        with pytest.raises(ValueError, match=r"_Broken\(\) returned weights .*" + match):
            call(tasks)
        assert param.grad is None and not param.any() and aggregator.num_steps == 0


class _FailingSGD(torch.optim.SGD):
    def step(self, closure=None):  # type: ignore[no-untyped-def,override]
        raise RuntimeError("boom")


def test_optimizer_failure_restores_grads() -> None:
    model, (theta,), adapted = _reptile_setup(10)
    outer = _FailingSGD(model.parameters(), lr=0.1)
    aggregator = GradientAgreementAggregator(model.parameters(), outer)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    grads = [p.grad for p in model.parameters()]
    with pytest.raises(RuntimeError, match="boom"):
        aggregator.step([[t - ti for t, ti in zip(theta, task)] for task in adapted])
    assert all(p.grad is g for p, g in zip(model.parameters(), grads))
    assert aggregator.num_steps == 0 and aggregator.last_weights is None


def test_diagnostics_cosines_and_negative_count() -> None:
    model, (theta,), adapted = _reptile_setup(11)
    deltas = [[t - ti for t, ti in zip(theta, task)] for task in adapted]
    deltas.append([-d for d in deltas[0]])
    aggregator = GradientAgreementAggregator(model.parameters(), track_cosines=True)
    weights = aggregator.step(deltas)
    diagnostics = aggregator.last_diagnostics
    assert diagnostics is not None and diagnostics.cosines is not None
    flat = torch.stack([torch.cat([t.reshape(-1) for t in d]) for d in deltas])
    mean = flat.mean(0)
    expected = flat @ mean / (flat.norm(dim=1) * mean.norm())
    torch.testing.assert_close(diagnostics.cosines, expected)
    assert diagnostics.num_negative == int((expected < 0).sum()) == int((weights < 0).sum())
    untracked = GradientAgreementAggregator(model.parameters())
    untracked.aggregate(deltas)
    assert untracked.last_diagnostics is not None and untracked.last_diagnostics.cosines is None


def _train(aggregator: GradientAgreementAggregator, model: torch.nn.Module, steps: range) -> None:
    for step in steps:
        gen = torch.Generator().manual_seed(step)
        deltas = [
            [
                torch.randn(p.shape, generator=gen, dtype=p.dtype) + 0.1 * p.detach()
                for p in model.parameters()
            ]
            for _ in range(4)
        ]
        model.zero_grad()  # as every training loop does: step() adds to .grad
        aggregator.step(deltas)


def test_state_dict_resume_continues_identically() -> None:
    def build() -> tuple[torch.nn.Module, GradientAgreementAggregator]:
        torch.manual_seed(12)
        model = torch.nn.Linear(3, 2).double()
        outer = torch.optim.Adam(model.parameters(), lr=0.05)
        return model, GradientAgreementAggregator(model.parameters(), outer)

    model, aggregator = build()
    _train(aggregator, model, range(0, 3))
    checkpoint = {
        "model": copy.deepcopy(model.state_dict()),
        "agg": copy.deepcopy(aggregator.state_dict()),
    }
    _train(aggregator, model, range(3, 6))

    resumed_model, resumed = build()
    resumed_model.load_state_dict(checkpoint["model"])
    resumed.load_state_dict(checkpoint["agg"])
    assert resumed.num_steps == 3
    _train(resumed, resumed_model, range(3, 6))
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)
    assert resumed.num_steps == aggregator.num_steps == 6
    # Without the optimizer state (Adam's moments), the run would have diverged:
    fresh_model, fresh = build()
    fresh_model.load_state_dict(checkpoint["model"])
    _train(fresh, fresh_model, range(3, 6))
    assert not torch.equal(next(fresh_model.parameters()), next(model.parameters()))


def test_load_state_dict_errors() -> None:
    model = torch.nn.Linear(2, 1)
    with_opt = GradientAgreementAggregator(
        model.parameters(), torch.optim.SGD(model.parameters(), lr=1)
    )
    without = GradientAgreementAggregator(model.parameters())
    with pytest.raises(TypeError, match=r"`state_dict` should be a dict\. Found `list`"):
        with_opt.load_state_dict([])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"missing the keys \['last_weights', 'num_steps'\]"):
        with_opt.load_state_dict({"optimizer": None})
    with pytest.raises(
        ValueError, match=r"`state_dict\['optimizer'\]` is None but this aggregator has one"
    ):
        with_opt.load_state_dict(without.state_dict())
    with pytest.raises(
        ValueError, match=r"is an optimizer state but this aggregator has no optimizer"
    ):
        without.load_state_dict(with_opt.state_dict())


def test_weights_method_and_repr() -> None:
    model, (theta,), adapted = _reptile_setup(13)
    deltas = [[t - ti for t, ti in zip(theta, task)] for task in adapted]
    aggregator = GradientAgreementAggregator(model.parameters(), weighting=Agreement())
    torch.testing.assert_close(aggregator.weights(deltas), reference_agreement_weights(deltas))
    assert aggregator.last_weights is None  # weights() records nothing
    assert (
        repr(aggregator)
        == "GradientAgreementAggregator(weighting=Agreement(), optimizer=None, params=4)"
    )
