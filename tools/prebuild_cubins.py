"""Compile cuda_src modules for sm_90 into a kernel cache dir on this (GPU-less) machine, with
the worker's exact key and flags, so a device call can carry the cubins and compile nothing.

    .venv/bin/python -m tools.prebuild_cubins CACHE_BASE [MODULE ...]
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from worker.backends.cuda.compile import CUDA_SRC, NVCC_OPTIONS, cache_key, expand_includes

ALL = [p.stem for p in sorted(CUDA_SRC.glob("*.cu"))]


def build(base: Path, name: str, arch: str = "sm_90") -> str:
    src = expand_includes(CUDA_SRC / f"{name}.cu")
    out = base / "kernels" / f"{name}-{arch}-{cache_key(src, arch)}.cubin"
    if out.exists():
        return f"{name}: cached"
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as d:
        cu = Path(d) / f"{name}.cu"
        cu.write_text(src)
        cmd = ["nvcc", "--cubin", f"-arch={arch}", *NVCC_OPTIONS, f"-I{CUDA_SRC}", "-o", str(out)]
        subprocess.run([*cmd, str(cu)], check=True)
    return f"{name}: built"


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m tools.prebuild_cubins", description=__doc__)
    ap.add_argument("cache_base", type=Path, help="kernel cache root (WORKER_ORCD_CACHE)")
    ap.add_argument("modules", nargs="*", metavar="MODULE", help=f"default: all of {ALL}")
    a = ap.parse_args()
    base, names = a.cache_base, a.modules or ALL
    with ThreadPoolExecutor(2) as ex:
        for r in ex.map(lambda n: build(base, n), names):
            print(r)


if __name__ == "__main__":
    main()
