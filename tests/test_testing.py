"""ga_optim.testing: the strategies draw what they promise, and the assertions can fail."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given

from ga_optim import Agreement, Weighting
from ga_optim.testing import (
    PATTERNS,
    assert_identical_tasks_uniform,
    assert_normalized,
    assert_permutation_equivariant,
    assert_scale_invariant,
    assert_update_aligned_with_mean,
    condition_number,
    reference_agreement_weights,
    task_batches,
)


@given(task_batches(min_tasks=2, max_tasks=5, max_params=2, max_side=3, dtype=torch.float32))
def test_batches_have_consistent_shapes(batch: list[list[torch.Tensor]]) -> None:
    assert 2 <= len(batch) <= 5
    assert 1 <= len(batch[0]) <= 2
    for task in batch:
        assert [t.shape for t in task] == [t.shape for t in batch[0]]
        assert all(t.dtype == torch.float32 for t in task)
        assert all(max(t.shape, default=1) <= 3 for t in task)


@given(task_batches(patterns=("identical",)))
def test_identical_pattern(batch: list[list[torch.Tensor]]) -> None:
    assert all(torch.equal(a, b) for task in batch for a, b in zip(task, batch[0]))


@given(task_batches(patterns=("zeros",)))
def test_zeros_pattern(batch: list[list[torch.Tensor]]) -> None:
    assert all(not t.any() for task in batch for t in task)


def test_unknown_pattern_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"unknown entries \['bogus'\]"):
        task_batches(patterns=("bogus",))
    with pytest.raises(ValueError, match=r"No batch fits min_tasks=3, max_tasks=2"):
        task_batches(min_tasks=3, max_tasks=2)
    assert "random" in PATTERNS


def test_reference_golden() -> None:
    g = torch.tensor([[1.0, 2.0], [3.0, -1.0], [-2.0, 0.0]])
    assert reference_agreement_weights(g).tolist() == pytest.approx([4 / 13, 5 / 13, -4 / 13])
    assert condition_number(torch.tensor([[1.0], [-1.0]])) == float("inf")
    assert condition_number(torch.tensor([[1.0], [1.0]])) == pytest.approx(1.0)


class _Broken(Weighting):
    """Weightings that each break one invariant, to show the assertions catch it."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def from_gramian(self, gramian: torch.Tensor) -> torch.Tensor:
        scores = gramian.sum(dim=1)
        n = scores.numel()
        if self.mode == "unnormalized":
            return scores
        if self.mode == "by-index":
            return torch.arange(1, n + 1, dtype=scores.dtype) / (n * (n + 1) / 2)
        if self.mode == "scale-dependent":
            w = torch.softmax(scores, dim=0)
            return w
        if self.mode == "negated":
            return -scores / scores.abs().sum()
        raise AssertionError(self.mode)


BATCH = [[torch.tensor([1.0, 2.0])], [torch.tensor([3.0, -1.0])], [torch.tensor([-2.0, 0.5])]]


def test_assertions_catch_broken_weightings() -> None:
    with pytest.raises(AssertionError, match=r"Σ\|w\| = .*expected 1"):
        assert_normalized(_Broken("unnormalized"), BATCH)
    with pytest.raises(AssertionError, match="permuted weights differ"):
        assert_permutation_equivariant(_Broken("by-index"), BATCH, [2, 1, 0])
    with pytest.raises(AssertionError, match="under a scale of"):
        assert_scale_invariant(_Broken("scale-dependent"), BATCH, 3.0)
    with pytest.raises(AssertionError, match="opposes the mean"):
        assert_update_aligned_with_mean(_Broken("negated"), BATCH)
    with pytest.raises(AssertionError, match="identical tasks"):
        assert_identical_tasks_uniform(_Broken("by-index"), [torch.ones(2)], 3)
    with pytest.raises(AssertionError, match="negative weights"):
        assert_normalized(Agreement(), BATCH, signed=False)


def test_assertions_pass_for_agreement_on_the_same_batch() -> None:
    assert_normalized(Agreement(), BATCH)
    assert_permutation_equivariant(Agreement(), BATCH, [2, 1, 0])
    assert_scale_invariant(Agreement(), BATCH, 3.0)
    assert_update_aligned_with_mean(Agreement(), BATCH)
    assert_identical_tasks_uniform(Agreement(), [torch.ones(2)], 3)


def test_helper_argument_errors() -> None:
    with pytest.raises(ValueError, match=r"`scale` should be positive\. Found -1\.0"):
        assert_scale_invariant(Agreement(), BATCH, -1.0)
    with pytest.raises(ValueError, match=r"takes some entries out of their dtype's normal range"):
        assert_scale_invariant(Agreement(), [[torch.tensor([1e-30])], [torch.tensor([1.0])]], 1e-10)
    with pytest.raises(ValueError, match=r"`permutation` should reorder range\(3\)"):
        assert_permutation_equivariant(Agreement(), BATCH, [0, 0, 1])
