"""agreement_weights: the paper's Eq. (13) against hand-computed and float64 references."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given

from ga_optim import Agreement, TaskStack, agreement_weights
from ga_optim.testing import (
    assert_weighting_invariants,
    condition_number,
    reference_agreement_weights,
    reference_gramian,
    task_batches,
)


def test_golden_three_tasks_by_hand() -> None:
    # g1 = (1, 2), g2 = (3, -1), g3 = (-2, 0); s = (2, 1)
    # G·1 = (g1·s, g2·s, g3·s) = (4, 5, -4); Σ|.| = 13
    g = [
        [torch.tensor([1.0, 2.0])],
        [torch.tensor([3.0, -1.0])],
        [torch.tensor([-2.0, 0.0])],
    ]
    weights = agreement_weights(g)
    assert weights.tolist() == pytest.approx([4 / 13, 5 / 13, -4 / 13], abs=1e-7)


def test_golden_two_parameters_by_hand() -> None:
    # Two tasks, two parameters: g1 = ([1], [[1, 0]]), g2 = ([2], [[0, -1]]), s = ([3], [[1, -1]])
    # r1 = 1·3 + 1 = 4, r2 = 2·3 + 1 = 7 → w = (4/11, 7/11)
    g = [
        [torch.tensor([1.0]), torch.tensor([[1.0, 0.0]])],
        [torch.tensor([2.0]), torch.tensor([[0.0, -1.0]])],
    ]
    assert agreement_weights(g).tolist() == pytest.approx([4 / 11, 7 / 11], abs=1e-7)


def test_stacked_tensor_matches_nested_lists() -> None:
    torch.manual_seed(0)
    stacked = torch.randn(5, 3, 2, dtype=torch.float64)
    nested = [[row] for row in stacked]
    torch.testing.assert_close(agreement_weights(stacked), agreement_weights(nested))
    torch.testing.assert_close(agreement_weights(stacked), reference_agreement_weights(stacked))


def test_gramian_keyword_matches_vectors() -> None:
    torch.manual_seed(1)
    g = torch.randn(6, 10, dtype=torch.float64)
    torch.testing.assert_close(agreement_weights(gramian=g @ g.T), agreement_weights(g))


def test_one_task_gets_weight_one() -> None:
    assert agreement_weights(torch.randn(1, 7)).tolist() == [1.0]
    assert agreement_weights(torch.zeros(1, 7)).tolist() == [1.0]


@pytest.mark.parametrize(
    "vectors",
    [
        torch.zeros(4, 3),  # all zero
        torch.tensor([[1.0, 2.0], [-1.0, -2.0]]),  # mean update exactly zero
        torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 0.0]]),
    ],
    ids=["zeros", "opposite-pair", "opposite-and-zero"],
)
def test_degenerate_batches_give_uniform_weights(vectors: torch.Tensor) -> None:
    weights = agreement_weights(vectors)
    n = vectors.shape[0]
    assert weights.tolist() == pytest.approx([1.0 / n] * n)


def test_degenerate_batches_do_not_warn(recwarn: pytest.WarningsRecorder) -> None:
    for _ in range(50):
        agreement_weights(torch.zeros(8, 100))
    assert len(recwarn) == 0


def test_none_counts_as_zeros() -> None:
    torch.manual_seed(2)
    a, b = torch.randn(3, dtype=torch.float64), torch.randn(2, dtype=torch.float64)
    with_none = [[a, b], [None, -b], [2 * a, None]]
    dense = [
        [a, b],
        [torch.zeros(3, dtype=torch.float64), -b],
        [2 * a, torch.zeros(2, dtype=torch.float64)],
    ]
    torch.testing.assert_close(agreement_weights(with_none), reference_agreement_weights(dense))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_dots_beyond_fp16_range(dtype: torch.dtype) -> None:
    # Entries of 200 give dots of 200²·P = 4e6 ≫ 65504 (fp16's max): accumulation must be fp32.
    torch.manual_seed(3)
    signs = torch.randint(0, 2, (4, 100)).float() * 2 - 1
    vectors = (signs * 200).to(dtype)
    weights = agreement_weights(vectors)
    assert weights.dtype == torch.float32
    expected = reference_agreement_weights(vectors.double())
    torch.testing.assert_close(weights.double(), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("scale", [1e-25, 1e-15, 1.0, 1e15, 1e25])
def test_float32_extreme_scales_match_float64_reference(scale: float) -> None:
    # 1e25 overflows float32 dots (1e50) and 1e-25 underflows them (1e-50): both take the
    # rescaled float64 path and must still give the right weights.
    torch.manual_seed(4)
    base = torch.randn(5, 40, dtype=torch.float64)
    vectors = (base * scale).float()
    weights = agreement_weights(vectors)
    assert weights.dtype == torch.float32
    torch.testing.assert_close(
        weights.double(), reference_agreement_weights(base), atol=2e-5, rtol=0
    )


def test_float64_huge_scale() -> None:
    torch.manual_seed(5)
    base = torch.randn(4, 6, dtype=torch.float64)
    torch.testing.assert_close(agreement_weights(base * 1e200), reference_agreement_weights(base))


@pytest.mark.parametrize("exponent", [-530, -500, -430, -200, -64, 0, 64, 250, 500, 511])
def test_weights_do_not_depend_on_the_magnitude(exponent: int) -> None:
    """Tasks ``[3, 1]·2**e`` weigh ``[3/4, 1/4]`` exactly, for scores ``12·2**2e`` anywhere
    in float64's range: below tiny/eps (rescaled), tiny but normal (normalized by a large
    power of two: torch 2.1's ``ldexp`` overflowed there and gave NaN), and near overflow."""
    batch = [[torch.tensor([math.ldexp(c, exponent)], dtype=torch.float64)] for c in (3.0, 1.0)]
    assert agreement_weights(batch).tolist() == [0.75, 0.25]


