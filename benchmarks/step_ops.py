"""What one outer step dispatches, for every way a meta-batch arrives (issue 18's table).

The Omniglot-scale conv-4 (64 filters, 18 tensors, 5-way; learn2learn's and the paper's
setting), N = 4 and N = 32 tasks, Mean and Agreement. One outer step is the call that
turns the recorded or given tasks into ``.grad`` (``optimizer=None``: the optimizer's own
operations are not counted), after a warm-up step of the same shape. Every aten operator
that reaches the dispatcher from Python counts once (``benchmarks/_dispatched.py``), and
``aten._local_scalar_dense`` among them is a value read back to the host. For the
adapters the recording is counted apart, per task.

Arrival forms: ``AgreementReptile.record`` (rows written by the adapter), learn2learn's
``AgreementMAML.backward`` (MAML form: meta-gradients and deltas), per-task lists given to
``aggregator.step`` (both forms), and ``FuncAgreement`` dicts (both forms).

Targets (issue 18): at most 30 operations per step for every form, the same at N = 4 and
N = 32 (± 2), Mean never above Agreement, at most one scalar read.

    .venv/bin/python benchmarks/step_ops.py           # seconds
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Callable

import learn2learn as l2l
import torch
from _dispatched import Dispatched
from torch import nn

from ga_optim import Agreement, GradientAgreementAggregator, Mean, Weighting
from ga_optim.adapters.func import FuncAgreement
from ga_optim.adapters.learn2learn import AgreementMAML
from ga_optim.adapters.reptile import AgreementReptile

SCALAR_READ = "aten._local_scalar_dense.default"
FORMS = (
    "AgreementReptile.record",
    "AgreementMAML.backward (MAML form)",
    "lists to aggregator.step",
    "lists to aggregator.step, MAML form",
    "FuncAgreement dicts",
    "FuncAgreement dicts, MAML form",
)


def conv4(ways: int = 5, filters: int = 64) -> nn.Module:
    layers: list[nn.Module] = []
    channels = 1
    for _ in range(4):
        layers += [
            nn.Conv2d(channels, filters, 3, padding=1),
            nn.BatchNorm2d(filters, track_running_stats=False),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 28 → 14 → 7 → 3 → 1
        ]
        channels = filters
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(filters, ways))


def count(run: Callable[[], object]) -> Counter[str]:
    with Dispatched() as counter:
        run()
    return counter.ops


def perturbed(model: nn.Module, gen: torch.Generator) -> list[torch.Tensor]:
    return [torch.randn(p.shape, generator=gen) * 0.01 + 0.001 for p in model.parameters()]


def step_ops(form: str, weighting: Weighting, n: int) -> tuple[Counter[str], Counter[str]]:
    """The operators of one outer step (after a warm-up step), and of recording one task
    (adapters only; empty otherwise)."""
    torch.manual_seed(0)
    model = conv4()
    gen = torch.Generator().manual_seed(n)
    record: Counter[str] = Counter()
    if form == "AgreementReptile.record":
        reptile = AgreementReptile(model, None, weighting=weighting)

        def prepare() -> None:
            nonlocal record
            for i in range(n):
                learner = reptile.clone()
                with torch.no_grad():
                    for p, d in zip(learner.parameters(), perturbed(model, gen)):
                        p.add_(d)
                ops = count(lambda learner=learner: reptile.record(learner))
                record = ops if i == 0 else record

        prepare()
        reptile.step()
        prepare()
        model.zero_grad()  # the loop's zero_grad() (dispatches nothing): step() adds to .grad
        return count(reptile.step), record
    if form.startswith("AgreementMAML"):
        maml = l2l.algorithms.MAML(model, lr=0.4)
        agree = AgreementMAML(maml, None, weighting=weighting)
        x = torch.randn(5, 1, 28, 28, generator=gen)
        y = torch.arange(5)

        def record_all() -> None:
            nonlocal record
            for i in range(n):
                learner = agree.clone()
                learner.adapt(nn.functional.cross_entropy(learner(x), y))
                loss = nn.functional.cross_entropy(learner(x), y)
                ops = count(lambda loss=loss, learner=learner: agree.backward(loss, learner))
                record = ops if i == 0 else record

        record_all()
        agree.step()
        record_all()
        model.zero_grad()
        return count(agree.step), record
    maml_form = form.endswith("MAML form")
    if form.startswith("lists"):
        aggregator = GradientAgreementAggregator(model.parameters(), weighting=weighting)
        tasks = [perturbed(model, gen) for _ in range(n)]
        deltas = [perturbed(model, gen) for _ in range(n)] if maml_form else None
        aggregator.step(tasks, agreement_vectors=deltas)
        model.zero_grad()
        return count(lambda: aggregator.step(tasks, agreement_vectors=deltas)), record
    func = FuncAgreement(model, None, weighting=weighting)
    names = [name for name, _ in model.named_parameters()]
    stacked = {
        k: torch.stack([perturbed(model, gen)[i] for _ in range(n)]) for i, k in enumerate(names)
    }
    stacked_deltas = {k: 0.5 * v for k, v in stacked.items()} if maml_form else None
    func.step(stacked, agreement_vectors=stacked_deltas)
    model.zero_grad()
    return count(lambda: func.step(stacked, agreement_vectors=stacked_deltas)), record


def table() -> dict[str, dict[str, tuple[int, int, int, int]]]:
    """Per form and weighting: (ops at N = 4, ops at N = 32, scalar reads at N = 32,
    recording ops per task)."""
    out: dict[str, dict[str, tuple[int, int, int, int]]] = {}
    for form in FORMS:
        out[form] = {}
        for name, weighting in (("Mean", Mean()), ("Agreement", Agreement())):
            few, _ = step_ops(form, weighting, 4)
            many, record = step_ops(form, weighting, 32)
            out[form][name] = (
                sum(few.values()),
                sum(many.values()),
                many[SCALAR_READ],
                sum(record.values()),
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--detail", action="store_true", help="list the operators of each step")
    args = parser.parse_args()
    tensors = list(conv4().parameters())
    params = sum(p.numel() for p in tensors)
    print(f"# torch {torch.__version__}; conv-4, {len(tensors)} tensors, P = {params}")
    print("| how the meta-batch arrives | Mean N=4 → 32 | Agreement N=4 → 32 | reads |", end="")
    print(" record ops/task |")
    print("|---|---|---|---|---|")
    results = table()
    worst = 0
    ok = True
    for form, row in results.items():
        mean, agree = row["Mean"], row["Agreement"]
        reads = max(mean[2], agree[2])
        recorded = f"{mean[3]} / {agree[3]}" if mean[3] else "—"
        print(
            f"| {form} | {mean[0]} → {mean[1]} | {agree[0]} → {agree[1]} | {reads} | {recorded} |"
        )
        worst = max(worst, mean[0], mean[1], agree[0], agree[1])
        ok &= all(abs(r[0] - r[1]) <= 2 for r in (mean, agree))
        ok &= mean[0] <= agree[0] and mean[1] <= agree[1] and reads <= 1
    print(
        f"\nTargets: at most 30 operations per step (worst {worst}: "
        f"{'met' if worst <= 30 else 'not met'}); the same at N = 4 and 32 ± 2, Mean never "
        f"above Agreement, at most one read ({'met' if ok else 'not met'})."
    )
    if args.detail:
        for form in FORMS:
            for name, weighting in (("Mean", Mean()), ("Agreement", Agreement())):
                ops, _ = step_ops(form, weighting, 32)
                print(f"\n{form}, {name}: {dict(ops)}")


if __name__ == "__main__":
    main()
