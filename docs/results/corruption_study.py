"""The corrupted-task study of docs/RESULTS.md: runs it, and writes its tables and figure
from the per-run JSON files.

Every run is one (task family, algorithm, corruption, RHO, outer lr, weighting, seed) and
one file ``<root>/<family>/<algorithm>/<corruption>/rho<RHO>/lr<lr>/<weighting>/seed<s>.json``
holding what the paper harness's ``run_one`` returned (the meta-parameters left out).
``run`` skips the runs whose file exists, so an interrupted study resumes where it stopped.

Protocol (the same for every weighting, Mean included), for each setting of
:data:`SETTINGS` (sine: Reptile and MAML, each with both corruption kinds; digits 5-way
1-shot, MAML, labels resampled):

1. *Tuning*: each weighting's outer learning rate is picked on the setting's grid
   (:data:`GRID`) at RHO = 0.2 by its mean error over the tuning seeds
   :data:`TUNING_SEEDS`, which are not the seeds that are reported (sine: MSE after 5
   fine-tuning steps; digits: accuracy). A rate that diverged in any seed is out.
2. *Evaluation*: at the picked rate, RHO in the setting's list, seeds :data:`SEEDS`.
   RHO = 0 is one run for both sine corruption kinds when they picked the same rate.

    python docs/results/corruption_study.py run       # the study (about 100 min on 2 cores)
    python docs/results/corruption_study.py report    # tables and figure from the files
    python docs/results/corruption_study.py run --quick --root /tmp/study   # seconds (CI)
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import multiprocessing
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PAPER = HERE.parent.parent / "examples" / "paper"
ROOT = HERE / "corruption"

WEIGHTINGS = (
    "mean",
    "oracle",
    "agreement",
    "nonnegative",
    "cosine",
    "leave_one_out",
    "leave_one_out_nonnegative",
    "geometric_median",
    "geometric_median_meta",
    "upgrad",
)
#: (family, algorithm, corruption kind, the RHOs reported).
SETTINGS = (
    ("sine", "reptile", "noise", (0.0, 0.2, 0.4)),
    ("sine", "reptile", "amplitude", (0.0, 0.2, 0.4)),
    ("sine", "maml", "noise", (0.0, 0.2, 0.4)),
    ("sine", "maml", "amplitude", (0.0, 0.2, 0.4)),
    ("digits", "maml", "labels", (0.0, 0.4)),
)
TUNING_RHO = 0.2
#: Reptile: SGD α; MAML: Adam β (both annealed linearly to 0 by the harness).
GRID = {
    ("sine", "reptile"): (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0),
    ("sine", "maml"): (3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
    ("digits", "maml"): (3e-4, 1e-3, 3e-3),
}
SINE_ITERATIONS = 2000  # a fifth (Reptile) and a quarter (MAML) of the main protocol's
SEEDS = (0, 1, 2, 3, 4)
TUNING_SEEDS = (100, 101)
T95 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571}


# -- the runs -------------------------------------------------------------------------------


def run_path(root: Path, job: dict[str, Any]) -> Path:
    kind = job["kind"] if job["rho"] > 0 else "clean"
    return (
        root / job["family"] / job["algorithm"] / kind / f"rho{job['rho']:g}"
        / f"lr{job['lr']:g}" / job["weighting"] / f"seed{job['seed']}.json"
    )  # fmt: skip


def _harness(name: str) -> Any:
    if str(PAPER) not in sys.path:
        sys.path.insert(0, str(PAPER))
    return importlib.import_module(name)


def run_one(job: dict[str, Any]) -> str:
    """Train and evaluate one run through the paper harness; write its JSON file."""
    quick = job["quick"]
    if job["family"] == "sine":
        harness = _harness("sine_regression")
        cfg = harness.Config.for_algorithm(
            job["algorithm"],
            iterations=20 if quick else SINE_ITERATIONS,
            outer_lr=job["lr"],
            corrupt_fraction=job["rho"],
            corruption=job["kind"],
            eval_tasks=20 if quick else None,
        )
    else:
        harness = _harness("fewshot_classification")
        cfg = harness.Config.for_run(
            "digits",
            job["algorithm"],
            shots=1,
            outer_lr=job["lr"],
            corrupt_fraction=job["rho"],
            **({"iterations": 5, "eval_episodes": 20} if quick else {}),
        )
    result = harness.run_one((job["weighting"], job["seed"], cfg, False))
    result.pop("theta", None)
    result["config"] = {k: v for k, v in vars(cfg).items() if not k.startswith("_")}
    path = run_path(Path(job["root"]), job)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(compact(result))
    partial.replace(path)  # whole or absent: a study killed mid-write resumes cleanly
    return str(path)


def compact(result: dict[str, Any]) -> str:
    """A run as JSON, its weight history (diagnostics, 200 points) rounded to 5
    significant digits; every reported number kept exact."""
    history = result["history"]
    for key in ("min", "max", "negative_share"):
        history[key] = [float(f"{v:.5g}") for v in history[key]]
    return json.dumps(result, separators=(",", ":"))


def _pending(root: Path, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [job for job in jobs if not run_path(root, job).exists()]


def _execute(jobs: list[dict[str, Any]], workers: int, what: str) -> None:
    started = time.perf_counter()
    print(f"{what}: {len(jobs)} runs", flush=True)
    if not jobs:
        return
    if workers == 1:
        for done, _ in enumerate(map(run_one, jobs), start=1):
            _progress(done, len(jobs), started)
        return
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        for done, _ in enumerate(pool.imap_unordered(run_one, jobs), start=1):
            _progress(done, len(jobs), started)


def _progress(done: int, total: int, started: float) -> None:
    if done % 20 == 0 or done == total:
        print(f"  {done}/{total} after {time.perf_counter() - started:.0f} s", flush=True)


def load(root: Path, job: dict[str, Any]) -> dict[str, Any] | None:
    path = run_path(root, job)
    return json.loads(path.read_text()) if path.exists() else None


def error(run: dict[str, Any] | None) -> float:
    """What the study reports of a run: sine, the MSE after 5 fine-tuning steps; digits,
    the error rate (%) on the test classes. NaN when missing or diverged."""
    if run is None:
        return math.nan
    value = run["mse"]["5"][0] if "mse" in run else 100 * (1 - run["accuracy"][0])
    return math.nan if value is None or math.isnan(value) else float(value)


def _job(root: Path, quick: bool, setting: tuple[Any, ...], **rest: Any) -> dict[str, Any]:
    family, algorithm, kind, _ = setting
    return {"root": str(root), "quick": quick, "family": family, "algorithm": algorithm,
            "kind": kind, **rest}  # fmt: skip


def weightings_of(setting: tuple[Any, ...]) -> tuple[str, ...]:
    """The weightings of a setting: the ``*_meta`` ones (measured on MAML's meta-gradients,
    not the inner-loop deltas) are MAML only."""
    return tuple(w for w in WEIGHTINGS if setting[1] == "maml" or not w.endswith("_meta"))


def _grid(setting: tuple[Any, ...], quick: bool) -> tuple[float, ...]:
    grid = GRID[setting[:2]]
    return grid[1:3] if quick else grid


def _seeds(quick: bool, tuning: bool = False) -> tuple[int, ...]:
    seeds = TUNING_SEEDS if tuning else SEEDS
    return seeds[:1] if quick else seeds


def _rhos(setting: tuple[Any, ...], quick: bool) -> tuple[float, ...]:
    return (0.0, 0.4) if quick else setting[3]


def tuning_jobs(root: Path, quick: bool) -> list[dict[str, Any]]:
    return [
        _job(root, quick, setting, rho=TUNING_RHO, lr=lr, weighting=weighting, seed=seed)
        for setting in SETTINGS
        for lr in _grid(setting, quick)
        for weighting in weightings_of(setting)
        for seed in _seeds(quick, tuning=True)
    ]


def picked_rates(root: Path, quick: bool) -> dict[tuple[Any, ...], float]:
    """``{(family, algorithm, kind, weighting): lr}``: the lowest mean error over the
    tuning seeds at RHO = 0.2 (a rate that diverged in any seed is out)."""
    picked = {}
    for setting in SETTINGS:
        for weighting in weightings_of(setting):
            scores = {}
            for lr in _grid(setting, quick):
                values = [
                    error(load(root, _job(root, quick, setting, rho=TUNING_RHO, lr=lr,
                                          weighting=weighting, seed=seed)))
                    for seed in _seeds(quick, tuning=True)
                ]  # fmt: skip
                if not any(math.isnan(v) for v in values):
                    scores[lr] = statistics.fmean(values)
            if scores:
                key = (*setting[:3], weighting)
                picked[key] = min(scores, key=scores.__getitem__)
    return picked


def evaluation_jobs(root: Path, quick: bool) -> list[dict[str, Any]]:
    picked = picked_rates(root, quick)
    jobs, seen = [], set()
    for setting in SETTINGS:
        for weighting in weightings_of(setting):
            lr = picked.get((*setting[:3], weighting))
            if lr is None:
                continue
            for rho in _rhos(setting, quick):
                for seed in _seeds(quick):
                    job = _job(root, quick, setting, rho=rho, lr=lr, weighting=weighting, seed=seed)
                    if str(run_path(root, job)) not in seen:
                        seen.add(str(run_path(root, job)))
                        jobs.append(job)
    return jobs


def run(root: Path, quick: bool, workers: int) -> None:
    _execute(_pending(root, tuning_jobs(root, quick)), workers, "tuning the outer learning rate")
    _execute(_pending(root, evaluation_jobs(root, quick)), workers, "evaluation")


# -- the report -----------------------------------------------------------------------------


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of a 95 % normal interval over seeds, NaN when a run
    diverged: the harness's own :func:`mean_ci`, as everywhere in docs/RESULTS.md."""
    return _harness("_common").mean_ci(values)


