"""The conformance suite: each pipeline shape's wrapped loop against its stock loop.

With ``Mean`` the wrapped loop (the documented edits only) must end where the stock loop
ends, on every tensor the optimizer holds and every buffer, after three outer steps
(float64, ≤ 1e-6); with ``Agreement`` the weights must be the ones used. The shapes and
their edits are listed in the user guide's Pipelines page.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ga_optim import Agreement, Mean
from tests._distributed import run_ranks, unwrap
from tests._optional import require

from . import _pipelines as pipes

l2l = require("learn2learn", "bash scripts/install_learn2learn.sh")
higher = require("higher", "pip install higher==0.2.1")

TOLERANCE = 1e-6
L2L_SHAPES = ["whole", "metasgd", "anil", "frozen", "bn", "groups", "penalty", "accumulate"]


def _assert_same_end(stock: pipes.State, wrapped: pipes.State) -> None:
    difference = pipes.max_difference(stock, wrapped)
    assert difference <= TOLERANCE, difference


@pytest.mark.parametrize(
    ("shape", "first_order"),
    [(shape, False) for shape in L2L_SHAPES] + [("whole", True), ("anil", True)],
    ids=[*L2L_SHAPES, "whole-first-order", "anil-first-order"],
)
def test_learn2learn_shape_equals_its_stock_loop(shape: str, first_order: bool) -> None:
    stock, _ = pipes.run_l2l(False, shape=shape, first_order=first_order, seed=1)
    wrapped, _ = pipes.run_l2l(True, shape=shape, first_order=first_order, seed=1)
    _assert_same_end(stock, wrapped)


@pytest.mark.parametrize("shape", L2L_SHAPES)
def test_learn2learn_shape_uses_the_weights(shape: str) -> None:
    """All the weight on task 0: the wrapped loop ends where the stock loop over task 0
    alone ends (every held tensor; the features in ANIL too)."""
    stock, _ = pipes.run_l2l(False, shape=shape, seed=1, n_tasks=1)
    wrapped, agree = pipes.run_l2l(True, pipes.OnlyFirst(), shape=shape, seed=1)
    _assert_same_end(pipes.held_only(stock), pipes.held_only(wrapped))
    assert agree.last_weights.tolist() == [1.0, 0.0, 0.0, 0.0]
    mean, _ = pipes.run_l2l(True, shape=shape, seed=1)
    assert pipes.max_difference(pipes.held_only(mean), pipes.held_only(wrapped)) > 1e-4


def test_anil_features_train_and_frozen_weights_stay() -> None:
    """What the stock loop does and the wrap did not before: ANIL's features move, a frozen
    layer under AdamW's decay does not."""
    torch.manual_seed(1)
    features = torch.nn.Linear(1, 8).double()  # what run_l2l builds first from the seed
    end, _ = pipes.run_l2l(True, shape="anil", seed=1)
    assert float((end["group0.param0"] - features.weight.detach()).abs().max()) > 1e-3
    frozen_end, _ = pipes.run_l2l(True, shape="frozen", seed=1)
    initial = pipes.mlp(1)[0]
    assert torch.equal(frozen_end["group0.param0"], initial.weight.detach())
    assert torch.equal(frozen_end["group0.param1"], initial.bias.detach())


