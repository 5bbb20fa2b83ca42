"""Merge the results.json of sine runs made on disjoint seeds under one protocol.

A (algorithm, weighting, seed) found in two files must have the same numbers in both: the
runs are deterministic (one thread, seeded), so this doubles as a reproducibility check.
Refuses files whose configurations differ. Writes OUT/table.md and OUT/results.json.

    PYTHONPATH=examples/paper python docs/results/merge_sine.py OUT a/results.json b/results.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from sine_regression import Config, summarize, table


def _runs(path: str) -> tuple[dict[tuple[str, str, int], dict[str, Any]], dict[str, Any]]:
    results = json.loads(Path(path).read_text())["results"]
    results.pop("amplitude_bins", None)
    runs, configs = {}, {}
    for algorithm, by_weighting in results.items():
        configs[algorithm] = by_weighting.pop("config")
        for weighting, entry in by_weighting.items():
            by_amplitude = entry.get("per_seed_mse_by_amplitude") or [{}] * len(entry["seeds"])
            for k, seed in enumerate(entry["seeds"]):
                run = {
                    "mse": {s: v[k] for s, v in entry["per_seed_mse"].items()},
                    "task_ci95": {s: v[k] for s, v in entry["per_seed_task_ci95"].items()},
                    "seconds": entry["seconds"] / len(entry["seeds"]),
                    "history": entry["weight_history"][k],
                    "by_amplitude": by_amplitude[k],
                }
                runs[(algorithm, weighting, seed)] = run
    return runs, configs


ALGORITHMS = ("reptile", "maml", "fomaml")
WEIGHTINGS = ("mean", "agreement", "nonnegative", "cosine", "agreement_meta")


def _order(item: tuple[tuple[str, str, int], Any]) -> tuple[int, int, int]:
    algorithm, weighting, seed = item[0]
    return ALGORITHMS.index(algorithm), WEIGHTINGS.index(weighting), seed


def main(out: str, paths: list[str]) -> None:
    merged: dict[tuple[str, str, int], dict[str, Any]] = {}
    configs: dict[str, Any] = {}
    checked = 0
    for path in paths:
        runs, found = _runs(path)
        for algorithm, config in found.items():
            if configs.setdefault(algorithm, config) != config:
                raise SystemExit(f"{path}: the {algorithm} configuration differs: {config}")
        for key, run in runs.items():
            if key in merged:
                if merged[key]["mse"] != run["mse"]:
                    raise SystemExit(f"{path}: {key} differs: {run['mse']} vs {merged[key]['mse']}")
                checked += 1
            else:
                merged[key] = run
    runs = [
        {
            "algorithm": algorithm,
            "weighting": weighting,
            "seed": seed,
            "history": run["history"],
            "mse": {k: (v, run["task_ci95"][k]) for k, v in run["mse"].items()},
            "mse_by_amplitude": run["by_amplitude"],
            "seconds": run["seconds"],
        }
        for (algorithm, weighting, seed), run in sorted(merged.items(), key=_order)
    ]
    summary = summarize(runs, {a: Config(**c) for a, c in configs.items()})
    text = table(summary)
    print(text)
    print(f"({checked} runs found in two files agreed to the last digit)")
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "table.md").write_text(text + "\n")
    payload = {"merged_from": paths, "reproduced_runs": checked, "results": summary}
    (Path(out) / "results.json").write_text(json.dumps(payload, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
