"""Weightings: Mean, Agreement, NonNegativeAgreement, and a custom one via ga_optim.testing."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given

from ga_optim import Agreement, Mean, NonNegativeAgreement, Weighting
from ga_optim.testing import (
    assert_identical_tasks_uniform,
    assert_weighting_invariants,
    reference_agreement_weights,
    reference_gramian,
    task_batches,
)


@given(task_batches())
def test_mean_is_uniform_and_satisfies_the_invariants(batch: list[list[torch.Tensor]]) -> None:
    weights = Mean().weights(batch)
    assert weights.tolist() == [1.0 / len(batch)] * len(batch)
    assert_weighting_invariants(Mean(), batch, signed=False)


def test_mean_from_gramian() -> None:
    assert Mean().weights(gramian=torch.eye(4)).tolist() == [0.25] * 4


@given(task_batches())
def test_agreement_from_gramian_equals_from_vectors(batch: list[list[torch.Tensor]]) -> None:
    # The Gramian of vectors near 1e-200 underflows float64; the weights are scale-free,
    # so compare against the Gramian of the vectors brought to unit magnitude.
    largest = max(float(t.abs().max()) for task in batch for t in task) or 1.0
    unit = [[t / largest for t in task] for task in batch]
    from_vectors = Agreement().weights(batch)
    from_gramian = Agreement().weights(gramian=reference_gramian(unit))
    torch.testing.assert_close(from_vectors, from_gramian, atol=1e-9, rtol=0)


@given(task_batches())
def test_non_negative_matches_clamped_formula(batch: list[list[torch.Tensor]]) -> None:
    weights = NonNegativeAgreement().weights(batch)
    signed = reference_agreement_weights(batch)
    positive = signed.clamp(min=0)
    expected = (
        positive / positive.sum() if positive.sum() > 0 else torch.full_like(signed, 1 / len(batch))
    )
    torch.testing.assert_close(weights, expected, atol=1e-9, rtol=0)
    assert_weighting_invariants(NonNegativeAgreement(), batch, signed=False)


def test_non_negative_golden() -> None:
    # G·1 = (4, 5, -4) as in the golden Agreement case → (4/9, 5/9, 0).
    g = torch.tensor([[1.0, 2.0], [3.0, -1.0], [-2.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(
        NonNegativeAgreement().weights(g), torch.tensor([4 / 9, 5 / 9, 0.0], dtype=torch.float64)
    )


def test_weighting_is_callable_and_repr() -> None:
    g = torch.tensor([[1.0, 0.0], [1.0, 1.0], [-1.0, 0.0]])
    assert Agreement()(g).tolist() == pytest.approx([0.25, 0.5, -0.25])
    assert repr(NonNegativeAgreement()) == "NonNegativeAgreement()"


class SoftmaxAgreement(Weighting):
    """A custom weighting, as a user would write one: softmax of the agreement scores.

    Only ``from_gramian`` is implemented; vectors go through the default Gramian path.
    """

    def __init__(self, temperature: float = 1.0) -> None:
        self.temperature = temperature

    def from_gramian(self, gramian: torch.Tensor) -> torch.Tensor:
        scores = gramian.sum(dim=1)
        scale = scores.abs().max()
        if scale == 0:
            return torch.full_like(scores, 1.0 / scores.numel())
        return torch.softmax(scores / (scale * self.temperature), dim=0)


@given(task_batches(dtype=torch.float32))
def test_custom_weighting_with_the_testing_helpers(batch: list[list[torch.Tensor]]) -> None:
    # float32 vectors: their float64 Gramian (the default path) neither under- nor overflows.
    weighting = SoftmaxAgreement()
    assert_weighting_invariants(weighting, batch, signed=False, aligned=False)
    weights = weighting.weights(batch)
    assert weights.dtype == torch.float32
    expected = SoftmaxAgreement().from_gramian(reference_gramian(batch))
    torch.testing.assert_close(weights.double(), expected, atol=1e-6, rtol=0)


def test_custom_weighting_identical_tasks() -> None:
    assert_identical_tasks_uniform(SoftmaxAgreement(), [torch.ones(3), torch.ones(2, 2)], 5)


def test_custom_weighting_rejects_non_finite() -> None:
    with pytest.raises(ValueError, match=r"`task_vectors\[1\]\[0\]` should be finite"):
        SoftmaxAgreement().weights([[torch.ones(2)], [torch.tensor([float("inf"), 0.0])]])
