"""The release artefacts: a wheel and an sdist that stand alone.

Built from a copy of the tracked files (what a clean export holds), without network
(``--no-isolation``: the dev extras install the build backend). The wheel carries the
licence and passes ``twine check --strict``; the unpacked sdist holds the whole test
suite with its helpers, and pytest collects it without an error.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (ROOT / ".git").exists():  # e.g. the suite run from an unpacked sdist
        reason = "builds the release from a git checkout's tracked files; this is none"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"under CI the suite must run in a git checkout: {reason}")
        pytest.skip(reason)
    export = tmp_path_factory.mktemp("export")
    tracked = (
        subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True)
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, tracked):
        source = ROOT / name
        if source.is_file():
            target = export / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read_bytes())
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(export)],
        check=True,
        capture_output=True,
    )
    return out


def test_wheel_and_sdist_pass_twine_check(dist: Path) -> None:
    files = sorted(dist.iterdir())
    assert [f.suffix for f in files] == [".whl", ".gz"], files
    result = subprocess.run(
        [sys.executable, "-m", "twine", "check", "--strict", *map(str, files)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    with zipfile.ZipFile(next(dist.glob("*.whl"))) as wheel:
        names = wheel.namelist()
        metadata = wheel.read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert any(n.endswith("licenses/LICENSE") for n in names)
    assert "License-Expression: MIT" in metadata
    assert not any(n.startswith("tests/") for n in names)  # the wheel is the library alone


def test_the_sdist_suite_collects_without_errors(dist: Path, tmp_path: Path) -> None:
    with tarfile.open(next(dist.glob("*.tar.gz"))) as archive:
        archive.extractall(tmp_path, filter="data")
    root = next(tmp_path.iterdir())
    for needed in ("LICENSE", "CHANGELOG.md", "conftest.py", "tests/_counting.py", "examples"):
        assert (root / needed).exists(), needed
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
        cwd=root,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "error" not in result.stdout.splitlines()[-1], result.stdout[-500:]
    assert " tests collected" in result.stdout
