"""docs/results/corruption_study.py: its quick study runs every weighting through the
paper harness, picks each weighting's rate from the files as stated, and reports."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import torch

from ._examples import load_script

STUDY = Path(__file__).resolve().parents[1] / "docs" / "results" / "corruption_study.py"


def test_quick_study_runs_picks_and_reports(tmp_path: Path) -> None:
    study = load_script(STUDY)
    threads = torch.get_num_threads()
    try:
        study.main(["run", "--quick", "--root", str(tmp_path), "--jobs", "1"])
    finally:
        torch.set_num_threads(threads)
    files = sorted(tmp_path.rglob("seed*.json"))
    runs = [json.loads(f.read_text()) for f in files]
    assert all("theta" not in run for run in runs)
    assert {run["weighting"] for run in runs} == set(study.WEIGHTINGS)
    # Every picked rate is the grid's best mean tuning MSE, read here straight off the files.
    picked = study.picked_rates(tmp_path, quick=True)
    assert len(picked) == sum(len(study.weightings_of(s)) for s in study.SETTINGS)
    assert ("sine", "reptile", "noise", "geometric_median_meta") not in picked
    assert ("sine", "maml", "noise", "geometric_median_meta") in picked
    for (family, algorithm, kind, weighting), lr in picked.items():
        folder = tmp_path / family / algorithm / kind / "rho0.2"
        by_rate = {}
        for rate_folder in folder.glob("lr*"):
            seeds = list((rate_folder / weighting).glob("seed*.json"))
            runs = [json.loads(p.read_text()) for p in seeds]
            values = [
                r["mse"]["5"][0] if family == "sine" else 100 * (1 - r["accuracy"][0]) for r in runs
            ]
            assert seeds and all(v is not None for v in values)
            by_rate[float(rate_folder.name[2:])] = statistics.fmean(values)
        assert len(by_rate) == 2
        assert lr == min(by_rate, key=by_rate.__getitem__)
        evaluated = tmp_path / family / algorithm / kind / "rho0.4" / f"lr{lr:g}" / weighting
        run = json.loads((evaluated / "seed0.json").read_text())
        assert run["config"]["outer_lr"] == lr and run["config"]["corrupt_fraction"] == 0.4
        if family == "sine":
            assert run["config"]["corruption"] == kind
        if weighting == "oracle":
            assert run["corrupted_weight_share"] == 0.0
        else:
            assert 0.0 < run["corrupted_weight_share"] < 1.0
    table = (tmp_path / "tables.md").read_text()
    for weighting in study.WEIGHTINGS:
        assert f"| {weighting} |" in table
    lr = picked[("digits", "maml", "labels", "mean")]
    digits = json.loads(
        (tmp_path / f"digits/maml/labels/rho0.4/lr{lr:g}/mean/seed0.json").read_text()
    )
    assert digits["config"]["corrupt_fraction"] == 0.4 and digits["shots"] == 1
    error = f"{100 * (1 - digits['accuracy'][0]):.1f}"
    assert error in table.split("digits 5-way 1-shot")[1]
    figure = (tmp_path / "corruption.png").read_bytes()
    assert figure.startswith(b"\x89PNG\r\n\x1a\n") and len(figure) > 1000
    # A second run finds every file and runs nothing.
    before = {f: f.stat().st_mtime_ns for f in files}
    study.main(["run", "--quick", "--root", str(tmp_path), "--jobs", "1"])
    assert {f: f.stat().st_mtime_ns for f in files} == before
    assert not math.isnan(study.interval([1.0, 2.0])[1])
