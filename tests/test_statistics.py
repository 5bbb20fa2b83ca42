"""The statistics as matrix products, against float64 computed by hand."""

from __future__ import annotations

import math

import torch
from hypothesis import example, given

from ga_optim._collective import Collective
from ga_optim._statistics import cosines, scaled, statistic
from ga_optim.testing import reference_gramian, task_batches

LOCAL = Collective()


def _matrix(batch: list[list[torch.Tensor]]) -> torch.Tensor:
    return torch.stack([torch.cat([t.reshape(-1).double() for t in task]) for task in batch])


def test_golden_scores_by_hand() -> None:
    # g = (1, 0), (1, 1), (-1, 0): Σ g = (1, 1); r = (1, 2, -1).
    j = torch.tensor([[1.0, 0.0], [1.0, 1.0], [-1.0, 0.0]])
    assert statistic(j, "scores", LOCAL, [3]).tolist() == [1.0, 2.0, -1.0]
    assert statistic(j, "count", LOCAL, [3]).tolist() == [0.0, 0.0, 0.0]
    assert statistic(j, "gramian", LOCAL, [3]).tolist() == [
        [1.0, 1.0, -1.0],
        [1.0, 2.0, -1.0],
        [-1.0, -1.0, 1.0],
    ]
    # Unit rows (1, 0), (1/√2, 1/√2), (-1, 0): Σ ĝ = (1/√2, 1/√2); r̂ = (1/√2, 1, -1/√2).
    h = 1 / math.sqrt(2)
    torch.testing.assert_close(
        statistic(j, "unit_scores", LOCAL, [3]), torch.tensor([h, 1.0, -h], dtype=torch.float64)
    )


@given(task_batches())
@example([[torch.tensor(9.9085e-157, dtype=torch.float64)]] * 2)  # stress profile: subnormal r
def test_scores_and_gramian_match_float64_by_hand(batch: list[list[torch.Tensor]]) -> None:
    j = _matrix(batch)
    gram = reference_gramian(batch)
    torch.testing.assert_close(statistic(j, "gramian", LOCAL, [len(batch)]), gram)
    scores = statistic(j, "scores", LOCAL, [len(batch)])
    scale = float(j.abs().max()) or 1.0  # r is a sum of products: rounding is relative to it
    # ... and, where the products fall below float64's smallest normal number, absolute:
    # each rounds to a multiple of 2**-1074 there.
    atol = max(1e-13 * len(batch) * scale**2 * j.shape[1], 4 * j.numel() * 2.0**-1074)
    torch.testing.assert_close(scores, gram.sum(1), rtol=0, atol=atol)


@given(task_batches(scales=(1e-200, 1.0, 1e200)))
def test_unit_scores_do_not_depend_on_each_tasks_magnitude(batch: list[list[torch.Tensor]]) -> None:
    """Each row is scaled by its own power of two before its norm: any magnitude works."""
    j = _matrix(batch)
    units = torch.stack(
        [
            (r / r.abs().max()) / torch.linalg.vector_norm(r / r.abs().max()) if r.any() else r
            for r in j
        ]
    )
    expected = units @ units.sum(0)
    got = statistic(j, "unit_scores", LOCAL, [len(batch)])
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9 * len(batch))


def test_scaled_is_times_the_power_of_two_to_unit_magnitude() -> None:
    j = torch.tensor([[3.0, -5.0], [0.25, 0.0]])
    assert scaled(j, LOCAL).tolist() == [[3 / 8, -5 / 8], [1 / 32, 0.0]]  # 5/8 in [0.5, 1)
    assert scaled(j, None).tolist() == [[3 / 8, -5 / 8], [0.5, 0.0]]  # each row its own
    assert scaled(j, LOCAL).dtype == torch.float64
    assert scaled(torch.zeros(2, 3), LOCAL).tolist() == [[0.0] * 3] * 2
    tiny = torch.tensor([[1e-310]], dtype=torch.float64)
    assert scaled(tiny, LOCAL).item() == 1e-310 * 2.0**1000  # the factor is capped


def test_cosines_by_hand() -> None:
    j = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    # Σ g = (1, 1): cos = 1/√2 for the first two, 0 for the zero task.
    h = 1 / math.sqrt(2)
    torch.testing.assert_close(
        cosines(j, LOCAL, [3]), torch.tensor([h, h, 0.0], dtype=torch.float64)
    )
