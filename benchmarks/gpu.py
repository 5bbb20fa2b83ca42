"""The GPU path: meta-steps and aggregation on a GPU, against an unweighted reference.

For the few-shot example's own meta-step (``meta_step`` in
``examples/paper/fewshot_classification.py``: Finn et al.'s conv-4, paper settings, random
images, ``vmap`` + ``FuncAgreement``), per setting and interleaved round by round:

* *reference*: the same meta-step whose outer step is a plain ``mean(0)`` of the stacked
  vectors written to ``.grad`` and the same optimizer step (no ga_optim at all);
* *Mean* and *Agreement*: ``FuncAgreement(..., weighting=Mean() | Agreement())``;
* *aggregation alone*: ``FuncAgreement.step`` on stacked vectors already computed, for
  Mean and Agreement (and the reference's own mean-and-write).

Then, at N = 32 and P = 1e7 (fp32): Agreement and Mean aggregation of a stacked
``[N, P]`` tensor and of per-task lists (4 tensors), against the *two-pass floor* — two
reads of the N × P entries at the device-to-device copy bandwidth measured here (which
is one copy of the ``[N, P]`` tensor: it reads and writes N × P entries).

Last, what one outer step launches at N = 4 and N = 32 (stacked input on 18 tiny
parameters, and per-task lists of 4 tensors too large to pack): on CUDA the kernels and
copies the profiler records on the device, on the CPU the operators dispatched; the stacked
path's count should not depend on N, the lists' grows by a few per task. It ends with the
targets below, each beside the value measured in the tables above and whether it is met.

Times are medians over rounds (``torch.cuda.synchronize`` around each timed call, each
round runs every variant ``--inner`` times), after a warm-up. Targets (issue 11, H100):
aggregation at Omniglot scale ≤ 0.5 ms for either weighting; the Agreement meta-step
within 5 % of the reference and Mean within 2 %, in both forms; Agreement at N = 32,
P = 1e7 within 2× of the two-pass floor.

    python benchmarks/gpu.py            # on a machine with a GPU (≈ 2 minutes on an H100)
    python benchmarks/gpu.py --quick    # small settings, seconds (also runs on the CPU)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "paper"))

from _dispatched import Dispatched
from fewshot_classification import Config, build_model, meta_step

from ga_optim import Agreement, GradientAgreementAggregator, Mean, TaskStack
from ga_optim.adapters.func import FuncAgreement, reptile_deltas

SETTINGS = [
    ("Omniglot 5-way 1-shot MAML", "omniglot", "maml", 5, (1, 28, 28)),
    ("Omniglot 20-way 1-shot MAML", "omniglot", "maml", 20, (1, 28, 28)),
    ("Omniglot 5-way 1-shot Reptile", "omniglot", "reptile", 5, (1, 28, 28)),
    ("miniImageNet 5-way 1-shot MAML", "miniimagenet", "maml", 5, (3, 84, 84)),
]


class PlainMean:
    """The unweighted reference: ``mean(0)`` of the stacked vectors into ``.grad``, step."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.named = list(model.named_parameters())
        self.optimizer = optimizer

    def step(self, task_vectors: dict[str, torch.Tensor], **_: Any) -> torch.Tensor:
        for name, param in self.named:
            param.grad = task_vectors[name].mean(0)
        self.optimizer.step()
        return task_vectors[self.named[0][0]].new_ones(())


class PlainListMean:
    """The unweighted reference for per-task lists: per parameter, ``stack(...).mean(0)``
    into ``.grad``, step."""

    def __init__(self, params: list[torch.Tensor], optimizer: torch.optim.Optimizer) -> None:
        self.params = params
        self.optimizer = optimizer

    def step(self, task_vectors: list[list[torch.Tensor]], **_: Any) -> torch.Tensor:
        for p, param in enumerate(self.params):
            param.grad = torch.stack([task[p] for task in task_vectors]).mean(0)
        self.optimizer.step()
        return self.params[0].new_ones(())


class PlainRowsMean:
    """The unweighted reference for recorded rows (what the adapters pass: one matrix
    ``[N, P]``): ``mean(0)``, its per-parameter views into ``.grad``, step."""

    def __init__(self, params: list[torch.Tensor], optimizer: torch.optim.Optimizer) -> None:
        self.params = params
        self.numels = [p.numel() for p in params]
        self.optimizer = optimizer

    def step(self, task_vectors: torch.Tensor, **_: Any) -> torch.Tensor:
        mean = task_vectors.mean(0)
        for param, part in zip(self.params, torch.split(mean, self.numels)):
            param.grad = part.view(param.shape)
        self.optimizer.step()
        return mean.new_ones(())


