"""sample_dev reads its settings from 48 bytes of device memory (cuda_src/sampling.cu,
SampleArgs); kernels.sample_args() writes them. The layout both sides assume is checked here
against the C struct compiled for the host by nvcc, and the values against what sample_full
is passed for the same settings."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from worker.backends.cuda.kernels import (
    SAMPLE_ARGS_BYTES,
    SAMPLE_MAX_GRID,
    SAMPLE_SCRATCH_BYTES,
    SAMPLE_SMALL_K,
    sample_args,
    sample_fixed_point,
)

CUDA_SRC = Path(__file__).resolve().parents[3] / "cuda_src"


def test_values_are_the_fixed_point_forms() -> None:
    raw = sample_args(
        n_pen=3, penalty=1.25, temperature=0.75, top_k=40, top_p=0.9, min_p=0.05, draw=0.3
    )
    assert len(raw) == SAMPLE_ARGS_BYTES
    tp_m, wfloor, d_m, pen, temp, n_pen, top_k, tp_sh, d_sh = struct.unpack("<QQQffiiii", raw)
    assert (tp_m, tp_sh, wfloor, d_m, d_sh) == sample_fixed_point(0.9, 0.05, 0.3)
    assert tp_m * 2.0**-tp_sh == 0.9 and d_m * 2.0**-d_sh == 0.3
    assert (pen, temp, n_pen, top_k) == (1.25, 0.75, 3, 40)
    off = struct.unpack(
        "<QQQffiiii",
        sample_args(n_pen=0, penalty=1.0, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, draw=0.0),
    )
    assert off[0] == 0 and off[7] == -1 and off[1] == 1  # top-p off, min-p floor 1
    with pytest.raises(ValueError):
        sample_args(n_pen=-1, penalty=1, temperature=1, top_k=0, top_p=1, min_p=0, draw=0)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is required (CI has it)")
def test_c_struct_layout_matches(tmp_path: Path) -> None:
    src = (CUDA_SRC / "sampling.cu").read_text()
    m = re.search(r"struct SampleArgs \{.*?\};", src, re.S)
    assert m, "SampleArgs not found in sampling.cu"
    prog = tmp_path / "layout.cu"
    prog.write_text(
        "#include <cstdio>\n#include <cstddef>\ntypedef unsigned long long u64;\n"
        + m.group(0)
        + '\nint main() { printf("%zu %zu %zu %zu %zu %zu %zu %zu %zu %zu\\n", '
        "sizeof(SampleArgs), offsetof(SampleArgs, top_p_m), offsetof(SampleArgs, wfloor), "
        "offsetof(SampleArgs, draw_m), offsetof(SampleArgs, pen), "
        "offsetof(SampleArgs, temperature), offsetof(SampleArgs, n_pen), "
        "offsetof(SampleArgs, top_k), offsetof(SampleArgs, top_p_sh), "
        "offsetof(SampleArgs, draw_sh)); }\n"
    )
    exe = tmp_path / "layout"
    subprocess.run(["nvcc", "-std=c++17", str(prog), "-o", str(exe)], check=True)
    got = [
        int(v) for v in subprocess.run([str(exe)], capture_output=True, text=True).stdout.split()
    ]
    assert got == [SAMPLE_ARGS_BYTES, 0, 8, 16, 24, 28, 32, 36, 40, 44]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is required (CI has it)")
def test_grid_scratch_size_matches(tmp_path: Path) -> None:
    """The backend allocates SAMPLE_SCRATCH_BYTES for the sampler's GridScratch."""
    src = (CUDA_SRC / "sampling.cu").read_text()
    m = re.search(r"struct GridScratch \{.*?\};", src, re.S)
    assert m, "GridScratch not found in sampling.cu"
    consts = {"SAMPLE_MAX_GRID": SAMPLE_MAX_GRID, "SAMPLE_SMALL_K": SAMPLE_SMALL_K}
    for name, value in consts.items():
        assert re.search(rf"#define {name} {value}\b", src), name
    prog = tmp_path / "scratch.cu"
    prog.write_text(
        "#include <cstdio>\ntypedef unsigned long long u64;\n"
        + "".join(f"#define {k} {v}\n" for k, v in consts.items())
        + m.group(0)
        + '\nint main() { printf("%zu\\n", sizeof(GridScratch)); }\n'
    )
    exe = tmp_path / "scratch"
    subprocess.run(["nvcc", "-std=c++17", str(prog), "-o", str(exe)], check=True)
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    assert int(out) == SAMPLE_SCRATCH_BYTES
