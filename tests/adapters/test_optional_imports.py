"""Without learn2learn, higher or torchjd: ga_optim imports, and each optional piece says
how to install what it needs."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import pytest

from tests._optional import require

BLOCK = """
import sys
class _Missing:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {names!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}")
        return None
sys.meta_path.insert(0, _Missing())
"""


def _run(code: str, blocked: set[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", BLOCK.format(names=blocked) + code],
        capture_output=True,
        text=True,
        check=False,
    )


def test_ga_optim_imports_without_optional_libraries() -> None:
    result = _run(
        "import ga_optim, ga_optim.adapters, ga_optim.adapters.func, ga_optim.adapters.reptile\n"
        "import sys\n"
        "assert not {'learn2learn', 'higher', 'torchjd'} & set(sys.modules)\n"
        "print(ga_optim.__version__)",
        {"learn2learn", "higher", "torchjd"},
    )
    assert result.returncode == 0, result.stderr
    # The version is written once (ga_optim.__version__); the metadata reads it.
    assert result.stdout.strip() == importlib.metadata.version("ga-optim")


@pytest.mark.parametrize(
    ("module", "blocked", "command"),
    [
        ("ga_optim.adapters.learn2learn", "learn2learn", "pip install learn2learn==0.2.0"),
        ("ga_optim.adapters.learn2learn", "learn2learn", "docs/site/install.md, 'learn2learn'"),
        ("ga_optim.adapters.higher", "higher", "pip install higher==0.2.1"),
    ],
)
def test_adapter_without_its_library_names_the_install_command(
    module: str, blocked: str, command: str
) -> None:
    result = _run(f"import {module}", {blocked})
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError:") and command in last


def test_to_torchjd_without_torchjd_names_the_install_command() -> None:
    result = _run("import ga_optim\nga_optim.to_torchjd(ga_optim.Agreement())", {"torchjd"})
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError:") and 'pip install "torchjd[quadprog-projector]"' in last


def test_testing_without_hypothesis_names_the_install_command() -> None:
    result = _run("import ga_optim.testing", {"hypothesis"})
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError:") and "pip install hypothesis" in last


def test_the_learn2learn_adapter_imports_without_a_word_from_gym() -> None:
    """learn2learn imports gym, whose import prints a four-line banner; ours prints none."""
    require("learn2learn", "bash scripts/install_learn2learn.sh")
    result = subprocess.run(
        [sys.executable, "-c", "import ga_optim.adapters.learn2learn"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr == "", result.stderr
