"""The few-shot example: its vmap-ed meta-steps and evaluation equal per-task autograd
loops (float64), one training step runs on each on-disk layout through the real loaders,
and the quick digits run writes its table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from ._examples import load_example
from .test_fewshot_data import TINY, make_mini_imagenet, make_omniglot

fewshot = load_example("fewshot_classification")
data = load_example("fewshot_data")


class Recorder:
    """Stands in for FuncAgreement: keeps what ``meta_step`` hands it."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.seen: dict[str, Any] = {}

    def step(self, task_vectors: Any, agreement_vectors: Any = None) -> torch.Tensor:
        self.seen = {"tasks": task_vectors, "agreement": agreement_vectors}
        return torch.full((self.n,), 1 / self.n)


def _loop_adapt(
    model: torch.nn.Module,
    start: list[torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    lr: float,
    create_graph: bool,
) -> list[torch.Tensor]:
    names = [name for name, _ in model.named_parameters()]
    fast = start
    for _ in range(steps):
        loss = F.cross_entropy(functional_call(model, dict(zip(names, fast)), (x,)), y)
        grads = torch.autograd.grad(loss, fast, create_graph=create_graph)
        fast = [w - lr * g for w, g in zip(fast, grads)]
    return fast


def _setup(algorithm: str, n: int = 3) -> tuple[Any, Any, tuple[torch.Tensor, ...]]:
    cfg = fewshot.Config.for_run("digits", algorithm, shots=2, meta_batch=n, inner_steps=3)
    model = fewshot.build_model(cfg, (1, 8, 8), seed=0).double()
    gen = torch.Generator().manual_seed(1)
    split = data.load_digits("train")
    episodes = data.sample_episodes(split, n, cfg.ways, cfg.shots, cfg.train_queries, gen)
    return cfg, model, tuple(e.double() if e.is_floating_point() else e for e in episodes)


@pytest.mark.parametrize("algorithm", ["maml", "fomaml"])
@pytest.mark.parametrize("on_meta_gradients", [False, True])
def test_maml_step_gives_each_task_its_own_meta_gradient(
    algorithm: str, on_meta_gradients: bool
) -> None:
    cfg, model, (xs, ys, xq, yq) = _setup(algorithm)
    recorder = Recorder(3)
    fewshot.meta_step(model, recorder, cfg, (xs, ys, xq, yq), on_meta_gradients)
    names = [name for name, _ in model.named_parameters()]
    for i in range(3):
        start = [p.detach().clone().requires_grad_() for p in model.parameters()]
        fast = _loop_adapt(
            model, start, xs[i], ys[i], cfg.inner_steps, cfg.inner_lr, algorithm == "maml"
        )
        query = F.cross_entropy(functional_call(model, dict(zip(names, fast)), (xq[i],)), yq[i])
        wrt = start if algorithm == "maml" else fast  # first order: ∇L_i at θ_i
        meta = torch.autograd.grad(query, wrt)
        for name, want in zip(names, meta):
            torch.testing.assert_close(recorder.seen["tasks"][name][i], want, rtol=1e-9, atol=1e-12)
        if on_meta_gradients:
            assert recorder.seen["agreement"] is None
        else:
            for name, s, f in zip(names, start, fast):
                got = recorder.seen["agreement"][name][i]
                torch.testing.assert_close(got, (s - f).detach(), rtol=1e-9, atol=1e-12)


def test_reptile_step_gives_each_task_its_inner_loop_delta() -> None:
    cfg, model, (xs, ys, xq, yq) = _setup("reptile")
    recorder = Recorder(3)
    fewshot.meta_step(model, recorder, cfg, (xs, ys, xq, yq))
    names = [name for name, _ in model.named_parameters()]
    assert recorder.seen["agreement"] is None
    for i in range(3):
        start = [p.detach().clone().requires_grad_() for p in model.parameters()]
        x, y = torch.cat([xs[i], xq[i]]), torch.cat([ys[i], yq[i]])
        fast = _loop_adapt(model, start, x, y, cfg.inner_steps, cfg.inner_lr, False)
        for name, s, f in zip(names, start, fast):
            torch.testing.assert_close(
                recorder.seen["tasks"][name][i], (s - f).detach(), rtol=1e-9, atol=1e-12
            )


def test_evaluate_equals_fine_tuning_each_episode_alone() -> None:
    cfg = fewshot.Config.for_run("digits", "maml", shots=1, eval_episodes=7, eval_chunk=3)
    model = fewshot.build_model(cfg, (1, 8, 8), seed=3)
    got = fewshot.evaluate(model, cfg)
    assert len(got) == 7
    gen = torch.Generator().manual_seed(cfg.eval_seed)
    split = data.load_digits("test")
    names = [name for name, _ in model.named_parameters()]
    want = []
    for n in (3, 3, 1):  # the chunks evaluate() draws, in order
        xs, ys, xq, yq = data.sample_episodes(split, n, cfg.ways, cfg.shots, cfg.eval_queries, gen)
        for i in range(n):
            start = [p.detach().clone().requires_grad_() for p in model.parameters()]
            fast = _loop_adapt(model, start, xs[i], ys[i], cfg.eval_steps, cfg.inner_lr, False)
            with torch.no_grad():
                logits = functional_call(model, dict(zip(names, fast)), (xq[i],))
            want.append(float((logits.argmax(-1) == yq[i]).float().mean()))
    assert got == pytest.approx(want, abs=1e-6)


def test_convnet_has_finn_et_al_s_shapes() -> None:
    omniglot = fewshot.ConvNet(ways=20, channels=1, hidden=64, image_size=28)
    mini = fewshot.ConvNet(ways=5, channels=3, hidden=32, image_size=84)
    digits = fewshot.ConvNet(ways=5, channels=1, hidden=32, image_size=8)
    # 28 → 14 → 7 → 3 → 1; 84 → 42 → 21 → 10 → 5; 8 → 4 → 2 → 1 (no fourth pool).
    assert omniglot.head.in_features == 64 and mini.head.in_features == 32 * 25
    assert digits.head.in_features == 32
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in digits.modules()) == 3
    assert omniglot(torch.zeros(2, 1, 28, 28)).shape == (2, 20)
    assert mini(torch.zeros(2, 3, 84, 84)).shape == (2, 5)


