"""CUDA kernels from cuda_src/ run on the CPU, to check what a kernel computes where no GPU is
at hand (tools/kernel_emu/emu.h says how, and what does not carry over: inline PTX, and the
FMA contraction nvcc may apply to plain float expressions).

    mod = load("norm.cu")                 # compiled with g++ into a cached shared library
    f = mod.get_function("rmsnorm_f32")   # called like a PyCUDA function
    f(x, None, w, out, np.int32(n), np.float32(1e-6), block=(256,), grid=(rows,))

Arguments: NumPy arrays (their memory is the kernel's global memory) or addresses (ints,
e.g. `arr.ctypes.data`, as the worker's launch plans carry them; None is a null pointer), and
scalars, converted by the kernel's own parameter types. Launches are synchronous; `shared`
sizes the dynamic shared memory; `stream` is ignored. `run(launch)` runs a
worker.backends.cuda.plans.base.Launch; `aligned(a)` copies an array to the alignment a launch
plan checks for.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "cuda_src"
HERE = Path(__file__).resolve().parent
CUDA_INCLUDE = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"

_KERNEL = re.compile(r'extern\s+"C"\s+KERNEL_EMU_GLOBAL\s+void\s+(\w+)\s*\(([^)]*)\)', re.S)
_DYN_SMEM = re.compile(
    r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?((?:[\w:]+\s+)+?)(\w+)\s*\[\s*\]\s*;"
)
_ASM = re.compile(r"\basm(\s+volatile)?\s*\(")
_SCALARS: dict[str, Any] = {
    "int": ctypes.c_int,
    "int32_t": ctypes.c_int32,
    "unsigned": ctypes.c_uint,
    "unsigned int": ctypes.c_uint,
    "uint32_t": ctypes.c_uint32,
    "long long": ctypes.c_longlong,
    "int64_t": ctypes.c_int64,
    "uint64_t": ctypes.c_uint64,
    "size_t": ctypes.c_size_t,
    "float": ctypes.c_float,
}


class _Launch(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint) for n in ("gx", "gy", "gz", "bx", "by", "bz")] + [
        ("smem", ctypes.c_size_t)
    ]


def aligned(a: np.ndarray, align: int = 256) -> np.ndarray:
    """A copy of `a` at an `align`-byte boundary (weights sit 256-byte aligned in the arena,
    and the launch plans refuse less)."""
    raw = np.empty(a.nbytes + align, np.uint8)
    off = -raw.ctypes.data % align
    out = raw[off : off + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def _emulable(text: str) -> str:
    """Kernel source as g++ takes it: dynamic shared arrays become the emulator's buffer,
    static ones function statics (one block runs at a time), inline PTX an abort."""
    text = _DYN_SMEM.sub(
        lambda m: f"{m[1].strip()}* {m[2]} = reinterpret_cast<{m[1].strip()}*>(::emu::dyn_smem());",
        text,
    )
    text = re.sub(r"\b__shared__\b", "static", text)
    return _ASM.sub("EMU_ASM(", text)


def _params(sig: str) -> list[tuple[str, str]]:
    """(type, name) of each parameter of a kernel signature."""
    out = []
    for p in (s.strip() for s in sig.split(",")):
        if not p:
            continue
        m = re.match(r"(.*?)(\w+)\s*$", p, re.S)
        if m is None:
            raise ValueError(f"cannot read parameter {p!r}")
        out.append((" ".join(m[1].replace("__restrict__", "").split()), m[2]))
    return out


def _ctype(t: str) -> Any:
    if "*" in t:
        return ctypes.c_void_p
    base = " ".join(w for w in t.split() if w != "const")
    if base not in _SCALARS:
        raise ValueError(f"parameter type {t!r} not supported")
    return _SCALARS[base]


class EmuFunction:
    def __init__(self, lib: ctypes.CDLL, name: str, params: list[tuple[str, str]]) -> None:
        self.name = name
        self._types = [_ctype(t) for t, _ in params]
        self._fn = getattr(lib, f"emu__{name}")
        self._fn.argtypes = [ctypes.POINTER(_Launch), *self._types]
        self._fn.restype = None

    def __call__(
        self,
        *args: Any,
        block: tuple[int, ...],
        grid: tuple[int, ...] = (1, 1, 1),
        shared: int = 0,
        stream: Any = None,
    ) -> None:
        if len(args) != len(self._types):
            raise TypeError(f"{self.name} takes {len(self._types)} arguments, got {len(args)}")
        b = (*block, 1, 1, 1)[:3]
        g = (*grid, 1, 1, 1)[:3]
        launch = _Launch(*g, *b, shared)
        conv = []
        for a, t in zip(args, self._types, strict=True):
            if t is ctypes.c_void_p:
                if isinstance(a, np.ndarray):
                    if not a.flags.c_contiguous:
                        raise TypeError(f"{self.name}: array arguments must be C-contiguous")
                    a = a.ctypes.data
                conv.append(ctypes.c_void_p(int(a or 0)))  # an address (None or 0: null)
            else:
                conv.append(t(a.item() if isinstance(a, np.generic) else a))
        self._fn(ctypes.byref(launch), *conv)


class EmuModule:
    def __init__(self, lib: ctypes.CDLL, kernels: dict[str, list[tuple[str, str]]]) -> None:
        self._lib = lib
        self._kernels = kernels
        self.kernels = frozenset(kernels)  # the kernels' names

    def get_function(self, name: str) -> EmuFunction:
        if name not in self._kernels:
            raise KeyError(f"no kernel {name!r} (have {sorted(self._kernels)})")
        return EmuFunction(self._lib, name, self._kernels[name])


def _gxx(d: Path, *args: str) -> str:
    cmd = [
        os.environ.get("CXX", "g++"), "-std=c++20", "-pthread", "-w", f"-I{d}",
        f"-I{CUDA_INCLUDE}", "-include", str(d / "emu.h"), *args,
    ]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"kernel_emu: {' '.join(cmd)} failed:\n{r.stderr[-4000:]}")
    return r.stdout


def _wrapper(name: str, params: list[tuple[str, str]]) -> str:
    decl = "".join(f", {t} {n}" for t, n in params)
    args = ", ".join(n for _, n in params)
    return (
        f'extern "C" void emu__{name}(const emu::Launch* L{decl}) '
        f"{{ emu::run(*L, [=] {{ {name}({args}); }}); }}"
    )


@functools.cache
def load(*files: str, cache: Path | None = None) -> EmuModule:
    """Compiles cuda_src/<file> (each of `files`, which may include any file of cuda_src/) for
    the CPU, once per content (cached under `cache`, default ~/.cache/worker-orcd/kernel_emu).
    The kernels are the `extern "C"` ones the preprocessor leaves (macro-made ones too)."""
    cache = cache or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / (
        "worker-orcd/kernel_emu"
    )
    sources = {p.name: _emulable(p.read_text()) for p in sorted(SRC.glob("*.cu*"))}
    emu_h = (HERE / "emu.h").read_text()
    key = hashlib.sha256(
        "\0".join([emu_h, *files, *(f"{k}\0{v}" for k, v in sorted(sources.items()))]).encode()
    ).hexdigest()[:16]
    lib_path = cache / f"{'_'.join(Path(f).stem for f in files)}-{key}.so"
    sig_path = lib_path.with_suffix(".json")
    if not (lib_path.exists() and sig_path.exists()):
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)
            for name, text in {**sources, "emu.h": emu_h}.items():
                (d / name).write_text(text)
            kernels: dict[str, list[tuple[str, str]]] = {}
            for f in files:
                pre = _gxx(d, "-E", "-P", "-DKERNEL_EMU_SCAN", "-x", "c++", str(d / f))
                kernels.update({m[1]: _params(m[2]) for m in _KERNEL.finditer(pre)})
            main = "".join(f'#include "{f}"\n' for f in files)
            main += "\n".join(_wrapper(n, p) for n, p in kernels.items()) + "\n"
            (d / "main.cpp").write_text(main)
            out = cache / f"{lib_path.name}.{os.getpid()}.tmp"
            _gxx(d, "-O1", "-g0", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math",
                 str(d / "main.cpp"), "-o", str(out))  # fmt: skip
            sig_tmp = sig_path.with_suffix(f".{os.getpid()}.tmp")
            sig_tmp.write_text(json.dumps(kernels))
            os.replace(sig_tmp, sig_path)
            os.replace(out, lib_path)
    sigs = json.loads(sig_path.read_text())
    kernels = {k: [(t, n) for t, n in v] for k, v in sigs.items()}
    return EmuModule(ctypes.CDLL(str(lib_path)), kernels)


def run(launch: Any) -> None:
    """Runs a worker.backends.cuda.plans.base.Launch (its module cuda_src/<module>.cu, its kernel,
    grid, block, shared memory and raw arguments) as MatmulKernels.run would queue it."""
    load(f"{launch.module}.cu").get_function(launch.kernel)(
        *launch.args, block=launch.block, grid=launch.grid, shared=launch.shared
    )
