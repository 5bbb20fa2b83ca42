"""What each rank runs in tests/test_distributed.py, and the same computed in one process.

Every rank builds the whole meta-batch from a seed and keeps its own slice, so the single-
process reference (``process_group=None`` over all tasks in rank order) sees exactly the
tasks the ranks saw together.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ga_optim import (
    Agreement,
    CosineAgreement,
    GeometricMedian,
    GradientAgreementAggregator,
    LeaveOneOutAgreement,
    Mean,
    NonNegativeAgreement,
    Weighting,
)

SHAPES = [(4, 3), (4,), (2, 4), (2,)]
DTYPES = {"float32": torch.float32, "float64": torch.float64}
SPLITS = {
    1: {"one": [5]},
    2: {"even": [3, 3], "empty": [0, 5], "uneven": [4, 1]},
    3: {"uneven": [1, 0, 4], "even": [2, 2, 2], "two_empty": [0, 0, 3]},
}


class GramianSoftmax(Weighting):
    """A weighting that needs the whole Gramian (exercises the gather path)."""

    def from_gramian(self, gramian: Tensor) -> Tensor:
        scale = gramian.diagonal().sum().clamp(min=1e-30)
        return torch.softmax(gramian.sum(dim=1) / scale, dim=0)


class Huge(Weighting):
    """Weights far from Σ|w| = 1: their weighted sum overflows float32."""

    needs = "count"

    def from_scores(self, scores: Tensor) -> Tensor:
        return torch.full_like(scores, 3e38)


FACTORIES: dict[str, Callable[[], Weighting]] = {
    "mean": Mean,
    "agreement": Agreement,
    "nonnegative": NonNegativeAgreement,
    "cosine": CosineAgreement,
    "leave_one_out": LeaveOneOutAgreement,
    "leave_one_out_nonnegative": lambda: LeaveOneOutAgreement(non_negative=True),
    "geometric_median": GeometricMedian,
    "gramian": GramianSoftmax,
}
WEIGHTINGS = tuple(FACTORIES)


def weighting(name: str) -> Weighting:
    return FACTORIES[name]()


def make_tasks(seed: int, n: int, dtype: torch.dtype) -> tuple[list[Any], list[Any]]:
    """``n`` tasks' vectors and agreement vectors; some entries ``None`` (a parameter a
    task did not touch). A shared direction makes most tasks agree, a few oppose."""
    gen = torch.Generator().manual_seed(seed)
    common = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    vectors, agreement = [], []
    for i in range(n):
        sign = -1.0 if i % 4 == 3 else 1.0
        task = [
            (sign * c + 0.7 * torch.randn(s, generator=gen, dtype=torch.float64)).to(dtype)
            for c, s in zip(common, SHAPES)
        ]
        delta = [
            (c + 0.5 * torch.randn(s, generator=gen, dtype=torch.float64)).to(dtype)
            for c, s in zip(common, SHAPES)
        ]
        if i % 2 == 0:
            task[3] = None
        if i % 3 == 0:
            delta[1] = None
        vectors.append(task)
        agreement.append(delta)
    return vectors, agreement


def make_params(dtype: torch.dtype, device: str = "cpu") -> list[Tensor]:
    gen = torch.Generator().manual_seed(1234)
    return [
        torch.randn(s, generator=gen, dtype=torch.float64).to(device, dtype).requires_grad_()
        for s in SHAPES
    ]


def _to(tasks: list[Any], device: str) -> list[Any]:
    return [[None if t is None else t.to(device) for t in task] for task in tasks]


def run_case(
    name: str,
    form: str,
    dtype_name: str,
    counts: list[int],
    rank: int | None,
    process_group: Any,
    device: str = "cpu",
) -> dict[str, Any]:
    """Two SGD-with-momentum steps, then an ``aggregate`` and a ``weights`` call, on this
    rank's slice of the tasks (all of them when ``rank`` is None), on ``device``; the
    results come back on the CPU."""
    dtype = DTYPES[dtype_name]
    params = make_params(dtype, device)
    outer = torch.optim.SGD(params, lr=0.3, momentum=0.9)
    aggregator = GradientAgreementAggregator(
        params, outer, weighting=weighting(name), process_group=process_group, track_cosines=True
    )
    start = 0 if rank is None else sum(counts[:rank])
    stop = sum(counts) if rank is None else start + counts[rank]
    out: dict[str, Any] = {"weights": [], "cosines": [], "bytes": []}
    for seed in (0, 1):
        vectors, agreement = make_tasks(seed, sum(counts), dtype)
        mine, mine_agreement = _to(vectors[start:stop], device), _to(agreement[start:stop], device)
        if form == "maml":
            w = aggregator.step(mine, agreement_vectors=mine_agreement)
        else:
            w = aggregator.step(mine)
        diagnostics = aggregator.last_diagnostics
        assert diagnostics is not None
        out["weights"].append(w.cpu())
        out["cosines"].append(None if diagnostics.cosines is None else diagnostics.cosines.cpu())
        out["bytes"].append(diagnostics.bytes_sent)
    out["params"] = [p.detach().cpu() for p in params]
    out["momentum"] = [outer.state[p]["momentum_buffer"].cpu() for p in params]
    vectors, agreement = make_tasks(2, sum(counts), dtype)
    out["aggregate"] = [t.cpu() for t in aggregator.aggregate(_to(vectors[start:stop], device))]
    out["plain_weights"] = aggregator.weights(_to(agreement[start:stop], device)).cpu()
    return out


def cases(world: int) -> list[tuple[str, str, str, str]]:
    return [
        (name, form, dtype, split)
        for split in SPLITS[world]
        for name in WEIGHTINGS
        for form in ("reptile", "maml")
        for dtype in DTYPES
    ]


def cases_worker(rank: int, world: int) -> dict[Any, Any]:
    results = {}
    for name, form, dtype, split in cases(world):
        counts = SPLITS[world][split]
        results[(name, form, dtype, split)] = run_case(
            name, form, dtype, counts, rank, dist.group.WORLD
        )
    return results


def cuda_worker(rank: int, world: int) -> dict[Any, Any]:
    """gloo moving CUDA tensors: two ranks sharing this machine's GPU."""
    return {
        (name, form): run_case(name, form, "float32", [3, 2], rank, dist.group.WORLD, "cuda")
        for name in WEIGHTINGS
        for form in ("reptile", "maml")
    }


