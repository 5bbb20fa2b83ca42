"""Plot few-shot results (used for docs/RESULTS.md): accuracy ± 95 % CI per configuration
and weighting, and the share of negative weights over training.

    python docs/results/fewshot_figure.py OUT.png docs/results/digits/results.json [...]
"""

from __future__ import annotations

import json
import statistics
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def main(out: str, paths: list[str]) -> None:
    merged: dict[str, dict[str, dict]] = {}
    for path in paths:
        for key, by_weighting in json.loads(open(path).read())["results"].items():
            merged.setdefault(key, {}).update(by_weighting)
    keys = list(merged)
    weightings = list(dict.fromkeys(w for k in keys for w in merged[k]))
    fig, (bars, negative) = plt.subplots(1, 2, figsize=(11, 3.6))
    width = 0.8 / len(weightings)
    for j, weighting in enumerate(weightings):
        xs = [i + (j - (len(weightings) - 1) / 2) * width for i in range(len(keys))]
        entries = [merged[k].get(weighting) for k in keys]
        heights = [100 * e["accuracy"] if e else 0.0 for e in entries]
        errors = [100 * e["ci95_over_seeds"] if e else 0.0 for e in entries]
        bars.bar(xs, heights, width, yerr=errors, capsize=3, label=weighting)
    bars.set_xticks(range(len(keys)), keys)
    low = min(100 * e["accuracy"] for k in keys for e in merged[k].values())
    bars.set_ylim(max(0.0, low - 10), 100)
    bars.set_ylabel("accuracy on the test classes (%)")
    bars.legend(fontsize=7)
    bars.set_title("5-way digits: mean ± 95 % CI over seeds")
    for key in keys:
        for weighting, entry in merged[key].items():
            if weighting == "mean":
                continue
            histories = entry["weight_history"]
            share = [statistics.fmean(h) for h in zip(*(h["negative_share"] for h in histories))]
            negative.plot(histories[0]["iteration"], share, label=f"{key}, {weighting}")
    negative.set_xlabel("meta-iteration")
    negative.set_ylabel("share of negative weights")
    negative.set_title("negative task weights (mean over seeds)")
    negative.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