def paired(values: list[float], baseline: list[float]) -> tuple[float, float]:
    """Mean per-seed difference ``values − baseline`` and its Student-t 95 % half-width."""
    differences = [a - b for a, b in zip(values, baseline)]
    if len(differences) < 2 or any(math.isnan(d) for d in differences):
        return math.nan, math.nan
    half = T95.get(len(differences), 1.96) * statistics.stdev(differences)
    return statistics.fmean(differences), half / math.sqrt(len(differences))


def collect(root: Path, quick: bool) -> dict[str, Any]:
    """Per-seed errors and weight shares of every cell, as
    ``{(family, algorithm, kind): {weighting: {rho: {"error", "share", "lr"}}}}``."""
    picked = picked_rates(root, quick)
    cells: dict[Any, Any] = {}
    for setting in SETTINGS:
        for weighting in weightings_of(setting):
            lr = picked.get((*setting[:3], weighting))
            if lr is None:
                continue
            cell = cells.setdefault(setting[:3], {}).setdefault(weighting, {})
            for rho in _rhos(setting, quick):
                runs = [
                    load(root, _job(root, quick, setting, rho=rho, lr=lr, weighting=weighting,
                                    seed=seed))
                    for seed in _seeds(quick)
                ]  # fmt: skip
                cell[rho] = {
                    "error": [error(r) for r in runs],
                    "share": [r["corrupted_weight_share"] if r else math.nan for r in runs],
                    "lr": lr,
                    "missing": sum(r is None for r in runs),
                }
    return cells


