"""Print the per-amplitude MSE table of a sine run's results.json (used for docs/RESULTS.md).

python docs/results/amplitude_table.py docs/results/sine-reptile-lr1/results.json 5
"""

from __future__ import annotations

import itertools
import json
import statistics
import sys


def main(path: str, steps: str) -> None:
    results = json.loads(open(path).read())["results"]
    bins = results.pop("amplitude_bins")
    labels = [f"a ∈ [{lo:g}, {hi:g})" for lo, hi in itertools.pairwise(bins)]
    print(f"| {path.split('/')[-2]}, MSE after {steps} steps | " + " | ".join(labels) + " |")
    print("|---" * (len(labels) + 1) + "|")
    for algorithm, by_weighting in results.items():
        for weighting, entry in by_weighting.items():
            if weighting == "config" or not entry["per_seed_mse_by_amplitude"]:
                continue
            per_seed = [run[steps] for run in entry["per_seed_mse_by_amplitude"] if run]
            cells = [statistics.fmean(seed[b] for seed in per_seed) for b in range(len(labels))]
            print(f"| {algorithm} {weighting} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "5")