VARIANTS = ("reference", "mean", "agreement")


def outer_step(variant: str, model: torch.nn.Module) -> PlainMean | FuncAgreement:
    """One variant's outer step on ``model`` (SGD, lr 1e-4): the unweighted reference, or
    ``FuncAgreement`` with Mean or Agreement."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    if variant == "reference":
        return PlainMean(model, opt)
    return FuncAgreement(model, opt, weighting=Mean() if variant == "mean" else Agreement())


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def interleaved(
    runs: dict[str, Callable[[], object]], rounds: int, inner: int, device: str
) -> dict[str, float]:
    """Median ms per call of each run, interleaved round by round, after a warm-up."""
    for run in runs.values():
        run()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            sync(device)
            start = time.perf_counter()
            for _ in range(inner):
                run()
            sync(device)
            times[name].append((time.perf_counter() - start) * 1e3 / inner)
    return {name: statistics.median(values) for name, values in times.items()}


def episodes(cfg: Config, shape: tuple[int, int, int], device: str) -> tuple[torch.Tensor, ...]:
    n, ways, shots, queries = cfg.meta_batch, cfg.ways, cfg.shots, cfg.train_queries
    gen = torch.Generator().manual_seed(0)
    xs = torch.randn(n, ways * shots, *shape, generator=gen)
    xq = torch.randn(n, ways * queries, *shape, generator=gen)
    ys = torch.arange(ways).repeat_interleave(shots).expand(n, -1).contiguous()
    yq = torch.arange(ways).repeat_interleave(queries).expand(n, -1).contiguous()
    return tuple(t.to(device) for t in (xs, ys, xq, yq))


def meta_steps(
    name: str, dataset: str, algorithm: str, ways: int, shape: tuple[int, int, int], args: Any
) -> dict[str, Any]:
    overrides: dict[str, Any] = {"ways": ways, "shots": 1, "device": args.device}
    if args.quick:
        overrides.update(meta_batch=4, hidden=16)
    cfg = Config.for_run(dataset, algorithm, **overrides)
    batch = episodes(cfg, shape, args.device)
    models = {variant: build_model(cfg, shape, seed=0) for variant in VARIANTS}
    variants = {variant: outer_step(variant, models[variant]) for variant in VARIANTS}

    def train_step(v: str) -> Any:
        models[v].zero_grad()  # as the loop does: the adapters add to .grad
        return meta_step(models[v], variants[v], cfg, batch)  # type: ignore[arg-type]

    runs = {v: (lambda v=v: train_step(v)) for v in variants}
    steps = interleaved(runs, args.rounds, args.inner, args.device)

    # Aggregation alone, on the stacked vectors of one meta-step.
    model = models["agreement"]
    params = {k: p.detach() for k, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(1)
    stacked = {
        k: (torch.randn(cfg.meta_batch, *p.shape, generator=gen) + 0.1).to(args.device)
        for k, p in params.items()
    }
    adapted = {k: params[k] - 0.01 * stacked[k] for k in params}
    deltas = reptile_deltas(params, adapted) if algorithm != "reptile" else None
    alone = {
        "reference": lambda: variants["reference"].step(stacked),
        "mean": lambda: variants["mean"].step(stacked, agreement_vectors=deltas, accumulate=False),
        "agreement": lambda: variants["agreement"].step(
            stacked, agreement_vectors=deltas, accumulate=False
        ),
    }
    aggregation = interleaved(alone, args.rounds, args.inner, args.device)
    p_total = sum(p.numel() for p in params.values())
    return {"name": name, "N": cfg.meta_batch, "P": p_total, "steps": steps, "alone": aggregation}


def large(args: Any) -> dict[str, float]:
    n, p = (32, 10_000_000) if not args.quick else (8, 100_000)
    device = args.device
    gen = torch.Generator(device=device).manual_seed(2)
    flat = torch.randn(n, p, device=device, generator=gen) + 0.1
    copy = torch.empty_like(flat)
    sizes = [p // 2, 3 * p // 10, 3 * p // 20, p - p // 2 - 3 * p // 10 - 3 * p // 20]
    lists = [list(torch.split(row, sizes)) for row in flat.clone()]
    params = [torch.zeros(s, device=device, requires_grad=True) for s in sizes]
    flat_params = [torch.zeros(p, device=device, requires_grad=True)]
    stacked_agree = GradientAgreementAggregator(flat_params)
    stacked_mean = GradientAgreementAggregator(flat_params, weighting=Mean())
    list_agree = GradientAgreementAggregator(params)
    list_mean = GradientAgreementAggregator(params, weighting=Mean())
    stack = TaskStack([flat])
    runs = {
        "copy": lambda: copy.copy_(flat),
        "stacked mean": lambda: stacked_mean.step(stack, accumulate=False),
        "stacked agreement": lambda: stacked_agree.step(stack, accumulate=False),
        "list mean": lambda: list_mean.step(lists, accumulate=False),
        "list agreement": lambda: list_agree.step(lists, accumulate=False),
    }
    out = interleaved(runs, args.rounds, 1, device)
    out["N"], out["P"] = n, p
    out["bandwidth_GBs"] = 2 * flat.numel() * 4 / (out["copy"] * 1e-3) / 1e9
    return out


def list_step(variant: str, model: torch.nn.Module, reference: type = PlainListMean) -> Any:
    """One variant's outer step for per-task lists, or (``reference=PlainRowsMean``) for
    recorded rows ``[N, P]`` (SGD, lr 1e-4)."""
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=1e-4)
    if variant == "reference":
        return reference(params, opt)
    weighting = Mean() if variant == "mean" else Agreement()
    return GradientAgreementAggregator(params, opt, weighting=weighting)


HOST_FORMS = (
    "reptile",
    "maml",
    "list reptile",
    "list maml",
    "recorded reptile",
    "recorded maml",
)
#: Issue 18's host-time targets: (form, Mean / ref bound, Agreement / ref bound).
HOST_TARGETS = [
    (form, 1.5, 2.0) for form in ("reptile", "maml", "recorded reptile", "recorded maml")
]


def host_overhead(args: Any) -> dict[str, float]:
    """Outer steps on 18 parameters of 2 entries each (the conv-4's parameter count), N = 32:
    the arithmetic is negligible, so what is timed is the host's work (Python, dispatch,
    launches) per step, the part that does not shrink with a faster device. Stacked input
    (``FuncAgreement``) and per-task lists (the learn2learn and Reptile adapters' form)."""
    device = args.device
    model = torch.nn.Sequential(*[torch.nn.Linear(1, 1) for _ in range(9)]).to(device)
    named = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(3)
    stacked = {
        k: (torch.randn(32, *p.shape, generator=gen) + 0.1).to(device) for k, p in named.items()
    }
    deltas = {k: 0.01 * v for k, v in stacked.items()}
    lists = [[stacked[k][i] for k in named] for i in range(32)]
    list_deltas = [[deltas[k][i] for k in named] for i in range(32)]
    rows = torch.cat([stacked[k].reshape(32, -1) for k in named], dim=1)
    row_deltas = torch.cat([deltas[k].reshape(32, -1) for k in named], dim=1)
    runs: dict[str, Callable[[], Any]] = {}
    for form, agreement in (("reptile", None), ("maml", deltas)):
        for variant in VARIANTS:
            step = outer_step(variant, model)
            runs[f"{form} {variant}"] = lambda s=step, a=agreement: s.step(
                stacked, agreement_vectors=a, accumulate=False
            )
    for form, list_agreement in (("list reptile", None), ("list maml", list_deltas)):
        for variant in VARIANTS:
            aggregator = list_step(variant, model)
            runs[f"{form} {variant}"] = lambda s=aggregator, a=list_agreement: s.step(
                lists, agreement_vectors=a, accumulate=False
            )
    for form, row_agreement in (("recorded reptile", None), ("recorded maml", row_deltas)):
        for variant in VARIANTS:
            recorded = list_step(variant, model, PlainRowsMean)
            runs[f"{form} {variant}"] = lambda s=recorded, a=row_agreement: s.step(
                rows, agreement_vectors=a, accumulate=False
            )
    return interleaved(runs, args.rounds, 20, device)


#: Per-task lists for the launch count: two tensors above the size up to which
#: ``ga_optim`` packs parameters (2**14 entries) and two above the size from which the CPU
#: sums a parameter on its own (2**20), so that none is packed and every per-task launch
#: shows.
LIST_SIZES = (2**20 + 1, 2**20 + 1, 2**14 + 1, 2**14 + 1)


def launches(args: Any) -> dict[str, int]:
    """What one outer step launches at N = 4 and N = 32: on CUDA the kernels and copies
    the profiler records on the device; on the CPU the operators dispatched. Stacked input
    on the 18-parameter model of :func:`host_overhead` (the count should not depend on N),
    and per-task lists of :data:`LIST_SIZES` (it grows with N: this says by how much)."""
    device = args.device
    model = torch.nn.Sequential(*[torch.nn.Linear(1, 1) for _ in range(9)]).to(device)
    big = torch.nn.ParameterList([torch.zeros(s) for s in LIST_SIZES]).to(device)
    counts: dict[str, int] = {}
    for n in (4, 32):
        gen = torch.Generator().manual_seed(n)
        stacked = {
            k: (torch.randn(n, *p.shape, generator=gen) + 0.1).to(device)
            for k, p in model.named_parameters()
        }
        deltas = {k: 0.01 * v for k, v in stacked.items()}
        lists = [[torch.randn(s, generator=gen).to(device) for s in LIST_SIZES] for _ in range(n)]
        list_deltas = [[0.01 * t for t in task] for task in lists]
        rows = torch.stack([torch.cat(task) for task in lists])
        row_deltas = 0.01 * rows
        for variant in VARIANTS:
            for form, agreement in (("reptile", None), ("maml", deltas)):
                step: Any = outer_step(variant, model)
                counts[f"{form} {variant} {n}"] = _count(
                    lambda s=step, v=stacked, a=agreement: s.step(
                        v, agreement_vectors=a, accumulate=False
                    ),
                    device,
                )
            for form, list_agreement in (("list reptile", None), ("list maml", list_deltas)):
                step = list_step(variant, big)
                counts[f"{form} {variant} {n}"] = _count(
                    lambda s=step, v=lists, a=list_agreement: s.step(
                        v, agreement_vectors=a, accumulate=False
                    ),
                    device,
                )
            for form, row_agreement in (("recorded reptile", None), ("recorded maml", row_deltas)):
                step = list_step(variant, big, PlainRowsMean)
                counts[f"{form} {variant} {n}"] = _count(
                    lambda s=step, v=rows, a=row_agreement: s.step(
                        v, agreement_vectors=a, accumulate=False
                    ),
                    device,
                )
    return counts


def _count(run: Callable[[], object], device: str) -> int:
    """Launches (CUDA) or dispatched operators (CPU) of one call, after a warm-up call."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    run()
    sync(device)
    if device != "cuda":
        with Dispatched() as dispatched:
            run()
        return sum(dispatched.ops.values())
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        sync(device)
    return sum(1 for e in prof.events() if e.device_type == DeviceType.CUDA)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--inner", type=int, default=5)
    parser.add_argument("--host-only", action="store_true", help="only the host-overhead table")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.inner = 2, 1
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"# {name}, torch {torch.__version__}; medians of {args.rounds} interleaved rounds")
    print(
        "| setting | N | P | reference step ms | Mean step ms | Agreement step ms | "
        "Mean / ref | Agreement / ref | aggregation ref / Mean / Agreement ms |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    settings = SETTINGS[:1] + SETTINGS[2:3] if args.quick else SETTINGS
    if args.host_only:
        settings = []
    results = []
    for setting in settings:
        r = meta_steps(*setting, args)
        results.append(r)
        s, a = r["steps"], r["alone"]
        print(
            f"| {r['name']} | {r['N']} | {r['P']} | {s['reference']:.2f} | {s['mean']:.2f} | "
            f"{s['agreement']:.2f} | {s['mean'] / s['reference']:.3f} | "
            f"{s['agreement'] / s['reference']:.3f} | "
            f"{a['reference']:.3f} / {a['mean']:.3f} / {a['agreement']:.3f} |",
            flush=True,
        )
    if not args.host_only:
        big = large(args)
        print(
            f"\nN = {big['N']}, P = {big['P']:.0e}: copy {big['copy']:.3f} ms "
            f"({big['bandwidth_GBs']:.0f} GB/s read + write) = the two-pass floor"
        )
        print("| input | Mean ms | Agreement ms | Agreement / floor | Agreement / Mean |")
        print("|---|---|---|---|---|")
        for kind in ("stacked", "list"):
            mean, agree = big[f"{kind} mean"], big[f"{kind} agreement"]
            print(
                f"| {kind} | {mean:.3f} | {agree:.3f} | {agree / big['copy']:.2f} | "
                f"{agree / mean:.2f} |"
            )
    host = host_overhead(args)
    print("\nHost overhead: 18 parameters of 2 entries, N = 32 (µs per step)")
    print("| form | reference | Mean | Agreement | Mean / ref | Agreement / ref |")
    print("|---|---|---|---|---|---|")
    for form in HOST_FORMS:
        ref, mean, agree = (host[f"{form} {v}"] * 1e3 for v in ("reference", "mean", "agreement"))
        print(
            f"| {form} | {ref:.0f} | {mean:.0f} | {agree:.0f} | {mean / ref:.1f} | "
            f"{agree / ref:.1f} |"
        )
    print("\nHost-time targets of issue 18 (ratios to the unweighted reference, as printed above)")
    print("| form | Mean / ref | bound | met | Agreement / ref | bound | met |")
    print("|---|---|---|---|---|---|---|")
    for form, mean_bound, agree_bound in HOST_TARGETS:
        ref = host[f"{form} reference"]
        mean, agree = (
            round(host[f"{form} mean"] / ref, 1),
            round(host[f"{form} agreement"] / ref, 1),
        )
        print(
            f"| {form} | {mean:.1f} | ≤ {mean_bound:g} | {'yes' if mean <= mean_bound else 'no'} "
            f"| {agree:.1f} | ≤ {agree_bound:g} | {'yes' if agree <= agree_bound else 'no'} |"
        )
    counted = launches(args)
    what = "CUDA kernels and copies" if args.device == "cuda" else "dispatched CPU operators"
    print(
        f"\n{what} per outer step, N = 4 / N = 32 (stacked: 18 parameters of 2 entries; "
        f"lists: 4 tensors of {', '.join(map(str, LIST_SIZES))} entries)"
    )
    print("| form | reference | Mean | Agreement |")
    print("|---|---|---|---|")
    for form in HOST_FORMS:
        cells = [f"{counted[f'{form} {v} 4']} / {counted[f'{form} {v} 32']}" for v in VARIANTS]
        print(f"| {form} | {' | '.join(cells)} |")
    if not args.host_only:
        print(
            "\nTargets of issue 11, set for an H100 (only a full run on one is measured against "
            "them; the quick mode's settings are smaller)"
        )
        print("| target | bound | measured | met |")
        print("|---|---|---|---|")
        for target, bound, measured in targets(results, big, host):
            shown = round(measured, 3)  # met or not as printed, so the table agrees with itself
            print(f"| {target} | ≤ {bound:g} | {shown:.3f} | {'yes' if shown <= bound else 'no'} |")


def targets(
    results: list[dict[str, Any]], big: dict[str, Any], host: dict[str, float]
) -> list[tuple[str, float, float]]:
    """``(target, bound, measured)`` for each target of issue 11, from the tables above."""
    omniglot = [r for r in results if r["name"].startswith("Omniglot 5-way")]
    steps = [r["steps"] for r in results]
    # (Mean, Agreement) for every time measured above
    pairs = [(s["mean"], s["agreement"]) for s in steps]
    pairs += [(r["alone"]["mean"], r["alone"]["agreement"]) for r in results]
    pairs += [(big[f"{k} mean"], big[f"{k} agreement"]) for k in ("stacked", "list")]
    pairs += [(host[f"{f} mean"], host[f"{f} agreement"]) for f in HOST_FORMS]
    return [
        (
            "aggregation alone at Omniglot 5-way scale, slower of Mean and Agreement (ms)",
            0.5,
            max(max(r["alone"]["mean"], r["alone"]["agreement"]) for r in omniglot),
        ),
        (
            "Agreement meta-step / reference, worst setting",
            1.05,
            max(s["agreement"] / s["reference"] for s in steps),
        ),
        (
            "Mean meta-step / reference, worst setting",
            1.02,
            max(s["mean"] / s["reference"] for s in steps),
        ),
        (
            f"stacked Agreement / two-pass floor, N = {big['N']}, P = {big['P']:.0e}",
            2.0,
            big["stacked agreement"] / big["copy"],
        ),
        ("Mean / Agreement, worst of every time above", 1.0, max(m / a for m, a in pairs)),
    ]


if __name__ == "__main__":
    main()
