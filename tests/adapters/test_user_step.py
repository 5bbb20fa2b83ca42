"""The user keeps their step: optimizer=None, then clipping, a GradScaler, accumulation.

Each adapter with ``optimizer=None`` and ``Mean`` followed by the loop's own step equals
the stock loop with the same step.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad

from ga_optim import Agreement, GradientAgreementAggregator, Mean, NonFiniteError
from ga_optim.adapters.func import FuncAgreement, reptile_deltas
from ga_optim.adapters.reptile import AgreementReptile
from tests._optional import require

from ._reference import Task, make_model, make_tasks, mse

l2l = require("learn2learn", "bash scripts/install_learn2learn.sh")
higher = require("higher", "pip install higher==0.2.1")
from ga_optim.adapters.higher import AgreementHigher  # noqa: E402
from ga_optim.adapters.learn2learn import AgreementMAML  # noqa: E402

INNER_LR = 0.1
KINDS = ("reptile", "learn2learn", "higher", "func")
Scale = Callable[[torch.Tensor], torch.Tensor]


def _identity(loss: torch.Tensor) -> torch.Tensor:
    return loss


def recorder(
    kind: str, model: nn.Module, weighting: object, **options: object
) -> Callable[[list[Task], Scale], torch.Tensor]:
    """The wrapped loop's meta-iteration up to (and including) ``agree.step()``, with
    ``optimizer=None``; ``scale`` is applied to each query loss (a GradScaler's)."""
    if kind == "reptile":
        agree_r = AgreementReptile(model, None, weighting=weighting, **options)  # type: ignore[arg-type]

        def reptile(tasks: list[Task], scale: Scale, accumulate: bool = False) -> torch.Tensor:
            for xs, ys, _, _ in tasks:
                learner = agree_r.clone()
                inner = torch.optim.SGD(learner.parameters(), lr=INNER_LR)
                for _ in range(2):
                    inner.zero_grad()
                    mse(learner(xs), ys).backward()
                    inner.step()
                agree_r.record(learner)
            return agree_r.step(accumulate=accumulate)

        return reptile
    if kind == "learn2learn":
        maml = l2l.algorithms.MAML(model, lr=INNER_LR)
        agree_m = AgreementMAML(maml, None, weighting=weighting, **options)  # type: ignore[arg-type]

        def learn2learn(tasks: list[Task], scale: Scale, accumulate: bool = False) -> torch.Tensor:
            for xs, ys, xq, yq in tasks:
                learner = agree_m.clone()
                learner.adapt(mse(learner(xs), ys))
                agree_m.backward(scale(mse(learner(xq), yq)), learner)
            return agree_m.step(accumulate=accumulate)

        return learn2learn
    if kind == "higher":
        agree_h = AgreementHigher(model, None, weighting=weighting, **options)  # type: ignore[arg-type]
        inner_opt = torch.optim.SGD(model.parameters(), lr=INNER_LR)

        def with_higher(tasks: list[Task], scale: Scale, accumulate: bool = False) -> torch.Tensor:
            for xs, ys, xq, yq in tasks:
                ctx = higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False)
                with ctx as (fmodel, diffopt):
                    diffopt.step(mse(fmodel(xs), ys))
                    agree_h.backward(scale(mse(fmodel(xq), yq)), fmodel)
            return agree_h.step(accumulate=accumulate)

        return with_higher
    agree_f = FuncAgreement(model, None, weighting=weighting, **options)  # type: ignore[arg-type]

    def with_func(tasks: list[Task], scale: Scale, accumulate: bool = False) -> torch.Tensor:
        params = {k: v.detach() for k, v in model.named_parameters()}
        grads, adapted = _func_tasks(model, params, tasks)
        return agree_f.step(
            grads, agreement_vectors=reptile_deltas(params, adapted), accumulate=accumulate
        )

    return with_func