def test_anil_with_agreement_is_algorithm_1_by_hand() -> None:
    """One SGD step of ANIL with Agreement against float64 by hand (torch.func): the
    weights come from the head's inner-loop deltas (the features' are zero), and both the
    features' and the head's meta-gradients are combined with them."""
    from torch.func import functional_call

    from ga_optim.adapters.learn2learn import AgreementMAML
    from ga_optim.testing import reference_agreement_weights

    torch.manual_seed(4)
    features = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh()).double()
    head_module = torch.nn.Linear(8, 1).double()
    theta_f = [p.detach().clone().requires_grad_() for p in features.parameters()]
    theta_h = [p.detach().clone().requires_grad_() for p in head_module.parameters()]
    tasks = pipes.sine_tasks(5)
    grads, deltas = [], []
    for xs, ys, xq, yq in tasks:
        feats = dict(zip(["0.weight", "0.bias"], theta_f))

        def run(head: list[torch.Tensor], x: torch.Tensor, feats=feats) -> torch.Tensor:
            hidden = functional_call(features, feats, (x,))
            return functional_call(head_module, dict(zip(["weight", "bias"], head)), (hidden,))

        fast = list(theta_h)
        for _ in range(2):
            inner = torch.autograd.grad(pipes.mse(run(fast, xs), ys), fast, create_graph=True)
            fast = [w - pipes.INNER_LR * g for w, g in zip(fast, inner)]
        query = pipes.mse(run(fast, xq), yq)
        grads.append([g.detach() for g in torch.autograd.grad(query, theta_f + theta_h)])
        deltas.append(
            [torch.zeros_like(t) for t in theta_f]
            + [(t - f).detach() for t, f in zip(theta_h, fast)]
        )
    w = reference_agreement_weights([d[2:] for d in deltas])  # the head's deltas alone
    expected = [
        t.detach() - 0.3 * sum(wi * g[k] for wi, g in zip(w, grads))
        for k, t in enumerate(theta_f + theta_h)
    ]
    head = l2l.algorithms.MAML(head_module, lr=pipes.INNER_LR)
    opt = torch.optim.SGD([*features.parameters(), *head.parameters()], lr=0.3)
    agree = AgreementMAML(head, opt, weighting=Agreement())
    for xs, ys, xq, yq in tasks:
        learner = head.clone()
        for _ in range(2):
            learner.adapt(pipes.mse(learner(features(xs)), ys))
        agree.backward(pipes.mse(learner(features(xq)), yq), learner)
    weights = agree.step()
    torch.testing.assert_close(weights, w, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(weights, torch.full_like(weights, 1 / len(tasks)), atol=1e-3)
    for got, want in zip([*features.parameters(), *head.parameters()], expected):
        torch.testing.assert_close(got.detach(), want, rtol=1e-12, atol=1e-12)


def test_anil_without_optimizer_needs_params_and_then_equals_the_stock_loop() -> None:
    """optimizer=None (clipping, a GradScaler): the adapter cannot see the features in
    the loop's own step, so it raises at the first task naming them, until params= says;
    then the loop (GradScaler, unscale, clip, scaler.step) equals the stock one."""
    from ga_optim.adapters.learn2learn import AgreementMAML

    def run(wrapped: bool, params: bool = True) -> pipes.State:
        torch.manual_seed(6)
        features = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh()).double()
        head = l2l.algorithms.MAML(torch.nn.Linear(8, 1).double(), lr=pipes.INNER_LR)
        outer = [*features.parameters(), *head.parameters()]
        opt = torch.optim.Adam(outer, lr=0.01)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        agree = None
        if wrapped:
            agree = AgreementMAML(
                head,
                None,
                params=outer if params else None,
                weighting=Mean(),
                non_finite="propagate",
            )
        for tasks in pipes.batches(6):
            opt.zero_grad()
            for xs, ys, xq, yq in tasks:
                learner = head.clone()
                learner.adapt(pipes.mse(learner(features(xs)), ys))
                query = scaler.scale(pipes.mse(learner(features(xq)), yq))
                if agree is None:
                    query.backward()
                else:
                    agree.backward(query, learner)
            if agree is None:
                for p in outer:
                    p.grad.mul_(1 / len(tasks))
            else:
                agree.step()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(outer, max_norm=0.5)
            scaler.step(opt)
            scaler.update()
        return pipes.state(opt, head, features)

    _assert_same_end(run(False), run(True))
    with pytest.raises(
        ValueError,
        match=r"reaches a parameter of shape \(8, 1\) that is not in the wrapped model.*params=",
    ):
        run(True, params=False)


@pytest.mark.parametrize("shape", ["whole", "frozen", "groups"])
def test_reptile_shape_equals_its_stock_loop(shape: str) -> None:
    stock, _ = pipes.run_reptile(False, shape=shape, seed=2)
    wrapped, _ = pipes.run_reptile(True, shape=shape, seed=2)
    _assert_same_end(stock, wrapped)
    alone, _ = pipes.run_reptile(False, shape=shape, seed=2, n_tasks=1)
    first, _ = pipes.run_reptile(True, pipes.OnlyFirst(), shape=shape, seed=2)
    _assert_same_end(alone, first)
    if shape == "frozen":
        initial = pipes.mlp(2)[0]
        assert torch.equal(wrapped["group0.param0"], initial.weight.detach())


