"""What every launch plan shares: the weight and launch types, device-buffer coercion, and
the argument checks that refuse a bad launch (`LaunchRefused`, naming the kernel) before
anything is queued."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from worker.backends.cuda.arena import DevBuf, LaunchRefused
from worker.backends.cuda.quant_layout import LAYOUTS, QLayout, layout

WEIGHT_ALIGN = 256
MAX_GRID_YZ = 65535
INT32_MAX = 2**31 - 1


# Kernel parameter formats for pycuda's prepare(): P pointer, q int64, i int32.
ARG_FORMATS: dict[str, str] = {
    "gemv": "PqiiPqiPPPq",
    "gemm": "PqiiPqiPPPq",
    "gemm2": "PqiiPqiPPPqiq",  # + K steps per split, split stride (elements)
    "gemm_splitk_reduce": "PiqiiPPPqPi",
    "gemm_x16": "PqiiPq",
    "skinny": "PqiiPqiPPPqiii",  # + splits, K steps a split, row tiles a block
    "embed": "PqiiPPq",
    "moe_gemv": "PqqiiiPiPqqPPq",
    "moe_gemm": "PqqiiPPPiPqqPPqiiqi",  # + splits, K steps a split, split stride, row tiles
    "moe_skinny_pair": "PqqiiPPPiPqqPPqiiqiPPP",  # moe_gemm's + second tensor, its bias, its y
    "moe_route": "PiiiPPP",
    "quant_x15": "PqiiiPPPP",
    "i15": "PiiPPPPiiPPPPqP",  # the 15-bit cores: ... partials, y, bias, residual, ldy, tickets
    "moe15": "PiiPPPPiiPPPPiiq",  # routed: ... partials, ntiles, tiles, list, topk, slot, bytes
    "moe15_glu": "PPiqiiPPPiffPPPP",
    "moe15_combine": "PPiqiPPiPi",
}


@dataclass(frozen=True)
class QWeight:
    """A (possibly quantized) weight matrix in VRAM: rows x cols, ggml type id qtype."""

    ptr: int
    qtype: int
    rows: int
    cols: int
    nbytes: int
    experts: int = 1

    @property
    def layout(self) -> QLayout:
        return layout(self.qtype)

    @property
    def row_bytes(self) -> int:
        return self.layout.row_bytes(self.cols)

    @property
    def expert_bytes(self) -> int:
        return self.rows * self.row_bytes


@dataclass(frozen=True)
class Launch:
    """One checked kernel launch: what `MatmulKernels.run` queues."""

    module: str
    kernel: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    args: tuple[int | float, ...]
    arg_format: str
    # grid[0] is capped at the blocks resident at once (MatmulKernels.run): the gemv's async walk,
    # whose warps load their next row tile while decoding the current one.
    cap_resident: bool = False
    # dynamic shared memory bytes (gemm v2); above 48 KB the function's limit is raised
    shared: int = 0


BufLike = DevBuf | tuple[Any, int] | Any


def as_buf(obj: BufLike) -> DevBuf:
    """DevBuf from a DevBuf, a (ptr|DeviceAllocation, nbytes) tuple or a pycuda GPUArray."""
    if isinstance(obj, DevBuf):
        return obj
    if isinstance(obj, tuple) and len(obj) == 2:
        return DevBuf(int(obj[0]), int(obj[1]))
    if hasattr(obj, "gpudata") and hasattr(obj, "nbytes"):
        return DevBuf(int(obj.gpudata), int(obj.nbytes))
    raise TypeError(f"not a device buffer with a known size: {type(obj).__name__}")


def opt_buf(obj: BufLike | None) -> DevBuf | None:
    return None if obj is None else as_buf(obj)


def require(kernel: str, ok: bool, problem: str) -> None:
    if not ok:
        raise LaunchRefused(kernel, problem)


def check_weight(kernel: str, w: QWeight) -> QLayout:
    try:
        lay = layout(w.qtype)
        lay.row_bytes(w.cols)
    except ValueError as e:
        raise LaunchRefused(kernel, str(e)) from None
    require(kernel, 1 <= w.rows <= INT32_MAX, f"weight rows {w.rows} out of range")
    require(kernel, w.cols <= INT32_MAX, f"weight cols {w.cols} out of range")
    require(kernel, w.experts >= 1, f"experts {w.experts} < 1")
    require(kernel, w.ptr > 0, "weight pointer is null")
    require(kernel, w.ptr % WEIGHT_ALIGN == 0, f"weight pointer {w.ptr:#x} not 256-byte aligned")
    need = w.experts * w.rows * lay.row_bytes(w.cols)
    require(kernel, w.nbytes >= need, f"weight buffer {w.nbytes} bytes < {need} needed")
    return lay


def check_f32(
    kernel: str, what: str, b: DevBuf, rows: int, cols: int, ld: int, *, align: int = 4
) -> tuple[int, int]:
    """Check a float32 [rows][cols] view with row stride ld; return its byte range."""
    require(kernel, b.ptr > 0, f"{what} pointer is null")
    require(kernel, b.ptr % align == 0, f"{what} pointer {b.ptr:#x} not {align}-byte aligned")
    require(kernel, ld >= cols, f"{what} row stride {ld} < row length {cols}")
    need = ((rows - 1) * ld + cols) * 4
    require(kernel, b.nbytes >= need, f"{what} buffer {b.nbytes} bytes < {need} needed")
    return b.ptr, b.ptr + need


def disjoint(kernel: str, a: tuple[int, int], b: tuple[int, int], what: str) -> None:
    require(kernel, a[1] <= b[0] or b[1] <= a[0], f"{what} overlap")


def bias_ptr(kernel: str, bias: BufLike | None, rows: int, n: int) -> int:
    """The optional fp32 bias (rows rows of n: one, or one an expert) checked; its pointer,
    0 for none."""
    bb = opt_buf(bias)
    if bb is None:
        return 0
    check_f32(kernel, "bias", bb, rows, n, n)
    return bb.ptr


def check_epilogue(
    kernel: str,
    yr: tuple[int, int],
    bias: BufLike | None,
    residual: BufLike | None,
    m: int,
    n: int,
    ldy: int,
    bias_rows: int = 1,
) -> tuple[int, int]:
    """The optional bias (bias_rows rows of n fp32) and residual (m rows of n, stride ldy:
    y itself or apart from it) of a launch writing y's byte range yr; their pointers (0:
    none)."""
    bptr, rb = bias_ptr(kernel, bias, bias_rows, n), opt_buf(residual)
    if rb is not None:
        rr = check_f32(kernel, "residual", rb, m, n, ldy)
        require(kernel, rr == yr or rr[1] <= yr[0] or yr[1] <= rr[0], "residual overlaps y")
    return (bptr, rb.ptr if rb else 0)


def kname(prefix: str, qtype: int) -> str:
    """Kernel name for messages: prefix_<type> when the type is known."""
    lay = LAYOUTS.get(int(qtype))
    return f"{prefix}_{lay.name}" if lay else prefix


def plan_linear(
    kernel: str,
    module: str,
    w: QWeight,
    lay: QLayout,
    x: BufLike,
    y: BufLike,
    ntok: int,
    bias: BufLike | None,
    residual: BufLike | None,
    ldx: int | None,
    ldy: int | None,
    *,
    grid: tuple[int, int, int],
    block: tuple[int, int, int],
) -> Launch:
    n, k = w.rows, w.cols
    ldx = k if ldx is None else ldx
    ldy = n if ldy is None else ldy
    require(kernel, ldx % 4 == 0, f"x row stride {ldx} not a multiple of 4 elements")
    xb, yb = as_buf(x), as_buf(y)
    xr = check_f32(kernel, "x", xb, ntok, k, ldx, align=16)
    yr = check_f32(kernel, "y", yb, ntok, n, ldy)
    disjoint(kernel, xr, yr, "x and y")
    disjoint(kernel, (w.ptr, w.ptr + w.nbytes), yr, "weights and y")
    bptr, rptr = check_epilogue(kernel, yr, bias, residual, ntok, n, ldy)
    args = (
        w.ptr,
        lay.row_bytes(k),
        n,
        k,
        xb.ptr,
        ldx,
        ntok,
        bptr,
        rptr,
        yb.ptr,
        ldy,
    )
    return Launch(module, kernel, grid, block, args, ARG_FORMATS[module])
