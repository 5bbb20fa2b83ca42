"""TorchJD interop against the real torchjd package, both ways, with float64 references."""

from __future__ import annotations

import pytest
import torch

from ga_optim import (
    Agreement,
    CosineAgreement,
    GeometricMedian,
    GradientAgreementAggregator,
    LeaveOneOutAgreement,
    Mean,
    NonNegativeAgreement,
    from_torchjd,
    to_torchjd,
)
from ga_optim.testing import reference_agreement_weights, reference_gramian
from tests._optional import require

torchjd_aggregation = require(
    "torchjd.aggregation", 'pip install "torchjd[quadprog-projector]>=0.18"'
)
torchjd_autojac = require("torchjd.autojac", 'pip install "torchjd[quadprog-projector]>=0.18"')


def _tasks(n: int, seed: int) -> list[list[torch.Tensor]]:
    """Tasks that mostly agree, one in three partly opposing (so that UPGrad and DualProj,
    which leave non-conflicting tasks alone, have conflicts to resolve)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(3, 4), (4,)]
    common = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    return [
        [
            (-0.8 if i % 3 == 1 else 1.0) * c
            + torch.randn(c.shape, generator=gen, dtype=torch.float64)
            for c in common
        ]
        for i in range(n)
    ]


@pytest.mark.parametrize("name", ["UPGradWeighting", "MGDAWeighting", "DualProjWeighting"])
def test_a_torchjd_weighting_in_the_aggregator(name: str) -> None:
    torchjd_weighting = getattr(torchjd_aggregation, name)()
    tasks = _tasks(5, 0)
    params = [
        torch.zeros(3, 4, dtype=torch.float64, requires_grad=True),
        torch.zeros(4, dtype=torch.float64, requires_grad=True),
    ]
    aggregator = GradientAgreementAggregator(
        params, torch.optim.SGD(params, lr=1.0), weighting=from_torchjd(torchjd_weighting)
    )
    weights = aggregator.step(tasks)
    # The reference: TorchJD's own weighting of the hand-built float64 Gramian, then Σ w_i v_i.
    expected = torchjd_weighting(reference_gramian(tasks))
    torch.testing.assert_close(weights, expected, rtol=1e-9, atol=1e-12)
    assert not torch.allclose(weights, torch.full_like(weights, weights.mean()))
    for p, param in enumerate(params):
        update = sum(w * task[p] for w, task in zip(expected.tolist(), tasks))
        torch.testing.assert_close(param.detach(), -update, rtol=1e-9, atol=1e-12)


def test_a_torchjd_weighting_in_a_learn2learn_maml_loop() -> None:
    require("learn2learn", "bash scripts/install_learn2learn.sh")
    import learn2learn as l2l

    from ga_optim.adapters.learn2learn import AgreementMAML
    from tests.adapters._reference import make_model, make_tasks, maml_reference, mse

    upgrad = torchjd_aggregation.UPGradWeighting()
    tasks = make_tasks(60)
    expected, expected_w = maml_reference(
        make_model(61), tasks, 0.1, 2, 0.05, False,
        weights=lambda deltas: upgrad(reference_gramian(deltas)),
    )  # fmt: skip
    model = make_model(61)
    maml = l2l.algorithms.MAML(model, lr=0.1)
    agree = AgreementMAML(
        maml, torch.optim.SGD(maml.parameters(), lr=0.05), weighting=from_torchjd(upgrad)
    )
    for xs, ys, xq, yq in tasks:
        learner = agree.clone()
        for _ in range(2):
            learner.adapt(mse(learner(xs), ys))
        agree.backward(mse(learner(xq), yq), learner)
    weights = agree.step()
    torch.testing.assert_close(weights, expected_w, rtol=1e-9, atol=1e-12)
    assert float(weights.max() - weights.min()) > 1e-3  # the tasks conflict: UPGrad acts
    for got, want in zip(model.parameters(), expected):
        torch.testing.assert_close(got.detach(), want, rtol=1e-9, atol=1e-12)


def test_agreement_in_a_torchjd_multi_task_step() -> None:
    torch.manual_seed(70)
    shared = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh()).double()
    heads = [torch.nn.Linear(5, 1).double() for _ in range(3)]
    x = torch.randn(8, 3, dtype=torch.float64)
    targets = [torch.randn(8, 1, dtype=torch.float64) for _ in heads]
    features = shared(x)
    losses = [((head(features) - y) ** 2).mean() for head, y in zip(heads, targets)]
    # The hand-computed reference: each task's gradient on the shared parameters (the rows
    # of the Jacobian), Eq. (13) weights in float64, their combination.
    shared_params = list(shared.parameters())
    rows = [torch.autograd.grad(loss, shared_params, retain_graph=True) for loss in losses]
    jacobian = torch.stack([torch.cat([g.reshape(-1) for g in row]) for row in rows])
    w = reference_agreement_weights(jacobian)
    expected = w @ jacobian

    aggregator = torchjd_aggregation.GramianWeightedAggregator(to_torchjd(Agreement()))
    torchjd_autojac.mtl_backward(losses, features=features)
    weights = torchjd_autojac.jac_to_grad(shared_params, aggregator)
    torch.testing.assert_close(weights, w, rtol=1e-12, atol=1e-12)
    got = torch.cat([p.grad.reshape(-1) for p in shared_params])
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(w, torch.full_like(w, 1 / 3))  # agreement did something


def test_interop_errors_and_names() -> None:
    with pytest.raises(TypeError, match=r"already a ga_optim Weighting"):
        from_torchjd(Agreement())
    with pytest.raises(TypeError, match=r"should be a TorchJD Gramian weighting"):
        from_torchjd(3)
    with pytest.raises(TypeError, match=r"should be a ga_optim Weighting"):
        to_torchjd(torchjd_aggregation.UPGradWeighting())
    assert "UPGradWeighting" in repr(from_torchjd(torchjd_aggregation.UPGradWeighting()))
    assert isinstance(to_torchjd(Mean()), torchjd_aggregation.Weighting)
    assert from_torchjd(torchjd_aggregation.MeanWeighting()).needs == "gramian"


@pytest.mark.parametrize(
    "weighting",
    [
        Agreement(),
        Mean(),
        NonNegativeAgreement(),
        CosineAgreement(),
        LeaveOneOutAgreement(non_negative=True),
        GeometricMedian(),
    ],
    ids=repr,
)
def test_an_exported_weighting_pickles_and_unpickles(weighting: object) -> None:
    """TorchJD's own weightings pickle (checkpoints, multiprocessing); ours exported do too,
    and the unpickled one computes the same weights."""
    import pickle

    exported = to_torchjd(weighting)
    restored = pickle.loads(pickle.dumps(exported))
    assert type(restored) is type(exported)
    gramian = reference_gramian(_tasks(4, 7))
    torch.testing.assert_close(restored(gramian), exported(gramian), rtol=0, atol=0)
    assert repr(restored) == repr(exported)
