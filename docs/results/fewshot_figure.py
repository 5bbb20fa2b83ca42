"""Plot few-shot results (used for docs/RESULTS.md): the figure the harness writes for
one run (accuracy ± 95 % CI per configuration and weighting, the share of negative
weights over training), over several ``results.json`` merged.

    PYTHONPATH=examples/paper python docs/results/fewshot_figure.py OUT.png \\
        docs/results/digits/results.json [...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from fewshot_classification import plot


def main(out: str, paths: list[str]) -> None:
    merged: dict[str, dict[str, Any]] = {}
    for path in paths:
        for key, by_weighting in json.loads(Path(path).read_text())["results"].items():
            merged.setdefault(key, {}).update(by_weighting)
    if not plot(merged, "5-way digits", Path(out)):
        sys.exit("matplotlib is needed for the figure")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
