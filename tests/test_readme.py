"""The README's custom-loop example runs as written and does what it says."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from tests._optional import require

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_custom_loop_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    block = next(b for b in _python_blocks() if "aggregator.step(deltas)" in b)
    namespace: dict[str, object] = {}
    exec(compile(block, str(README), "exec"), namespace)
    printed = capsys.readouterr().out.split()
    assert float(printed[0]) == pytest.approx(1.0, abs=1e-6)
    assert 0 <= int(printed[1]) <= 5
    aggregator = namespace["aggregator"]
    assert aggregator.num_steps == 20  # type: ignore[attr-defined]


def test_readme_names_the_two_commands() -> None:
    text = README.read_text()
    assert "bash scripts/main.sh" in text and "bash scripts/test.sh" in text
    ci = (README.parent / ".ci" / "run").read_text()
    assert "bash scripts/test.sh" in ci


def test_distributed_block_is_a_slice_of_the_example() -> None:
    """The README's distributed loop is the example's own lines, in order (the example
    itself runs under torchrun in tests/test_distributed.py), so the two cannot drift."""
    block = next(b for b in _python_blocks() if "process_group=dist.group.WORLD" in b)
    example = (README.parent / "examples" / "distributed_maml.py").read_text().splitlines()
    position = 0
    for line in (raw.strip() for raw in block.splitlines()):
        if not line:
            continue
        while position < len(example) and example[position].strip() != line:
            position += 1
        assert position < len(example), f"not in examples/distributed_maml.py (in order): {line}"
        position += 1


def test_grad_scaler_and_clipping_block_runs() -> None:
    """The README's optimizer=None + GradScaler + clipping loop runs and trains."""
    require("learn2learn", "bash scripts/install_learn2learn.sh")
    block = next(b for b in _python_blocks() if "GradScaler" in b)
    torch.manual_seed(0)
    namespace: dict[str, object] = {}
    exec(compile(block, str(README), "exec"), namespace)
    agree, scaler = namespace["agree"], namespace["scaler"]
    assert agree.num_recorded == 0  # type: ignore[attr-defined]
    assert agree.last_weights.shape == (4,)  # type: ignore[attr-defined]
    opt = namespace["opt"]
    steps = [s["step"] for s in opt.state.values()]  # type: ignore[attr-defined]
    assert steps and all(int(s) == 5 for s in steps), "the scaler skipped finite steps"
    assert scaler.get_scale() == 2.0**16  # type: ignore[attr-defined]