def test_higher_loop_that_sums_its_losses_equals_reduction_sum() -> None:
    stock, _ = pipes.run_higher(False, seed=3)
    wrapped, agree = pipes.run_higher(True, seed=3)
    _assert_same_end(stock, wrapped)
    assert agree.aggregator.reduction == "sum"


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
@pytest.mark.parametrize("algo", ["maml", "reptile"])
def test_peft_lora_on_gpt2_equals_its_stock_loop_and_the_base_stays(algo: str) -> None:
    require("peft", "pip install 'peft>=0.21'")
    require("transformers", "pip install 'transformers>=5'")
    stock, _ = pipes.run_lora(False, algo=algo, seed=7)
    wrapped, _ = pipes.run_lora(True, algo=algo, seed=7)
    _assert_same_end(stock, wrapped)
    initial = pipes.lora_gpt2(7)
    names = [name for name, _ in initial.named_parameters()]
    moved = {
        name: not torch.equal(wrapped[f"group0.param{k}"], p.detach())
        for k, (name, p) in enumerate(initial.named_parameters())
    }
    assert not any(moved[n] for n, p in initial.named_parameters() if not p.requires_grad)
    assert all(moved[n] for n in names if "lora_" in n)


def test_torch_func_example_shape_equals_its_stock_loop() -> None:
    """The wrap against the stock loop of the restructured shape (the parameters an
    argument, ``vmap(grad(loss_for_task))``), whose meta-gradients are the float64
    autograd ones. The example's own shape (a backward through a vmap of the summed
    losses, the inner ``grad`` closing over ``net.named_parameters()``) is not the
    reference: in float64 its gradient is ~1e-2 away from autograd's (measured here:
    6e-3 on the first layer), so a wrapped loop cannot and should not equal it."""
    restructured, _ = pipes.run_func(False, seed=8)
    wrapped, agree = pipes.run_func(True, seed=8)
    _assert_same_end(restructured, wrapped)
    assert agree.aggregator.reduction == "sum"


