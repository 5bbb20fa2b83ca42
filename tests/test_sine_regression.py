"""The sine example: its quick mode runs (so it cannot rot) and its batched steps are right."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from ga_optim import GradientAgreementAggregator

from ._examples import load_example as _load


def test_sine_quick_run_writes_its_table_and_results(tmp_path: Path) -> None:
    sine = _load("sine_regression")
    threads = torch.get_num_threads()
    try:
        sine.main(
            [
                "--quick", "--out", str(tmp_path), "--jobs", "1",
                "--algorithms", "reptile", "maml",
                "--weightings", "mean", "agreement", "agreement_meta", "nonnegative",
            ]
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    table = (tmp_path / "table.md").read_text()
    for name in ("figure1_reptile", "figure1_maml", "weights_reptile", "weights_maml"):
        figure = (tmp_path / f"{name}.png").read_bytes()  # the plotting code ran
        assert figure.startswith(b"\x89PNG\r\n\x1a\n") and len(figure) > 1000, name
    assert set(results) == {"reptile", "maml", "amplitude_bins"}
    assert "agreement_meta" not in results["reptile"]  # MAML only
    bins = results.pop("amplitude_bins")
    assert bins == [0.1, 1.0, 2.0, 3.0, 4.0, 5.0]
    for algorithm, by_weighting in results.items():
        assert by_weighting["config"]["algorithm"] == algorithm
        for weighting, run in by_weighting.items():
            if weighting == "config":
                continue
            five, thirty_two = run["per_seed_mse"]["5"], run["per_seed_mse"]["32"]
            assert len(five) == len(thirty_two) == len(run["seeds"]) == 2
            assert all(math.isfinite(v) and v > 0 for v in five + thirty_two)
            # Fine-tuning longer on the same 10 shots fits the sine better.
            assert run["mean_mse"]["32"] < run["mean_mse"]["5"]
            assert f"| {algorithm} | {weighting} |" in table
            for per_bin in run["per_seed_mse_by_amplitude"]:
                assert len(per_bin["5"]) == len(bins) - 1
                assert all(math.isfinite(v) and v > 0 for v in per_bin["5"] + per_bin["32"])
            negative = [s for h in run["weight_history"] for s in h["negative_share"]]
            if weighting in ("agreement", "agreement_meta"):
                assert max(negative) > 0  # some tasks fought the batch
            else:
                assert max(negative) == 0
            if weighting == "mean":
                bounds = [v for h in run["weight_history"] for v in h["min"] + h["max"]]
                assert bounds == pytest.approx([0.1] * len(bounds))  # float32 1/N


def test_sine_maml_step_gives_per_task_meta_gradients() -> None:
    # The batched MAML step must give each task the meta-gradient of its own query loss.
    sine = _load("sine_regression")
    cfg = sine.Config.for_algorithm("maml", meta_batch=3)
    theta = [p.requires_grad_() for p in sine.init_mlp(torch.Generator().manual_seed(1))]
    recorded = {}

    class Recorder:
        def step(self, tasks, agreement_vectors=None):  # type: ignore[no-untyped-def]
            recorded["tasks"], recorded["agreement"] = tasks, agreement_vectors
            return torch.full((3,), 1 / 3)

    gen = torch.Generator().manual_seed(2)
    sine.maml_step(theta, Recorder(), cfg, gen, on_meta_gradients=False)
    _, _, x, y = sine.sample_tasks(3, 2 * cfg.shots, torch.Generator().manual_seed(2))
    for i in range(3):
        xs, ys = x[i : i + 1, : cfg.shots], y[i : i + 1, : cfg.shots]
        xq, yq = x[i : i + 1, cfg.shots :], y[i : i + 1, cfg.shots :]
        start = [p.detach().unsqueeze(0).requires_grad_() for p in theta]
        fast = start
        for _ in range(cfg.inner_steps):
            grads = torch.autograd.grad(
                sine.task_losses(fast, xs, ys).sum(), fast, create_graph=True
            )
            fast = [w - cfg.inner_lr * g for w, g in zip(fast, grads)]
        meta = torch.autograd.grad(sine.task_losses(fast, xq, yq).sum(), start)
        for got, want in zip(recorded["tasks"][i], meta):
            torch.testing.assert_close(got, want[0])
        for got, s, f in zip(recorded["agreement"][i], start, fast):
            torch.testing.assert_close(got, (s - f)[0].detach())


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


def test_sine_divergence_is_recorded_not_raised() -> None:
    sine = _load("sine_regression")
    cfg = sine.Config.for_algorithm("reptile", iterations=500, outer_lr=50.0, eval_tasks=10)
    threads = torch.get_num_threads()
    try:
        run = sine.run_one(("mean", 0, cfg, False))
    finally:
        torch.set_num_threads(threads)
    assert run["history"]["diverged_at"] is not None and run["history"]["diverged_at"] < 500
    assert all(math.isnan(mean) for mean, _ in run["mse"].values())
    summary = sine.summarize([run], {"reptile": cfg})
    assert "diverged in 1 of 1 seeds" in sine.table(summary)


def _replayed_share(seed: int, steps: int, tasks: int, fraction: float) -> float:
    """The share of Mean's weight on corrupted tasks, replayed from the corruption's own
    generator: each step, the corrupted count over N."""
    gen = torch.Generator().manual_seed(1_000_003 + seed)
    return (
        sum(
            float((torch.rand(tasks, generator=gen) < fraction).sum()) / tasks for _ in range(steps)
        )
        / steps
    )


@pytest.mark.parametrize("kind", ["noise", "amplitude"])
def test_sine_corrupted_quick_run_records_the_weight_share(tmp_path: Path, kind: str) -> None:
    sine = _load("sine_regression")
    names = ["mean", "oracle", "leave_one_out", "leave_one_out_nonnegative", "geometric_median"]
    threads = torch.get_num_threads()
    try:
        sine.main(
            [
                "--quick", "--out", str(tmp_path), "--jobs", "1",
                "--algorithms", "reptile", "maml",
                "--weightings", *names, "geometric_median_meta",
                "--corrupt-fraction", "0.4", "--corruption", kind,
            ]
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert "geometric_median_meta" not in results["reptile"]  # MAML only
    for algorithm in ("reptile", "maml"):
        if algorithm == "maml":
            names = [*names, "geometric_median_meta"]
        assert results[algorithm]["config"]["corrupt_fraction"] == 0.4
        assert results[algorithm]["config"]["corruption"] == kind
        for weighting in names:
            entry = results[algorithm][weighting]
            shares = entry["per_seed_corrupted_weight_share"]
            assert len(shares) == 2 and all(0.0 <= s <= 1.0 for s in shares)
            assert all(math.isfinite(v) for v in entry["per_seed_mse"]["5"])
            if weighting == "oracle":
                assert shares == [0.0, 0.0]
            if weighting == "mean":  # uniform weights: the corrupted fraction itself
                expected = [_replayed_share(s, 40, 10, 0.4) for s in entry["seeds"]]
                assert shares == pytest.approx(expected, abs=1e-12)
                assert 0.25 < shares[0] < 0.55
            assert entry["corrupted_weight_share"][0] == pytest.approx(sum(shares) / 2)


def test_sine_corruption_replaces_only_the_chosen_tasks() -> None:
    sine = _load("sine_regression")
    gen = torch.Generator().manual_seed(0)
    amplitude, _, _, y = sine.sample_tasks(4, 2000, gen)
    mask = torch.tensor([True, False, True, False])
    louder = sine.corrupt(y, mask, "amplitude", torch.Generator().manual_seed(1))
    torch.testing.assert_close(louder[mask], 10 * y[mask], rtol=0, atol=0)
    torch.testing.assert_close(louder[~mask], y[~mask], rtol=0, atol=0)
    noisy = sine.corrupt(y, mask, "noise", torch.Generator().manual_seed(1))
    torch.testing.assert_close(noisy[~mask], y[~mask], rtol=0, atol=0)
    for i in (0, 2):  # Gaussian noise with the clean task's spread, unrelated to the sine
        assert float(noisy[i].std()) == pytest.approx(float(y[i].std()), rel=0.1)
        assert abs(float(torch.corrcoef(torch.stack([noisy[i, :, 0], y[i, :, 0]]))[0, 1])) < 0.1
        assert abs(float(noisy[i].mean())) < 0.1 * float(amplitude[i])
    none = torch.zeros(4, dtype=torch.bool)
    assert torch.equal(sine.corrupt(y, none, "noise", torch.Generator().manual_seed(1)), y)
    with pytest.raises(ValueError, match="`corruption` should be one of"):
        sine.corrupt(y, mask, "labels", gen)


def test_sine_clean_fraction_trains_on_the_clean_tasks() -> None:
    """RHO = 0 draws exactly the tasks of a run without corruption (its draws come from a
    generator of their own), so a clean study row is the harness's plain run."""
    sine = _load("sine_regression")
    common = _load("_common")
    cfg = sine.Config.for_algorithm("reptile", meta_batch=4)
    outcomes = []
    for corruption in (None, common.Corruption(0.0, seed=3)):
        theta = [p.requires_grad_() for p in sine.init_mlp(torch.Generator().manual_seed(1))]
        aggregator = GradientAgreementAggregator(theta, torch.optim.SGD(theta, lr=1.0))
        gen = torch.Generator().manual_seed(2)
        for _ in range(3):
            sine.reptile_step(theta, aggregator, cfg, gen, corruption)
        outcomes.append([p.detach().clone() for p in theta])
    for a, b in zip(*outcomes):
        assert torch.equal(a, b)