@given(task_batches())
@example([[torch.tensor([1.0, 0.0], dtype=torch.float64)]] * 3)
@example([[torch.zeros(2, dtype=torch.float64)]] * 2)
# torch 2.1 gave NaN here (its ldexp raised 2 to an integer exponent in float32)
@example([[torch.tensor(1.6604e-127, dtype=torch.float64)]] * 2)
def test_matches_float64_gram_formula(batch: list[list[torch.Tensor]]) -> None:
    weights = agreement_weights(batch)
    expected = reference_agreement_weights(batch)
    kappa = condition_number(batch)
    tol = 64 * len(batch) * torch.finfo(torch.float64).eps * min(kappa, 1e300)
    if math.isinf(kappa):  # the scores cancel exactly: uniform by definition
        assert weights.tolist() == pytest.approx(expected.tolist())
    else:
        assert float((weights - expected).abs().max()) <= tol


@given(task_batches(dtype=torch.float32))
def test_float32_matches_float64_gram_formula(batch: list[list[torch.Tensor]]) -> None:
    weights = agreement_weights(batch)
    assert weights.dtype == torch.float32
    expected = reference_agreement_weights(batch)
    kappa = condition_number(batch)
    if math.isinf(kappa):
        assert weights.tolist() == pytest.approx(expected.tolist())
    else:
        tol = 64 * len(batch) * torch.finfo(torch.float32).eps * kappa
        assert float((weights.double() - expected).abs().max()) <= tol


@given(task_batches())
def test_invariants(batch: list[list[torch.Tensor]]) -> None:
    assert_weighting_invariants(Agreement(), batch)


@given(task_batches())
def test_every_input_form_gives_the_same_weights(batch: list[list[torch.Tensor]]) -> None:
    """Per-task lists, one stacked tensor per parameter and one flat [N, P] matrix are
    packed into the same task matrix: bitwise the same weights."""
    from_lists = agreement_weights(batch)
    columns = [torch.stack([task[p] for task in batch]) for p in range(len(batch[0]))]
    from_stack = agreement_weights(TaskStack(columns))
    dtype = from_lists.dtype if from_lists.dtype == torch.float64 else columns[0].dtype
    if all(c.dtype == dtype for c in columns):
        flat = torch.cat([c.reshape(len(batch), -1) for c in columns], dim=1)
        assert torch.equal(agreement_weights(flat), from_lists)
    assert torch.equal(from_stack, from_lists)


@given(task_batches(min_tasks=2))
def test_weights_are_proportional_to_dot_with_mean(batch: list[list[torch.Tensor]]) -> None:
    # w_i ∝ g_i·ḡ with a positive factor (N / Σ|G·1|), whenever G·1 ≠ 0.
    gram = reference_gramian(batch)
    scores = gram.sum(dim=1)
    weights = agreement_weights(batch)
    if scores.abs().sum() > 0 and not math.isinf(condition_number(batch)):
        big = scores.abs() > 1e-6 * scores.abs().max()
        assert torch.equal(torch.sign(weights[big]), torch.sign(scores[big]))
