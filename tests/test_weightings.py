"""Weightings: Mean, Agreement, NonNegativeAgreement, and a custom one via ga_optim.testing."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from hypothesis import assume, example, given
from hypothesis import strategies as st

from ga_optim import (
    Agreement,
    CosineAgreement,
    GeometricMedian,
    LeaveOneOutAgreement,
    Mean,
    NonNegativeAgreement,
    Weighting,
)
from ga_optim.testing import (
    assert_identical_tasks_uniform,
    assert_weighting_invariants,
    condition_number,
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
@example([[torch.tensor([1e-6, 7.5e-7], dtype=torch.float64)], [-torch.tensor([1e-6, 7.5e-7], dtype=torch.float64) * (1 + 2**-52)]])  # fmt: skip
def test_agreement_from_gramian_equals_from_vectors(batch: list[list[torch.Tensor]]) -> None:
    # The Gramian of vectors near 1e-200 underflows float64; the weights are scale-free,
    # so compare against the Gramian of the vectors brought to unit magnitude.
    largest = max(float(t.abs().max()) for task in batch for t in task) or 1.0
    unit = [[t / largest for t in task] for task in batch]
    from_vectors = Agreement().weights(batch)
    from_gramian = Agreement().weights(gramian=reference_gramian(unit))
    # Both routes are exact to about κ·N·eps (κ counts the cancellation in Σ g_j; the
    # Gramian's rounded entries cannot resolve a sum that cancels to 1e-16 of its terms:
    # the example, found by the stress profile, has κ ≈ 8e15).
    kappa = condition_number(batch)
    tol = 16 * len(batch) * torch.finfo(torch.float64).eps * kappa
    if tol < 0.5:
        torch.testing.assert_close(from_vectors, from_gramian, atol=max(tol, 1e-9), rtol=0)
    for weights in (from_vectors, from_gramian):  # whatever κ, both are normalised
        assert abs(float(weights.abs().sum()) - 1.0) < 1e-12


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


def _unit_rows(batch: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
    out = []
    for task in batch:
        largest = max(float(t.abs().max()) for t in task) or 1.0
        task = [t.double() / largest for t in task]  # so the squares cannot underflow
        norm = torch.sqrt(sum((t**2).sum() for t in task))
        out.append([t.double() / norm if norm > 0 else t.double() * 0 for t in task])
    return out


@given(task_batches(scales=(1e-3, 1.0, 1e3)))
@example([[torch.tensor([1e-3, 0.0], dtype=torch.float64)], [torch.tensor([-1e-3, 1.1025e-12], dtype=torch.float64)]])  # fmt: skip
@example([[torch.tensor([1e-3, 0.0], dtype=torch.float64)], [torch.tensor([-2.5e-4, 3.9063e-06], dtype=torch.float64)]])  # fmt: skip
@example([[torch.tensor(2.4841e-206, dtype=torch.float64), torch.tensor(-4.1733e-201, dtype=torch.float64)], [torch.tensor(0.0, dtype=torch.float64), torch.tensor(1e-3, dtype=torch.float64)]])  # fmt: skip
def test_cosine_matches_normalized_reference(batch: list[list[torch.Tensor]]) -> None:
    weights = CosineAgreement().weights(batch)
    unit_rows = _unit_rows(batch)
    expected = reference_agreement_weights(unit_rows)
    unit_sum = torch.stack([torch.cat([t.reshape(-1) for t in task]) for task in unit_rows]).sum(0)
    noise_floor = 4 * len(batch) ** 2 * torch.finfo(torch.float64).eps
    largest = max(float(t.abs().max()) for task in batch for t in task) or 1.0
    unit = [[t / largest for t in task] for task in batch]  # so float64's Gramian cannot underflow
    gram = reference_gramian(unit)
    from_gramian = CosineAgreement().weights(gramian=gram)
    nonzero = torch.tensor([any(bool(t.any()) for t in task) for task in batch])
    # A Gramian cannot hold a task whose squared norm underflows beside the largest one's.
    gram_ok = bool((gram.diagonal()[nonzero] > 1e-290).all())
    uniform = torch.full_like(weights, 1 / len(batch))
    # The directions' scores are determined to about κ·N·eps (κ of the unit vectors: it
    # counts the cancellation in Σ ĝ). Compare values only where Σ ĝ also stands clear of
    # each path's rounding noise: ~N·eps for the vectors, ~N·sqrt(eps) for the Gramian (its
    # squared norm sums N² rounded entries).
    kappa = condition_number(unit_rows)
    tol = 64 * len(batch) * torch.finfo(torch.float64).eps * min(kappa, 1e300)
    if float(unit_sum.norm()) > 1e3 * noise_floor:
        assert float((weights - expected).abs().max()) <= max(tol, 1e-9)
    if gram_ok and float(unit_sum.norm()) ** 2 > 1e3 * noise_floor and tol < 1e-9:
        torch.testing.assert_close(from_gramian, expected, atol=1e-6, rtol=0)
    if float(unit_sum.norm()) == 0.0:  # the directions cancel exactly: uniform
        torch.testing.assert_close(weights, uniform)
        if gram_ok:
            torch.testing.assert_close(from_gramian, uniform)
    assert_weighting_invariants(CosineAgreement(), batch, aligned=False)


def test_cosine_ignores_each_tasks_own_scale() -> None:
    # The paper's weights favour a task whose update is 100× larger; cosine weights do not.
    torch.manual_seed(40)
    base = torch.randn(4, 6, dtype=torch.float64) + 1.0
    scaled = base.clone()
    scaled[0] *= 100.0
    torch.testing.assert_close(CosineAgreement().weights(scaled), CosineAgreement().weights(base))
    assert Agreement().weights(scaled)[0] > 0.9 > Agreement().weights(base)[0]


def test_cosine_golden_and_zero_vector() -> None:
    # Unit vectors (1,0), (0,1), (-1,0): sum (0,1) → scores (0, 1, 0) → w = (0, 1, 0).
    g = torch.tensor([[3.0, 0.0], [0.0, 0.5], [-2.0, 0.0]], dtype=torch.float64)
    assert CosineAgreement().weights(g).tolist() == pytest.approx([0.0, 1.0, 0.0])
    # A zero task is a zero direction: weight 0 (unit vectors (1,0),(1,0) give 1/2 each).
    g0 = torch.tensor([[2.0, 0.0], [0.0, 0.0], [5.0, 0.0]], dtype=torch.float64)
    assert CosineAgreement().weights(g0).tolist() == pytest.approx([0.5, 0.0, 0.5])


@st.composite
def nearly_cancelling(draw: st.DrawFn) -> list[list[torch.Tensor]]:
    """A task g, its near-opposite −(1 + δ)·g (δ from 1e-12 to 1e-2), and 0–3 others
    small beside them: Σ g_j nearly cancels, the case where the two paths part ways."""
    side = draw(st.integers(1, 4))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    g = torch.randn(side, generator=gen, dtype=torch.float64) + 0.1
    delta = 10.0 ** draw(st.floats(-12, -2))
    others = draw(st.integers(0, 3))
    noise = 10.0 ** draw(st.floats(-8, -2))
    tasks = [[g], [-(1 + delta) * g]]
    tasks += [
        [noise * torch.randn(side, generator=gen, dtype=torch.float64)] for _ in range(others)
    ]
    return tasks


def _directions(batch: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
    return _unit_rows(batch)


@pytest.mark.parametrize(
    "weighting",
    [Mean(), Agreement(), NonNegativeAgreement(), CosineAgreement(), SoftmaxAgreement()],
    ids=["mean", "agreement", "nonnegative", "cosine", "custom-gramian"],
)
@given(st.one_of(task_batches(scales=(1e-3, 1.0, 1e3)), nearly_cancelling()))
def test_vector_and_gramian_paths_agree(
    weighting: Weighting, batch: list[list[torch.Tensor]]
) -> None:
    """Every weighting gives the same weights from the vectors and from their Gramian, to
    what floating point determines: κ·N·eps, with κ counting the cancellation in Σ g_j
    (and, for the scale-free cosine, in Σ ĝ_j). Where κ leaves nothing determined, both
    are still normalised."""
    largest = max(float(t.abs().max()) for task in batch for t in task) or 1.0
    # The built-in weightings are scale-free: compare with the Gramian of the vectors at
    # unit magnitude, which cannot underflow. A Gramian-only weighting need not be: its
    # contract is from_gramian of the vectors' own float64 Gramian.
    unit = (
        batch if weighting.needs == "gramian" else [[t / largest for t in task] for task in batch]
    )
    from_vectors = weighting.weights(batch)
    from_gramian = weighting.weights(gramian=reference_gramian(unit))
    n = len(batch)
    kappa = condition_number(batch)
    if isinstance(weighting, CosineAgreement):
        kappa = max(kappa, condition_number(_directions(batch)))
        unit_sum = torch.stack(
            [torch.cat([t.reshape(-1) for t in task]) for task in _directions(batch)]
        ).sum(0)
        if float(unit_sum.norm()) ** 2 < 1e3 * 4 * n * n * torch.finfo(torch.float64).eps:
            kappa = math.inf  # within reach of the shared cancellation threshold
        gram = reference_gramian(unit)
        nonzero = torch.tensor([any(bool(t.any()) for t in task) for task in batch])
        if not bool((gram.diagonal()[nonzero] > 1e-290).all()):
            kappa = math.inf  # a tiny task's direction is lost in any float64 Gramian
    tol = 64 * n * torch.finfo(torch.float64).eps * kappa
    if tol < 0.1:
        torch.testing.assert_close(from_vectors, from_gramian, atol=max(tol, 1e-12), rtol=0)
    for weights in (from_vectors, from_gramian):
        assert torch.isfinite(weights).all()
        total = weights.abs().sum() if isinstance(weighting, Agreement) else weights.sum()
        assert abs(float(total) - 1.0) < 1e-9, weights


def test_cosine_paths_share_the_cancellation_threshold() -> None:
    """Three directions that cancel to ~5e-9 (‖Σĝ‖² ≈ 2.5e-17, below 4·N²·eps): both paths
    give uniform weights. (The vector path used to compare ‖Σĝ‖ with that bound instead,
    and gave signed weights here.) Clear of it (‖Σĝ‖ ≈ 5e-4) both give the same signed
    weights."""
    s = math.sqrt(3) / 2
    for e, uniform in ((1e-8, True), (1e-3, False)):
        g = torch.tensor([[1.0, 0.0], [-0.5, s], [-0.5, -s + e]], dtype=torch.float64)
        from_vectors = CosineAgreement().weights(g)
        from_gramian = CosineAgreement().weights(gramian=g @ g.T)
        if uniform:
            expected = torch.full((3,), 1 / 3, dtype=torch.float64)
            torch.testing.assert_close(from_vectors, expected, rtol=0, atol=0)
            torch.testing.assert_close(from_gramian, expected, rtol=0, atol=0)
        else:
            torch.testing.assert_close(from_vectors, from_gramian, rtol=0, atol=1e-9)
            assert float(from_vectors[0]) < -0.49 and float(from_vectors[1]) > 0.49


# -- LeaveOneOutAgreement -----------------------------------------------------------------


def _dense(batch: list[list[torch.Tensor]]) -> torch.Tensor:
    """The batch as one float64 matrix at unit magnitude (the weights are scale-free)."""
    matrix = torch.stack([torch.cat([t.reshape(-1).double() for t in task]) for task in batch])
    largest = matrix.abs().max()
    return matrix / largest if largest > 0 else matrix


def _leave_one_out_reference(matrix: torch.Tensor, non_negative: bool) -> torch.Tensor:
    """By hand: r_i = Σ_{j≠i} g_i·g_j from a double loop over pairs."""
    n = matrix.shape[0]
    scores = torch.tensor(
        [sum(float(matrix[i] @ matrix[j]) for j in range(n) if j != i) for i in range(n)],
        dtype=torch.float64,
    )
    if non_negative:
        scores = scores.clamp(min=0)
    total = scores.abs().sum()
    return scores / total if total > 0 else torch.full((n,), 1.0 / n, dtype=torch.float64)


def _leave_one_out_kappa(matrix: torch.Tensor, non_negative: bool) -> float:
    """(Σ‖g_i‖)² / Σ_i |g_i·Σ_{j≠i} g_j|: what rounding does to the self-excluded scores
    (the clamped form: over the positive scores; a score at zero may round either way)."""
    gram = matrix @ matrix.T
    scores = gram.sum(1) - gram.diagonal()
    denominator = float((scores.clamp(min=0) if non_negative else scores.abs()).sum())
    mass = float(matrix.norm(dim=1).sum())
    return 1.0 if mass == 0 else (mass * mass / denominator if denominator > 0 else math.inf)


@pytest.mark.parametrize("non_negative", [False, True], ids=["signed", "non-negative"])
@given(task_batches())
def test_leave_one_out_matches_the_pairwise_sum(
    non_negative: bool, batch: list[list[torch.Tensor]]
) -> None:
    weighting = LeaveOneOutAgreement(non_negative=non_negative)
    matrix = _dense(batch)
    expected = _leave_one_out_reference(matrix, non_negative)
    from_vectors = weighting.weights(batch)
    from_gramian = weighting.weights(gramian=matrix @ matrix.T)
    n, p = matrix.shape
    kappa = _leave_one_out_kappa(matrix, non_negative)
    tol = 16 * (n + p) * torch.finfo(torch.float64).eps * kappa
    if tol < 0.1:
        for weights in (from_vectors, from_gramian):
            torch.testing.assert_close(weights, expected, atol=max(tol, 1e-13), rtol=0)
    for weights in (from_vectors, from_gramian):
        assert abs(float(weights.abs().sum()) - 1.0) < 1e-12
        if non_negative:
            assert bool((weights >= 0).all())
    assert_weighting_invariants(weighting, batch, signed=not non_negative, aligned=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_leave_one_out_low_precision_against_float64(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    vectors = (torch.randn(6, 40, generator=gen) + 0.5).to(dtype)
    weights = LeaveOneOutAgreement()(vectors)
    assert weights.dtype == torch.float32
    expected = _leave_one_out_reference(vectors.double(), False)
    torch.testing.assert_close(weights.double(), expected, atol=1e-6, rtol=0)


def test_leave_one_out_ignores_a_large_orthogonal_task() -> None:
    """The issue's case: seven agreeing tasks and one orthogonal task a thousand times
    larger. The paper's score gives it more than 90 % of the weight; without the self term
    it gets none, and the seven split the weight by how much the others pull their way."""
    gen = torch.Generator().manual_seed(1)
    agreeing = torch.zeros(8, 12, dtype=torch.float64)
    agreeing[:7, :6] = 1.0 + 0.3 * torch.randn(7, 6, generator=gen, dtype=torch.float64)
    agreeing[7, 6:] = torch.randn(6, generator=gen, dtype=torch.float64)
    agreeing[7] *= 1000 * agreeing[0].norm() / agreeing[7].norm()
    assert float(Agreement()(agreeing)[7]) > 0.9
    for non_negative in (False, True):
        weights = LeaveOneOutAgreement(non_negative=non_negative)(agreeing)
        assert float(weights[7]) == 0.0
        expected = _leave_one_out_reference(agreeing, non_negative)
        torch.testing.assert_close(weights, expected, atol=1e-14, rtol=0)
        assert bool((weights[:7] > 0).all())


def test_leave_one_out_golden_and_degenerate() -> None:
    g = torch.tensor([[1.0, 0.0], [1.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    # r = G·1 − diag G = [1 + 1 − 1 − 1, 1 − 1 + 0, −1 − 1 + 0]... by hand:
    # g0·(g1 + g2) = 1 − 1 = 0; g1·(g0 + g2) = 1 − 1 = 0; g2·(g0 + g1) = −1 − 1 = −2.
    torch.testing.assert_close(
        LeaveOneOutAgreement()(g), torch.tensor([0.0, 0.0, -1.0], dtype=torch.float64)
    )
    # no positive score: uniform
    torch.testing.assert_close(
        LeaveOneOutAgreement(non_negative=True)(g), torch.full((3,), 1 / 3, dtype=torch.float64)
    )
    one = LeaveOneOutAgreement()(torch.tensor([[3.0, 4.0]]))
    assert one.tolist() == [1.0]
    orthogonal = LeaveOneOutAgreement()(torch.eye(3))
    assert orthogonal.tolist() == pytest.approx([1 / 3] * 3)
    assert repr(LeaveOneOutAgreement(non_negative=True)) == (
        "LeaveOneOutAgreement(non_negative=True)"
    )
    with pytest.raises(TypeError, match=r"`non_negative` should be a bool\. Found 1"):
        LeaveOneOutAgreement(non_negative=1)  # type: ignore[arg-type]


def test_leave_one_out_float64_range() -> None:
    """Vectors near 1e-200 or 1e200 (their products under- or overflow float64) get the
    weights of the same vectors at unit scale: the scores are taken on the matrix scaled
    by a power of two."""
    g = torch.tensor([[1.0, 0.5], [0.8, -0.2], [-0.1, 1.0]], dtype=torch.float64)
    expected = _leave_one_out_reference(g, False)
    for scale in (1e-200, 1e200):
        torch.testing.assert_close(LeaveOneOutAgreement()(g * scale), expected, atol=1e-15, rtol=0)


# -- GeometricMedian ----------------------------------------------------------------------


def _objective(matrix: torch.Tensor, point: torch.Tensor) -> float:
    return float((matrix - point).norm(dim=1).sum())


def _weiszfeld_reference(matrix: torch.Tensor, smoothing: float = 1e-6) -> torch.Tensor:
    """The smoothed Weiszfeld iteration on the vectors themselves (distances taken from the
    differences, not from a Gramian), run far past convergence."""
    nu = smoothing * float(matrix.norm(dim=1).pow(2).mean().sqrt())
    point = matrix.mean(0)
    if nu == 0:  # all-zero vectors
        return point
    for _ in range(20_000):
        inverse = 1.0 / (matrix - point).norm(dim=1).clamp(min=nu)
        new = (inverse / inverse.sum()) @ matrix
        if torch.equal(new, point):
            break
        point = new
    return point


#: Found by the stress profile, each: Weiszfeld's iteration crawled (not converged after
#: 1 000 steps), or an accelerated Weiszfeld (SQUAREM, tried) or Newton's method with a
#: looser stop, or with distances from an eigendecomposition only, ended at different
#: points for another order or scale of the same tasks.
_STRESS_MEDIANS = (
    [[0.0, -4e-4], [1e-3, -1e-3], [6e-4, -8e-4], [-8e-4, 0.0]],
    [
        [4.0625e-4, 6.5625e-4],
        [-3.125e-5, 3.90625e-4],
        [6.875e-4, 8.125e-4],
        [-7.8125e-4, -3.125e-5],
    ],
    [
        [4.0625e-4, 6.5625e-4],
        [-3.125e-5, 3.984375e-4],
        [6.875e-4, 8.125e-4],
        [-7.96875e-4, -6.25e-5],
    ],
    [[1.192092896e-08], [1.192092896e-10], [0.0], [0.0], [1e-3]],  # three within ν
    [[0.0], [1e-3], [1e-4], [3e-4]],  # not unique: any point in [1e-4, 3e-4]
    [[-5e-4, 0.0], [-5.9605e-11, 0.0], [0.0, 1e-3], [0.0, 5e-4]],  # next to a task
    [[5.8685e-61], [0.0], [1e-3], [1e-9]],  # distances of ν: weights need z to ν·tolerance
    [[1e-3], [1e-9], [5.8685e-61]],
    [[0.05, 0.05, 0, 0], [6.103515625e-08, 5e-4, 5e-4, 0], [0, 5e-4, 5e-4, 0]],  # 1.5 ν apart
    [[1.0], [1.00001]],  # two tasks apart in the fifth digit: the midpoint, at every scale
    [[-0.001], [-0.00099]],
    [[1.0], [1.00001], [1.00003]],  # permutations agreed to 1.3e-7 only
)


def _stress_medians(test: Callable[..., None]) -> Callable[..., None]:
    for rows in _STRESS_MEDIANS:
        test = example([[torch.tensor(row, dtype=torch.float64)] for row in rows])(test)
    return test


@given(
    task_batches(
        min_tasks=2,
        max_tasks=7,
        max_side=5,
        scales=(1e-3, 1.0, 1e3),
        patterns=("random", "one_dominant", "parallel", "identical", "opposite"),
    )
)
@example([[torch.tensor(x, dtype=torch.float64)] for x in (0.0, 3e-4, 1.1921e-10)])  # stress
@_stress_medians
def test_geometric_median_is_the_median(batch: list[list[torch.Tensor]]) -> None:
    """Σ w_i g_i minimises Σ‖g_i − z‖ as well as Weiszfeld run to convergence on the vectors
    does, and the weights meet the invariants to the stopping tolerance."""
    matrix = _dense(batch)
    # A Gramian weighting sees the vectors' own float64 Gramian: entries below ~1e-154
    # square to nothing there (the weighting's documented range).
    raw = torch.cat([t.reshape(-1).double() for task in batch for t in task]).abs()
    nonzero = raw[raw != 0]
    assume(not nonzero.numel() or float(nonzero.min()) > 1e-100)
    weights = GeometricMedian()(batch)
    assert bool((weights >= 0).all())
    assert abs(float(weights.sum()) - 1.0) < 1e-12
    reference = _weiszfeld_reference(matrix)
    found = _objective(matrix, weights @ matrix)
    best = _objective(matrix, reference)
    scale = float(matrix.norm(dim=1).max())
    # To the smoothing ν (tasks closer than ν count as one point, each moving the median
    # by less than ν) and the stopping tolerance.
    nu = 1e-6 * float(matrix.norm(dim=1).pow(2).mean().sqrt())
    n = len(batch)
    assert found <= best + 1e-8 * max(scale, 1e-300) * n + n * nu, (found, best)
    assert_weighting_invariants(GeometricMedian(), batch, signed=False, aligned=False, atol=1e-7)


@pytest.mark.parametrize("scale", [1e-3, 1.0, 3.0, 1e3])
def test_geometric_median_of_two_tasks_is_their_midpoint(scale: float) -> None:
    """Two tasks: every point between them is a median; the weights are ½ each (the
    midpoint, the limit of the smoothed medians), however close the tasks and at any
    scale (they differed in the seventh digit, and moved with the scale, before the
    Gramian was centred)."""
    for rows in ([[1.0], [1.00001]], [[-0.001], [-0.00099]], [[3.0, 4.0], [3.0, 4.0001]]):
        matrix = scale * torch.tensor(rows, dtype=torch.float64)
        for order in (matrix, matrix.flip(0)):
            weights = GeometricMedian()(order)
            torch.testing.assert_close(
                weights, torch.full((2,), 0.5, dtype=torch.float64), rtol=0, atol=1e-12
            )


def test_geometric_median_in_a_flat_valley() -> None:
    """The stress profile's slow case: Weiszfeld's iteration was still 0.07 from the
    weights' limit after 1 000 steps (objective 8e-6 high, relative); Newton's reaches the
    median (the reference runs Weiszfeld on the vectors 20 000 times)."""
    matrix = torch.tensor(
        [[0.0, -4e-4], [1e-3, -1e-3], [6e-4, -8e-4], [-8e-4, 0.0]], dtype=torch.float64
    )
    reference = _weiszfeld_reference(matrix)
    weights = GeometricMedian()(matrix)
    assert _objective(matrix, weights @ matrix) - _objective(matrix, reference) <= 1e-15
    assert float((weights @ matrix - reference).norm()) <= 1e-8
    # and its weights are Weiszfeld's at the median: a fixed point of its update
    inverse = 1.0 / (matrix - weights @ matrix).norm(dim=1)
    torch.testing.assert_close(weights, inverse / inverse.sum(), atol=1e-9, rtol=0)


def test_geometric_median_resists_an_outlier() -> None:
    """Nine agreeing tasks and one pointing elsewhere with 1000 × their norm: the median
    stays with the nine (the outlier's weight is about its inverse distance), where the
    paper's weights hand the outlier nearly everything."""
    gen = torch.Generator().manual_seed(2)
    matrix = torch.ones(10, 20, dtype=torch.float64) + 0.2 * torch.randn(
        10, 20, generator=gen, dtype=torch.float64
    )
    matrix[9] = -1000 * matrix[9]
    weights = GeometricMedian()(matrix)
    assert float(weights[9]) < 1e-3
    median = weights @ matrix
    torch.testing.assert_close(median, _weiszfeld_reference(matrix), atol=1e-6, rtol=0)
    assert float((median - matrix[:9].mean(0)).norm()) < 0.5 * float(matrix[0].norm())
    assert float(Agreement()(matrix)[9]) > 0.9


def test_geometric_median_degenerate_and_arguments() -> None:
    assert GeometricMedian()(torch.zeros(4, 3)).tolist() == [0.25] * 4
    assert torch.equal(GeometricMedian()(torch.ones(3, 2)), torch.full((3,), 1 / 3))
    gram = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    assert GeometricMedian().weights(gramian=gram).tolist() == [0.5, 0.5]
    # three points on a line: the median is the middle one
    line = torch.tensor([[0.0], [1.0], [5.0]], dtype=torch.float64)
    weights = GeometricMedian()(line)
    assert float(weights @ line) == pytest.approx(1.0, abs=1e-6)
    assert "tolerance=1e-10" in repr(GeometricMedian())
    for kwargs, message in (
        ({"smoothing": 0.0}, "`smoothing` should be a number in \\(0, 1\\). Found 0.0"),
        ({"tolerance": 2}, "`tolerance` should be a number in \\(0, 1\\). Found 2"),
        ({"max_iterations": 0}, "`max_iterations` should be an int >= 1. Found 0"),
    ):
        with pytest.raises(ValueError, match=message):
            GeometricMedian(**kwargs)  # type: ignore[arg-type]