# -- bad input on one rank ---------------------------------------------------------------


def _snapshot(params: list[Tensor], outer: torch.optim.Optimizer) -> dict[str, Any]:
    return {
        "params": [p.detach().clone() for p in params],
        "grads": [None if p.grad is None else p.grad.clone() for p in params],
        "state": {i: dict(outer.state[p]) for i, p in enumerate(params) if p in outer.state},
    }


def errors_worker(rank: int, world: int) -> dict[str, Any]:
    """A sequence of calls, each bad on one rank; every rank records what it raised and
    whether anything changed; a good step at the end shows no rank was left behind."""
    dtype = torch.float32
    params = make_params(dtype)
    outer = torch.optim.Adam(params, lr=0.1)
    aggregator = GradientAgreementAggregator(params, outer, process_group=dist.group.WORLD)
    mean = GradientAgreementAggregator(
        params, outer, weighting=Mean(), process_group=dist.group.WORLD
    )
    vectors, agreement = make_tasks(5, 2 * world, dtype)
    mine = vectors[2 * rank : 2 * rank + 2]
    mine_agreement = agreement[2 * rank : 2 * rank + 2]

    def nan_on_rank1() -> None:
        bad = [list(t) for t in mine]
        if rank == 1:
            bad[0][2] = bad[0][2].clone()
            bad[0][2][1, 1] = float("nan")
        aggregator.step(bad)

    def ragged_on_last() -> None:
        bad = [list(t) for t in mine]
        if rank == world - 1:
            bad[1][0] = torch.zeros(3, 4)
        aggregator.step(bad)

    def dtype_on_rank0() -> None:
        bad = [[None if t is None else t.double() for t in task] for task in mine]
        aggregator.step(bad if rank == 0 else mine)

    def inf_agreement_mean() -> None:
        bad = [list(t) for t in mine_agreement]
        if rank == 0:
            bad[1][0] = bad[1][0].clone()
            bad[1][0][0, 0] = float("inf")
        mean.step(mine, agreement_vectors=bad)

    def no_task_anywhere() -> None:
        aggregator.step([])

    def form_mismatch() -> None:
        if rank == 0:
            aggregator.step(mine, agreement_vectors=mine_agreement)
        else:
            aggregator.step(mine)

    huge = GradientAgreementAggregator(
        params, outer, weighting=Huge(), process_group=dist.group.WORLD
    )

    def overflow() -> None:
        huge.step(mine)

    def gramian_on_rank1() -> None:
        if rank == 1:
            aggregator.weights(gramian=torch.eye(2))
        else:
            aggregator.weights(mine)

    out: dict[str, Any] = {}
    for call in (
        nan_on_rank1,
        ragged_on_last,
        dtype_on_rank0,
        inf_agreement_mean,
        no_task_anywhere,
        form_mismatch,
        overflow,
        gramian_on_rank1,
    ):
        before = _snapshot(params, outer)
        try:
            call()
            raised: tuple[str, str] | None = None
        except Exception as error:
            raised = (type(error).__name__, str(error))
        after = _snapshot(params, outer)
        unchanged = (
            all(torch.equal(a, b) for a, b in zip(before["params"], after["params"]))
            and before["grads"] == after["grads"]
            and before["state"].keys() == after["state"].keys()
        )
        out[call.__name__] = {"raised": raised, "unchanged": unchanged}
    # non_finite="propagate": NaN on one rank reaches every rank's .grad, nothing raises.
    loose = [torch.zeros(s, requires_grad=True) for s in SHAPES]
    propagate = GradientAgreementAggregator(
        loose, non_finite="propagate", process_group=dist.group.WORLD
    )
    bad = [list(t) for t in mine]
    if rank == 1:
        bad[0][2] = bad[0][2].clone()
        bad[0][2][1, 1] = float("nan")
    out["propagate"] = {
        "weights": propagate.step(bad).clone(),
        "grads_finite": [bool(torch.isfinite(p.grad).all()) for p in loose],
    }
    # process_group=None stays one process although a default group is initialised.
    out["local"] = GradientAgreementAggregator(make_params(dtype)).weights(mine)
    out["good"] = aggregator.step(mine).clone()
    out["params"] = [p.detach().clone() for p in params]
    return out


