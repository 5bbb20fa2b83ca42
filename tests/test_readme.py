"""Every code block of the README is run by a test here, or is checked against the file
that a test runs (a verbatim slice of an example; a diff that tests/test_examples.py
undoes; a command whose script and flags exist), so the README and the code cannot drift."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import torch

from ga_optim import Agreement, Weighting

from ._examples import load_example, load_script
from ._optional import require

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# A marker in each block -> the test below that covers it.
COVERED = {
    "bash scripts/main.sh": "test_readme_names_the_two_commands",
    "examples/paper/sine_regression.py": "test_paper_commands_parse_and_plan_their_runs",
    "aggregator.step(deltas)": "test_custom_loop_example_runs",
    "agreement_vectors=inner_deltas": "test_maml_form_line_combines_meta_gradients_weighted_by_deltas",
    "+++ examples/": "tests/test_examples.py::test_readme_diff_is_the_difference_to_the_stock_loop",
    "meta_gradient = vmap(": "test_python_blocks_that_are_slices_of_examples",
    "GradScaler": "test_grad_scaler_and_clipping_block_runs",
    "process_group=dist.group.WORLD": "test_python_blocks_that_are_slices_of_examples",
    "torchrun --nproc_per_node 2": "test_commands_name_existing_scripts_and_flags",
    "assert_weighting_invariants": "test_property_testing_block_runs_and_can_fail",
}


def _blocks(language: str | None = None) -> list[str]:
    found = re.findall(r"```(\w*)\n(.*?)```", README.read_text(), flags=re.S)
    return [body for lang, body in found if language is None or lang == language]


def _block(marker: str, language: str = "python") -> str:
    (block,) = [b for b in _blocks(language) if marker in b]
    return block


def _commands() -> list[list[str]]:
    """The commands of the README's bash blocks (continuation lines joined, comments out)."""
    commands = []
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(words)
    return commands


def test_every_code_block_is_covered_by_a_test() -> None:
    for block in _blocks():
        markers = [m for m in COVERED if m in block]
        assert len(markers) == 1, f"a README block no test covers (or two claim):\n{block}"


def test_custom_loop_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    namespace: dict[str, Any] = {}
    exec(compile(_block("aggregator.step(deltas)"), str(README), "exec"), namespace)
    printed = capsys.readouterr().out.split()
    assert float(printed[0]) == pytest.approx(1.0, abs=1e-6)
    assert 0 <= int(printed[1]) <= 5
    assert namespace["aggregator"].num_steps == 20


def test_maml_form_line_combines_meta_gradients_weighted_by_deltas() -> None:
    """After the custom loop, the MAML line steps θ ← θ − 0.1 Σ w_i ∇L_i with w from the
    deltas (float64, by hand: w_i = d_i·Σd_j / Σ_k |d_k·Σd_j|)."""
    namespace: dict[str, Any] = {}
    exec(compile(_block("aggregator.step(deltas)"), str(README), "exec"), namespace)
    model = namespace["model"]
    gen = torch.Generator().manual_seed(3)
    shapes = [p.shape for p in model.parameters()]
    namespace["meta_gradients"] = [
        [torch.randn(s, generator=gen) for s in shapes] for _ in range(4)
    ]
    namespace["inner_deltas"] = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(4)]
    before = [p.detach().clone().double() for p in model.parameters()]
    exec(compile(_block("agreement_vectors=inner_deltas"), str(README), "exec"), namespace)

    flat = torch.stack(
        [torch.cat([t.double().flatten() for t in task]) for task in namespace["inner_deltas"]]
    )
    scores = flat @ flat.sum(0)
    weights = scores / scores.abs().sum()
    for index, (p, start) in enumerate(zip(model.parameters(), before)):
        update = sum(
            w * task[index].double() for w, task in zip(weights, namespace["meta_gradients"])
        )
        torch.testing.assert_close(p.detach().double(), start - 0.1 * update, rtol=0, atol=1e-6)


def _assert_slice(block: str, path: Path) -> None:
    """The block's lines are lines of ``path`` (indentation aside), in order."""
    lines = [line.strip() for line in path.read_text().splitlines()]
    position = 0
    for line in (raw.strip() for raw in block.splitlines()):
        if not line:
            continue
        while position < len(lines) and lines[position] != line:
            position += 1
        assert position < len(lines), f"not in {path.name} (in order): {line}"
        position += 1


