"""AgreementHigher on the real higher library, against the hand-written Algorithm 1."""

from __future__ import annotations

import pytest
import torch

from ga_optim import Mean
from tests._optional import require

from ._reference import make_model, make_tasks, maml_reference, mse

higher = require("higher", "pip install higher==0.2.1")
from ga_optim.adapters.higher import AgreementHigher  # noqa: E402

INNER_LR, OUTER_LR, STEPS = 0.1, 0.05, 2


def _higher_step(
    model: torch.nn.Module, tasks: list, first_order: bool, weighting=None
) -> torch.Tensor:
    meta_opt = torch.optim.SGD(model.parameters(), lr=OUTER_LR)
    inner_opt = torch.optim.SGD(model.parameters(), lr=INNER_LR)
    agree = AgreementHigher(model, meta_opt, weighting=weighting)
    for xs, ys, xq, yq in tasks:
        ctx = higher.innerloop_ctx(
            model, inner_opt, copy_initial_weights=False, track_higher_grads=not first_order
        )
        with ctx as (fmodel, diffopt):
            for _ in range(STEPS):
                diffopt.step(mse(fmodel(xs), ys))
            agree.backward(mse(fmodel(xq), yq), fmodel)
    return agree.step()


@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
def test_agreement_higher_is_algorithm_1(first_order: bool) -> None:
    tasks = make_tasks(20)
    expected, expected_w = maml_reference(
        make_model(21), tasks, INNER_LR, STEPS, OUTER_LR, first_order
    )
    model = make_model(21)
    weights = _higher_step(model, tasks, first_order)
    torch.testing.assert_close(weights, expected_w)
    for got, want in zip(model.parameters(), expected):
        torch.testing.assert_close(got.detach(), want)


def test_mean_reproduces_the_stock_higher_loop() -> None:
    tasks = make_tasks(22)
    stock = make_model(23)
    meta_opt = torch.optim.SGD(stock.parameters(), lr=OUTER_LR)
    inner_opt = torch.optim.SGD(stock.parameters(), lr=INNER_LR)
    meta_opt.zero_grad()
    for xs, ys, xq, yq in tasks:
        with higher.innerloop_ctx(stock, inner_opt, copy_initial_weights=False) as (
            fmodel,
            diffopt,
        ):
            for _ in range(STEPS):
                diffopt.step(mse(fmodel(xs), ys))
            (mse(fmodel(xq), yq) / len(tasks)).backward()
    meta_opt.step()

    model = make_model(23)
    _higher_step(model, tasks, False, weighting=Mean())
    for got, want in zip(model.parameters(), stock.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_agreement_higher_errors() -> None:
    model = make_model(24)
    agree = AgreementHigher(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(TypeError, match=r"`fmodel` should be the functional model from higher"):
        agree.backward(mse(model(torch.ones(1, 1, dtype=torch.float64)), torch.zeros(1, 1)), model)
    with pytest.raises(RuntimeError, match=r"found no recorded task"):
        agree.step()
