"""The examples run in their quick modes, so they cannot rot."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_sine_quick_run_writes_its_table_and_results(tmp_path: Path) -> None:
    sine = _load("sine_regression")
    threads = torch.get_num_threads()
    try:
        sine.main(
            ["--quick", "--out", str(tmp_path), "--weightings", "mean", "agreement", "nonnegative"]
        )
    finally:
        torch.set_num_threads(threads)
    results = json.loads((tmp_path / "results.json").read_text())
    table = (tmp_path / "table.md").read_text()
    for weighting in ("mean", "agreement", "nonnegative"):
        run = results["runs"][weighting]
        five, thirty_two = run["per_seed_mse"]["5"], run["per_seed_mse"]["32"]
        assert len(five) == len(thirty_two) == len(results["seeds"]) == 2
        assert all(math.isfinite(v) and v > 0 for v in five + thirty_two)
        # Fine-tuning longer on the same 10 shots fits the sine better.
        assert run["mean_mse"]["32"] < run["mean_mse"]["5"]
        assert f"| {weighting} |" in table
        negative = [s for h in run["weight_history"] for s in h["negative_share"]]
        if weighting == "agreement":
            assert max(negative) > 0  # some tasks fought the batch
        else:
            assert max(negative) == 0
        if weighting == "mean":
            bounds = [v for h in run["weight_history"] for v in h["min"] + h["max"]]
            assert bounds == pytest.approx([0.1] * len(bounds))  # float32 1/N


def test_sine_batched_adaptation_matches_a_per_task_loop() -> None:
    # The batched inner loop must adapt each task on its own data only.
    sine = _load("sine_regression")
    gen = torch.Generator().manual_seed(0)
    theta = sine.init_mlp(gen)
    _, _, x, y = sine.sample_tasks(3, 20, gen)
    batched = [p.unsqueeze(0).expand(3, *p.shape) for p in theta]
    together = sine.adapt(batched, x, y, steps=4, lr=0.02, batch=10)
    for i in range(3):
        alone = sine.adapt(
            [p.unsqueeze(0) for p in theta], x[i : i + 1], y[i : i + 1], steps=4, lr=0.02, batch=10
        )
        for a, b in zip(together, alone):
            torch.testing.assert_close(a[i], b[0], rtol=1e-5, atol=1e-6)