def _func_tasks(
    model: nn.Module, params: dict[str, torch.Tensor], tasks: list[Task]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Stacked meta-gradients and adapted weights of one-step MAML, by torch.func."""

    def query(p: dict[str, torch.Tensor], xs, ys, xq, yq):  # type: ignore[no-untyped-def]
        g = grad(lambda q: mse(functional_call(model, q, (xs,)), ys))(p)
        fast = {k: p[k] - INNER_LR * g[k] for k in p}
        return mse(functional_call(model, fast, (xq,)), yq), fast

    per_task = [grad(query, has_aux=True)(params, *task) for task in tasks]
    stack = {k: torch.stack([g[k] for g, _ in per_task]) for k in params}
    fast = {k: torch.stack([f[k].detach() for _, f in per_task]) for k in params}
    return stack, fast


def stock(kind: str, model: nn.Module, tasks: list[Task], scale: Scale) -> None:
    """The unwrapped loop's meta-iteration up to its own step: the mean into ``.grad``."""
    n = len(tasks)
    if kind == "reptile":
        for p in model.parameters():
            p.grad = torch.zeros_like(p) if p.grad is None else p.grad
        for xs, ys, _, _ in tasks:
            learner = copy.deepcopy(model)
            inner = torch.optim.SGD(learner.parameters(), lr=INNER_LR)
            for _ in range(2):
                inner.zero_grad()
                mse(learner(xs), ys).backward()
                inner.step()
            for p, fast in zip(model.parameters(), learner.parameters()):
                p.grad.add_((p.data - fast.data) / n)
    elif kind == "learn2learn":
        maml = l2l.algorithms.MAML(model, lr=INNER_LR)
        for xs, ys, xq, yq in tasks:
            learner = maml.clone()
            learner.adapt(mse(learner(xs), ys))
            scale(mse(learner(xq), yq)).backward()  # as learn2learn's examples: sum, then / N
        for p in model.parameters():
            p.grad.mul_(1.0 / n)
    elif kind == "higher":
        inner_opt = torch.optim.SGD(model.parameters(), lr=INNER_LR)
        for xs, ys, xq, yq in tasks:
            with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (f, d):
                d.step(mse(f(xs), ys))
                scale(mse(f(xq), yq)).backward()
        for p in model.parameters():
            p.grad.mul_(1.0 / n)
    else:
        params = {k: v.detach() for k, v in model.named_parameters()}
        grads, _ = _func_tasks(model, params, tasks)
        for name, p in model.named_parameters():
            p.grad = grads[name].mean(0)


@pytest.mark.parametrize("kind", KINDS)
def test_clipping_after_step_equals_the_stock_loop(kind: str) -> None:
    wrapped_model, stock_model = make_model(21), make_model(21)
    run = recorder(kind, wrapped_model, Mean())
    wrapped_opt = torch.optim.Adam(wrapped_model.parameters(), lr=0.01)
    stock_opt = torch.optim.Adam(stock_model.parameters(), lr=0.01)
    norms = []
    for iteration in range(3):
        tasks = make_tasks(100 + iteration)
        wrapped_opt.zero_grad()
        run(tasks, _identity)
        norms.append(float(nn.utils.clip_grad_norm_(wrapped_model.parameters(), 0.05)))
        wrapped_opt.step()
        stock_opt.zero_grad()
        stock(kind, stock_model, tasks, _identity)
        nn.utils.clip_grad_norm_(stock_model.parameters(), 0.05)
        stock_opt.step()
    assert max(norms) > 0.05, "the clipping never acted: the test would not see it"
    for got, want in zip(wrapped_model.parameters(), stock_model.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["learn2learn", "higher"])
def test_grad_scaler_skips_a_forced_overflow_like_the_stock_loop(kind: str) -> None:
    wrapped_model, stock_model = make_model(31).float(), make_model(31).float()
    run = recorder(kind, wrapped_model, Mean(), non_finite="propagate")
    wrapped_opt = torch.optim.SGD(wrapped_model.parameters(), lr=0.05)
    stock_opt = torch.optim.SGD(stock_model.parameters(), lr=0.05)
    wrapped_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    stock_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    applied = []
    for iteration in range(4):
        tasks = [tuple(t.float() for t in task) for task in make_tasks(200 + iteration)]
        if iteration == 1:  # one task's query targets ~1e36: its scaled gradient overflows
            xs, ys, xq, yq = tasks[2]
            tasks[2] = (xs, ys, xq, yq * 1e36)
        before = [p.detach().clone() for p in stock_model.parameters()]
        wrapped_opt.zero_grad()
        run(tasks, wrapped_scaler.scale)
        wrapped_scaler.step(wrapped_opt)
        wrapped_scaler.update()
        stock_opt.zero_grad()
        stock(kind, stock_model, tasks, stock_scaler.scale)
        stock_scaler.step(stock_opt)
        stock_scaler.update()
        applied.append(any(not torch.equal(b, p) for b, p in zip(before, stock_model.parameters())))
        assert wrapped_scaler.get_scale() == stock_scaler.get_scale(), iteration
        for got, want in zip(wrapped_model.parameters(), stock_model.parameters()):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert applied == [True, False, True, True]  # the overflow's step alone was skipped
    assert wrapped_scaler.get_scale() == 2.0**9


def test_weights_do_not_depend_on_the_loss_scale() -> None:
    tasks = make_tasks(40)
    grads, weights = [], []
    for factor in (1.0, 1024.0):
        model = make_model(41)
        run = recorder("learn2learn", model, Agreement())
        weights.append(run(tasks, lambda loss, f=factor: loss * f))
        grads.append([p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(weights[0], weights[1], rtol=0, atol=0)
    assert not torch.allclose(weights[0], torch.full_like(weights[0], 0.25))
    for small, large in zip(*grads):
        torch.testing.assert_close(large, 1024.0 * small, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_accumulating_two_meta_batches_sums_their_updates(kind: str) -> None:
    first, second = make_tasks(50), make_tasks(51)
    expected = []
    for tasks in (first, second):
        model = make_model(52)
        recorder(kind, model, Agreement())(tasks, _identity)
        expected.append([p.grad.clone() for p in model.parameters()])
    model = make_model(52)
    run = recorder(kind, model, Agreement())
    run(first, _identity, accumulate=True)
    run(second, _identity, accumulate=True)
    for p, a, b in zip(model.parameters(), *expected):
        torch.testing.assert_close(p.grad, a + b, rtol=1e-12, atol=1e-12)
    # accumulate=False replaces: the last update alone.
    run(first, _identity, accumulate=False)
    for p, a in zip(model.parameters(), expected[0]):
        torch.testing.assert_close(p.grad, a, rtol=1e-12, atol=1e-12)


def test_propagate_lets_non_finite_values_reach_grad() -> None:
    params = [torch.zeros(3, dtype=torch.float64, requires_grad=True)]
    vectors = [[torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)] for _ in range(2)]
    vectors[1][0][1] = float("inf")
    deltas = [[torch.ones(3, dtype=torch.float64)] for _ in range(2)]
    raising = GradientAgreementAggregator(params)
    with pytest.raises(NonFiniteError, match=r"`task_vectors\[1\]\[0\]`"):
        raising.step(vectors, agreement_vectors=deltas)
    assert params[0].grad is None
    propagate = GradientAgreementAggregator(params, non_finite="propagate")
    weights = propagate.step(vectors, agreement_vectors=deltas)
    torch.testing.assert_close(weights, torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert params[0].grad is not None and params[0].grad[1] == float("inf")
    # When the weights read a non-finite value they are NaN, and so is the update.
    weights = propagate.step(vectors)
    assert torch.isnan(weights).all() and torch.isnan(params[0].grad).all()


def test_propagate_needs_no_optimizer_and_accumulate_is_a_bool() -> None:
    params = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError, match=r"needs `optimizer=None`"):
        GradientAgreementAggregator(params, torch.optim.SGD(params, lr=0.1), non_finite="propagate")
    with pytest.raises(ValueError, match=r"`non_finite` should be 'raise' or 'propagate'"):
        GradientAgreementAggregator(params, non_finite="ignore")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"`accumulate` should be a bool"):
        GradientAgreementAggregator(params).step([[torch.ones(2)]], accumulate=1)  # type: ignore[arg-type]
