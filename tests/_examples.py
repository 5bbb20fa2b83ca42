"""Import an example script as a module.

The paper's harness (``examples/paper/``) imports its shared modules by name, as when run
as a script, so its folder goes on ``sys.path``; the copyable examples at the top of
``examples/`` import only ``ga_optim`` and public libraries, so they load from their file
alone (:func:`load_script`), as a user's copy would.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PAPER = EXAMPLES / "paper"


def load_example(name: str) -> ModuleType:
    """A module of the paper harness, ``examples/paper/<name>.py``."""
    if str(PAPER) not in sys.path:
        sys.path.insert(0, str(PAPER))
    return importlib.import_module(name)


def load_script(path: Path, name: str | None = None) -> ModuleType:
    """The Python file at ``path`` as a fresh module (not cached in ``sys.modules``)."""
    spec = importlib.util.spec_from_file_location(name or f"_example_{path.stem}", path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
