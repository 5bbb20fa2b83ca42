"""Run a benchmark against the ``ga_optim`` of another checkout, to compare commits.

An editable install puts its own import hook ahead of ``PYTHONPATH``; this drops it, puts
``ROOT`` first on the path and runs the script as ``__main__``:

    git worktree add /tmp/before 3b3cea8
    python benchmarks/with_checkout.py /tmp/before benchmarks/gpu.py --host-only
    python benchmarks/with_checkout.py . benchmarks/gpu.py --host-only
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    root, script = Path(sys.argv[1]).resolve(), sys.argv[2]
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
    sys.path.insert(0, str(root))
    import ga_optim

    location = Path(ga_optim.__file__).resolve()
    if root not in location.parents:
        sys.exit(f"ga_optim was imported from {location}, not from {root}")
    print(f"# ga_optim from {location.parent}")
    sys.argv = sys.argv[2:]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
