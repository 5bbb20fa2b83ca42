"""This checkout's ga_optim against another one's, side by side in one process.

The other checkout's package is imported under the name ``ga_optim_before`` (a link in a
temporary folder), so both run interleaved round by round on the same tensors; each time
is the median over rounds, and the ratio is this checkout's time over the other's. For
every way a meta-batch arrives, one meta-batch's arrival and outer step is timed:

* ``AgreementReptile``: N × ``record(learner)`` (learners adapted beforehand), ``step()``;
* ``AgreementMAML`` (learn2learn, first order, so that the learners adapted beforehand
  can be reused): N × (query forward, ``backward(loss, learner)``), ``step()`` (the
  Omniglot scale only);
* per-task lists to ``aggregator.step``, Reptile and MAML forms;
* ``FuncAgreement`` dicts ``{name: [N, *shape]}``, Reptile and MAML forms.

Two scales: the Omniglot conv-4 (18 tensors, P = 112 261) at N = 32, and N = 32 tasks of
P = 1e7 in 4 tensors (50/30/15/5 %). Targets (issue 18): at the Omniglot scale no form
slower than before (ratio ≤ 1), at P = 1e7 no form above 1.5. ``--memory`` adds, at
P = 1e7, the bytes the first outer step allocates (what the library keeps between steps,
plus one step's own) and a warm step's, counted per dispatched operator (deterministic;
the recording of adapter tasks is included).

    git worktree add /tmp/before COMMIT
    .venv/bin/python benchmarks/versus.py --before /tmp/before [--memory]
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

FORMS = (
    "AgreementReptile.record + step",
    "AgreementMAML.backward + step",
    "lists to aggregator.step",
    "lists to aggregator.step, MAML form",
    "FuncAgreement dicts",
    "FuncAgreement dicts, MAML form",
)
WEIGHTINGS = ("Mean", "Agreement")


def load(before: Path) -> tuple[ModuleType, ModuleType]:
    """(this checkout's ga_optim, the other's as ``ga_optim_before``)."""
    import ga_optim

    folder = Path(tempfile.mkdtemp())
    (folder / "ga_optim_before").symlink_to((before / "ga_optim").resolve())
    sys.path.insert(0, str(folder))
    return ga_optim, importlib.import_module("ga_optim_before")


def conv4() -> nn.Module:
    layers: list[nn.Module] = []
    channels = 1
    for _ in range(4):
        layers += [
            nn.Conv2d(channels, 64, 3, padding=1),
            nn.BatchNorm2d(64, track_running_stats=False),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]
        channels = 64
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(64, 5))


class Large(nn.Module):
    """P = 1e7 in four tensors; the forward is a stand-in (only the outer step is timed)."""

    def __init__(self) -> None:
        super().__init__()
        sizes = (5_000_000, 3_000_000, 1_500_000, 500_000)
        self.weights = nn.ParameterList([nn.Parameter(torch.zeros(s)) for s in sizes])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum((w[:5] * x).sum() for w in self.weights)  # type: ignore[return-value]


def prepare(
    lib: ModuleType, form: str, weighting: str, model: nn.Module, n: int, seed: int
) -> Callable[[], Any]:
    """One meta-batch's arrival and outer step with ``lib``, ready to call repeatedly."""
    gen = torch.Generator().manual_seed(seed)
    chosen = getattr(lib, weighting)()
    params = list(model.parameters())

    def vectors() -> list[list[torch.Tensor]]:
        return [
            [torch.randn(p.shape, generator=gen) * 0.01 + 1e-3 for p in params] for _ in range(n)
        ]

    if form.startswith("AgreementReptile"):
        reptile = importlib.import_module(f"{lib.__name__}.adapters.reptile")
        agree = reptile.AgreementReptile(model, None, weighting=chosen)
        learners = []
        for task in vectors():
            learner = agree.clone()
            with torch.no_grad():
                for p, d in zip(learner.parameters(), task):
                    p.add_(d)
            learners.append(learner)

        def run_reptile() -> Any:
            model.zero_grad()  # the loop's zero_grad(): this version adds to .grad
            for learner in learners:
                agree.record(learner)
            return agree.step()

        return run_reptile
    if form.startswith("AgreementMAML"):
        import learn2learn as l2l

        adapter = importlib.import_module(f"{lib.__name__}.adapters.learn2learn")
        maml = l2l.algorithms.MAML(model, lr=0.4, first_order=True)
        agree = adapter.AgreementMAML(maml, None, weighting=chosen)
        x = torch.randn(5, 1, 28, 28, generator=gen)
        y = torch.arange(5)
        learners = []
        for _ in range(n):
            learner = agree.clone()
            learner.adapt(nn.functional.cross_entropy(learner(x), y))
            learners.append(learner)

        def run_maml() -> Any:
            model.zero_grad()
            for learner in learners:  # the query forward is timed too (the same for both)
                agree.backward(nn.functional.cross_entropy(learner(x), y), learner)
            return agree.step()

        return run_maml
    maml_form = form.endswith("MAML form")
    if form.startswith("lists"):
        aggregator = lib.GradientAgreementAggregator(params, weighting=chosen)
        tasks, deltas = vectors(), vectors() if maml_form else None
        return lambda: (model.zero_grad(), aggregator.step(tasks, agreement_vectors=deltas))
    func = importlib.import_module(f"{lib.__name__}.adapters.func")
    agree = func.FuncAgreement(model, None, weighting=chosen)
    stacked = {
        k: torch.randn(n, *p.shape, generator=gen) * 0.01 for k, p in model.named_parameters()
    }
    deltas_d = {k: 0.5 * v for k, v in stacked.items()} if maml_form else None
    return lambda: (model.zero_grad(), agree.step(stacked, agreement_vectors=deltas_d))


