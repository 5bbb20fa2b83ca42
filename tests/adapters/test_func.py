"""torch.func helpers: a vmap-ed Reptile / MAML loop against the hand-written Algorithm 1."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, grad, vmap

from ga_optim import Mean
from ga_optim.adapters.func import FuncAgreement, reptile_deltas, stacked_task_vectors

from ._reference import make_model, make_tasks, maml_reference, mse, reptile_reference

INNER_LR, OUTER_LR, STEPS = 0.1, 0.05, 2


def _batched(tasks: list) -> tuple[torch.Tensor, ...]:
    return tuple(torch.stack([t[k] for t in tasks]) for k in range(4))


def _inner(model: torch.nn.Module):  # type: ignore[no-untyped-def]
    def loss(params, x, y):  # type: ignore[no-untyped-def]
        return mse(functional_call(model, params, (x,)), y)

    def adapt(params, xs, ys):  # type: ignore[no-untyped-def]
        for _ in range(STEPS):
            grads = grad(loss)(params, xs, ys)
            params = {k: params[k] - INNER_LR * grads[k] for k in params}
        return params

    return loss, adapt


def test_func_maml_matches_algorithm_1() -> None:
    tasks = make_tasks(30)
    expected, expected_w = maml_reference(
        make_model(31), tasks, INNER_LR, STEPS, OUTER_LR, first_order=False
    )
    model = make_model(31)
    loss, adapt = _inner(model)
    params = dict(model.named_parameters())
    xs, ys, xq, yq = _batched(tasks)

    def query_loss(params, xs, ys, xq, yq):  # type: ignore[no-untyped-def]
        return loss(adapt(params, xs, ys), xq, yq)

    meta_grads = vmap(grad(query_loss), in_dims=(None, 0, 0, 0, 0))(params, xs, ys, xq, yq)
    adapted = vmap(adapt, in_dims=(None, 0, 0))(params, xs, ys)
    agree = FuncAgreement(model, torch.optim.SGD(model.parameters(), lr=OUTER_LR))
    weights = agree.step(meta_grads, agreement_vectors=reptile_deltas(params, adapted))
    torch.testing.assert_close(weights, expected_w)
    for got, want in zip(model.parameters(), expected):
        torch.testing.assert_close(got.detach(), want)


def test_func_reptile_matches_line_10_and_mean_is_plain_reptile() -> None:
    tasks = make_tasks(32)
    for weighting in (None, Mean()):
        model = make_model(33)
        theta = [p.detach().clone() for p in model.parameters()]
        _, adapt = _inner(model)
        params = dict(model.named_parameters())
        xs, ys, _, _ = _batched(tasks)
        adapted = vmap(adapt, in_dims=(None, 0, 0))(params, xs, ys)
        per_task = [[adapted[k][i].detach() for k in params] for i in range(len(tasks))]
        agree = FuncAgreement(
            model, torch.optim.SGD(model.parameters(), lr=0.3), weighting=weighting
        )
        weights = agree.step(reptile_deltas(params, adapted))
        if weighting is None:
            expected, expected_w = reptile_reference(theta, per_task, 0.3)
            torch.testing.assert_close(weights, expected_w)
        else:
            expected = [
                t + 0.3 * (torch.stack([a[k] for a in per_task]).mean(0) - t)
                for k, t in enumerate(theta)
            ]
        for got, want in zip(model.parameters(), expected):
            torch.testing.assert_close(got.detach(), want)


def test_stacked_task_vectors_are_views_in_parameter_order() -> None:
    stacked = {"b": torch.arange(6.0).view(3, 2), "a": torch.arange(3.0).view(3, 1)}
    tasks = stacked_task_vectors(stacked, ["a", "b"])
    assert len(tasks) == 3
    assert tasks[2][0].tolist() == [2.0] and tasks[2][1].tolist() == [4.0, 5.0]
    assert tasks[1][1].data_ptr() == stacked["b"][1].data_ptr()  # a view, not a copy


def test_func_errors() -> None:
    with pytest.raises(ValueError, match=r"no entry for the parameters \['c'\]"):
        stacked_task_vectors({"a": torch.ones(2, 1)}, ["a", "c"])
    with pytest.raises(ValueError, match=r"entries \['z'\] that are not parameters"):
        stacked_task_vectors({"a": torch.ones(2, 1), "z": torch.ones(2)}, ["a"])
    with pytest.raises(
        ValueError, match=r"`stacked\['b'\]` has 3 tasks along dimension 0; `stacked\['a'\]` has 2"
    ):
        stacked_task_vectors({"a": torch.ones(2, 1), "b": torch.ones(3, 1)}, ["a", "b"])
    with pytest.raises(ValueError, match=r"`adapted\['w'\]` has shape \(2, 3\); expected \[N, 4\]"):
        reptile_deltas({"w": torch.ones(4)}, {"w": torch.ones(2, 3)})
    model = make_model(34)
    agree = FuncAgreement(model)
    with pytest.raises(TypeError, match=r"`task_vectors` should be a dict"):
        agree.step([torch.ones(2)])  # type: ignore[arg-type]


def test_reptile_deltas_of_a_parameter_the_inner_loop_does_not_adapt_are_zero() -> None:
    params = {"features": torch.ones(3), "head": torch.full((2,), 2.0)}
    adapted = {"head": torch.tensor([[1.0, 1.5], [2.5, 2.0]])}
    deltas = reptile_deltas(params, adapted)
    assert torch.equal(deltas["features"], torch.zeros(2, 3))
    assert torch.equal(deltas["head"], torch.tensor([[1.0, 0.5], [-0.5, 0.0]]))
    with pytest.raises(ValueError, match=r"`adapted` has entries \['other'\] that are not in"):
        reptile_deltas(params, {**adapted, "other": torch.ones(2, 1)})
    with pytest.raises(ValueError, match=r"`adapted` should hold at least one adapted parameter"):
        reptile_deltas(params, {})
    with pytest.raises(
        ValueError, match=r"`adapted\['more'\]` holds 2 tasks .* `adapted\['head'\]` holds 3"
    ):
        reptile_deltas(
            {**params, "more": torch.ones(1)}, {"head": torch.ones(3, 2), "more": torch.ones(2, 1)}
        )