# -- a rank that dies --------------------------------------------------------------------


def dying_worker(rank: int, world: int) -> dict[str, Any]:
    params = make_params(torch.float32)
    aggregator = GradientAgreementAggregator(
        params, torch.optim.SGD(params, lr=0.1), process_group=dist.group.WORLD
    )
    vectors, _ = make_tasks(0, 4, torch.float32)
    aggregator.step(vectors[2 * rank : 2 * rank + 2])  # one good step together
    dist.barrier()
    if rank == 1:
        os._exit(3)  # dies without a word, mid-training
    time.sleep(0.5)
    start = time.monotonic()
    try:
        aggregator.step(vectors[2 * rank : 2 * rank + 2])
        raised = None
    except Exception as error:
        raised = (type(error).__name__, isinstance(error, RuntimeError), str(error)[:300])
    return {"raised": raised, "elapsed": time.monotonic() - start}


# -- the adapters ------------------------------------------------------------------------


def _sine(seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    amplitude = 0.1 + 4.9 * torch.rand((), generator=gen, dtype=torch.float64)
    phase = 3.0 * torch.rand((), generator=gen, dtype=torch.float64)
    x = 10 * torch.rand(20, 1, generator=gen, dtype=torch.float64) - 5
    y = amplitude * torch.sin(x + phase)
    return x[:10], y[:10], x[10:], y[10:]


def sine_model() -> torch.nn.Module:
    torch.manual_seed(7)
    return torch.nn.Sequential(
        torch.nn.Linear(1, 12), torch.nn.Tanh(), torch.nn.Linear(12, 1)
    ).double()


ADAPTERS = ("reptile", "func", "learn2learn", "higher")


def run_adapter(kind: str, counts: list[int], rank: int | None, process_group: Any) -> list[Tensor]:
    """Two meta-iterations of ``kind``'s loop over this rank's tasks (all when ``rank`` is
    None), agreement-weighted; the parameters after them."""
    model = sine_model()
    loss_fn = torch.nn.MSELoss()
    start = 0 if rank is None else sum(counts[:rank])
    stop = sum(counts) if rank is None else start + counts[rank]
    outer = torch.optim.SGD(model.parameters(), lr=0.1)
    kwargs = {"weighting": Agreement(), "process_group": process_group}
    if kind == "reptile":
        from ga_optim.adapters.reptile import AgreementReptile

        reptile = AgreementReptile(model, outer, **kwargs)
        for iteration in range(2):
            for index in range(start, stop):
                xs, ys, _, _ = _sine(100 * iteration + index)
                learner = reptile.clone()
                inner = torch.optim.SGD(learner.parameters(), lr=0.02)
                for _ in range(3):
                    inner.zero_grad()
                    loss_fn(learner(xs), ys).backward()
                    inner.step()
                reptile.record(learner)
            reptile.step()
    elif kind == "func":
        from torch.func import functional_call, grad

        from ga_optim.adapters.func import FuncAgreement, reptile_deltas

        agree = FuncAgreement(model, outer, **kwargs)

        def query_loss(params: dict[str, Tensor], xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor):  # type: ignore[no-untyped-def]
            inner = grad(lambda p: loss_fn(functional_call(model, p, (xs,)), ys))(params)
            fast = {k: params[k] - 0.05 * inner[k] for k in params}
            return loss_fn(functional_call(model, fast, (xq,)), yq), fast

        for iteration in range(2):
            params = {k: v.detach() for k, v in model.named_parameters()}
            grads: dict[str, list[Tensor]] = {k: [] for k in params}
            adapted: dict[str, list[Tensor]] = {k: [] for k in params}
            for index in range(start, stop):
                g, fast = grad(query_loss, has_aux=True)(params, *_sine(100 * iteration + index))
                for k in params:
                    grads[k].append(g[k])
                    adapted[k].append(fast[k].detach())
            stack = {
                k: torch.stack(v) if v else params[k].new_zeros((0, *params[k].shape))
                for k, v in grads.items()
            }
            fast_stack = {
                k: torch.stack(v) if v else params[k].new_zeros((0, *params[k].shape))
                for k, v in adapted.items()
            }
            agree.step(stack, agreement_vectors=reptile_deltas(params, fast_stack))
    elif kind == "learn2learn":
        import learn2learn as l2l

        from ga_optim.adapters.learn2learn import AgreementMAML

        maml = l2l.algorithms.MAML(model, lr=0.05, first_order=False)
        agree = AgreementMAML(maml, torch.optim.SGD(maml.parameters(), lr=0.1), **kwargs)
        for iteration in range(2):
            for index in range(start, stop):
                xs, ys, xq, yq = _sine(100 * iteration + index)
                learner = agree.clone()
                learner.adapt(loss_fn(learner(xs), ys))
                agree.backward(loss_fn(learner(xq), yq), learner)
            agree.step()
    elif kind == "higher":
        import higher

        from ga_optim.adapters.higher import AgreementHigher

        agree = AgreementHigher(model, outer, **kwargs)
        inner_opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for iteration in range(2):
            for index in range(start, stop):
                xs, ys, xq, yq = _sine(100 * iteration + index)
                with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (
                    fmodel,
                    diffopt,
                ):
                    diffopt.step(loss_fn(fmodel(xs), ys))
                    agree.backward(loss_fn(fmodel(xq), yq), fmodel)
            agree.step()
    return [p.detach().clone() for p in model.parameters()]


def adapters_worker(rank: int, world: int, counts: list[int]) -> dict[str, list[Tensor]]:
    return {kind: run_adapter(kind, counts, rank, dist.group.WORLD) for kind in ADAPTERS}