def _one_training_step(split: Any, cfg: Any) -> None:
    model = fewshot.build_model(cfg, split.image_shape, seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    outer = torch.optim.Adam(model.parameters(), lr=1e-3)
    agreement = fewshot.FuncAgreement(model, outer)
    gen = torch.Generator().manual_seed(0)
    episodes = data.sample_episodes(
        split, cfg.meta_batch, cfg.ways, cfg.shots, cfg.train_queries, gen
    )
    weights = fewshot.meta_step(model, agreement, cfg, episodes)
    assert weights.shape == (cfg.meta_batch,)
    assert float(weights.abs().sum()) == pytest.approx(1.0)
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_one_training_step_on_a_tiny_omniglot(tmp_path: Path) -> None:
    make_omniglot(tmp_path, TINY)
    split = data.load_omniglot(tmp_path, "train", train_characters=2, validation_characters=1)
    assert split.image_shape == (1, 28, 28)
    cfg = fewshot.Config.for_run("omniglot", "maml", ways=5, shots=1, train_queries=2, meta_batch=2)
    _one_training_step(split, cfg)


def test_one_training_step_and_the_quick_run_on_a_tiny_mini_imagenet(tmp_path: Path) -> None:
    make_mini_imagenet(tmp_path, classes=5, per_class=4)
    split = data.load_mini_imagenet(tmp_path, "train")
    cfg = fewshot.Config.for_run("miniimagenet", "fomaml", shots=1, train_queries=2, meta_batch=2)
    _one_training_step(split, cfg)
    # The command line end to end on the same files (the test split: 5 classes of 4).
    out = tmp_path / "out"
    results = _quick(
        [
            "--dataset", "miniimagenet", "--data-root", str(tmp_path), "--shots", "1",
            "--algorithms", "fomaml", "--seeds", "0", "--iterations", "1", "--meta-batch", "2",
            "--train-queries", "2", "--eval-queries", "3", "--device", "cpu", "--out", str(out),
        ]
    )  # fmt: skip
    assert set(results["results"]) == {"fomaml 1-shot"}
    assert (out / "table.md").read_text().startswith("| miniimagenet 5-way |")


def test_data_root_is_required_for_on_disk_datasets(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="`--data-root` is required for omniglot"):
        fewshot.load_split("omniglot", None, "train")
    with pytest.raises(FileNotFoundError, match=r"mini-imagenet-cache-train\.pkl"):
        fewshot.load_split("miniimagenet", str(tmp_path / "nowhere"), "train")


def _quick(argv: list[str]) -> dict[str, Any]:
    threads = torch.get_num_threads()
    try:
        return fewshot.main(["--quick", "--jobs", "1", *argv])
    finally:
        torch.set_num_threads(threads)


def test_digits_quick_run_writes_its_table_and_results(tmp_path: Path) -> None:
    results = _quick(
        ["--out", str(tmp_path), "--weightings", "mean", "agreement", "agreement_meta"]
    )
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["results"] == json.loads(json.dumps(results["results"]))
    figure = (tmp_path / "figure.png").read_bytes()  # the plotting code ran
    assert figure.startswith(b"\x89PNG\r\n\x1a\n") and len(figure) > 1000
    table = (tmp_path / "table.md").read_text()
    keys = {"maml 1-shot", "maml 5-shot", "reptile 1-shot", "reptile 5-shot"}
    assert set(saved["results"]) == keys == set(saved["configs"])
    assert "agreement_meta" not in saved["results"]["reptile 1-shot"]  # MAML only
    for key, by_weighting in saved["results"].items():
        assert saved["configs"][key]["shots"] == int(key.split()[1][0])
        for weighting, entry in by_weighting.items():
            assert entry["seeds"] == [0, 1] and entry["diverged"] == 0
            assert all(0.0 <= a <= 1.0 for a in entry["per_seed_accuracy"])
            assert entry["accuracy"] == pytest.approx(sum(entry["per_seed_accuracy"]) / 2)
            assert f"| {key} | {weighting} | {100 * entry['accuracy']:.1f} ±" in table
            if weighting == "mean":
                bounds = [v for h in entry["weight_history"] for v in h["min"] + h["max"]]
                assert bounds == pytest.approx([1 / 8] * len(bounds))


def test_omniglot_and_mini_imagenet_use_finn_et_al_s_settings() -> None:
    five = fewshot.Config.for_run("omniglot", "maml", ways=5)
    twenty = fewshot.Config.for_run("omniglot", "maml", ways=20)
    mini = fewshot.Config.for_run("miniimagenet", "fomaml")
    assert (five.meta_batch, five.inner_steps, five.inner_lr, five.eval_steps) == (32, 1, 0.4, 3)
    assert (twenty.meta_batch, twenty.inner_steps, twenty.inner_lr) == (16, 5, 0.1)
    assert (mini.meta_batch, mini.inner_steps, mini.inner_lr, mini.hidden) == (4, 5, 0.01, 32)
    assert fewshot.Config.for_run("omniglot", "reptile", meta_batch=8).meta_batch == 8


def test_digits_corrupted_quick_run_records_the_weight_share(tmp_path: Path) -> None:
    names = ["mean", "oracle", "leave_one_out", "leave_one_out_nonnegative", "geometric_median"]
    _quick(
        [
            "--out", str(tmp_path), "--algorithms", "maml", "--shots", "1",
            "--weightings", *names, "--corrupt-fraction", "0.4",
        ]
    )  # fmt: skip
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["configs"]["maml 1-shot"]["corrupt_fraction"] == 0.4
    for weighting in names:
        entry = saved["results"]["maml 1-shot"][weighting]
        shares = entry["per_seed_corrupted_weight_share"]
        assert len(shares) == 2 and all(0.0 <= s <= 1.0 for s in shares)
        assert all(0.0 <= a <= 1.0 for a in entry["per_seed_accuracy"])
        if weighting == "oracle":
            assert shares == [0.0, 0.0]
        if weighting == "mean":  # uniform weights: the corrupted fraction itself
            for seed, share in zip(entry["seeds"], shares):
                gen = torch.Generator().manual_seed(1_000_003 + seed)
                counts = [float((torch.rand(8, generator=gen) < 0.4).sum()) for _ in range(10)]
                assert share == pytest.approx(sum(counts) / 80, abs=1e-12)


def test_corrupt_labels_resamples_only_the_chosen_episodes() -> None:
    gen = torch.Generator().manual_seed(0)
    ys = torch.arange(5).repeat_interleave(20).repeat(4, 1)  # [4 tasks, 100]
    yq = ys.clone()
    mask = torch.tensor([False, True, False, True])
    new_s, new_q = fewshot.corrupt_labels((ys, yq), mask, 5, gen)
    for old, new in ((ys, new_s), (yq, new_q)):
        assert torch.equal(new[~mask], old[~mask])
        chosen = new[mask]
        assert int(chosen.min()) >= 0 and int(chosen.max()) <= 4
        # uniform over the 5 labels, unrelated to the true ones: about 1 in 5 still agree
        agree = float((chosen == old[mask]).double().mean())
        assert 0.1 < agree < 0.3
        counts = torch.bincount(chosen.reshape(-1), minlength=5)
        assert int(counts.min()) > 20
