"""AgreementMAML / AgreementReptile on the real learn2learn, against hand-written loops."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ga_optim import Mean
from tests._optional import require

from ._reference import make_model, make_tasks, maml_reference, mse, reptile_reference

l2l = require("learn2learn", "bash scripts/install_learn2learn.sh")
from ga_optim.adapters.learn2learn import AgreementMAML, AgreementReptile  # noqa: E402

INNER_LR, OUTER_LR, STEPS = 0.1, 0.05, 2


def _wrapped_step(
    model: nn.Module, tasks: list, first_order: bool, weighting=None, algo="MAML"
) -> tuple[object, torch.Tensor]:
    if algo == "MAML":
        maml = l2l.algorithms.MAML(model, lr=INNER_LR, first_order=first_order)
    else:
        maml = l2l.algorithms.MetaSGD(model, lr=INNER_LR, first_order=first_order)
    opt = torch.optim.SGD(maml.parameters(), lr=OUTER_LR)
    agree = AgreementMAML(maml, opt, weighting=weighting)
    opt.zero_grad()
    for xs, ys, xq, yq in tasks:
        learner = agree.clone()
        for _ in range(STEPS):
            learner.adapt(mse(learner(xs), ys))
        agree.backward(mse(learner(xq), yq), learner)
    assert agree.num_recorded == len(tasks)
    weights = agree.step()
    assert agree.num_recorded == 0
    return maml, weights


@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
def test_agreement_maml_is_algorithm_1(first_order: bool) -> None:
    tasks = make_tasks(0)
    expected, expected_w = maml_reference(
        make_model(1), tasks, INNER_LR, STEPS, OUTER_LR, first_order
    )
    model = make_model(1)
    _, weights = _wrapped_step(model, tasks, first_order)
    torch.testing.assert_close(weights, expected_w)
    assert not torch.allclose(weights, torch.full_like(weights, 0.25))  # agreement did something
    for got, want in zip(model.parameters(), expected):
        torch.testing.assert_close(got.detach(), want)


@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
def test_mean_reproduces_the_stock_learn2learn_loop(first_order: bool) -> None:
    tasks = make_tasks(2)
    stock_model = make_model(3)
    maml = l2l.algorithms.MAML(stock_model, lr=INNER_LR, first_order=first_order)
    opt = torch.optim.SGD(maml.parameters(), lr=OUTER_LR)
    opt.zero_grad()
    for xs, ys, xq, yq in tasks:  # the shape of learn2learn's MAML examples
        learner = maml.clone()
        for _ in range(STEPS):
            learner.adapt(mse(learner(xs), ys))
        mse(learner(xq), yq).backward()
    for p in maml.parameters():
        p.grad.mul_(1.0 / len(tasks))
    opt.step()

    model = make_model(3)
    _wrapped_step(model, tasks, first_order, weighting=Mean())
    for got, want in zip(model.parameters(), stock_model.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_metasgd_with_mean_reproduces_stock_loop_and_zero_lr_deltas() -> None:
    tasks = make_tasks(4)
    stock_model = make_model(5)
    meta = l2l.algorithms.MetaSGD(stock_model, lr=INNER_LR)
    opt = torch.optim.SGD(meta.parameters(), lr=OUTER_LR)
    for xs, ys, xq, yq in tasks:
        learner = meta.clone()
        for _ in range(STEPS):
            learner.adapt(mse(learner(xs), ys))
        mse(learner(xq), yq).backward()
    for p in meta.parameters():
        p.grad.mul_(1.0 / len(tasks))
    opt.step()

    model = make_model(5)
    wrapped, _ = _wrapped_step(model, tasks, False, weighting=Mean(), algo="MetaSGD")
    for got, want in zip(wrapped.parameters(), meta.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # The learning rates were learned (their meta-gradient is not zero)…
    assert not torch.equal(wrapped.lrs[0], torch.full_like(wrapped.lrs[0], INNER_LR))


def test_agreement_maml_errors() -> None:
    model = make_model(6)
    maml = l2l.algorithms.MAML(model, lr=INNER_LR)
    opt = torch.optim.SGD(maml.parameters(), lr=OUTER_LR)
    agree = AgreementMAML(maml, opt)
    with pytest.raises(RuntimeError, match=r"step\(\) found no recorded task"):
        agree.step()
    with pytest.raises(
        TypeError, match=r"`maml` should be a learn2learn MAML or MetaSGD\. Found `Sequential`"
    ):
        AgreementMAML(model, opt)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`agreement_on` should be 'deltas'"):
        AgreementMAML(maml, opt, agreement_on="grads")  # type: ignore[arg-type]
    other = l2l.algorithms.MAML(nn.Linear(2, 3).double(), lr=0.1).clone()
    _, _, xq, _ = make_tasks(7, 1)[0]
    with pytest.raises(ValueError, match=r"`learner` has 2 parameters; the wrapped model has 4"):
        agree.backward(other(torch.ones(1, 2, dtype=torch.float64)).sum(), other)
    learner = agree.clone()
    with pytest.raises(ValueError, match=r"does not depend on the parameters"):
        agree.backward(torch.tensor(1.0), learner)
    with pytest.raises(ValueError, match=r"should be a scalar Tensor"):
        agree.backward(learner(xq), learner)
    unrelated = torch.ones(1, requires_grad=True)
    with pytest.raises(ValueError, match=r"does not depend on the wrapped model's parameters"):
        agree.backward((unrelated * 2).sum(), learner)
    assert agree.num_recorded == 0


def test_agreement_on_meta_gradients_option() -> None:
    tasks = make_tasks(8)
    model = make_model(9)
    maml = l2l.algorithms.MAML(model, lr=INNER_LR)
    opt = torch.optim.SGD(maml.parameters(), lr=OUTER_LR)
    agree = AgreementMAML(maml, opt, agreement_on="meta_gradients")
    for xs, ys, xq, yq in tasks:
        learner = agree.clone()
        learner.adapt(mse(learner(xs), ys))
        agree.backward(mse(learner(xq), yq), learner)
    grads = agree.meta_gradients.clone()  # one row per task [N, P]
    assert grads.shape == (len(tasks), sum(p.numel() for p in maml.parameters()))
    from ga_optim.testing import reference_agreement_weights

    torch.testing.assert_close(agree.step(), reference_agreement_weights(grads))


def test_agreement_reptile_is_algorithm_1_line_10() -> None:
    model = make_model(10)
    theta = [p.detach().clone() for p in model.parameters()]
    reptile = AgreementReptile(model, torch.optim.SGD(model.parameters(), lr=0.3))
    adapted = []
    for xs, ys, _, _ in make_tasks(11):
        learner = reptile.clone()
        inner = torch.optim.SGD(learner.parameters(), lr=0.05)
        for _ in range(3):
            inner.zero_grad()
            mse(learner(xs), ys).backward()
            inner.step()
        adapted.append([p.detach().clone() for p in learner.parameters()])
        reptile.record(learner)
    weights = reptile.step()
    expected, expected_w = reptile_reference(theta, adapted, 0.3)
    torch.testing.assert_close(weights, expected_w)
    for got, want in zip(model.parameters(), expected):
        torch.testing.assert_close(got.detach(), want)


def test_reptile_with_mean_reproduces_the_stock_reptile_loop() -> None:
    tasks = make_tasks(12)
    stock = make_model(13)
    opt = torch.optim.SGD(stock.parameters(), lr=0.3)
    opt.zero_grad()
    for p in stock.parameters():
        p.grad = torch.zeros_like(p)
    for xs, ys, _, _ in tasks:  # the shape of learn2learn's Reptile example
        learner = copy.deepcopy(stock)
        inner = torch.optim.SGD(learner.parameters(), lr=0.05)
        for _ in range(3):
            inner.zero_grad()
            mse(learner(xs), ys).backward()
            inner.step()
        for p, fast in zip(stock.parameters(), learner.parameters()):
            p.grad.add_(p.data - fast.data)
    for p in stock.parameters():
        p.grad.mul_(1.0 / len(tasks))
    opt.step()

    model = make_model(13)
    reptile = AgreementReptile(model, torch.optim.SGD(model.parameters(), lr=0.3), weighting=Mean())
    for xs, ys, _, _ in tasks:
        learner = reptile.clone()
        inner = torch.optim.SGD(learner.parameters(), lr=0.05)
        for _ in range(3):
            inner.zero_grad()
            mse(learner(xs), ys).backward()
            inner.step()
        reptile.record(learner)
    reptile.step()
    for got, want in zip(model.parameters(), stock.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_reptile_errors() -> None:
    model = make_model(14)
    reptile = AgreementReptile(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(RuntimeError, match=r"found no recorded learner"):
        reptile.step()
    with pytest.raises(ValueError, match=r"`learner` has parameters of shapes"):
        reptile.record(nn.Linear(3, 3))
    with pytest.raises(TypeError, match=r"`model` should be a torch\.nn\.Module"):
        AgreementReptile([1], None)  # type: ignore[arg-type]