@pytest.mark.parametrize(
    ("marker", "example"),
    [
        ("process_group=dist.group.WORLD", "distributed_maml.py"),  # run in test_distributed.py
        ("meta_gradient = vmap(", "maml_vmap.py"),  # run in test_examples.py
    ],
)
def test_python_blocks_that_are_slices_of_examples(marker: str, example: str) -> None:
    _assert_slice(_block(marker), ROOT / "examples" / example)


def test_slice_check_can_fail() -> None:
    with pytest.raises(AssertionError, match=r"not in maml_vmap\.py"):
        _assert_slice("agree.step(meta_grads)\n", ROOT / "examples" / "maml_vmap.py")


def test_grad_scaler_and_clipping_block_runs() -> None:
    """The README's optimizer=None + GradScaler + clipping loop runs and trains."""
    require("learn2learn", "bash scripts/install_learn2learn.sh")
    torch.manual_seed(0)
    namespace: dict[str, Any] = {}
    exec(compile(_block("GradScaler"), str(README), "exec"), namespace)
    agree, scaler, opt = namespace["agree"], namespace["scaler"], namespace["opt"]
    assert agree.num_recorded == 0
    assert agree.last_weights.shape == (4,)
    steps = [s["step"] for s in opt.state.values()]
    assert steps and all(int(s) == 5 for s in steps), "the scaler skipped finite steps"
    assert scaler.get_scale() == 2.0**16


class _Doubled(Weighting):
    """Twice the agreement weights: Σ|w| = 2, which the invariants must catch."""

    needs = "scores"

    def from_scores(self, scores: torch.Tensor) -> torch.Tensor:
        return 2 * Agreement().from_scores(scores)

    def from_gramian(self, gramian: torch.Tensor) -> torch.Tensor:
        return 2 * Agreement().from_gramian(gramian)


def test_property_testing_block_runs_and_can_fail(tmp_path: Path) -> None:
    """Run as a module of its own (hypothesis reads the test's source when it reports)."""
    block = _block("assert_weighting_invariants")
    (tmp_path / "readme_property.py").write_text(block)
    load_script(tmp_path / "readme_property.py").test_my_weighting()  # hypothesis runs
    broken = "from tests.test_readme import _Doubled as Doubled\n" + block.replace(
        "Agreement()", "Doubled()"
    )
    (tmp_path / "readme_property_broken.py").write_text(broken)
    with pytest.raises(AssertionError):
        load_script(tmp_path / "readme_property_broken.py").test_my_weighting()


def test_readme_names_the_two_commands() -> None:
    assert ["bash", "scripts/main.sh"] in _commands() and ["bash", "scripts/test.sh"] in _commands()
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
    assert (ROOT / "scripts" / "main.sh").exists() and (ROOT / "scripts" / "test.sh").exists()


def _script_and_arguments(words: list[str]) -> tuple[Path, list[str]] | None:
    scripts = [i for i, w in enumerate(words) if w.endswith(".py")]
    if not scripts:
        return None
    return ROOT / words[scripts[0]], words[scripts[0] + 1 :]


def test_commands_name_existing_scripts_and_flags() -> None:
    """Every Python script a README command runs exists and declares each flag it is given."""
    checked = 0
    for words in _commands():
        found = _script_and_arguments(words)
        if found is None:
            continue
        script, arguments = found
        assert script.exists(), words
        source = script.read_text()
        for flag in (a for a in arguments if a.startswith("--")):
            assert f'"{flag}"' in source, f"{script.name} has no {flag}: {' '.join(words)}"
        checked += 1
    assert checked >= 5


def test_paper_commands_parse_and_plan_their_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The paper-harness commands run up to the training: their arguments parse and every
    combination they ask for is planned (``run_jobs`` is replaced by a recorder)."""
    planned: list[list[Any]] = []

    class Planned(Exception):
        pass

    def record(_run: Any, jobs: list[Any], *_: Any) -> None:
        planned.append(jobs)
        raise Planned

    for words in _commands():
        found = _script_and_arguments(words)
        if found is None or found[0].parent.name != "paper":
            continue
        script, arguments = found
        module = load_example(script.stem)
        monkeypatch.setattr(module, "run_jobs", record)
        if "--out" in arguments:
            arguments[arguments.index("--out") + 1] = str(tmp_path / "out")
        with pytest.raises(Planned):
            module.main(arguments)
        jobs = planned[-1]
        seeds = arguments[arguments.index("--seeds") + 1 :] if "--seeds" in arguments else []
        seeds = seeds[: next((i for i, s in enumerate(seeds) if s.startswith("--")), len(seeds))]
        assert len(jobs) >= max(len(seeds), 1), words
    assert len(planned) == 3