def interleaved(runs: dict[str, Callable[[], Any]], rounds: int) -> dict[str, float]:
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


class Allocated(TorchDispatchMode):
    """Bytes of the new storages that the operators dispatched from Python create (views,
    in-place and ``out=`` results reuse a storage and are not counted)."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        given = {
            t.untyped_storage().data_ptr()
            for t in tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in given:
                self.bytes += t.untyped_storage().nbytes()
        return out


def memory(
    lib: ModuleType, form: str, weighting: str, model: nn.Module, n: int
) -> tuple[float, float]:
    """Bytes allocated by the first outer step (what the library keeps, plus what one step
    takes) and by a warm one, in units of P floats (the update is 1)."""
    p = sum(t.numel() for t in model.parameters())
    run = prepare(lib, form, weighting, model, n, 0)
    found = []
    for _ in range(2):
        with Allocated() as counter:
            run()
        found.append(counter.bytes / (4 * p))
    return found[0], found[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", type=Path, required=True, help="the other checkout")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--large-rounds", type=int, default=5)
    parser.add_argument("--memory", action="store_true")
    parser.add_argument("--quick", action="store_true", help="N = 4, small model, 3 rounds")
    args = parser.parse_args()
    now, before = load(args.before)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads; this: {now.__file__}")
    print(f"# before: {before.__file__}")
    n = 4 if args.quick else 32
    scales = [("Omniglot conv-4", conv4, args.rounds if not args.quick else 3)]
    if not args.quick:
        scales.append(("P = 1e7", Large, args.large_rounds))
    print("| scale | form | weighting | before ms | now ms | now / before |")
    print("|---|---|---|---|---|---|")
    worst: dict[str, float] = {}
    for scale, build, rounds in scales:
        for form in FORMS:
            if form.startswith("AgreementMAML") and build is Large:
                continue
            for weighting in WEIGHTINGS:
                torch.manual_seed(0)
                model = build()
                runs = {
                    "before": prepare(before, form, weighting, model, n, 1),
                    "now": prepare(now, form, weighting, model, n, 1),
                }
                t = interleaved(runs, rounds)
                ratio = t["now"] / t["before"]
                worst[scale] = max(worst.get(scale, 0.0), ratio)
                print(
                    f"| {scale} | {form} | {weighting} | {t['before']:.2f} | {t['now']:.2f} "
                    f"| {ratio:.2f} |",
                    flush=True,
                )
    for scale, bound in (("Omniglot conv-4", 1.0), ("P = 1e7", 1.5)):
        if scale in worst:
            print(f"\n{scale}: worst now / before {worst[scale]:.2f} (target ≤ {bound:g})")
    if args.memory:
        print("\nAllocated at N = 32, P = 1e7 (units of P floats): first step / warm step")
        print("| form | weighting | before | now |")
        print("|---|---|---|---|")
        for form in FORMS:
            if form.startswith("AgreementMAML"):
                continue
            for weighting in WEIGHTINGS:
                cells = []
                for lib in (before, now):
                    torch.manual_seed(0)
                    peak, kept = memory(lib, form, weighting, Large(), 32)
                    cells.append(f"{peak:.2f} / {kept:.2f}")
                print(f"| {form} | {weighting} | {cells[0]} | {cells[1]} |", flush=True)


if __name__ == "__main__":
    main()
