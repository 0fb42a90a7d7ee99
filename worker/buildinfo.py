"""Which source commit of worker-orcd is running (beside ``worker.__version__``).

The commit is ``$WORKER_ORCD_COMMIT`` where set (an image built without ``.git``), else
``git rev-parse --short HEAD`` of the checkout this package was imported from, else
``unknown``. Computed once per process (health payloads and the gateway's
``system_fingerprint`` read it on every call).
"""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]


@functools.cache
def commit() -> str:
    env = os.environ.get("WORKER_ORCD_COMMIT", "").strip()
    if env:
        return env
    if not (_REPO / ".git").exists():
        return "unknown"
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=_REPO,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"