def _cell(mean: float, half: float, digits: int) -> str:
    if math.isnan(mean):
        return "—"
    return f"{mean:.{digits}f}" + ("" if math.isnan(half) else f" ± {half:.{digits}f}")


def _entry(entry: dict[str, Any], digits: int, baseline: dict[str, Any] | None = None) -> str:
    """One cell of a table: mean ± CI (or, with ``baseline``, the paired difference);
    "—" while runs are missing; "diverged in k of n" when some diverged."""
    values = entry["error"]
    if entry["missing"] or (baseline is not None and baseline["missing"]):
        return "—"
    diverged = sum(math.isnan(v) for v in values)
    if diverged:
        return f"diverged in {diverged} of {len(values)}"
    if baseline is None:
        return _cell(*interval(values), digits)
    if any(math.isnan(v) for v in baseline["error"]):
        return "—"
    return _cell(*paired(values, baseline["error"]), digits)


def tables(cells: dict[Any, Any]) -> str:
    out = []
    for (family, algorithm, kind), by_weighting in cells.items():
        rhos = sorted(next(iter(by_weighting.values())))
        metric = "MSE after 5 steps" if family == "sine" else "error (%) on the test classes"
        digits = 3 if family == "sine" else 1
        title = (
            f"{family}, {algorithm}, {kind}"
            if family == "sine"
            else "digits 5-way 1-shot, MAML, labels resampled"
        )
        out.append(
            f"**{title}** — {metric}, mean ± 95 % CI over seeds; "
            "Δ: paired difference from Mean (Student t)\n"
        )
        header = (
            "| weighting | outer lr | "
            + " | ".join(f"RHO = {rho:g} | Δ vs Mean" for rho in rhos)
            + " |"
        )
        out += [header, "|---|---|" + "---|---|" * len(rhos)]
        mean_cells = by_weighting["mean"]
        for weighting, cell in by_weighting.items():
            parts = []
            for rho in rhos:
                parts.append(_entry(cell[rho], digits))
                parts.append(
                    "" if weighting == "mean" else _entry(cell[rho], digits, mean_cells[rho])
                )
            out.append(f"| {weighting} | {cell[rhos[0]]['lr']:g} | " + " | ".join(parts) + " |")
        out.append("")
    out.append(
        "**Weight share of the corrupted tasks** (mean over training of "
        "Σ_corrupted |w_i| / Σ |w_i|; mean over seeds)\n"
    )
    columns = [
        (key, rho)
        for key, by in cells.items()
        for rho in sorted(next(iter(by.values())))
        if rho > 0
    ]
    names = [
        f"{f} {a} {k} {rho:g}" if f == "sine" else f"digits {rho:g}" for (f, a, k), rho in columns
    ]
    out += ["| weighting | " + " | ".join(names) + " |", "|---|" + "---|" * len(columns)]
    for weighting in WEIGHTINGS:
        values = []
        for key, rho in columns:
            cell = cells[key].get(weighting)
            mean = interval(cell[rho]["share"])[0] if cell else math.nan
            values.append("—" if math.isnan(mean) else f"{mean:.2f}")
        out.append(f"| {weighting} | " + " | ".join(values) + " |")
    return "\n".join(out) + "\n"


