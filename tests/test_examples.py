"""The copyable examples at the top of ``examples/``: each trains, each runs when copied out
of the repository, and with ``Mean`` each equals the loop it was made from.

For the three adapters shown as diffs in the README, the stock loop is rebuilt from the
example and the README's diff (the ``-`` lines in, the ``+`` lines out), so the diff is
exactly the difference and the equality below checks it. The torch.func example is
checked against a plain per-task ``torch.autograd`` MAML loop written here.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.func import functional_call

import ga_optim

from ._examples import EXAMPLES, load_script
from ._optional import require

README = EXAMPLES.parent / "README.md"
LIBRARIES = {
    "maml_learn2learn.py": ("learn2learn", "bash scripts/install_learn2learn.sh"),
    "anil.py": ("learn2learn", "bash scripts/install_learn2learn.sh"),
    "maml_higher.py": ("higher", "pip install higher==0.2.1"),
}
COPYABLE = ["maml_learn2learn.py", "reptile.py", "maml_higher.py", "maml_vmap.py", "anil.py"]


def _needs(name: str) -> None:
    if name in LIBRARIES:
        require(*LIBRARIES[name])


def readme_diffs() -> dict[str, list[str]]:
    """``{example path: diff body lines}`` for the README's ``diff`` blocks."""
    diffs = {}
    for block in re.findall(r"```diff\n(.*?)```", README.read_text(), flags=re.S):
        lines = block.splitlines()
        assert lines[0].startswith("--- ") and lines[1].startswith("+++ "), lines[:2]
        diffs[lines[1][4:].strip()] = lines[2:]
    return diffs


def stock_from_diff(example: list[str], diff: list[str]) -> list[str]:
    """Undo ``diff`` on the lines of ``example``: keep the context, drop the ``+`` lines,
    put the ``-`` lines back. Hunks are separated by `` ...`` lines; the context and ``+``
    lines of a hunk must be consecutive lines of the example, hunks in order."""
    hunks: list[list[str]] = [[]]
    for line in diff:
        if line[1:].strip() == "...":
            hunks.append([])
        else:
            hunks[-1].append(line if line else " ")
    stock: list[str] = []
    position = 0
    for hunk in filter(None, hunks):
        assert hunk[0][0] in " +", f"a hunk should start with a line of the example: {hunk[0]}"
        kept = [line[1:] for line in hunk if line[0] in " +"]
        start = next(
            (
                i
                for i in range(position, len(example) - len(kept) + 1)
                if example[i : i + len(kept)] == kept
            ),
            None,
        )
        assert start is not None, f"not in the example (in order): {kept}"
        stock += example[position:start]
        position = start
        for line in hunk:
            kind, text = line[0], line[1:]
            assert kind in " +-", f"not a diff line: {line!r}"
            if kind == "-":
                stock.append(text)
                continue
            if kind == " ":
                stock.append(text)
            position += 1
    return stock + example[position:]


def _parameters(result: dict[str, Any]) -> list[torch.Tensor]:
    return [p.detach().cpu() for p in result["model"].parameters()]


def _assert_parameters_equal(a: dict[str, Any], b: dict[str, Any], atol: float) -> None:
    for x, y in zip(_parameters(a), _parameters(b), strict=True):
        torch.testing.assert_close(x, y, rtol=0.0, atol=atol)


#: The ANIL example's edits, undone: the stock loop of learn2learn's anil_fc100.py shape.
ANIL_EDITS = [
    ("from ga_optim import Agreement, Mean, NonNegativeAgreement\n", ""),
    ("from ga_optim.adapters.learn2learn import AgreementMAML\n", ""),
    (
        'WEIGHTINGS = {"mean": Mean, "agreement": Agreement, "nonnegative": NonNegativeAgreement}',
        "",
    ),
    ("    agree = AgreementMAML(head, opt, weighting=WEIGHTINGS[args.weighting]())\n", ""),
    ("agree.backward(query_loss, learner)", "query_loss.backward()"),
    (
        "        agree.step()",
        "        for p in all_parameters:\n"
        "            p.grad.mul_(1.0 / args.tasks_per_batch)\n"
        "        opt.step()\n"
        "        pass",
    ),
]


def test_anil_example_with_mean_equals_the_stock_anil_loop(tmp_path: Path) -> None:
    """The ANIL example with the four edits undone (the features outside the wrapped head
    train in both), against the example with ``--weighting mean``."""
    _needs("anil.py")
    text = (EXAMPLES / "anil.py").read_text()
    for old, new in ANIL_EDITS:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    assert "ga_optim" not in text.split('"""', 2)[2].replace("python anil.py", "")
    stock_path = tmp_path / "stock_anil.py"
    stock_path.write_text(text.replace("WEIGHTINGS[args.weighting]", "None"))
    argv = ["--weighting", "mean", "--iterations", "6", "--tasks-per-batch", "4"]
    wrapped = load_script(EXAMPLES / "anil.py").main(argv)
    stock = load_script(stock_path).main(argv)
    _assert_parameters_equal(wrapped, stock, atol=1e-6)
    features = list(wrapped["model"][0].parameters())
    torch.manual_seed(0)  # the features moved from their initialisation
    initial = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU())
    assert not torch.equal(features[0].detach(), next(initial.parameters()).detach())


