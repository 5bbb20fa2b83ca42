"""The TorchJD weightings against Mean on the sine protocols (docs/RESULTS.md).

Reads the runs' results.json files (same seeds, budget and outer-lr grid as the other
weightings) and prints markdown tables. Reptile: MSE after 5 steps per outer learning
rate (mean ± 1.96·s/√n over seeds, as elsewhere in docs/RESULTS.md); the paired per-seed
differences against Mean at lr 2.0 (the protocol's rate); and each weighting at its best
rate against Mean at its best (2.5), paired, with Student-t intervals. MAML and
first-order MAML (Adam, the protocol's one rate): MSE and the paired differences
against Mean.

    python docs/results/torchjd_comparison.py
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
T95 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776}


def per_seed(
    folder: str, weighting: str, steps: str = "5", algorithm: str = "reptile"
) -> dict[int, float]:
    """{seed: MSE} of one weighting in one run folder (empty if the folder lacks it)."""
    entry = run_entry(folder, algorithm, weighting)
    return dict(zip(entry["seeds"], entry["per_seed_mse"][steps])) if entry else {}


def run_entry(folder: str, key: str, weighting: str) -> dict[str, Any] | None:
    """One weighting's entry under ``key`` in a run folder's results.json, if there."""
    path = HERE / folder / "results.json"
    if not path.exists():
        return None
    entry: dict[str, Any] | None = (
        json.loads(path.read_text())["results"].get(key, {}).get(weighting)
    )
    return entry or None


def interval(values: list[float], t: bool = False) -> str:
    """Mean ± the half-width of a 95 % interval: normal (1.96, as elsewhere in
    docs/RESULTS.md) or, with ``t``, Student's t (for the few paired seeds)."""
    diverged = sum(v is None or math.isnan(v) for v in values)
    if diverged:
        return f"diverged in {diverged} of {len(values)} seeds"
    if len(values) < 2:
        return f"{values[0]:.3f} (1 seed)" if values else "—"
    factor = T95[len(values)] if t else 1.96
    half = factor * statistics.stdev(values) / math.sqrt(len(values))
    return (
        f"{statistics.fmean(values):+.3f} ± {half:.3f}"
        if t
        else f"{statistics.fmean(values):.3f} ± {half:.3f}"
    )


RUNS = {  # outer lr -> the folders holding each weighting's runs at that lr
    "0.5": ["sine-reptile-lr0.5", "sine-torchjd-lr0.5"],
    "1.0": ["sine-reptile-lr1", "sine-torchjd-lr1"],
    "2.0": ["sine-full", "sine-torchjd-lr2", "sine-torchjd-lr2-seeds34"],
    "2.5": ["sine-torchjd-lr2.5"],
    "3.0": ["sine-torchjd-lr3"],
}
WEIGHTINGS = ["mean", "agreement", "nonnegative", "upgrad", "dualproj", "mgda"]


def collect(lr: str, weighting: str, steps: str = "5") -> dict[int, float]:
    found: dict[int, float] = {}
    for folder in RUNS[lr]:
        found.update(per_seed(folder, weighting, steps))
    return found


def main() -> None:
    print("| Reptile, MSE after 5 steps | " + " | ".join(f"lr {lr}" for lr in RUNS) + " |")
    print("|---" * (len(RUNS) + 1) + "|")
    for weighting in WEIGHTINGS:
        cells = [interval(list(collect(lr, weighting).values())) for lr in RUNS]
        print(f"| {weighting} | " + " | ".join(cells) + " |")
    print()
    print("| paired vs Mean, lr 2.0 | seeds | Δ MSE, 5 steps | better | Δ MSE, 32 steps |")
    print("|---|---|---|---|---|")
    for weighting in WEIGHTINGS[1:]:
        row = []
        for steps in ("5", "32"):
            base, other = collect("2.0", "mean", steps), collect("2.0", weighting, steps)
            seeds = sorted(set(base) & set(other))
            diffs = [other[s] - base[s] for s in seeds]
            row.append((seeds, diffs))
        (seeds, d5), (_, d32) = row
        if not seeds:
            continue
        better = sum(d < 0 for d in d5)
        print(
            f"| {weighting} | {len(seeds)} | {interval(d5, t=True)} | {better} / {len(seeds)} | "
            f"{interval(d32, t=True)} |"
        )