def test_torch_func_restructured_meta_gradients_are_autograds() -> None:
    from torch.func import functional_call, grad, vmap

    net = pipes.conv_bn(8, running_stats=False)
    tasks = pipes.image_tasks(9)

    def loss(p: pipes.State, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(functional_call(net, p, (x,)), y)

    def for_task(p: pipes.State, xs, ys, xq, yq) -> torch.Tensor:  # type: ignore[no-untyped-def]
        for _ in range(2):
            g = grad(loss)(p, xs, ys)
            p = {k: p[k] - pipes.INNER_LR * g[k] for k in p}
        return loss(p, xq, yq)

    params = {k: v.detach() for k, v in net.named_parameters()}
    stacked = vmap(grad(for_task), in_dims=(None, 0, 0, 0, 0))(params, *pipes.stacked(tasks))
    for i, (xs, ys, xq, yq) in enumerate(tasks):
        theta = {k: v.clone().requires_grad_() for k, v in params.items()}
        fast = theta
        for _ in range(2):
            inner = torch.autograd.grad(loss(fast, xs, ys), list(fast.values()), create_graph=True)
            fast = {k: v - pipes.INNER_LR * g for (k, v), g in zip(fast.items(), inner)}
        want = torch.autograd.grad(loss(fast, xq, yq), list(theta.values()))
        for name, w in zip(theta, want):
            torch.testing.assert_close(stacked[name][i], w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("weighting", ["mean", "agreement"])
def test_anil_across_two_gloo_ranks_equals_one_process(weighting: str, tmp_path: Path) -> None:
    """Each rank adapts half of every meta-batch; the features and the head end where one
    process (and, with Mean, the stock loop) ends."""
    results, codes = run_ranks(pipes.anil_worker, 2, tmp_path, weighting)
    ranks = unwrap(results)
    assert codes == [0, 0]
    one, _ = pipes.run_l2l(
        True, Agreement() if weighting == "agreement" else Mean(), shape="anil", seed=11
    )
    for end in ranks:
        _assert_same_end(one, end)
    if weighting == "mean":
        stock, _ = pipes.run_l2l(False, shape="anil", seed=11)
        _assert_same_end(stock, ranks[0])


def test_anil_bad_task_raises_and_nothing_is_half_applied() -> None:
    """A non-finite task in the ANIL loop: step() names it; the features, the head, their
    .grad (the loop's penalty in it) and the optimizer's state are as before the call, and
    the recorded tasks are kept."""
    from ga_optim import NonFiniteError
    from ga_optim.adapters.learn2learn import AgreementMAML

    torch.manual_seed(12)
    features = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh()).double()
    head = l2l.algorithms.MAML(torch.nn.Linear(8, 1).double(), lr=pipes.INNER_LR)
    outer = [*features.parameters(), *head.parameters()]
    opt = torch.optim.Adam(outer, lr=0.01)
    agree = AgreementMAML(head, opt, weighting=Mean())
    first, second = pipes.batches(12)[:2]
    for tasks in (first, second):
        opt.zero_grad()
        for xs, ys, xq, yq in tasks:
            learner = head.clone()
            learner.adapt(pipes.mse(learner(features(xs)), ys))
            agree.backward(pipes.mse(learner(features(xq)), yq), learner)
        if tasks is first:
            agree.step()  # one good step, so that Adam has a state
    # The second meta-batch is recorded; poison its last task, add a penalty, and step.
    agree.meta_gradients[-1, 0] = float("nan")
    (1e-2 * sum(p.pow(2).sum() for p in outer)).backward()
    grads = [p.grad.clone() for p in outer]
    values = [p.detach().clone() for p in outer]
    state = {k: {n: t.clone() for n, t in v.items()} for k, v in opt.state.items()}
    with pytest.raises(NonFiniteError, match=r"`task_vectors\[3\]\[0\]` should be finite"):
        agree.step()
    assert agree.num_recorded == len(second)
    for p, g, v in zip(outer, grads, values):
        assert torch.equal(p.grad, g) and torch.equal(p.detach(), v)
    for key, saved in state.items():
        for name, t in saved.items():
            assert torch.equal(opt.state[key][name], t)


def test_no_trainable_outer_parameter_raises() -> None:
    from ga_optim.adapters.learn2learn import AgreementMAML

    model = pipes.mlp(13).requires_grad_(False)
    maml = l2l.algorithms.MAML(model, lr=0.1, allow_nograd=True)
    agree = AgreementMAML(maml, torch.optim.SGD(maml.parameters(), lr=0.1))
    xs, ys, _, _ = pipes.sine_tasks(13)[0]
    loss = pipes.mse(maml.clone()(xs), ys) + torch.zeros((), requires_grad=True)
    with pytest.raises(ValueError, match=r"None of the 4 outer parameters requires grad"):
        agree.backward(loss, maml.clone())
    assert agree.num_recorded == 0


def test_torch_func_anil_equals_its_stock_loop_and_uses_the_weights() -> None:
    stock, _ = pipes.run_func_anil(False, seed=14)
    wrapped, _ = pipes.run_func_anil(True, seed=14)
    _assert_same_end(stock, wrapped)
    alone, _ = pipes.run_func_anil(False, seed=14, n_tasks=1)
    first, agree = pipes.run_func_anil(True, pipes.OnlyFirst(), seed=14)
    _assert_same_end(alone, first)
    assert agree.last_weights.tolist() == [1.0, 0.0, 0.0, 0.0]


def test_higher_anil_equals_its_stock_loop() -> None:
    """higher's innerloop_ctx over the head alone, the features outside it, both in the
    outer optimizer."""
    from ga_optim.adapters.higher import AgreementHigher

    def run(wrapped: bool) -> pipes.State:
        torch.manual_seed(15)
        features = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh()).double()
        head = torch.nn.Linear(8, 1).double()
        meta_opt = torch.optim.Adam([*features.parameters(), *head.parameters()], lr=0.01)
        inner_opt = torch.optim.SGD(head.parameters(), lr=pipes.INNER_LR)
        agree = AgreementHigher(head, meta_opt, weighting=Mean()) if wrapped else None
        for tasks in pipes.batches(15):
            meta_opt.zero_grad()
            for xs, ys, xq, yq in tasks:
                with higher.innerloop_ctx(head, inner_opt, copy_initial_weights=False) as (
                    fhead,
                    diffopt,
                ):
                    diffopt.step(pipes.mse(fhead(features(xs)), ys))
                    query = pipes.mse(fhead(features(xq)), yq)
                    if agree is None:
                        (query / len(tasks)).backward()
                    else:
                        agree.backward(query, fhead)
            if agree is None:
                meta_opt.step()
            else:
                agree.step()
        return pipes.state(meta_opt, features, head)

    _assert_same_end(run(False), run(True))
