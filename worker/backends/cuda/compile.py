"""Kernel registry: compiles `cuda_src/<name>.cu` through PyCUDA at startup, cached by hash.

`#include "x.cuh"` lines that name files in cuda_src/ are expanded before hashing, so a change
to a shared header invalidates every module that uses it; the cache key also covers the nvcc
flags, the target architecture and the nvcc version. A warm start compiles nothing.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path
from typing import Any


def kernel_source_dir() -> Path:
    """Where the .cu/.cuh sources are: inside the package in an installed wheel (setup.py
    copies them there at build time), else the repository's top-level cuda_src/ (a source
    checkout or an editable install)."""
    here = Path(__file__).resolve().parent
    packaged = here / "cuda_src"
    if any(packaged.glob("*.cu")):
        return packaged
    return here.parents[2] / "cuda_src"


CUDA_SRC = kernel_source_dir()
# Keep in step with scripts/check-kernels.sh (CI compiles with the same flags).
NVCC_OPTIONS: tuple[str, ...] = ("-std=c++17", "-O3", "-Xptxas=-warn-spills")
_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.MULTILINE)


def kernel_cache_dir() -> Path:
    env = os.environ.get("WORKER_ORCD_CACHE")
    base = Path(env) if env else Path.home() / ".cache" / "worker-orcd"
    return base / "kernels"


def expand_includes(path: Path, seen: set[Path] | None = None) -> str:
    """Source text with local includes inlined (each header once)."""
    seen = set() if seen is None else seen
    text = path.read_text()

    def repl(m: re.Match[str]) -> str:
        inc = (path.parent / m.group(1)).resolve()
        if not inc.exists():
            return m.group(0)  # a system header: leave for nvcc
        if inc in seen:
            return f"// {m.group(1)} already included"
        seen.add(inc)
        return f"// begin {m.group(1)}\n{expand_includes(inc, seen)}\n// end {m.group(1)}"

    return _INCLUDE.sub(repl, text)


@cache
def nvcc_version() -> str:
    out = subprocess.run(["nvcc", "--version"], capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def cache_key(source: str, arch: str) -> str:
    h = hashlib.sha256()
    for part in (source, arch, " ".join(NVCC_OPTIONS), nvcc_version()):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


_prewarm_lock = threading.Lock()
_prewarmed: set[tuple[str, str]] = set()


def module_names() -> list[str]:
    return sorted(p.stem for p in CUDA_SRC.glob("*.cu"))


def cached_path(name: str, arch: str) -> Path:
    source = expand_includes(CUDA_SRC / f"{name}.cu")
    return kernel_cache_dir() / f"{name}-{arch}-{cache_key(source, arch)}.cubin"


def prewarm(arch: str, names: list[str] | None = None) -> list[str]:
    """Compile every module missing from the cache, in parallel (one nvcc per core);
    returns the names compiled now. A cold start costs the slowest module, not the sum."""
    todo = [n for n in (names or module_names()) if not cached_path(n, arch).exists()]
    if not todo:
        return []
    workers = max(1, min(len(todo), os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nvcc") as pool:
        list(pool.map(lambda n: _compile_one(n, arch), todo))
    return todo


def compile_cubin(name: str, arch: str) -> tuple[bytes, bool]:
    """(cubin, compiled_now) for cuda_src/<name>.cu and e.g. arch='sm_90'.

    The first cache miss for an arch (a cold start) compiles every module at once."""
    cached = cached_path(name, arch)
    if cached.exists():
        return cached.read_bytes(), False
    with _prewarm_lock:
        first = (str(kernel_cache_dir()), arch) not in _prewarmed
        _prewarmed.add((str(kernel_cache_dir()), arch))
    if first:
        prewarm(arch)
        if cached.exists():
            return cached.read_bytes(), True
    return _compile_one(name, arch), True


def _compile_one(name: str, arch: str) -> bytes:
    source = expand_includes(CUDA_SRC / f"{name}.cu")
    cached = kernel_cache_dir() / f"{name}-{arch}-{cache_key(source, arch)}.cubin"
    from pycuda.compiler import compile as pycuda_compile  # GPU hosts only

    cubin: bytes = pycuda_compile(
        source,
        options=list(NVCC_OPTIONS),
        arch=arch,
        no_extern_c=True,  # sources declare their entry points extern "C" themselves
        cache_dir=False,  # our key covers headers and flags; PyCUDA's covers neither
        include_dirs=[str(CUDA_SRC)],
    )
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".tmp{os.getpid()}-{threading.get_ident()}")
    tmp.write_bytes(cubin)
    tmp.replace(cached)
    return cubin


def load_module(name: str, arch: str) -> Any:
    """A pycuda.driver.Module for cuda_src/<name>.cu; needs a current context."""
    import pycuda.driver as drv

    cubin, _ = compile_cubin(name, arch)
    return drv.module_from_buffer(cubin)