def best_against_best() -> None:
    """Each weighting at its best outer lr in the grid against Mean at its best, paired."""
    print()
    print("| best lr vs Mean's (2.5) | lr | seeds | Δ MSE, 5 steps | better | Δ, 32 steps |")
    print("|---|---|---|---|---|---|")
    for weighting in WEIGHTINGS[1:]:
        means = {}
        for lr in RUNS:
            values = list(collect(lr, weighting).values())
            if values and not any(math.isnan(v) for v in values):
                means[lr] = statistics.fmean(values)
        if not means:
            continue
        lr = min(means, key=lambda k: means[k])
        row = []
        for steps in ("5", "32"):
            base, other = collect("2.5", "mean", steps), collect(lr, weighting, steps)
            seeds = sorted(set(base) & set(other))
            row.append((seeds, [other[s] - base[s] for s in seeds]))
        (seeds, d5), (_, d32) = row
        if seeds:
            better = sum(d < 0 for d in d5)
            print(
                f"| {weighting} | {lr} | {len(seeds)} | {interval(d5, t=True)} | "
                f"{better} / {len(seeds)} | {interval(d32, t=True)} |"
            )


MAML_RUNS = ["sine-full", "sine-torchjd-maml"]


def maml_tables() -> None:
    """MAML and first-order MAML: each weighting's MSE, and paired against Mean."""
    for algorithm in ("maml", "fomaml"):
        print()
        print(
            f"| {algorithm} | seeds | MSE, 5 steps | MSE, 32 steps | Δ vs Mean, 5 steps | "
            "better | Δ vs Mean, 32 steps |"
        )
        print("|---|---|---|---|---|---|---|")
        for weighting in WEIGHTINGS:
            found: dict[str, dict[int, float]] = {}
            base: dict[str, dict[int, float]] = {}
            for steps in ("5", "32"):
                found[steps], base[steps] = {}, {}
                for folder in MAML_RUNS:
                    found[steps].update(per_seed(folder, weighting, steps, algorithm))
                    base[steps].update(per_seed(folder, "mean", steps, algorithm))
            if not found["5"]:
                continue
            seeds = sorted(set(found["5"]) & set(base["5"]))
            d5 = [found["5"][s] - base["5"][s] for s in seeds]
            d32 = [found["32"][s] - base["32"][s] for s in seeds]
            paired = (
                f"{interval(d5, t=True)} | {sum(d < 0 for d in d5)} / {len(seeds)} | "
                f"{interval(d32, t=True)}"
                if weighting != "mean"
                else "— | — | —"
            )
            print(
                f"| {weighting} | {len(found['5'])} | {interval(list(found['5'].values()))} | "
                f"{interval(list(found['32'].values()))} | {paired} |"
            )


# All at the same code (the first digits run, docs/results/digits, is from an earlier
# commit whose rounding differed: its Mean is not the one these runs are paired with).
DIGITS_RUNS = [
    "digits-current-mean",
    "digits-current-agreement",
    "digits-torchjd",
    "digits-torchjd-5shot",
    "digits-seeds34",
]


def digits_accuracy(folder: str, key: str, weighting: str) -> dict[int, float]:
    """{seed: accuracy in points} of one weighting and configuration of a digits run."""
    entry = run_entry(folder, key, weighting)
    if not entry:
        return {}
    return {s: 100 * a for s, a in zip(entry["seeds"], entry["per_seed_accuracy"])}


def points(values: list[float], factor: float, signed: bool = False) -> str:
    """Mean ± factor·s/√n, in accuracy points (one decimal)."""
    half = factor * statistics.stdev(values) / math.sqrt(len(values))
    return f"{statistics.fmean(values):{'+' if signed else ''}.1f} ± {half:.1f}"


def digits_table() -> None:
    """The digits run (5-way): accuracy per weighting, paired with Mean per seed."""
    print()
    print("| digits 5-way | weighting | seeds | accuracy (%) | Δ vs Mean (points) | better |")
    print("|---|---|---|---|---|---|")
    for key in ("maml 1-shot", "maml 5-shot", "reptile 1-shot", "reptile 5-shot"):
        base: dict[int, float] = {}
        for folder in DIGITS_RUNS:
            base.update(digits_accuracy(folder, key, "mean"))
        for weighting in WEIGHTINGS:
            found: dict[int, float] = {}
            for folder in DIGITS_RUNS:
                found.update(digits_accuracy(folder, key, weighting))
            if not found:
                continue
            seeds = sorted(set(found) & set(base))
            diffs = [found[s] - base[s] for s in seeds]
            paired = (
                f"{points(diffs, T95[len(diffs)], signed=True)} | "
                f"{sum(d > 0 for d in diffs)} / {len(seeds)}"
                if weighting != "mean"
                else "— | —"
            )
            mean_ci = points(list(found.values()), 1.96)
            print(f"| {key} | {weighting} | {len(found)} | {mean_ci} | {paired} |")


if __name__ == "__main__":
    main()
    best_against_best()
    maml_tables()
    digits_table()
