#!/usr/bin/env bash
# Install learn2learn 0.2.0 (the latest release) into .venv on Python 3.11.
#
# Its only distribution is an sdist whose generated Cython C files predate Python 3.11
# (they include longintrepr.h, which 3.11 moved), so `pip install learn2learn` fails to
# compile. This downloads that sdist, regenerates the C files from its three .pyx files
# with Cython 3.0, installs it without its (outdated) pins, then installs what it imports.
# No learn2learn code is kept in this repository. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
if "$PY" -c "import learn2learn, learn2learn.data.task_dataset" 2>/dev/null; then
    exit 0
fi
pip_q() {
    "$PY" -m pip install --disable-pip-version-check -q "$@" 2>&1 \
        | { grep -v -E "Location '.*' is ignored" || true; }
    return "${PIPESTATUS[0]}"
}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# --no-binary learn2learn (not :all:): the sdist only; its build dependencies come as wheels.
"$PY" -m pip download --disable-pip-version-check -q --no-deps --no-binary learn2learn \
    "learn2learn==0.2.0" -d "$work" 2>&1 | { grep -v -E "Location '.*' is ignored" || true; }
tar xzf "$work"/learn2learn-0.2.0.tar.gz -C "$work"
src="$work/learn2learn-0.2.0"
pip_q "cython>=3.0,<3.1" "setuptools>=64" wheel
for name in meta_dataset task_dataset transforms; do
    "$PY" -m cython -3 "$src/learn2learn/data/$name.pyx" -o "$src/learn2learn/data/$name.c"
done
# learn2learn's import-time needs (torch and torchvision come from scripts/setup.sh).
pip_q numpy scipy requests tqdm "gym<0.27"
pip_q --no-deps --no-build-isolation "$src"
"$PY" -c "import learn2learn; print('learn2learn', learn2learn.__version__, 'installed')"