STYLE = {
    "mean": ("k", "-"),
    "oracle": ("k", ":"),
    "agreement": ("C0", "-"),
    "nonnegative": ("C1", "-"),
    "cosine": ("C2", "-"),
    "leave_one_out": ("C3", "--"),
    "leave_one_out_nonnegative": ("C4", "--"),
    "geometric_median": ("C5", "-."),
    "geometric_median_meta": ("C8", "-."),
    "upgrad": ("C6", "-."),
}


def figure(cells: dict[Any, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no figure")
        return False
    keys = list(cells)
    rows = (len(keys) + 2) // 3  # three panels a row, one cell kept for the legend
    fig, grid = plt.subplots(rows, 3, figsize=(13, 3.6 * rows), squeeze=False)
    axes = list(grid.flat)
    for ax, key in zip(axes, keys):
        family, algorithm, kind = key
        for weighting, cell in cells[key].items():
            rhos = sorted(cell)
            stats = [interval(cell[rho]["error"]) for rho in rhos]
            means = [m for m, _ in stats]
            halves = [0.0 if math.isnan(h) else h for _, h in stats]
            color, line = STYLE.get(weighting, (None, "-"))
            ax.plot(rhos, means, line, color=color, marker="o", ms=3, label=weighting)
            ax.fill_between(
                rhos, [m - h for m, h in zip(means, halves)],
                [m + h for m, h in zip(means, halves)], color=color, alpha=0.12,
            )  # fmt: skip
        ax.set_xlabel("RHO (share of corrupted training tasks)")
        if family == "sine" and any(
            interval(c[rho]["error"])[0] > 0 for c in cells[key].values() for rho in c
        ):
            ax.set_yscale("log")  # the failures sit two orders of magnitude above the rest
        if family == "sine":
            ax.set_title(f"sine, {algorithm}, {kind}", fontsize=9)
            ax.set_ylabel("MSE after 5 steps")
        else:
            ax.set_title("digits 5-way 1-shot, MAML, labels", fontsize=9)
            ax.set_ylabel("error on test classes (%)")
    legend: dict[str, Any] = {}
    for ax in axes[: len(keys)]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    handles, labels = list(legend.values()), list(legend)
    for spare in axes[len(keys) :]:
        spare.axis("off")
    axes[-1].legend(handles, labels, loc="center", fontsize=9, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def report(root: Path, quick: bool) -> str:
    cells = collect(root, quick)
    text = tables(cells)
    (root / "tables.md").write_text(text)
    print(text)
    if figure(cells, root / "corruption.png"):
        print(f"wrote {root / 'corruption.png'}")
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=("run", "report"))
    parser.add_argument("--root", type=Path, default=ROOT, help=f"default: {ROOT}")
    parser.add_argument("--quick", action="store_true", help="a tiny study (seconds), for CI")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (one thread each)")
    args = parser.parse_args(argv)
    if args.what == "run":
        run(args.root, args.quick, args.jobs)
    report(args.root, args.quick)


if __name__ == "__main__":
    main()
