"""The producers that write their output's 15-bit codes themselves (rmsnorm_f32 and
swiglu_f32 with planes; cuda_src/i15.cuh), run on the CPU through tools.kernel_emu: their
output is the one they write without planes, and their codes are quant_x15's (tools.i15's
twin) of that output, bit for bit, so an integer product that reads them gives the bits it
gives after its own pre-pass. kernels.i15_args refuses what the kernels cannot lay out."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from tools.i15 import quant_x15
from tools.kernel_emu import aligned, load
from worker.backends.cuda.arena import DevBuf, LaunchRefused
from worker.backends.cuda.kernels import i15_args
from worker.backends.cuda.plans.i15 import i15_planes


def _planes(rows: int, n: int, blk: int) -> tuple[np.ndarray, tuple[int, ...]]:
    buf = aligned(np.full(i15_planes(rows, n, blk)[4], 0x5A, np.uint8), 16)  # garbage
    args = i15_args("test", (DevBuf(buf.ctypes.data, buf.nbytes), blk), rows, n)
    return buf, args


def _read(buf: np.ndarray, rows: int, n: int, blk: int) -> tuple[np.ndarray, ...]:
    hi, lo, d, sq, _ = i15_planes(rows, n, blk)
    return (
        buf[hi:lo].view(np.int8).reshape(rows, n),
        buf[lo : lo + rows * n].view(np.int8).reshape(rows, n),
        buf[d : d + 4 * rows * (n // blk)].view(np.float32).reshape(rows, n // blk),
        buf[sq : sq + 4 * rows * (n // 32)].view(np.int32).reshape(rows, n // 32),
    )


def _same_codes(out: np.ndarray, buf: np.ndarray, blk: int) -> None:
    rows, n = out.shape
    got = _read(buf, rows, n, blk)
    for a, b in zip(got, quant_x15(out, blk), strict=True):
        assert a.tobytes() == b.tobytes()


@pytest.fixture(scope="module")
def norm() -> Any:
    return load("norm.cu")


@pytest.fixture(scope="module")
def act() -> Any:
    return load("activation.cu")


@pytest.mark.parametrize(
    ("n", "blk", "threads"), [(896, 32, 256), (3072, 256, 1024), (2048, 256, 256)]
)
def test_rmsnorm_writes_the_codes_of_its_output(norm: Any, n: int, blk: int, threads: int) -> None:
    rows = 3
    rng = np.random.default_rng(n)
    x = rng.standard_normal((rows, n)).astype(np.float32)
    x[1, 40] = 30.0  # an outlier sets its block's scale
    w = rng.standard_normal(n).astype(np.float32)
    f = norm.get_function("rmsnorm_f32")
    i32, eps = np.int32, np.float32(1e-6)
    plain = np.full((rows, n), np.nan, np.float32)
    f(x.copy(), None, w, plain, i32(n), eps, None, None, None, None, i32(0),
      block=(threads, 1, 1), grid=(rows, 1))  # fmt: skip
    out = np.full((rows, n), np.nan, np.float32)
    buf, q = _planes(rows, n, blk)
    f(x.copy(), None, w, out, i32(n), eps, *q, block=(threads, 1, 1), grid=(rows, 1))
    assert out.tobytes() == plain.tobytes()
    _same_codes(out, buf, blk)


@pytest.mark.parametrize(("n", "blk"), [(896, 32), (4864, 256), (320, 32)])
def test_swiglu_writes_the_codes_of_its_output(act: Any, n: int, blk: int) -> None:
    """Gate and up side by side in one buffer ([gate | up] per row, strides 2n), out with a
    longer stride: the codes are rows of n."""
    rows = 2
    rng = np.random.default_rng(n)
    gu = rng.standard_normal((rows, 2 * n)).astype(np.float32)
    gu[0, 5] = 12.0
    f = act.get_function("swiglu_f32")
    i32 = np.int32
    out = np.full((rows, n + 16), np.nan, np.float32)
    plain = out.copy()
    strides = (i32(2 * n), i32(2 * n), i32(n + 16))
    grid = ((n + 255) // 256, rows)
    up = gu.ctypes.data + 4 * n  # (an address: the up half of each row)
    f(gu, up, plain, i32(n), *strides, None, None, None, None, i32(0),
      block=(256, 1, 1), grid=grid)  # fmt: skip
    buf, q = _planes(rows, n, blk)
    f(gu, up, out, i32(n), *strides, *q, block=(256, 1, 1), grid=grid)
    assert out.tobytes() == plain.tobytes()
    _same_codes(np.ascontiguousarray(out[:, :n]), buf, blk)


def test_planes_the_kernels_cannot_lay_out_are_refused() -> None:
    buf = aligned(np.zeros(i15_planes(2, 896, 32)[4], np.uint8), 16)
    ok = DevBuf(buf.ctypes.data, buf.nbytes)
    assert i15_args("k", None, 2, 896) == (0, 0, 0, 0, 0)
    with pytest.raises(LaunchRefused, match="multiple of the scale block 256"):
        i15_args("k", (ok, 256), 2, 896)  # 896 is not whole super-blocks
    with pytest.raises(LaunchRefused, match="scale block 64"):
        i15_args("k", (ok, 64), 2, 896)
    with pytest.raises(LaunchRefused, match="planes"):
        i15_args("k", (ok, 32), 3, 896)  # a row more than the buffer holds
    with pytest.raises(LaunchRefused, match="16-byte aligned"):
        i15_args("k", (DevBuf(ok.ptr + 4, ok.nbytes - 4), 32), 1, 896)


def test_a_producer_writes_codes_only_for_products_that_all_take_them() -> None:
    """MatmulKernels.i15_input_block: the scale block when every product of an input takes
    the integer cores at one block (Qwen's q/k (Q5_0) and v (Q8_0): 32), None when one
    does not (an F16 product, the switch off, invariance off) or the blocks differ."""
    from worker.backends.cuda.matmul import MatmulKernels
    from worker.backends.cuda.plans.base import QWeight

    mm = MatmulKernels.__new__(MatmulKernels)  # the choice is host logic: no GPU needed
    mm.int15, mm.int15_large, mm.invariant = True, False, True

    def w(qtype: int, cols: int = 896) -> QWeight:
        return QWeight(1 << 20, qtype, 128, cols, 0)

    assert mm.i15_input_block([w(6), w(8)]) == 32
    assert mm.i15_input_block([w(12, 3072), w(14, 3072)]) == 256
    assert mm.i15_input_block([w(6, 3072), w(12, 3072)]) is None  # 32 and 256
    assert mm.i15_input_block([w(6), w(1)]) is None  # F16 takes the fp16 gemm
    assert mm.i15_input_block([w(12, 896)]) is None  # K not whole super-blocks
    mm.invariant = False
    assert mm.i15_input_block([w(6)]) is None
    mm.invariant, mm.int15 = True, False
    assert mm.i15_input_block([w(6)]) is None
    mm.int15_large = True  # the default: only K-quant products of 8 Mi weights and more
    assert mm.i15_input_block([w(6)]) is None
    big = QWeight(1 << 20, 12, 3072, 3072, 0)
    assert mm.i15_input_block([big, QWeight(1 << 20, 13, 9216, 3072, 0)]) == 256
    assert mm.i15_input_block([big, w(12, 3072)]) is None  # 128 rows: below the size
