"""Access to the repository's `tools/` tree (not installed) for the commands that use it:
`synth` (the synthetic-model writer) and `bench --suite` (the suite over NATS).

From a source checkout (an editable install, or `python -m worker` in the repository root)
the tree lies beside the `worker` package; from an installed wheel it does not exist and the
command says where to run it instead of failing with an ImportError.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

import worker


class ToolsUnavailable(RuntimeError):
    """The command needs tools/ and this installation has no source checkout beside it."""


def source_root() -> Path | None:
    """The repository root holding this `worker` package and a `tools/` tree, if any."""
    root = Path(worker.__file__).resolve().parent.parent
    return root if (root / "tools" / "__init__.py").is_file() else None


def import_tool(name: str, command: str) -> ModuleType:
    """`tools.<name>`, importing it from the source checkout; ToolsUnavailable otherwise."""
    root = source_root()
    if root is None:
        raise ToolsUnavailable(
            f"`worker-orcd {command}` runs from a source checkout: it uses the repository's "
            "tools/ tree, which is not installed. Clone the repository, run "
            "scripts/dev-setup.sh and use .venv/bin/worker-orcd there."
        )
    if str(root) not in sys.path:
        sys.path.append(str(root))
    return importlib.import_module(f"tools.{name}")
