"""Build hook: the CUDA kernel sources live in the repository's top-level cuda_src/ (where
the project keeps them), and the wheel carries a copy inside the package
(worker/backends/cuda/cuda_src/), where worker/backends/cuda/compile.py finds them in an
installed worker. Everything else is in pyproject.toml."""

from __future__ import annotations

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

KERNELS = Path(__file__).resolve().parent / "cuda_src"
PACKAGED = Path("worker", "backends", "cuda", "cuda_src")


class BuildPyWithKernels(build_py):
    """build_py, plus every cuda_src/*.cu and *.cuh copied into the built package."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:  # an editable install reads the top-level directory itself
            return
        sources = sorted(p for p in KERNELS.iterdir() if p.suffix in (".cu", ".cuh"))
        if not sources:
            raise RuntimeError(f"no kernel sources in {KERNELS}")
        target = Path(self.build_lib) / PACKAGED
        self.mkpath(str(target))
        for src in sources:
            self.copy_file(str(src), str(target / src.name))


setup(cmdclass={"build_py": BuildPyWithKernels})