def test_stock_from_diff_undoes_a_diff() -> None:
    example = ["import a", "", "x = 1", "y = f(x)", "z = 2", "print(y)"]
    diff = ["+import a", "", " ...", " x = 1", "-y = g(x)", "+y = f(x)", " ...", " print(y)"]
    assert stock_from_diff(example, diff) == ["", "x = 1", "y = g(x)", "z = 2", "print(y)"]
    with pytest.raises(AssertionError, match="not in the example"):
        stock_from_diff(example, [" x = 1", "+z = 2"])  # not consecutive lines


@pytest.mark.parametrize("name", ["maml_learn2learn.py", "reptile.py", "maml_higher.py"])
def test_readme_diff_is_the_difference_to_the_stock_loop(name: str, tmp_path: Path) -> None:
    """Rebuilt from the README's diff, the stock loop has no ga_optim in it, and trains to
    the same parameters as the example with ``Mean`` (which moved them)."""
    _needs(name)
    diff = readme_diffs()[f"examples/{name}"]
    stock_text = "\n".join(stock_from_diff((EXAMPLES / name).read_text().splitlines(), diff))
    code = ast.parse(stock_text)
    del code.body[0]  # the docstring, which names the adapter
    assert "ga_optim" not in ast.unparse(code) and "WEIGHTINGS" not in ast.unparse(code)
    stock_path = tmp_path / f"stock_{name}"
    stock_path.write_text(stock_text + "\n")
    argv = ["--weighting", "mean", "--iterations", "4"]
    wrapped = load_script(EXAMPLES / name).main(argv)
    stock = load_script(stock_path).main(argv)
    _assert_parameters_equal(wrapped, stock, atol=1e-6)
    assert wrapped["after"] == pytest.approx(stock["after"], rel=1e-5)
    initial = _parameters(load_script(EXAMPLES / name).main(["--iterations", "0"]))
    moved = max((a - b).abs().max().item() for a, b in zip(initial, _parameters(wrapped)))
    assert moved > 1e-4  # the equality above is not the untrained model twice


def test_maml_vmap_with_mean_equals_a_plain_autograd_maml_loop() -> None:
    """The vmap example with ``Mean``: four Adam steps on the mean of the tasks' second-order
    meta-gradients, each task adapted alone with ``torch.autograd.grad``."""
    example = load_script(EXAMPLES / "maml_vmap.py")
    result = example.main(["--weighting", "mean", "--iterations", "4"])
    model = example.main(["--iterations", "0"])["model"]
    names = [name for name, _ in model.named_parameters()]
    opt = torch.optim.Adam(model.parameters(), lr=0.001)
    gen = torch.Generator().manual_seed(0)

    def loss(weights: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        prediction = functional_call(model, dict(zip(names, weights)), (x,))
        return nn.functional.mse_loss(prediction, y)

    for _ in range(4):
        xs, ys, xq, yq = example.sine_tasks(16, 10, gen)
        opt.zero_grad()
        total = torch.zeros(())
        for i in range(16):
            fast = list(model.parameters())
            for _ in range(5):
                grads = torch.autograd.grad(loss(fast, xs[i], ys[i]), fast, create_graph=True)
                fast = [w - 0.01 * g for w, g in zip(fast, grads)]
            total = total + loss(fast, xq[i], yq[i])
        (total / 16).backward()
        opt.step()
    _assert_parameters_equal(result, {"model": model}, atol=1e-6)


@pytest.mark.parametrize("name", COPYABLE)
def test_example_runs_alone_when_copied_and_its_quick_run_learns(name: str, tmp_path: Path) -> None:
    """Copied out of the repository (nothing of it on the path), ``--quick`` trains: the
    meta-test loss after adaptation is lower after training than before."""
    _needs(name)
    copy = tmp_path / name
    shutil.copy(EXAMPLES / name, copy)
    # The package under test, and nothing else of the repository, on the copy's path: it
    # is found whether ga_optim is installed or only on this process's path (as on the
    # GPU machine, where scripts/gpu_check.sh puts the checkout on PYTHONPATH).
    site = tmp_path / "site"
    site.mkdir()
    (site / "ga_optim").symlink_to(Path(ga_optim.__file__).resolve().parent)
    done = subprocess.run(
        [sys.executable, str(copy), "--quick"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": "", "HOME": str(tmp_path), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(site)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = re.search(
        r"agreement: meta-test MSE after adaptation ([\d.]+) -> ([\d.]+)", done.stdout
    )
    assert found, done.stdout
    before, after = float(found[1]), float(found[2])
    assert after < 0.95 * before, (before, after)
    assert "it/s" in done.stderr or "s/it" in done.stderr  # the progress bar


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; this machine has none")
def test_maml_vmap_on_cuda_learns_and_follows_the_cpu_run() -> None:
    """On CUDA the quick run learns, and four steps land where the CPU's do (the losses:
    Adam turns rounding-level differences of near-zero gradient entries into lr-sized
    steps, so the parameters are not compared entry by entry across devices)."""
    example = load_script(EXAMPLES / "maml_vmap.py")
    quick = example.main(["--device", "cuda", "--quick"])
    assert quick["after"] < 0.95 * quick["before"]
    on_cuda = example.main(["--device", "cuda", "--iterations", "4"])
    on_cpu = example.main(["--device", "cpu", "--iterations", "4"])
    assert on_cuda["before"] == pytest.approx(on_cpu["before"], rel=1e-5)
    assert on_cuda["after"] == pytest.approx(on_cpu["after"], rel=1e-3)
    assert next(on_cuda["model"].parameters()).device.type == "cuda"