def test_oracle_is_the_mean_of_the_clean_tasks() -> None:
    common = _load("_common")
    corruption = common.Corruption(0.5, seed=0)
    oracle = common.make_weighting("oracle", corruption)
    gen = torch.Generator().manual_seed(0)
    vectors = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    mask = corruption.draw(6)
    assert 0 < int(mask.sum()) < 6
    weights = oracle(vectors)
    clean = (~mask).double()
    torch.testing.assert_close(weights, clean / clean.sum(), rtol=0, atol=0)
    # the update the aggregator applies: the plain mean of the clean tasks' vectors
    param = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    aggregator = GradientAgreementAggregator([param], weighting=oracle)
    update = aggregator.aggregate([[v] for v in vectors])[0]
    torch.testing.assert_close(update, vectors[~mask].mean(0), rtol=1e-12, atol=1e-14)
    corruption.mask = torch.ones(6, dtype=torch.bool)  # every task corrupted: Mean
    assert oracle(vectors).tolist() == [1 / 6] * 6
    corruption.record(torch.full((6,), 1 / 6))
    assert corruption.weight_share == 1.0
    with pytest.raises(RuntimeError, match="needs the run's Corruption"):
        common.Oracle()(vectors)
    with pytest.raises(ValueError, match=r"`--corrupt-fraction` should be in \[0, 1\]"):
        common.Corruption(1.5, seed=0)
