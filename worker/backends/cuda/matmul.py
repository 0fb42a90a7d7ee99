"""Launch wrappers for the quantized matrix kernels (gemv, gemm, embedding, MoE).

How to call (everything on the thread that owns the CUDA context, context current):

    from worker.backends.cuda.arena import DevBuf
    from worker.backends.cuda.matmul import MatmulKernels, QWeight
    mm = MatmulKernels("sm_90")          # loads cuda_src/{gemv,gemm,embed,moe}.cu (hash cache)
    w = QWeight(ptr=arena_ptr + off, qtype=12, rows=N, cols=K, nbytes=tensor_nbytes)
    mm.linear(w, x=DevBuf(x_ptr, x_nbytes), y=DevBuf(y_ptr, y_nbytes), ntok=M,
              bias=DevBuf(b_ptr, b_nbytes) or None, residual=None, stream=stream)

- Pointers: a `DevBuf(ptr, nbytes)`, a `(ptr, nbytes)` tuple whose ptr is an int or a
  `pycuda.driver.DeviceAllocation`, or a pycuda `GPUArray` (its gpudata and nbytes). The
  nbytes is what the wrapper checks every access against; for a view into an arena give the
  bytes from ptr to the end of the view.
- Weights: `QWeight` = ggml type id (`gguf.GGMLQuantizationType` value), rows N, columns K
  (ggml ne1, ne0), 256-byte-aligned pointer, nbytes >= N * row_bytes; experts > 1 for a 3-D
  expert tensor [experts][N][K] (MoE).
- Activations are float32, row-major: x[t] at x + t*ldx (elements), y[t] at y + t*ldy.
  ldx defaults to K and ldy to N. x must be 16-byte aligned with ldx % 4 == 0.
- `linear` computes y[t] = W x[t] (+ bias) (+ residual[t]) for t < ntok: the tensor-core
  arithmetic for every ntok when `MatmulKernels.invariant` (the backend's default: a row's
  result must not depend on ntok), as skinny (one launch) up to SKINNY_MAX_ROWS rows and as
  the gemm above; otherwise ntok <= 8 runs the decode gemv (weights read once for all ntok).
  `residual` has y's layout and may be y itself (in-place residual add); y must not overlap x.
- `stream`: a `pycuda.driver.Stream` or None (the null stream). Launches are asynchronous and
  only enqueue work, so the backend can capture them: begin capture with cuda.bindings on
  `stream.handle`, call the wrappers, end capture. The argument checks run in Python before
  anything is queued; a bad argument raises `LaunchRefused` (arena.py, the same refusal as
  kernels.py's launches: a `CudaError`, code CUDA_ERROR) naming the kernel; a failed launch
  raises `CudaError` naming the kernel. Errors of the running kernel surface at the caller's
  next synchronize.
- `plan_*` functions do the checks and return the `Launch` (kernel name, grid, block, args)
  without a GPU; `MatmulKernels.run(launch, stream)` queues one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

from worker.backends.cuda.arena import DevBuf, LaunchRefused
from worker.backends.cuda.quant_layout import LAYOUTS, QLayout, layout
from worker.errors import CudaError

GEMV_THREADS = 128
GEMV_WARPS = 4  # warps per block of the gemv (GEMV4_WARPS in gemv.cu)
# WORKER_ORCD_GEMV_MODE ("plain:2", "async:1", ...) overrides the per-size default of
# gemv_mode for A/B benchmarks on one warm card (docs/configuration.md).
_FORCED_MODE = os.environ.get("WORKER_ORCD_GEMV_MODE", "")
GEMV_MAX_TOKENS = 8
# Tensor-core gemm: 3 (gemm_x16 converts X to fp16 into a workspace, then
# gemm3_<type>_m128/_m64) or 2 (gemm2_<type>_m128/_m64: X converted inside; both: 128-row
# tiles, raw weights staged by cp.async, dynamic shared memory), per matrix (gemm_version): 3
# for matrices of at least GEMM3_MIN_ELEMENTS weights, else 2 (docs/kernels.md, H100: v3 is
# faster on the GPU for every shape, but its extra launch and checks cost ~15 us of host
# time, and Qwen2.5-0.5B's eager prefill is launch-bound: pp512 53.5k tok/s with v2
# everywhere, 38-40k with v3 everywhere; Phi-3-mini 13.4k with v2, 15.9k with v3).
GEMM3_MIN_ELEMENTS = 8 << 20
GEMM2_ROWS = 128  # g2::BN in gemm.cu: weight rows per block
GEMM2_THREADS = 256  # g2::THREADS
GEMM2_LD = 40  # g2::LD: halves per row of the fp16 tiles
# v2/v3 token tile: 128 when that gives at least this many blocks, else 64 (run 1, H100:
# 128 won at 92-128 blocks, 64 at 16-28 blocks)
GEMM2_MIN_BLOCKS_128 = 64
# skinny_<type> (gemm.cu): gemm2's arithmetic for up to 16 rows in one launch, one warp per
# (8 weight rows, split). `linear` takes it for 1..SKINNY_MAX_ROWS rows wherever it would take
# the gemm; WORKER_ORCD_SKINNY_ROWS=0 turns it off (A/B runs).
SKINNY_MAX_ROWS = min(16, int(os.environ.get("WORKER_ORCD_SKINNY_ROWS", "16")))
SKINNY_ROWS = 8  # sk::ROWS: weight rows a warp
SKINNY_ITEM_BYTES = 16 * SKINNY_ROWS * 4  # sk::Smem<T>::item: one (tile, split)'s partials
SKINNY_MAX_WARPS = 16
GEMM3_X_STAGES = 3  # g2::XS: fp16 X tiles in flight (gemm3)
X16_THREADS = 128  # gemm_x16: 8 elements a thread
EMBED_THREADS = 128
WEIGHT_ALIGN = 256
MAX_GRID_YZ = 65535
INT32_MAX = 2**31 - 1


def int15_choice(value: str) -> tuple[bool, bool, bool]:
    """(routed experts, every dense product, the large K-quant dense products) on the
    integer cores for a WORKER_ORCD_INT15 value."""
    v = value.lower()
    return v in ("auto", "experts", "all", "1"), v in ("all", "1"), v == "auto"


# 15-bit integer products (cuda_src/i15.cu; docs/kernels.md, "Integer products"), with
# batch invariance on. By default (WORKER_ORCD_INT15 `auto`) the routed MoE experts (MXFP4,
# Q8_0) and the dense Q4_K / Q5_K / Q6_K products of at least I15_DENSE_MIN_WEIGHTS weights
# (Phi-3-class and larger files; not Qwen2.5-0.5B's small ones, where staging costs more than
# the fp16 decoding saves) take them: K-quant decoding is what the fp16 products are most
# issue-bound on, so these gain most (Phi-3: decode +50 / +70 % at 1 / 8 streams, -17 % at
# 64, prefill -24 %: BENCHMARKS.md). `experts`: the experts only; `all`: every dense product
# of the formats below too; `0` none (A/B).
INT15_EXPERTS, INT15_DENSE, INT15_LARGE = int15_choice(os.environ.get("WORKER_ORCD_INT15", "auto"))
I15_KQUANTS = (12, 13, 14)
I15_DENSE_MIN_WEIGHTS = 8 << 20
# Q4_0, Q5_0, Q8_0, MXFP4 (blocks of 32, X scaled per 32); Q4_K, Q5_K, Q6_K
I15_TYPES = (2, 6, 8, 39, 12, 13, 14)
I15_Q6_K = 14
I15_CHUNK = 8  # legacy formats: blocks of 32 a chunk (splits are whole chunks)
I15_LEGACY_PITCH = {2: 176, 6: 208, 8: 304, 39: 176}  # I15Leg<T>::PITCH: a staged row
# steps of up to 8 rows take gemm15p8_* (one n8 tile a block), the rest gemm15p_* (32 rows
# of X a block); the same bits. (A dp4a core for 1-8 rows lost to gemm15p8 in the model, an
# unstaged tensor-core core to gemm15p, 64 rows of X a block to 32: docs/kernels.md.)
I15_P8_ROWS = 8
I15_SPLIT_MAX_SB = 11  # K-quants: super-blocks a split at most
I15_GEMM_ROWS = 64  # weight rows a block of the tensor-core cores (4 warps of 16)
I15_GEMM_TOK = 32  # rows of X a gemm15p block
I15_GEMMP_SLOTS = 3  # staged units (super-blocks, legacy: chunks) in a block's ring, at most
# gemm15p8's ring: two slots leave room for more of its blocks on a multiprocessor (H100, one
# process, 3 / 2 slots alternated: Phi-3's gate_up and head 6-12 % faster at 1-8 rows, its
# other products within 1 %; the 32-row cores gained at some shapes and lost at others, so
# they keep three)
I15_P8_SLOTS = 2

MODULES = ("gemv", "gemm", "embed", "moe", "i15")

# Kernel parameter formats for pycuda's prepare(): P pointer, q int64, i int32.
_ARG_FORMATS: dict[str, str] = {
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
# MoE (moe.cu; docs/kernels.md, MoE): moe_gemv's default rows per warp, the
# routing pre-pass's block and expert limit, the prefill token tiles.
MOE_GEMV_ROWS_PER_WARP = (2, 4)  # for 1 token, for 2 (H100, docs/kernels.md, MoE)
MOE_ROUTE_THREADS = 1024
MOE_MAX_EXPERTS = 1024  # moe_route's shared-memory tables (MOE_MAX_EXPERTS in moe.cu)
MOE_SKINNY_TILE_M = 16  # moe_skinny's routed tiles: at most 16 rows (one mma's m)
# routed expert products: K splits (about; moe_split) and the most tokens a step takes the
# skinny form for (above: moe_gemm5; both sum a row the same way). Measured on gpt-oss
# (H200, BENCHMARKS.md): 4 splits against 1 and 8, skinny up to 64 tokens against 16.
MOE_SPLIT_WANT = 4
MOE_SKINNY_MAX_TOKENS = 64
# The routed integer cores' tiles of assignments (moe15p<8|16|64>): 8 up to
# MOE15_TILE8_MAX_TOKENS tokens a step, 16 up to MOE_SKINNY_MAX_TOKENS, 64 above. With few
# assignments an expert, the 8-row core issues fewer instructions a weight and fits more blocks
# a multiprocessor (gpt-oss on an H100, BENCHMARKS.md: +6 / +13 / +11 % S_TG at 1 / 8 / 32
# tokens against tiles of 16, -10 % at 64). A tile's size never changes an assignment's bits.
MOE15_TILE8_MAX_TOKENS = 32


def moe15_tile(ntok: int) -> int:
    """Assignments a tile of the routed integer cores for a step of ntok tokens."""
    if ntok <= MOE15_TILE8_MAX_TOKENS:
        return 8
    return 16 if ntok <= MOE_SKINNY_MAX_TOKENS else 64


# Routed gemm (docs/kernels.md, MoE): moe_gemm5_<type>_m128/_m64 (gemm2 core, 128 weight rows a
# block, gathered token rows); on an H100 against the gemm_tile-core kernel it replaced
# (gpt-oss 32 experts top-4): 512 tokens 727.7 -> 523.1 us a launch, pp512 7453 -> 9534 tok/s.
# v5 token tile: 128 when the assignments per expert average at least this many (fewer, fuller
# tiles: one 128-row tile costs ~1.3 64-row tiles in the dense gemm2 at 512 tokens), else 64
# (H100: m128 523 vs m64 596 us at an average of 64, m64 439 vs 501 at 16)
MOE5_MIN_AVG_128 = 56


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
class MoeRoute:
    """A routing pre-pass queued by MatmulKernels.moe_route: the ids it read, the form and
    token tile it routed for, the workspace it wrote (None for the gemv form: no pre-pass),
    and which pre-pass it was (a later one overwrites the workspace, so only the latest may
    be used)."""

    ids: int
    ntok: int
    topk: int
    experts: int
    form: str
    tile_m: int
    gen: int
    workspace: DevBuf | None


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


def _opt_buf(obj: BufLike | None) -> DevBuf | None:
    return None if obj is None else as_buf(obj)


def _need(kernel: str, ok: bool, problem: str) -> None:
    if not ok:
        raise LaunchRefused(kernel, problem)


def _check_weight(kernel: str, w: QWeight) -> QLayout:
    try:
        lay = layout(w.qtype)
        lay.row_bytes(w.cols)
    except ValueError as e:
        raise LaunchRefused(kernel, str(e)) from None
    _need(kernel, 1 <= w.rows <= INT32_MAX, f"weight rows {w.rows} out of range")
    _need(kernel, w.cols <= INT32_MAX, f"weight cols {w.cols} out of range")
    _need(kernel, w.experts >= 1, f"experts {w.experts} < 1")
    _need(kernel, w.ptr > 0, "weight pointer is null")
    _need(kernel, w.ptr % WEIGHT_ALIGN == 0, f"weight pointer {w.ptr:#x} not 256-byte aligned")
    need = w.experts * w.rows * lay.row_bytes(w.cols)
    _need(kernel, w.nbytes >= need, f"weight buffer {w.nbytes} bytes < {need} needed")
    return lay


def _check_f32(
    kernel: str, what: str, b: DevBuf, rows: int, cols: int, ld: int, *, align: int = 4
) -> tuple[int, int]:
    """Check a float32 [rows][cols] view with row stride ld; return its byte range."""
    _need(kernel, b.ptr > 0, f"{what} pointer is null")
    _need(kernel, b.ptr % align == 0, f"{what} pointer {b.ptr:#x} not {align}-byte aligned")
    _need(kernel, ld >= cols, f"{what} row stride {ld} < row length {cols}")
    need = ((rows - 1) * ld + cols) * 4
    _need(kernel, b.nbytes >= need, f"{what} buffer {b.nbytes} bytes < {need} needed")
    return b.ptr, b.ptr + need


def _disjoint(kernel: str, a: tuple[int, int], b: tuple[int, int], what: str) -> None:
    _need(kernel, a[1] <= b[0] or b[1] <= a[0], f"{what} overlap")


def _bias_ptr(kernel: str, bias: BufLike | None, rows: int, n: int) -> int:
    """The optional fp32 bias (rows rows of n: one, or one an expert) checked; its pointer,
    0 for none."""
    bb = _opt_buf(bias)
    if bb is None:
        return 0
    _check_f32(kernel, "bias", bb, rows, n, n)
    return bb.ptr


def _check_epilogue(
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
    bptr, rb = _bias_ptr(kernel, bias, bias_rows, n), _opt_buf(residual)
    if rb is not None:
        rr = _check_f32(kernel, "residual", rb, m, n, ldy)
        _need(kernel, rr == yr or rr[1] <= yr[0] or yr[1] <= rr[0], "residual overlaps y")
    return (bptr, rb.ptr if rb else 0)


def plan_gemv(
    w: QWeight,
    x: BufLike,
    y: BufLike,
    ntok: int = 1,
    *,
    bias: BufLike | None = None,
    residual: BufLike | None = None,
    ldx: int | None = None,
    ldy: int | None = None,
    rows_per_warp: int | None = None,
    max_blocks: int | None = None,
    mode: str | None = None,
) -> Launch:
    """Decode form: y[t] = W x[t] (+bias) (+residual[t]) for t < ntok <= 8.

    gemv_<type>_nb<NB>[_x|_a][_r2|_r4]: each warp owns rows_per_warp rows (1, 2 or 4; 4 only
    for ntok <= 2; default from gemv_mode), 4 warps a block.
    mode: "plain" (loads to registers, then decode; one block per row tile), "xpf"
    (plain plus x requested one group ahead; one token, one row per warp), "async" (cp.async
    into two shared stages, warps walk row tiles; with 2-4 rows per warp the grid is capped
    at the resident blocks; one token); default from gemv_mode.
    max_blocks: at most this many blocks (each walks every max_blocks-th row tile)."""
    lay = _check_weight(_kname("gemv", w.qtype), w)
    kernel = f"gemv_{lay.name}"
    _need(kernel, w.experts == 1, "an expert tensor needs moe_gemv")
    _need(kernel, 1 <= ntok <= GEMV_MAX_TOKENS, f"ntok {ntok} not in 1..{GEMV_MAX_TOKENS}")
    nb = 1 << (ntok - 1).bit_length()
    dmode, drw = gemv_mode(w.rows, nb)
    if mode is None:
        mode = dmode if rows_per_warp is None else "plain"
    rw = (drw if mode == dmode else 1) if rows_per_warp is None else rows_per_warp
    _need(kernel, mode in ("plain", "xpf", "async"), f"gemv mode {mode!r} unknown")
    _need(kernel, mode == "plain" or nb == 1, f"gemv mode {mode} needs ntok 1")
    _need(kernel, rw in (1, 2, 4), f"rows_per_warp {rw} not 1, 2 or 4")
    _need(kernel, rw < 4 or nb <= 2, "rows_per_warp 4 needs ntok <= 2")
    _need(kernel, mode != "xpf" or rw == 1, "gemv mode xpf has one row per warp")
    tag = {"plain": "", "xpf": "_x", "async": "_a"}[mode]
    kernel = f"gemv_{lay.name}_nb{nb}{tag}" + ("" if rw == 1 else f"_r{rw}")
    rows_per_block = GEMV_WARPS * rw
    blocks = -(-w.rows // rows_per_block)
    if max_blocks is not None:
        _need(kernel, max_blocks >= 1, f"max_blocks {max_blocks} < 1")
        blocks = min(blocks, max_blocks)
    launch = _plan_linear(
        kernel,
        "gemv",
        w,
        lay,
        x,
        y,
        ntok,
        bias,
        residual,
        ldx,
        ldy,
        grid=(blocks, 1, 1),
        block=(GEMV_THREADS, 1, 1),
    )
    # the async walk with one row per warp measured faster with one block per tile (H100)
    return replace(launch, cap_resident=mode == "async" and rw >= 2)


def gemv_mode(rows: int, nb: int) -> tuple[str, int]:
    """Default (mode, rows per warp) of the gemv for a matrix of `rows` rows and nb tokens,
    the fastest measured per class in run 6 (docs/kernels.md, H100): for one token, the
    cp.async walk for large matrices (2 rows per warp, capped grid, from 32768 rows; 1 row,
    one block per tile, from 8192), plain loads for mid-sized ones (2 rows per warp from 4096),
    and x requested ahead where a warp is nearly alone on its SM (up to 1024 rows)."""
    if _FORCED_MODE:
        mode, _, rpw = _FORCED_MODE.partition(":")
        return mode, int(rpw or 1)
    if nb == 1:
        if rows >= 32768:
            return "async", 2
        if rows >= 8192:
            return "async", 1
        if rows > 1024:
            return "plain", 2 if rows >= 4096 else 1
        return "xpf", 1
    if rows >= 32768 and nb <= 2:
        return "plain", 4
    return "plain", 2 if rows >= 4096 else 1


def plan_gemm(
    w: QWeight,
    x: BufLike,
    y: BufLike,
    m: int,
    *,
    bias: BufLike | None = None,
    residual: BufLike | None = None,
    ldx: int | None = None,
    ldy: int | None = None,
    tile_m: int | None = None,
    version: int | None = None,
    xh: BufLike | None = None,
    split: tuple[int, int] | None = None,
) -> Launch:
    """Prefill form: Y[t] = W X[t] (+bias) (+residual[t]) for t < m, on tensor cores.

    split: (S, kps): S splits of kps K steps each write plain partial sums
    at y + z * m * N (a workspace of S * m * N floats; bias and residual are then for
    plan_splitk_reduce, which adds the splits in order).

    version 2: gemm2_<type>_m<tile_m>, 128 weight rows per block, 256 threads, dynamic
    shared memory (gemm2_smem_bytes); tile_m 128 by default when that gives at least
    GEMM2_MIN_BLOCKS_128 blocks, else 64 (more blocks for shapes with few row tiles).
    version 3: gemm3_<type>_m<tile_m>, the same tiles reading X as fp16 from `xh` (m rows of
    K halves, written first by plan_gemm_x16's launch; MatmulKernels.gemm does both).
    Default version: gemm_version(w) (MatmulKernels.gemm supplies xh when it picks 3)."""
    lay = _check_weight(_kname("gemm", w.qtype), w)
    kernel = f"gemm_{lay.name}"
    version = gemm_version(w) if version is None else version
    _need(kernel, version in (2, 3), f"gemm version {version} not 2 or 3")
    _need(kernel, w.experts == 1, "an expert tensor needs moe_gemm")
    _need(kernel, 1 <= m <= INT32_MAX, f"token count {m} out of range")
    tiles_n = -(-w.rows // GEMM2_ROWS)
    _need(kernel, tiles_n <= MAX_GRID_YZ, f"{w.rows} rows exceed the grid limit")
    if tile_m is None:
        # (at most 64 rows: a 128-row tile would only multiply zeros)
        tile_m = 128 if m > 64 and -(-m // 128) * tiles_n >= GEMM2_MIN_BLOCKS_128 else 64
    _need(kernel, tile_m in (64, 128), f"tile_m {tile_m} not 64 or 128")
    kernel = f"gemm{version}_{lay.name}_m{tile_m}"
    launch = _plan_linear(
        kernel,
        "gemm",
        w,
        lay,
        x,
        y,
        m,
        bias,
        residual,
        ldx,
        ldy,
        grid=(-(-m // tile_m), tiles_n, 1),
        block=(GEMM2_THREADS, 1, 1),
    )
    n_split, kps = split if split is not None else (1, 0)
    if n_split > 1:
        yb = as_buf(y)
        _need(kernel, bias is None and residual is None, "a split launch adds no bias/residual")
        _need(kernel, ldy in (None, w.rows), "split partials are dense rows")
        _need(kernel, yb.nbytes >= n_split * m * w.rows * 4, "split workspace too small")
        _need(kernel, kps > 0 and (kps * GEMM2_BK) % max(lay.qk, 128) == 0, "split not chunked")
        _need(kernel, n_split * kps >= w.cols // GEMM2_BK > (n_split - 1) * kps, "bad split")
    extra = (kps if n_split > 1 else 0, m * w.rows if n_split > 1 else 0)
    launch = replace(
        launch,
        grid=(launch.grid[0], launch.grid[1], n_split),
        args=(*launch.args, *extra),
        arg_format=_ARG_FORMATS["gemm2"],
    )
    if version == 2:
        return replace(launch, shared=gemm2_smem_bytes(lay, tile_m))
    _need(kernel, xh is not None, "version 3 needs the fp16 X workspace xh")
    assert xh is not None
    hb, yb = as_buf(xh), as_buf(y)
    hbytes = m * w.cols * 2  # m rows of K halves
    _need(kernel, hb.ptr > 0 and hb.ptr % 16 == 0, "xh pointer null or not 16-byte aligned")
    _need(kernel, hb.nbytes >= hbytes, f"xh buffer {hb.nbytes} bytes < {hbytes} needed")
    ybytes = ((m - 1) * (w.rows if ldy is None else ldy) + w.rows) * 4
    _disjoint(kernel, (hb.ptr, hb.ptr + hbytes), (yb.ptr, yb.ptr + ybytes), "xh and y")
    args = (*launch.args[:4], hb.ptr, w.cols, *launch.args[6:])
    return replace(launch, args=args, shared=gemm2_smem_bytes(lay, tile_m, x_stages=3))


GEMM2_BK = 32  # g2::BK: K elements a step


def _chunk_steps(w: QWeight) -> int:
    """K steps of one raw chunk (max(QK, 128) elements), the unit a split is cut in."""
    return max(layout(w.qtype).qk, 128) // GEMM2_BK


def _raw_chunks(w: QWeight) -> int:
    """Raw chunks along w's K."""
    return -(-(w.cols // GEMM2_BK) // _chunk_steps(w))


def split_k(w: QWeight, want: int) -> tuple[int, int]:
    """(splits, K steps a split) cutting w's K into about `want` splits of whole raw chunks
    (max(QK, 128) elements); (1, 0) for one."""
    spc = _chunk_steps(w)
    chunks = _raw_chunks(w)
    per = -(-chunks // min(max(want, 1), chunks))  # chunks a split
    n_split = -(-chunks // per)
    return (n_split, per * spc) if n_split > 1 else (1, 0)


def gemm_split(w: QWeight, sms: int) -> tuple[int, int]:
    """(splits, K steps a split) of the tensor-core product for this weight shape on a GPU of
    `sms` multiprocessors, whole raw chunks a split. A function of the shape only, never of
    the row count, so that a row's sums are the same however many rows a launch has.

    No split where one column of 128-row gemm tiles already fills the GPU (or K is one
    chunk). Otherwise at least the splits that make the gemm's blocks fill the GPU (fewer
    left the batch-64 gemm short of blocks), at most twice that (more partial sums to write
    and add), and among those the one whose skinny launch, which runs every decode step of
    up to 16 rows, `_skinny_cost` rates cheapest (ties: fewer splits).
    tools/skinny_sweep.py measures a choice against the others (BENCHMARKS.md)."""
    tiles_n = -(-w.rows // GEMM2_ROWS)
    chunks = _raw_chunks(w)
    if tiles_n >= sms or chunks < 2:
        return 1, 0
    fill = min(chunks, -(-sms // tiles_n))  # one 128-row tile column of blocks fills the GPU
    splits = [split_k(w, want) for want in range(max(2, fill), min(chunks, 2 * fill) + 1)]
    return min(splits, key=lambda split: (_skinny_cost(w, split, sms), split[0]))


SKINNY_WARPS_PER_SM = 16  # skinny warps resident on one SM (~120 registers a thread)
SM_SHARED = 228 * 1024  # shared memory of one sm_90 SM


def _skinny_cost(w: QWeight, split: tuple[int, int], sms: int) -> int:
    """Time of a skinny launch with this split, in chunk-times of one warp: waves of
    resident blocks x items a warp x (chunks an item + one for its prologue). A split that
    leaves a last partial wave of blocks costs a whole wave: measured on the H200, Phi-3's
    ffn_down with 6 splits (384 blocks of 6 warps, two an SM by registers, 1.45 waves) took
    36.9 us, with 5 splits (384 blocks of 5 warps, three an SM, one wave) 24.4 us."""
    n_split, kps = split
    per = kps // _chunk_steps(w)  # raw chunks a split
    g, warps, blocks, shared = skinny_launch(w, n_split)
    per_sm = max(1, min(SKINNY_WARPS_PER_SM // warps, SM_SHARED // (shared + 1024)))
    waves = -(-blocks // (sms * per_sm))
    return waves * -(-(g * n_split) // warps) * (per + 1)


def plan_splitk_reduce(
    part: BufLike,
    n_split: int,
    m: int,
    n: int,
    y: BufLike,
    *,
    bias: BufLike | None = None,
    residual: BufLike | None = None,
    ldy: int | None = None,
    experts: tuple[BufLike, int] | None = None,
) -> Launch:
    """y[t] = sum over the splits, in order, of part[z][t] (+bias) (+residual[t]).
    experts (the routed expert matmuls): (ids, n_expert), ids int32 [m] on the device: row t
    is an assignment to expert ids[t] (rows of an id outside [0, n_expert) left unwritten)
    and bias is [n_expert][n], row t adding its expert's row."""
    kernel = "gemm_splitk_reduce"
    ldy = n if ldy is None else ldy
    pb, yb = as_buf(part), as_buf(y)
    _need(kernel, n_split >= 1 and 1 <= m <= MAX_GRID_YZ, f"{n_split} splits, {m} rows")
    _need(kernel, pb.nbytes >= n_split * m * n * 4, "partials buffer too small")
    yr = _check_f32(kernel, "y", yb, m, n, ldy)
    _disjoint(kernel, (pb.ptr, pb.ptr + n_split * m * n * 4), yr, "partials and y")
    ib, n_expert = (as_buf(experts[0]), experts[1]) if experts is not None else (None, 0)
    if ib is not None:
        _need(kernel, ib.nbytes >= 4 * m, f"expert ids buffer {ib.nbytes} bytes < {4 * m}")
        _need(kernel, n_expert >= 1, f"{n_expert} experts")
    bptr, rptr = _check_epilogue(kernel, yr, bias, residual, m, n, ldy, max(1, n_expert))
    args = (
        pb.ptr,
        n_split,
        m * n,
        m,
        n,
        bptr,
        rptr,
        yb.ptr,
        ldy,
        ib.ptr if ib else 0,
        n_expert,
    )
    grid = (-(-n // 256), m, 1)
    return Launch("gemm", kernel, grid, (256, 1, 1), args, _ARG_FORMATS[kernel])


def i15_block(qtype: int) -> int:
    """Elements of X a 15-bit scale covers for this weight format: its float-step block
    (32 for the legacy formats, a super-block of 256 for the K-quants)."""
    return 32 if qtype in (2, 6, 8, 39) else 256


def i15_split(w: QWeight, sms: int) -> int:
    """K splits of the 15-bit cores for this shape on this GPU, never a function of the row
    count (the cores must give the same bits), and no empty split. K-quants: whole
    super-blocks, enough 256-row tiles for two a multiprocessor, at most I15_SPLIT_MAX_SB a
    split. Legacy formats: whole chunks of 8 blocks, enough 64-row tiles for two a
    multiprocessor."""
    if i15_block(w.qtype) == 32:
        chunks = -(-(w.cols // 32) // I15_CHUNK)
        want = max(1, -(-2 * sms // -(-w.rows // I15_GEMM_ROWS)))
        per = -(-chunks // min(chunks, want))
        return -(-chunks // per)
    nsb = w.cols // 256
    want = max(1, -(-2 * sms // -(-w.rows // 256)))
    per = min(I15_SPLIT_MAX_SB, -(-nsb // min(nsb, want)))
    return -(-nsb // per)


def i15_planes(m: int, k: int, blk: int = 256) -> tuple[int, int, int, int, int]:
    """Byte offsets of the planes hi and lo, d (one a `blk` elements), sq (one a 32) and the
    total bytes of quant_x15's output for m rows of k (16-byte aligned pieces)."""
    hi, lo = 0, m * k
    d = -(-2 * m * k // 16) * 16
    sq = d + -(-4 * m * (k // blk) // 16) * 16
    return hi, lo, d, sq, sq + 4 * m * (k // 32)


def i15_gemmp_slot(
    qtype: int, block_bytes: int, tok: int = I15_GEMM_TOK, rows: int = I15_GEMM_ROWS
) -> int:
    """Shared bytes of one staged super-block (legacy: chunk of 8 blocks) of gemm15p with
    `tok` rows of X a block (32, or 8 for gemm15p8): both planes of those rows (rows of 272
    bytes), its `rows` weight rows (Q6_K and legacy: the 16-byte aligned covers), d and, for
    Q4_K / Q5_K, sq (G15P<T, TOK>, Q6P<TOK>, G15L<T, TOK>)."""
    planes = 2 * tok * 272
    if qtype == I15_Q6_K:
        return planes + rows * 240 + tok * 4
    if i15_block(qtype) == 32:
        return planes + rows * I15_LEGACY_PITCH[qtype] + tok * I15_CHUNK * 4
    return planes + rows * block_bytes + tok * 36


def i15_core(m: int) -> str:
    """The integer core for m rows (both give the same bits): gemm15p8 (one n8 tile a block)
    up to 8 rows, gemm15p (four) above."""
    return "gemm15p8" if m <= I15_P8_ROWS else "gemm15p"


def i15_dense_slots(tok: int) -> int:
    """Staged units a dense integer core's ring holds at most: I15_P8_SLOTS for gemm15p8
    (tok 8), I15_GEMMP_SLOTS for gemm15p."""
    return I15_P8_SLOTS if tok == 8 else I15_GEMMP_SLOTS


def i15_core_tok(core: str) -> int:
    """Rows of X a block of a tensor-core integer core."""
    return 8 if core == "gemm15p8" else I15_GEMM_TOK


def plan_quant_x15(
    x: BufLike, planes: BufLike, m: int, k: int, *, ldx: int | None = None, blk: int = 256
) -> Launch:
    """The 15-bit activations of x (m rows of k, stride ldx) into `planes` (i15_planes), one
    scale per `blk` (256 or 32) elements."""
    kernel = "quant_x15"
    ldx = k if ldx is None else ldx
    _need(kernel, blk in (32, 256), f"scale block {blk} not 32 or 256")
    _need(kernel, 1 <= m <= MAX_GRID_YZ, f"row count {m} out of range")
    _need(kernel, blk <= k <= INT32_MAX and k % blk == 0, f"row length {k} not a multiple of {blk}")
    xb, pb = as_buf(x), as_buf(planes)
    xr = _check_f32(kernel, "x", xb, m, k, ldx)
    hi, lo, d, sq, total = i15_planes(m, k, blk)
    _need(kernel, pb.ptr > 0 and pb.ptr % 16 == 0, "planes pointer null or not 16-byte aligned")
    _need(kernel, pb.nbytes >= total, f"planes buffer {pb.nbytes} bytes < {total} needed")
    _disjoint(kernel, xr, (pb.ptr, pb.ptr + total), "x and planes")
    args = (xb.ptr, ldx, m, k, blk, pb.ptr + hi, pb.ptr + lo, pb.ptr + d, pb.ptr + sq)
    grid = (-(-k // 256), m, 1)
    return Launch("i15", kernel, grid, (256, 1, 1), args, _ARG_FORMATS[kernel])


def i15_fold(w: QWeight, m: int, splits: int, sms: int) -> bool:
    """Whether gemm15p folds w's splits into one block a tile (gemm15pf: the same bits, no
    partials): for steps of more than I15_P8_ROWS rows whose output tiles fill the GPU's
    multiprocessors without the split (at fewer, the split's blocks are what fill it), or
    fill half of them where each split is a single unit (such a block cannot overlap its one
    unit's copy with its arithmetic). Never Q6_K: gemm15pf_q6_k spills, and was slower than
    the split core at every row count measured (BENCHMARKS.md)."""
    if splits <= 1 or m <= I15_P8_ROWS or w.qtype == I15_Q6_K:
        return False
    tiles = i15_tiles(w, m)
    single = i15_block(w.qtype) == 256 and w.cols // 256 <= splits  # a super-block a split
    return tiles >= sms or (single and 2 * tiles >= sms)


def i15_tiles(w: QWeight, m: int) -> int:
    """Output tiles of the core plan_i15 picks for m rows (a ticket each when it finishes
    its own splits)."""
    return -(-w.rows // I15_GEMM_ROWS) * -(-m // i15_core_tok(i15_core(m)))


def plan_i15(
    w: QWeight,
    planes: BufLike,
    part: BufLike,
    m: int,
    splits: int,
    *,
    y: BufLike | None = None,
    bias: BufLike | None = None,
    residual: BufLike | None = None,
    ldy: int | None = None,
    tickets: BufLike | None = None,
    fold: bool = False,
) -> Launch:
    """The 15-bit product of w and quant_x15's planes (m rows, scaled per i15_block) by the
    core i15_core picks; the same bits whichever. Without y: split partials
    part[splits][m][w.rows] (gemm_splitk_reduce sums them). With y: y = the product (+ bias)
    (+ residual) by gemm_splitk_reduce's steps in the same launch (one split: at once;
    several: the last block of each output tile adds the tile's partials in order, counting
    on `tickets`, i15_tiles int32 zeros, zeros again after the launch). fold (gemm15p only,
    i15_fold): a block a tile adds its splits in order itself, the same bits; without y its
    sum is part[0] (a one-split sum of it adds bias the same way), no tickets needed."""
    lay = _check_weight("i15", w)
    blk = i15_block(w.qtype)
    core = i15_core(m)
    kernel = f"{core}{'f' if fold else ''}_{lay.name}"
    _need(kernel, not fold or core == "gemm15p", f"no folded form of {core}")
    _need(kernel, not fold or w.qtype != I15_Q6_K, "no folded form for q6_k (i15_fold)")
    _need(kernel, w.qtype in I15_TYPES and w.experts == 1, f"no 15-bit product for {lay.name}")
    _need(kernel, 1 <= m <= MAX_GRID_YZ * I15_GEMM_TOK, f"row count {m} out of range")
    _need(kernel, w.cols % blk == 0, f"row length {w.cols} not a multiple of {blk}")
    units = -(-(w.cols // 32) // I15_CHUNK) if blk == 32 else w.cols // 256
    what = "chunks of 8 blocks" if blk == 32 else "super-blocks"
    _need(kernel, 1 <= splits <= units, f"{splits} splits of {units} {what}")
    per = -(-units // splits)
    _need(kernel, (splits - 1) * per < units, f"{splits} splits of {units} {what}: one empty")
    pb, qb = as_buf(part), as_buf(planes)
    hi, lo, d, sq, total = i15_planes(m, w.cols, blk)
    _need(kernel, qb.ptr > 0 and qb.nbytes >= total, f"planes buffer {qb.nbytes} < {total} bytes")
    need = (1 if fold else splits) * m * w.rows * 4
    _need(kernel, pb.ptr > 0 and pb.nbytes >= need, f"partials buffer {pb.nbytes} < {need} bytes")
    _disjoint(kernel, (qb.ptr, qb.ptr + total), (pb.ptr, pb.ptr + need), "planes and partials")
    q = qb.ptr
    out: tuple[int, ...] = (0, 0, 0, 0, 0)
    if y is not None:
        ldy = w.rows if ldy is None else ldy
        yr = _check_f32(kernel, "y", as_buf(y), m, w.rows, ldy)
        _disjoint(kernel, (qb.ptr, qb.ptr + total), yr, "planes and y")
        bptr, rptr = _check_epilogue(kernel, yr, bias, residual, m, w.rows, ldy)
        tk = 0
        if splits > 1 and not fold:  # a tile's last block sums its partials: a ticket a tile
            _disjoint(kernel, (pb.ptr, pb.ptr + need), yr, "partials and y")
            tb = _opt_buf(tickets)
            _need(kernel, tb is not None and tb.nbytes >= 4 * i15_tiles(w, m), "tickets too small")
            assert tb is not None
            tk = tb.ptr
        out = (as_buf(y).ptr, bptr, rptr, ldy, tk)
    else:
        _need(kernel, bias is None and residual is None, "bias or residual without y")
    args = (w.ptr, w.rows, w.cols, q + hi, q + lo, q + d, q + sq, m, splits, pb.ptr, *out)
    tok = i15_core_tok(core)
    ring = units if fold else per  # units a block walks
    shared = min(ring, i15_dense_slots(tok)) * i15_gemmp_slot(w.qtype, lay.block_bytes, tok)
    grid = (-(-w.rows // I15_GEMM_ROWS), -(-m // tok), 1 if fold else splits)
    block = (128, 1, 1)
    return Launch("i15", kernel, grid, block, args, _ARG_FORMATS["i15"], shared=shared)


# the routed integer cores (moe15p<16|64>_<fmt>): the formats of gpt-oss's experts
I15_MOE_TYPES = (8, 39)


def plan_moe_i15(
    w: QWeight,
    planes: BufLike,
    part: BufLike,
    n_assign: int,
    splits: int,
    route: MoeRoute,
    *,
    x_rows: int,
    per_slot_input: bool,
) -> Launch:
    """The 15-bit products of the experts w over moe_route's tiles (route.tile_m 8, 16 or 64):
    split partials part[splits][n_assign][w.rows] of every assignment a, from row a (per
    slot) or a / topk of quant_x15's planes (x_rows rows, scaled per 32); the in-order sum
    with the experts' biases is gemm_splitk_reduce's. An assignment's bits are the dense
    core's on its expert's matrix."""
    lay = _check_weight("moe15", w)
    kernel = f"moe15p{route.tile_m}_{lay.name}"
    _need(kernel, w.qtype in I15_MOE_TYPES and w.experts > 1, f"no routed 15-bit {lay.name}")
    _need(kernel, route.tile_m in (8, 16, 64) and route.workspace is not None, "not routed for it")
    _need(kernel, route.experts == w.experts, f"routed for {route.experts} experts")
    _need(kernel, n_assign == route.ntok * route.topk, f"{n_assign} assignments")
    _need(kernel, w.cols % 32 == 0, f"row length {w.cols} not a multiple of 32")
    units = -(-(w.cols // 32) // I15_CHUNK)
    _need(kernel, 1 <= splits <= units, f"{splits} splits of {units} chunks")
    per = -(-units // splits)
    _need(kernel, (splits - 1) * per < units, f"{splits} splits of {units} chunks: one empty")
    pb, qb = as_buf(part), as_buf(planes)
    hi, lo, d, sq, total = i15_planes(x_rows, w.cols, 32)
    _need(kernel, x_rows >= (n_assign if per_slot_input else route.ntok), f"{x_rows} rows of X")
    _need(kernel, qb.ptr > 0 and qb.nbytes >= total, f"planes buffer {qb.nbytes} < {total} bytes")
    need = splits * n_assign * w.rows * 4
    _need(kernel, pb.ptr > 0 and pb.nbytes >= need, f"partials buffer {pb.nbytes} < {need} bytes")
    _disjoint(kernel, (qb.ptr, qb.ptr + total), (pb.ptr, pb.ptr + need), "planes and partials")
    ws = route.workspace
    assert ws is not None
    _check_moe_ws(kernel, ws, n_assign, w.experts, route.tile_m)
    q = qb.ptr
    args = (
        w.ptr, w.rows, w.cols, q + hi, q + lo, q + d, q + sq, n_assign, splits, pb.ptr,
        *_moe_ws_ptrs(ws, n_assign, w.experts, route.tile_m), route.topk,
        int(per_slot_input), w.expert_bytes,
    )  # fmt: skip
    slot = i15_gemmp_slot(w.qtype, lay.block_bytes, route.tile_m)
    shared = min(per, 2 if route.tile_m == 64 else I15_GEMMP_SLOTS) * slot
    bound = moe_tile_bound(n_assign, w.experts, route.tile_m)
    grid = (-(-w.rows // I15_GEMM_ROWS), bound, splits)
    return Launch("i15", kernel, grid, (128, 1, 1), args, _ARG_FORMATS["moe15"], shared=shared)


def plan_moe15_glu(
    gpart: BufLike,
    upart: BufLike,
    splits: int,
    n_assign: int,
    n: int,
    ids: BufLike,
    n_expert: int,
    planes: BufLike,
    *,
    gate_bias: BufLike | None = None,
    up_bias: BufLike | None = None,
    alpha: float = 1.702,
    limit: float = 7.0,
) -> Launch:
    """The end of the integer MoE layer's first half in one launch: per assignment, the
    gate's and up's split partials ([splits][n_assign][n] each) added in order with their
    experts' biases ([n_expert][n]), the clamped SwiGLU, and the result's 15-bit codes per 32
    into `planes` (i15_planes(n_assign, n, 32)) for the down product: the bits of
    gemm_splitk_reduce twice, swiglu_oai_f32 and quant_x15."""
    kernel = "moe15_glu"
    gb, ub, qb, ib = as_buf(gpart), as_buf(upart), as_buf(planes), as_buf(ids)
    _need(kernel, 1 <= n_assign <= MAX_GRID_YZ and splits >= 1, f"{n_assign} rows, {splits} splits")
    _need(kernel, n >= 32 and n % 32 == 0, f"row length {n} not a multiple of 32")
    part = splits * n_assign * n * 4
    _need(kernel, gb.nbytes >= part and ub.nbytes >= part, "partials buffers too small")
    _disjoint(kernel, (gb.ptr, gb.ptr + part), (ub.ptr, ub.ptr + part), "gate and up partials")
    hi, lo, d, sq, total = i15_planes(n_assign, n, 32)
    _need(kernel, qb.ptr > 0 and qb.ptr % 16 == 0, "planes pointer null or not 16-byte aligned")
    _need(kernel, qb.nbytes >= total, f"planes buffer {qb.nbytes} bytes < {total} needed")
    for what, pb in (("gate", gb), ("up", ub)):
        _disjoint(kernel, (pb.ptr, pb.ptr + part), (qb.ptr, qb.ptr + total), f"{what} and planes")
    _need(kernel, ib.nbytes >= 4 * n_assign and n_expert >= 1, "expert ids buffer too small")
    biases = [_bias_ptr(kernel, b, n_expert, n) for b in (gate_bias, up_bias)]
    q = qb.ptr
    args = (
        gb.ptr, ub.ptr, splits, n_assign * n, n_assign, n, *biases, ib.ptr, n_expert,
        float(alpha), float(limit), q + hi, q + lo, q + d, q + sq,
    )  # fmt: skip
    grid = (-(-n // 256), n_assign, 1)
    return Launch("i15", kernel, grid, (256, 1, 1), args, _ARG_FORMATS[kernel])


def plan_moe15_combine(
    x: BufLike,
    part: BufLike,
    splits: int,
    ntok: int,
    topk: int,
    n: int,
    ids: BufLike,
    n_expert: int,
    weights: BufLike,
    *,
    bias: BufLike | None = None,
) -> Launch:
    """The end of the integer MoE layer in one launch: x[t] += the sum over token t's topk
    slots, in order, of its weight ([ntok][topk]) times the down product of that assignment
    (its split partials [splits][ntok * topk][n] added in order, plus its expert's bias):
    the bits of gemm_splitk_reduce and moe_combine_f32."""
    kernel = "moe15_combine"
    n_assign = ntok * topk
    xb, pb, ib, wb = as_buf(x), as_buf(part), as_buf(ids), as_buf(weights)
    _need(kernel, 1 <= ntok <= MAX_GRID_YZ and topk >= 1 and splits >= 1, "rows, slots, splits")
    need = splits * n_assign * n * 4
    _need(kernel, pb.nbytes >= need, f"partials buffer {pb.nbytes} bytes < {need}")
    xr = _check_f32(kernel, "x", xb, ntok, n, n)
    _disjoint(kernel, (pb.ptr, pb.ptr + need), xr, "partials and x")
    _need(kernel, ib.nbytes >= 4 * n_assign and n_expert >= 1, "expert ids buffer too small")
    _need(kernel, wb.nbytes >= 4 * n_assign, "slot weights buffer too small")
    bptr = _bias_ptr(kernel, bias, n_expert, n)
    args = (xb.ptr, pb.ptr, splits, n_assign * n, n, bptr, ib.ptr, n_expert, wb.ptr, topk)
    grid = (-(-n // 256), ntok, 1)
    return Launch("i15", kernel, grid, (256, 1, 1), args, _ARG_FORMATS[kernel])


def gemm_version(w: QWeight) -> int:
    """Tensor-core gemm version for w: 3 (fp16 X pre-pass) for matrices of at least
    GEMM3_MIN_ELEMENTS weights, 2 below."""
    return 3 if w.rows * w.cols >= GEMM3_MIN_ELEMENTS else 2


def plan_gemm_x16(x: BufLike, xh: BufLike, m: int, k: int, *, ldx: int | None = None) -> Launch:
    """gemm3's pre-pass: xh[t][j] = fp16(x[t][j]) for t < m, j < k (xh rows of k halves)."""
    kernel = "gemm_x16"
    ldx = k if ldx is None else ldx
    _need(kernel, 1 <= m <= INT32_MAX, f"token count {m} out of range")
    _need(kernel, 8 <= k <= INT32_MAX and k % 8 == 0, f"row length {k} not a multiple of 8")
    _need(kernel, ldx % 4 == 0, f"x row stride {ldx} not a multiple of 4 elements")
    xb, hb = as_buf(x), as_buf(xh)
    xr = _check_f32(kernel, "x", xb, m, k, ldx, align=16)
    _need(kernel, hb.ptr > 0 and hb.ptr % 16 == 0, "xh pointer null or not 16-byte aligned")
    _need(kernel, hb.nbytes >= m * k * 2, f"xh buffer {hb.nbytes} bytes < {m * k * 2} needed")
    _disjoint(kernel, xr, (hb.ptr, hb.ptr + m * k * 2), "x and xh")
    grid = (m, -(-k // (8 * X16_THREADS)), 1)
    args = (xb.ptr, ldx, m, k, hb.ptr, k)
    return Launch("gemm", kernel, grid, (X16_THREADS, 1, 1), args, _ARG_FORMATS["gemm_x16"])


def gemm2_smem_bytes(lay: QLayout, tile_m: int, *, x_stages: int = 2) -> int:
    """Dynamic shared memory of gemm2_<type>_m<tile_m> (g2::Smem in gemm.cu, same formula;
    x_stages=3: gemm3's, g2::Smem3): x_stages fp16 X tiles and two fp16 W tiles of GEMM2_LD
    halves a row, and two raw chunks of 128 rows, each row a 16-byte cover of max(QK, 128)
    elements' bytes at an odd multiple of 16 bytes (the kernel traps when launched with
    less)."""
    return (x_stages * tile_m + 2 * GEMM2_ROWS) * GEMM2_LD * 2 + 2 * GEMM2_ROWS * _raw_pitch(lay)


def _raw_pitch(lay: QLayout) -> int:
    """g2::Cfg<T>::P: bytes of one row's raw chunk (max(QK, 128) elements) in shared memory, a
    16-byte cover of its bytes at an odd multiple of 16 bytes."""
    kc = max(lay.qk, 128)
    seg = kc // lay.qk * lay.block_bytes
    win = (seg + 30) // 16 * 16
    return win + 16 if (win // 16) % 2 == 0 else win


def skinny_stages(lay: QLayout) -> int:
    """sk::Smem<T>::NST: raw chunks in a skinny warp's ring (4 for the quantized types, whose
    row chunks are at most 256 bytes; 2 for f16, bf16 and f32)."""
    return 4 if _raw_pitch(lay) <= 256 else 2


def skinny_warp_bytes(lay: QLayout) -> int:
    """sk::Smem<T>::warp: a warp's ring of raw chunks of 8 rows and the fp16 tile of one
    chunk (rows of max(QK, 128) + 8 halves)."""
    tld = max(lay.qk, 128) + 8
    return skinny_stages(lay) * SKINNY_ROWS * _raw_pitch(lay) + SKINNY_ROWS * tld * 2


SMEM_MAX = 227 * 1024  # shared memory a block may have on sm_90 (sm_80: 163 KB)


def skinny_shape(n_split: int, warp_bytes: int = 0) -> tuple[int, int]:
    """(row tiles a block G, warps a block): about 8-16 (tile, split) items a block, each warp
    taking as many items as the others (or one fewer), and no more warps than the shared
    memory holds beside the items' partials."""
    g = max(1, 8 // n_split)
    items = g * n_split
    rounds = -(-items // SKINNY_MAX_WARPS)
    warps = -(-items // rounds)
    if warp_bytes:
        room = (SMEM_MAX - items * SKINNY_ITEM_BYTES) // warp_bytes
        warps = max(1, min(warps, room))
    return g, warps


def skinny_launch(w: QWeight, n_split: int) -> tuple[int, int, int, int]:
    """(row tiles a block, warps a block, blocks, dynamic shared memory bytes) of skinny
    over w with n_split splits."""
    warp_bytes = skinny_warp_bytes(layout(w.qtype))
    g, warps = skinny_shape(n_split, warp_bytes)
    tiles = -(-w.rows // SKINNY_ROWS)
    return g, warps, -(-tiles // g), warps * warp_bytes + g * n_split * SKINNY_ITEM_BYTES


def plan_skinny(
    w: QWeight,
    x: BufLike,
    y: BufLike,
    m: int,
    *,
    split: tuple[int, int],
    bias: BufLike | None = None,
    residual: BufLike | None = None,
    ldx: int | None = None,
    ldy: int | None = None,
) -> Launch:
    """Y[t] = W X[t] (+bias) (+residual[t]) for t < m <= 16 with gemm2's arithmetic: bit for
    bit what plan_gemm (versions 2 and 3) and plan_splitk_reduce give with the same split
    (S, kps) = gemm_split(w, sms), in one launch."""
    lay = _check_weight(_kname("skinny", w.qtype), w)
    kernel = f"skinny_{lay.name}"
    _need(kernel, w.experts == 1, "an expert tensor needs moe_gemm")
    _need(kernel, 1 <= m <= 16, f"{m} rows: skinny takes 1..16")
    n_split, kps = split
    _need(kernel, n_split >= 1 and (n_split == 1) == (kps == 0), f"split {split}")
    if n_split > 1:
        _need(kernel, (kps * GEMM2_BK) % max(lay.qk, 128) == 0, "split not chunked")
        _need(kernel, n_split * kps >= w.cols // GEMM2_BK > (n_split - 1) * kps, "bad split")
    g, warps, blocks, shared = skinny_launch(w, n_split)
    launch = _plan_linear(
        kernel,
        "gemm",
        w,
        lay,
        x,
        y,
        m,
        bias,
        residual,
        ldx,
        ldy,
        grid=(blocks, 1, 1),
        block=(32 * warps, 1, 1),
    )
    _need(kernel, shared <= SMEM_MAX, f"{n_split} splits need {shared} bytes of shared memory")
    return replace(
        launch,
        args=(*launch.args, n_split, kps, g),
        arg_format=_ARG_FORMATS["skinny"],
        shared=shared,
    )


def _kname(prefix: str, qtype: int) -> str:
    """Kernel name for messages: prefix_<type> when the type is known."""
    lay = LAYOUTS.get(int(qtype))
    return f"{prefix}_{lay.name}" if lay else prefix


def _plan_linear(
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
    _need(kernel, ldx % 4 == 0, f"x row stride {ldx} not a multiple of 4 elements")
    xb, yb = as_buf(x), as_buf(y)
    xr = _check_f32(kernel, "x", xb, ntok, k, ldx, align=16)
    yr = _check_f32(kernel, "y", yb, ntok, n, ldy)
    _disjoint(kernel, xr, yr, "x and y")
    _disjoint(kernel, (w.ptr, w.ptr + w.nbytes), yr, "weights and y")
    bptr, rptr = _check_epilogue(kernel, yr, bias, residual, ntok, n, ldy)
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
    return Launch(module, kernel, grid, block, args, _ARG_FORMATS[module])


def plan_embed(w: QWeight, ids: BufLike, n: int, out: BufLike, *, ldo: int | None = None) -> Launch:
    """out[i] = row ids[i] of w as float32, i < n (ids int32 on the device; a bad id -> NaN)."""
    lay = _check_weight(_kname("embed", w.qtype), w)
    kernel = f"embed_{lay.name}"
    _need(kernel, w.experts == 1, "embedding table must be 2-D")
    _need(kernel, 1 <= n <= MAX_GRID_YZ, f"row count {n} not in 1..{MAX_GRID_YZ}")
    ldo = w.cols if ldo is None else ldo
    _need(kernel, ldo % 4 == 0, f"out row stride {ldo} not a multiple of 4 elements")
    ib, ob = as_buf(ids), as_buf(out)
    _need(kernel, ib.ptr > 0 and ib.ptr % 4 == 0, "ids pointer null or not 4-byte aligned")
    _need(kernel, ib.nbytes >= 4 * n, f"ids buffer {ib.nbytes} bytes < {4 * n} needed")
    orng = _check_f32(kernel, "out", ob, n, w.cols, ldo, align=16)
    _disjoint(kernel, (ib.ptr, ib.ptr + 4 * n), orng, "ids and out")
    grid = (-(-(w.cols // 8) // EMBED_THREADS), n, 1)
    args = (w.ptr, lay.row_bytes(w.cols), w.rows, w.cols, ib.ptr, ob.ptr, ldo)
    return Launch("embed", kernel, grid, (EMBED_THREADS, 1, 1), args, _ARG_FORMATS["embed"])


def moe_tile_bound(n_assign: int, n_experts: int, tile_m: int) -> int:
    """Upper bound on the routed token tiles of moe_gemm: sum over experts of
    ceil(count / tile_m) <= ceil(n_assign / tile_m) + (experts with a non-zero count)."""
    return -(-n_assign // tile_m) + min(n_experts, n_assign)


def moe_workspace_bytes(n_assign: int, n_experts: int, tile_m: int) -> int:
    """Bytes of moe_route's workspace: the tile count (16 bytes), the tile table (16 bytes a
    tile: expert, first list entry, rows, 0) and the sorted assignment list (4 bytes each)."""
    return 16 + 16 * moe_tile_bound(n_assign, n_experts, tile_m) + 4 * n_assign


def _moe_ws_ptrs(ws: DevBuf, n_assign: int, n_experts: int, tile_m: int) -> tuple[int, int, int]:
    """(ntiles, tiles, list) pointers inside a routing workspace."""
    bound = moe_tile_bound(n_assign, n_experts, tile_m)
    return ws.ptr, ws.ptr + 16, ws.ptr + 16 + 16 * bound


def _check_moe_ws(kernel: str, ws: DevBuf, n_assign: int, n_experts: int, tile_m: int) -> None:
    _need(kernel, ws.ptr > 0 and ws.ptr % 16 == 0, "workspace pointer null or not 16-byte aligned")
    need = moe_workspace_bytes(n_assign, n_experts, tile_m)
    _need(kernel, ws.nbytes >= need, f"workspace {ws.nbytes} bytes < {need} needed")


def plan_moe_route(
    ids: BufLike,
    n_assign: int,
    n_experts: int,
    workspace: BufLike,
    *,
    tile_m: int = 64,
) -> Launch:
    """The routing pre-pass of moe_gemm: per-expert lists of the assignments (ascending within
    an expert, experts ascending) and the table of token tiles of at most tile_m rows, written
    into `workspace` (moe_workspace_bytes); ids outside [0, n_experts) are in no list."""
    kernel = "moe_route"
    _need(kernel, 1 <= n_assign <= INT32_MAX // 2, f"n_assign {n_assign} out of range")
    _need(
        kernel,
        1 <= n_experts <= MOE_MAX_EXPERTS,
        f"{n_experts} experts not in 1..{MOE_MAX_EXPERTS}",
    )
    _need(kernel, tile_m in (8, 16, 64, 128), f"tile_m {tile_m} not 8, 16, 64 or 128")
    ib, wb = as_buf(ids), as_buf(workspace)
    _need(kernel, ib.ptr > 0 and ib.ptr % 4 == 0, "ids pointer null or not 4-byte aligned")
    _need(kernel, ib.nbytes >= 4 * n_assign, f"ids buffer {ib.nbytes} bytes < {4 * n_assign}")
    _check_moe_ws(kernel, wb, n_assign, n_experts, tile_m)
    need = moe_workspace_bytes(n_assign, n_experts, tile_m)
    _disjoint(kernel, (ib.ptr, ib.ptr + 4 * n_assign), (wb.ptr, wb.ptr + need), "ids and workspace")
    args = (ib.ptr, n_assign, n_experts, tile_m, *_moe_ws_ptrs(wb, n_assign, n_experts, tile_m))
    return Launch(
        "moe", kernel, (1, 1, 1), (MOE_ROUTE_THREADS, 1, 1), args, _ARG_FORMATS["moe_route"]
    )


def plan_moe(
    w: QWeight,
    ids: BufLike,
    ntok: int,
    topk: int,
    x: BufLike,
    y: BufLike,
    *,
    per_slot_input: bool,
    bias: BufLike | None = None,
    ldx_tok: int | None = None,
    form: str = "auto",
    rows_per_warp: int | None = None,
    tile_m: int | None = None,
    workspace: BufLike | None = None,
    split: tuple[int, int] = (1, 0),
    pair: tuple[QWeight, BufLike, BufLike | None] | None = None,
) -> Launch:
    """Expert matmuls: y[t*topk+s] = W[ids[t*topk+s]] x(t, s) (+ bias[expert]).

    w: expert tensor [experts][N][K]; ids: int32 [ntok*topk] on the device; x(t, s) =
    x + t*ldx_tok + s*K when per_slot_input (down projection) else x + t*ldx_tok (gate/up);
    ldx_tok defaults to topk*K or K accordingly. y: float32 [ntok*topk][N]. bias: float32
    [experts][N]. form: "gemv" (decode), "gemm" (prefill), "skinny" (decode with the gemm's
    arithmetic), "auto" (gemv for ntok <= 2, else gemm).

    gemv: moe_gemv_<type>[_r2|_r4], a warp per rows_per_warp rows (1, 2 or 4; default
    MOE_GEMV_ROWS_PER_WARP: 2 for one token, 4 for two) of one assignment, grid
    (ceil(N / (4 rows_per_warp)), n_assign).
    gemm: moe_gemm5_<type>_m64 or _m128 over the token tiles that plan_moe_route's pre-pass
    wrote into `workspace` (required; the pre-pass must be queued before it on the same
    stream, for the same ids, experts and tile_m: MatmulKernels.moe does both), on the dense
    gemm2 core (128 weight rows a block, 256 threads, dynamic shared memory
    gemm2_smem_bytes); tile_m default moe5_tile_m.
    skinny: moe_skinny_<type> over plan_moe_route's tiles of at most MOE_SKINNY_TILE_M rows,
    a block per (tile, G 8-row weight tiles of its expert) with G and its warps from
    skinny_shape: the bits of moe_gemm5 (with the same split) in one launch.
    split (moe_split; skinny and gemm): K in that many splits of kps steps. skinny sums them
    in the block; gemm writes split z's plain partials at y + z * n_assign * N (y then holds
    the splits: MatmulKernels.moe adds them with plan_splitk_reduce and the experts' bias).
    pair (skinny only): (w2, y2, bias2), a second expert tensor of w's type and shape over the
    same routed tiles and x, into its own y2 (gpt-oss's up beside its gate): one launch of
    moe_skinny_<type>_pair, grid y doubled, each row computed as by its own launch.
    """
    lay = _check_weight(_kname("moe", w.qtype), w)
    _need("moe", form in ("auto", "gemv", "gemm", "skinny"), f"unknown form {form!r}")
    if form == "auto":
        form = "gemv" if ntok <= 2 else "gemm"
    kernel = f"moe_{form}_{lay.name}"
    n, k = w.rows, w.cols
    _need(kernel, 1 <= topk <= w.experts, f"topk {topk} not in 1..{w.experts}")
    _need(kernel, ntok >= 1, f"ntok {ntok} < 1")
    n_assign = ntok * topk
    ldx_slot = k if per_slot_input else 0
    if ldx_tok is None:
        ldx_tok = topk * k if per_slot_input else k
    _need(kernel, ldx_tok % 4 == 0, f"x token stride {ldx_tok} not a multiple of 4 elements")
    _need(kernel, ldx_tok >= (topk * k if per_slot_input else k), "x token stride too small")
    xb, yb, ib = as_buf(x), as_buf(y), as_buf(ids)
    bb = _opt_buf(bias)
    xr = _check_f32(kernel, "x", xb, ntok, topk * k if per_slot_input else k, ldx_tok, align=16)
    n_split, kps = split
    _need(kernel, n_split >= 1 and (n_split == 1) == (kps == 0), f"split {split}")
    _need(kernel, n_split == 1 or form in ("skinny", "gemm"), "only the routed forms split K")
    # the gemm form with splits writes them all into y ([splits][n_assign][N] partials)
    y_rows = n_assign * (n_split if form == "gemm" else 1)
    yr = _check_f32(kernel, "y", yb, y_rows, n, n)
    _disjoint(kernel, xr, yr, "x and y")
    _need(kernel, ib.ptr > 0 and ib.ptr % 4 == 0, "ids pointer null or not 4-byte aligned")
    _need(kernel, ib.nbytes >= 4 * n_assign, f"ids buffer {ib.nbytes} bytes < {4 * n_assign}")
    _disjoint(kernel, (ib.ptr, ib.ptr + 4 * n_assign), yr, "ids and y")
    if bb is not None:
        _check_f32(kernel, "bias", bb, w.experts, n, n)
    bptr = bb.ptr if bb else 0
    if form == "gemv":
        _need(kernel, n_assign <= MAX_GRID_YZ, f"{n_assign} assignments exceed the grid limit")
        args: tuple[int, ...] = (
            w.ptr,
            w.expert_bytes,
            lay.row_bytes(k),
            n,
            k,
            w.experts,
            ib.ptr,
            topk,
            xb.ptr,
            ldx_tok,
            ldx_slot,
            bptr,
            yb.ptr,
            n,
        )
        rw = MOE_GEMV_ROWS_PER_WARP[ntok > 1] if rows_per_warp is None else rows_per_warp
        _need(kernel, rw in (1, 2, 4), f"rows_per_warp {rw} not 1, 2 or 4")
        kernel += "" if rw == 1 else f"_r{rw}"
        grid = (-(-n // (GEMV_WARPS * rw)), n_assign, 1)
        return Launch("moe", kernel, grid, (GEMV_THREADS, 1, 1), args, _ARG_FORMATS["moe_gemv"])
    if n_split > 1:
        _need(kernel, (kps * GEMM2_BK) % max(lay.qk, 128) == 0, "split not chunked")
        _need(kernel, n_split * kps >= k // GEMM2_BK > (n_split - 1) * kps, "bad split")
        _need(kernel, n_split <= MAX_GRID_YZ, f"{n_split} splits")
    g, warps = skinny_shape(n_split, skinny_warp_bytes(lay))
    row_tiles = -(-n // SKINNY_ROWS)
    if form == "skinny":
        tm = MOE_SKINNY_TILE_M if tile_m is None else tile_m
        _need(kernel, tm == MOE_SKINNY_TILE_M, f"tile_m {tm} not {MOE_SKINNY_TILE_M}")
        tiles_n = -(-row_tiles // g)
    else:
        tm = moe5_tile_m(n_assign, w.experts) if tile_m is None else tile_m
        _need(kernel, tm in (64, 128), f"tile_m {tm} not 64 or 128")
        tiles_n = -(-n // GEMM2_ROWS)
        kernel = f"moe_gemm5_{lay.name}_m{tm}"
    _need(kernel, tiles_n <= MAX_GRID_YZ, f"{n} rows exceed the grid limit")
    _need(kernel, w.experts <= MOE_MAX_EXPERTS, f"{w.experts} experts > {MOE_MAX_EXPERTS}")
    _need(kernel, n_assign <= INT32_MAX // 2, f"{n_assign} assignments out of range")
    _need(kernel, workspace is not None, "the routed gemm needs a workspace (plan_moe_route)")
    wb = as_buf(workspace)
    _check_moe_ws(kernel, wb, n_assign, w.experts, tm)
    wr = (wb.ptr, wb.ptr + moe_workspace_bytes(n_assign, w.experts, tm))
    _disjoint(kernel, wr, yr, "workspace and y")
    _disjoint(kernel, wr, xr, "workspace and x")
    grid = (moe_tile_bound(n_assign, w.experts, tm), tiles_n, n_split if form == "gemm" else 1)
    args = (
        w.ptr,
        w.expert_bytes,
        lay.row_bytes(k),
        n,
        k,
        *_moe_ws_ptrs(wb, n_assign, w.experts, tm),
        topk,
        xb.ptr,
        ldx_tok,
        ldx_slot,
        bptr,
        yb.ptr,
        n,
        n_split,
        kps,
        n_assign * n,
        g,
    )
    if form == "skinny":
        shared = warps * skinny_warp_bytes(lay) + g * n_split * SKINNY_ITEM_BYTES
        _need(kernel, shared <= SMEM_MAX, f"{n_split} splits need {shared} bytes of shared memory")
        block = (32 * warps, 1, 1)
        if pair is not None:
            w2, y2, bias2 = pair
            _need(kernel, _same_shape(w, w2), "the paired tensor differs in type or shape")
            _check_weight(kernel, w2)
            y2b, b2b = as_buf(y2), _opt_buf(bias2)
            y2r = _check_f32(kernel, "y2", y2b, y_rows, n, n)
            _disjoint(kernel, xr, y2r, "x and y2")
            _disjoint(kernel, yr, y2r, "y and y2")
            _disjoint(kernel, (ib.ptr, ib.ptr + 4 * n_assign), y2r, "ids and y2")
            _disjoint(kernel, wr, y2r, "workspace and y2")
            _need(kernel, (b2b is None) == (bb is None), "bias for one tensor of the pair only")
            if b2b is not None:
                _check_f32(kernel, "bias2", b2b, w.experts, n, n)
            grid = (grid[0], 2 * grid[1], grid[2])
            _need(kernel, grid[1] <= MAX_GRID_YZ, f"{n} rows a tensor exceed the grid limit")
            return Launch(
                "moe",
                f"{kernel}_pair",
                grid,
                block,
                (*args, w2.ptr, b2b.ptr if b2b else 0, y2b.ptr),
                _ARG_FORMATS["moe_skinny_pair"],
                shared=shared,
            )
        return Launch("moe", kernel, grid, block, args, _ARG_FORMATS["moe_gemm"], shared=shared)
    _need(kernel, pair is None, "only the skinny form pairs two tensors in one launch")
    return Launch(
        "moe",
        kernel,
        grid,
        (GEMM2_THREADS, 1, 1),
        args,
        _ARG_FORMATS["moe_gemm"],
        shared=gemm2_smem_bytes(lay, tm),
    )


def _same_shape(a: QWeight, b: QWeight) -> bool:
    return (a.qtype, a.rows, a.cols, a.experts) == (b.qtype, b.rows, b.cols, b.experts)


def moe_split(w: QWeight) -> tuple[int, int]:
    """(splits, K steps a split) of the routed expert products over w: a function of the
    weight shape only (every form and every token count sums a row the same way), about
    MOE_SPLIT_WANT splits of whole raw chunks. One-token steps read only top-k experts, so a
    chain over all of K left too few warps in flight to stream them (gpt-oss, H200: 80 us a
    launch of 4 experts of 2880 x 2880, BENCHMARKS.md)."""
    return split_k(w, MOE_SPLIT_WANT)


def moe5_tile_m(n_assign: int, n_experts: int) -> int:
    """Default token tile of moe_gemm5: 128 when the assignments per expert average at least
    MOE5_MIN_AVG_128 (gpt-oss at 512 tokens: 64), else 64."""
    return 128 if n_assign >= MOE5_MIN_AVG_128 * n_experts else 64


def _prefer_shared(fn: Any) -> None:
    """Ask for the largest shared-memory carveout for this function: the gemv pipeline and the
    gemm tiles live in shared memory, and the context prefers L1 (docs/design.md), which would cut
    the blocks resident per SM."""
    import pycuda.driver as drv

    carve = getattr(drv.function_attribute, "PREFERRED_SHARED_MEMORY_CARVEOUT", None)
    try:
        if carve is not None:
            fn.set_attribute(carve, 100)
        else:
            fn.set_cache_config(drv.func_cache.PREFER_SHARED)
    except (AttributeError, drv.Error):  # older pycuda or driver: the cache-config hint
        fn.set_cache_config(drv.func_cache.PREFER_SHARED)


def _allow_dynamic_shared(fn: Any, kernel: str, nbytes: int) -> None:
    """Raise fn's dynamic shared-memory limit to nbytes (needed above 48 KB)."""
    import pycuda.driver as drv

    try:
        fn.set_attribute(drv.function_attribute.MAX_DYNAMIC_SHARED_SIZE_BYTES, nbytes)
    except (AttributeError, drv.Error) as e:
        raise CudaError(f"{kernel}: cannot allow {nbytes} bytes of shared memory: {e}") from e


class MatmulKernels:
    """Loaded modules and prepared functions; create and use on the CUDA context thread."""

    def __init__(self, arch: str | None = None) -> None:
        from worker.backends.cuda.compile import load_module

        if arch is None:
            import pycuda.driver as drv

            major, minor = drv.Context.get_device().compute_capability()
            arch = f"sm_{major}{minor}"
        self.arch = arch
        self._modules = {name: load_module(name, arch) for name in MODULES}
        self._funcs: dict[str, Any] = {}
        self._x16: DevBuf | None = None  # gemm3's fp16 X workspace (_x16_workspace)
        self._splitk: DevBuf | None = None  # split-K partials (_splitk_workspace)
        self._x16_keep: list[Any] = []
        self._resident: dict[str, int] = {}
        self._smem_allowed: dict[str, int] = {}  # dynamic shared memory allowed per kernel
        self._moe_ws: DevBuf | None = None  # moe_route's workspace (MatmulKernels.moe)
        self._route_gen = 0  # MoeRoute.gen of the latest routing pre-pass
        self._moe_ws_keep: list[Any] = []
        self._i15_ws: DevBuf | None = None  # quant_x15's planes (_i15_workspace)
        self._i15_tk: DevBuf | None = None  # the integer cores' tickets (_i15_tickets)
        # dense products / routed experts by the 15-bit integer cores (with `invariant`)
        self.int15 = INT15_DENSE
        self.int15_large = INT15_LARGE  # (the K-quant products of I15_DENSE_MIN_WEIGHTS)
        self.int15_experts = INT15_EXPERTS
        # batch invariance: every row count takes the tensor-core forms (gemm, routed
        # moe_gemm), whose per-row arithmetic does not depend on the other rows, so a row's
        # result is the same in a launch of 1 row or of 256; False lets 1-8 rows take the
        # decode gemv (fewer bytes per launch at batch 1, other rounding)
        self.invariant = False
        import pycuda.driver as drv

        dev = drv.Context.get_device()
        attr = drv.device_attribute
        self._sms = int(dev.get_attribute(attr.MULTIPROCESSOR_COUNT))
        self._sm_regs = int(dev.get_attribute(attr.MAX_REGISTERS_PER_MULTIPROCESSOR))
        self._sm_smem = int(dev.get_attribute(attr.MAX_SHARED_MEMORY_PER_MULTIPROCESSOR))
        self._sm_threads = int(dev.get_attribute(attr.MAX_THREADS_PER_MULTIPROCESSOR))

    def _func(self, launch: Launch) -> Any:
        fn = self._funcs.get(launch.kernel)
        if fn is None:
            try:
                fn = self._modules[launch.module].get_function(launch.kernel)
            except Exception as e:  # pycuda.driver.LogicError: named function not found
                raise CudaError(f"{launch.kernel}: not in module {launch.module}: {e}") from e
            fn.prepare(launch.arg_format)
            _prefer_shared(fn)
            self._funcs[launch.kernel] = fn
            self._resident[launch.kernel] = self._sms * self._blocks_per_sm(fn, launch.block[0])
        return fn

    def _blocks_per_sm(self, fn: Any, threads: int) -> int:
        """Blocks of fn resident on one SM (registers, shared memory, threads)."""
        warps = -(-threads // 32)
        regs_per_warp = -(-max(1, int(fn.num_regs)) * 32 // 256) * 256
        by_regs = (self._sm_regs // regs_per_warp) // warps
        by_smem = self._sm_smem // (int(fn.shared_size_bytes) + 1024)
        by_threads = self._sm_threads // threads
        return max(1, min(by_regs, by_smem, by_threads, 32))

    def resident_blocks(self, kernel: str) -> int:
        """Blocks of a loaded kernel resident on the whole GPU at once (after its first use)."""
        return self._resident[kernel]

    def run(self, launch: Launch, stream: Any = None) -> None:
        """Queue a checked launch on `stream` (pycuda Stream or None)."""
        fn = self._func(launch)
        if launch.shared > self._smem_allowed.get(launch.kernel, 48 * 1024):
            # (skinny's need varies by launch: raised to the largest asked so far)
            _allow_dynamic_shared(fn, launch.kernel, launch.shared)
            self._smem_allowed[launch.kernel] = launch.shared
        grid = launch.grid
        if launch.cap_resident:
            grid = (min(grid[0], self._resident[launch.kernel]), grid[1], grid[2])
        try:
            fn.prepared_async_call(
                grid, launch.block, stream, *launch.args, shared_size=launch.shared
            )
        except Exception as e:  # pycuda.driver.Error and subclasses
            raise CudaError(f"{launch.kernel}: launch failed: {e}") from e

    # Convenience: check and queue in one call.
    def gemv(
        self, w: QWeight, x: BufLike, y: BufLike, ntok: int = 1, *, stream: Any = None, **kw: Any
    ) -> None:
        self.run(plan_gemv(w, x, y, ntok, **kw), stream)

    def gemm(
        self, w: QWeight, x: BufLike, y: BufLike, m: int, *, stream: Any = None, **kw: Any
    ) -> None:
        """Tensor-core product (plan_gemm). Version 3 first converts x to fp16 into this
        object's workspace (grown on demand; launches on one stream are ordered, so
        consecutive calls may share it — calls on two streams at once must not use version
        3). K is split as gemm_split decides for the shape (partials in a workspace of this
        object, then plan_splitk_reduce)."""
        version = kw.get("version")
        v = gemm_version(w) if version is None else version
        split = gemm_split(w, self._sms) if "split" not in kw else kw.pop("split")
        launches: list[Launch] = []
        main_kw = dict(kw)
        if split is not None and split[0] > 1:
            part = self._splitk_workspace(split[0] * m * w.rows * 4)
            for key in ("bias", "residual", "ldy"):
                main_kw.pop(key, None)
            reduce = plan_splitk_reduce(
                part,
                split[0],
                m,
                w.rows,
                y,
                bias=kw.get("bias"),
                residual=kw.get("residual"),
                ldy=kw.get("ldy"),
            )
            out: BufLike = part
        else:
            reduce, out = None, y
        if v == 3 and "xh" not in kw:
            ws = self._x16_workspace(m * w.cols * 2)
            launches.append(plan_gemm_x16(x, ws, m, w.cols, ldx=kw.get("ldx")))
            main_kw["xh"] = ws
        launches.append(plan_gemm(w, x, out, m, split=split, **main_kw))
        if reduce is not None:
            launches.append(reduce)
        for launch in launches:  # all checked before any is queued
            self.run(launch, stream)

    def _splitk_workspace(self, nbytes: int) -> DevBuf:
        """Split-K partials: grown on demand, never freed while this object lives (queued
        launches may still use an older one); reserve() sizes it before any capture."""
        if self._splitk is None or self._splitk.nbytes < nbytes:
            import pycuda.driver as drv

            size = max(nbytes, 1 << 20)
            size = 1 << (size - 1).bit_length()
            alloc = drv.mem_alloc(size)
            self._x16_keep.append(alloc)
            self._splitk = DevBuf(int(alloc), size)
        return self._splitk

    def _x16_workspace(self, nbytes: int) -> DevBuf:
        """A device buffer of at least nbytes for gemm3's fp16 X (kept for the object's life;
        a larger request allocates a larger one and keeps the old, which queued launches may
        still read)."""
        if self._x16 is None or self._x16.nbytes < nbytes:
            import pycuda.driver as drv

            size = max(nbytes, 1 << 20)
            size = 1 << (size - 1).bit_length()
            alloc = drv.mem_alloc(size)
            self._x16_keep.append(alloc)
            self._x16 = DevBuf(int(alloc), size)
        return self._x16

    def takes_i15(self, w: QWeight) -> bool:
        """Whether linear() sends w through the 15-bit integer cores (a choice per weight,
        never per row count: a product's bits must not depend on its batch)."""
        large = w.qtype in I15_KQUANTS and w.rows * w.cols >= I15_DENSE_MIN_WEIGHTS
        return (
            (self.int15 or (self.int15_large and large))
            and self.invariant
            and w.qtype in I15_TYPES
            and w.experts == 1
            and w.cols % i15_block(w.qtype) == 0
        )

    def i15_input_block(self, weights: list[QWeight]) -> int | None:
        """The scale block (32 or 256) of the 15-bit codes that every product of one input
        would take, so its producer may write them (kernels.rmsnorm / swiglu with planes)
        and the products skip their pre-pass; None where one takes another path or they
        differ."""
        blocks = {i15_block(w.qtype) if self.takes_i15(w) else 0 for w in weights}
        return blocks.pop() if len(blocks) == 1 and 0 not in blocks else None

    def linear(
        self,
        w: QWeight,
        x: BufLike,
        y: BufLike,
        ntok: int,
        *,
        stream: Any = None,
        planes: BufLike | None = None,
        **kw: Any,
    ) -> None:
        """gemv for ntok <= 8 (decode, weights read once), tensor-core gemm above; always
        the gemm's arithmetic when `invariant`. The gemm's arithmetic for at most
        SKINNY_MAX_ROWS rows runs as skinny (same bits, one launch). `planes`: x's 15-bit
        codes at w's scale block, already written by x's producer (i15_input_block), used
        when w takes the integer cores."""
        if self.takes_i15(w) and not kw.keys() & {"version", "tile_m", "split", "xh"}:
            self.i15(w, x, y, ntok, stream=stream, planes=planes, **kw)
        elif ntok <= GEMV_MAX_TOKENS and not self.invariant:
            self.gemv(w, x, y, ntok, stream=stream, **kw)
        elif (
            ntok <= SKINNY_MAX_ROWS
            and w.experts == 1
            and not kw.keys() & {"version", "tile_m", "split", "xh"}  # a gemm asked for
        ):
            self.skinny(w, x, y, ntok, stream=stream, **kw)
        else:
            self.gemm(w, x, y, ntok, stream=stream, **kw)

    def i15(
        self,
        w: QWeight,
        x: BufLike,
        y: BufLike,
        m: int,
        *,
        stream: Any = None,
        bias: BufLike | None = None,
        residual: BufLike | None = None,
        ldx: int | None = None,
        ldy: int | None = None,
        planes: BufLike | None = None,
    ) -> None:
        """y = w x (+ bias) (+ residual) by the 15-bit integer cores: quant_x15 (unless
        `planes` holds x's codes already), then gemm15p8 or gemm15p, which also sum their
        splits in order and add bias and residual (one launch)."""
        splits = i15_split(w, self._sms)
        fold = i15_fold(w, m, splits, self._sms)
        blk = i15_block(w.qtype)
        part = self._splitk_workspace((1 if fold else splits) * m * w.rows * 4)
        launches = []
        if planes is None:
            planes = self._i15_workspace(i15_planes(m, w.cols, blk)[4])
            launches.append(plan_quant_x15(x, planes, m, w.cols, ldx=ldx, blk=blk))
        tickets = None if fold else self._i15_tickets(i15_tiles(w, m))
        launches.append(
            plan_i15(
                w,
                planes,
                part,
                m,
                splits,
                y=y,
                bias=bias,
                residual=residual,
                ldy=ldy,
                tickets=tickets,
                fold=fold,
            )
        )
        for launch in launches:  # all checked before any is queued
            self.run(launch, stream)

    def _i15_tickets(self, n: int) -> DevBuf:
        """The integer cores' tickets (a zero int32 per output tile; each launch leaves them
        zero): grown on demand, zeroed when allocated; reserve() sizes it before any capture."""
        if self._i15_tk is None or self._i15_tk.nbytes < 4 * n:
            import pycuda.driver as drv

            size = 1 << (max(4 * n, 1 << 16) - 1).bit_length()
            alloc = drv.mem_alloc(size)
            drv.memset_d32(alloc, 0, size // 4)
            self._x16_keep.append(alloc)
            self._i15_tk = DevBuf(int(alloc), size)
        return self._i15_tk

    def _i15_workspace(self, nbytes: int) -> DevBuf:
        """quant_x15's planes: grown on demand and kept (queued launches may still read an
        older one); reserve() sizes it before any capture."""
        if self._i15_ws is None or self._i15_ws.nbytes < nbytes:
            import pycuda.driver as drv

            size = 1 << (max(nbytes, 1 << 20) - 1).bit_length()
            alloc = drv.mem_alloc(size)
            self._x16_keep.append(alloc)
            self._i15_ws = DevBuf(int(alloc), size)
        return self._i15_ws

    def skinny(
        self, w: QWeight, x: BufLike, y: BufLike, m: int, *, stream: Any = None, **kw: Any
    ) -> None:
        """plan_skinny with the gemm's split for this shape on this GPU."""
        self.run(plan_skinny(w, x, y, m, split=gemm_split(w, self._sms), **kw), stream)

    def embed(
        self,
        w: QWeight,
        ids: BufLike,
        n: int,
        out: BufLike,
        *,
        stream: Any = None,
        ldo: int | None = None,
    ) -> None:
        self.run(plan_embed(w, ids, n, out, ldo=ldo), stream)

    def arithmetic(self, weights: list[QWeight]) -> dict[str, Any]:
        """Which arithmetic these matrices take (for the load log and bench's record): the
        WORKER_ORCD_INT15 setting, batch invariance, how many dense matrices take the 15-bit
        integer cores and how many the fp16 ones (with invariance off: the decode gemv at
        few rows), and which the experts take ("integer", "fp16", "mixed"; "none")."""
        dense = [w for w in weights if w.experts == 1]
        on = {self.moe_takes_i15(w.qtype) for w in weights if w.experts > 1}
        experts = "none"
        if on:
            experts = "mixed" if len(on) > 1 else "integer" if True in on else "fp16"
        setting = "all" if self.int15 else "auto" if self.int15_large else "experts"
        return {
            "int15": setting if self.int15 or self.int15_large or self.int15_experts else "0",
            "batch_invariant": self.invariant,
            "dense_integer": sum(self.takes_i15(w) for w in dense),
            "dense_fp16": sum(not self.takes_i15(w) for w in dense),
            "experts": experts,
        }

    def moe_takes_i15(self, qtype: int | None) -> bool:
        """Whether experts of this format take the routed integer cores: every step with
        batch invariance on, every step the decode gemv does not take with it off (they are
        faster than the fp16 routed forms at every token count)."""
        return self.int15_experts and qtype in I15_MOE_TYPES

    def moe_form(self, ntok: int, form: str = "auto", qtype: int | None = None) -> str:
        """The form of the expert products of a step of ntok tokens: the decode gemv (not
        invariant, ntok <= 2), else the routed integer cores ("i15") for experts of qtype
        when they take them, else skinny (ntok <= MOE_SKINNY_MAX_TOKENS) or the routed gemm."""
        if form != "auto":
            return form
        if ntok <= 2 and not self.invariant:
            return "gemv"
        if self.moe_takes_i15(qtype):
            return "i15"
        return "skinny" if ntok <= MOE_SKINNY_MAX_TOKENS else "gemm"

    def moe_route(
        self,
        ids: BufLike,
        ntok: int,
        topk: int,
        n_experts: int,
        *,
        stream: Any = None,
        form: str = "auto",
        tile_m: int | None = None,
        qtype: int | None = None,
    ) -> MoeRoute:
        """Queue the routing pre-pass of the routed forms into this object's workspace (none
        for the gemv form): the expert products of one layer that share these ids pass the
        returned MoeRoute to `moe` instead of routing again. Valid until the next moe_route.
        `qtype`: the experts' format (the integer form is chosen by it)."""
        form = self.moe_form(ntok, form, qtype)
        n_assign = ntok * topk
        tm, ws = 0, None
        if form == "i15":
            tm = tile_m or moe15_tile(ntok)
        if form != "gemv":
            tm = (
                tm
                or tile_m
                or (MOE_SKINNY_TILE_M if form == "skinny" else moe5_tile_m(n_assign, n_experts))
            )
            ws = self._moe_workspace(moe_workspace_bytes(n_assign, n_experts, tm))
            self.run(plan_moe_route(ids, n_assign, n_experts, ws, tile_m=tm), stream)
        self._route_gen += 1
        return MoeRoute(as_buf(ids).ptr, ntok, topk, n_experts, form, tm, self._route_gen, ws)

    def moe(
        self,
        w: QWeight,
        ids: BufLike,
        ntok: int,
        topk: int,
        x: BufLike,
        y: BufLike,
        *,
        per_slot_input: bool,
        stream: Any = None,
        route: MoeRoute | None = None,
        pair: tuple[QWeight, BufLike, BufLike | None] | None = None,
        planes: BufLike | None = None,
        **kw: Any,
    ) -> None:
        """plan_moe's launch; the routed forms (gemm, skinny) read the routing pre-pass of
        `route` (moe_route with the same ids; queued here first when None), and split K as
        moe_split decides for the shape (gemm: partials in this object's split-K workspace,
        then plan_splitk_reduce with each assignment's expert bias). pair = (w2, y2, bias2):
        a second tensor of w's type and shape over the same x into y2 (the skinny form takes
        both in one launch, the others one after the other). The workspaces are shared by
        every call: queue all MoE launches of one MatmulKernels on one stream (the backend
        does). `planes` (the integer form, token inputs): x's 15-bit codes scaled per 32,
        already written by x's producer, so no pre-pass is queued."""
        form = kw.pop("form", "auto")
        tile_m = kw.pop("tile_m", None)
        if route is None:
            route = self.moe_route(
                ids, ntok, topk, w.experts, stream=stream, form=form, tile_m=tile_m
            )
        self._check_route("moe", route, ids, ntok, topk, w.experts)
        _need("moe", form in ("auto", route.form), f"form {form} but routed for {route.form}")
        _need("moe", tile_m in (None, route.tile_m), f"tile_m {tile_m}, routed for {route.tile_m}")
        form = route.form
        mats = [(w, y, kw.pop("bias", None))]
        if pair is not None:
            mats.append(pair)
        if form == "i15":
            launches = self._routed_i15(
                mats, ids, ntok, topk, x, per_slot_input, route, kw, planes=planes
            )
        elif planes is not None:
            raise LaunchRefused("moe", f"15-bit planes given to the {form} form")
        elif form == "gemv":
            launches = [
                plan_moe(
                    m,
                    ids,
                    ntok,
                    topk,
                    x,
                    out,
                    per_slot_input=per_slot_input,
                    form=form,
                    bias=b,
                    **kw,
                )
                for m, out, b in mats
            ]
        else:
            launches = self._routed(mats, ids, ntok, topk, x, per_slot_input, route, kw)
        for launch in launches:  # all checked before any is queued
            self.run(launch, stream)

    def _check_route(
        self, kernel: str, route: MoeRoute, ids: BufLike, ntok: int, topk: int, experts: int
    ) -> None:
        """Refuse a routing that is not the latest pre-pass of these ids and experts (a later
        one overwrote the workspace)."""
        key = (as_buf(ids).ptr, ntok, topk, experts, self._route_gen)
        if (route.ids, route.ntok, route.topk, route.experts, route.gen) != key:
            raise LaunchRefused(
                kernel, f"routing {route} is not the latest one of these ids and experts"
            )

    def moe15_ffn(
        self,
        gate: tuple[QWeight, BufLike | None],
        up: tuple[QWeight, BufLike | None],
        down: tuple[QWeight, BufLike | None],
        ids: BufLike,
        slot_weights: BufLike,
        ntok: int,
        topk: int,
        x: BufLike,
        out: BufLike,
        route: MoeRoute,
        *,
        swiglu: tuple[float, float] = (1.702, 7.0),
        planes: BufLike | None = None,
        stream: Any = None,
    ) -> None:
        """gpt-oss's expert FFN on the routed integer cores (route.form "i15"), each half
        ending in one launch: quant_x15 of x (ntok rows; none when `planes` holds its codes),
        gate and up (matrix, expert biases) by the routed core into split partials, moe15_glu
        (their in-order sums with the biases, the clamped SwiGLU (alpha, limit), down's
        codes), down by the routed core, moe15_combine (its in-order sum with its biases,
        weighted over each token's slots in order, added into `out`, ntok rows of down's
        width). The bits of moe() for gate and up, swiglu_oai, moe() for down, and
        moe_combine, which it replaces."""
        (wg, bg), (wu, bu), (wd, bd) = gate, up, down
        self._check_route("moe15", route, ids, ntok, topk, wg.experts)
        _need("moe15", route.form == "i15", f"routed for the {route.form} form")
        _need("moe15", wg.rows == wu.rows == wd.cols, "gate, up and down widths differ")
        n_assign, ff = ntok * topk, wg.rows
        sg, sd = i15_split(wg, self._sms), i15_split(wd, self._sms)
        _need("moe15", i15_split(wu, self._sms) == sg, "gate and up split differently")
        half = -(-sg * n_assign * ff * 4 // 256) * 256  # gate's partials, then up's
        ws = self._splitk_workspace(max(2 * half, sd * n_assign * wd.rows * 4))
        gpart = DevBuf(ws.ptr, half)
        upart = DevBuf(ws.ptr + half, ws.nbytes - half)
        launches = []
        if planes is None:
            planes = self._i15_workspace(i15_planes(ntok, wg.cols, 32)[4])
            launches.append(plan_quant_x15(x, planes, ntok, wg.cols, blk=32))
        for m, part in ((wg, gpart), (wu, upart)):
            launches.append(
                plan_moe_i15(
                    m, planes, part, n_assign, sg, route, x_rows=ntok, per_slot_input=False
                )
            )
        # down's codes: the token planes are read by now (one stream), so their workspace
        # takes them unless the producer's planes were given
        dplanes = self._i15_workspace(i15_planes(n_assign, ff, 32)[4])
        alpha, limit = swiglu
        launches.append(
            plan_moe15_glu(
                gpart, upart, sg, n_assign, ff, ids, wg.experts, dplanes,
                gate_bias=bg, up_bias=bu, alpha=alpha, limit=limit,
            )
        )  # fmt: skip
        launches.append(
            plan_moe_i15(wd, dplanes, ws, n_assign, sd, route, x_rows=n_assign, per_slot_input=True)
        )
        launches.append(
            plan_moe15_combine(
                out, ws, sd, ntok, topk, wd.rows, ids, wd.experts, slot_weights,
                bias=bd,
            )
        )  # fmt: skip
        for launch in launches:  # all checked before any is queued
            self.run(launch, stream)

    def _routed_i15(
        self,
        mats: list[tuple[QWeight, BufLike, BufLike | None]],
        ids: BufLike,
        ntok: int,
        topk: int,
        x: BufLike,
        per_slot_input: bool,
        route: MoeRoute,
        kw: dict[str, Any],
        *,
        planes: BufLike | None = None,
    ) -> list[Launch]:
        """The integer form: one pre-pass of x (every matrix of `mats` reads the same x;
        none when `planes` holds its codes), then per matrix the routed core into split
        partials and the in-order sum with each assignment's expert bias."""
        _need("moe15", not kw.keys() - {"ldx"}, f"options {sorted(kw)} not for the integer form")
        n_assign = ntok * topk
        w0 = mats[0][0]
        x_rows = n_assign if per_slot_input else ntok
        launches = []
        if planes is None:
            planes = self._i15_workspace(i15_planes(x_rows, w0.cols, 32)[4])
            launches.append(plan_quant_x15(x, planes, x_rows, w0.cols, ldx=kw.get("ldx"), blk=32))
        for m, y, b in mats:
            _need("moe15", m.cols == w0.cols, "paired experts of another width")
            splits = i15_split(m, self._sms)
            part = self._splitk_workspace(splits * n_assign * m.rows * 4)
            launches.append(
                plan_moe_i15(
                    m,
                    planes,
                    part,
                    n_assign,
                    splits,
                    route,
                    x_rows=x_rows,
                    per_slot_input=per_slot_input,
                )
            )
            launches.append(
                plan_splitk_reduce(
                    part, splits, n_assign, m.rows, y, bias=b, experts=(ids, m.experts)
                )
            )
        return launches

    def _routed(
        self,
        mats: list[tuple[QWeight, BufLike, BufLike | None]],
        ids: BufLike,
        ntok: int,
        topk: int,
        x: BufLike,
        per_slot_input: bool,
        route: MoeRoute,
        kw: dict[str, Any],
    ) -> list[Launch]:
        n_assign = ntok * topk
        # the workspace the pre-pass wrote (its size is not worked out again)
        common: dict[str, Any] = {
            "per_slot_input": per_slot_input,
            "form": route.form,
            "tile_m": route.tile_m,
            "workspace": route.workspace,
        }
        given = kw.pop("split", None)
        w, y, b = mats[0]
        same = len(mats) == 2 and _same_shape(w, mats[1][0])
        if route.form == "skinny" and (len(mats) == 1 or same):
            split = given or moe_split(w)
            pair = mats[1] if same else None
            return [
                plan_moe(w, ids, ntok, topk, x, y, bias=b, pair=pair, split=split, **common, **kw)
            ]
        launches = []
        for m, y, b in mats:
            split = given or moe_split(m)
            out: BufLike = y
            if route.form == "gemm" and split[0] > 1:
                out = self._splitk_workspace(split[0] * n_assign * m.rows * 4)
            launches.append(
                plan_moe(m, ids, ntok, topk, x, out, bias=b, split=split, **common, **kw)
            )
            if out is not y:
                launches.append(
                    plan_splitk_reduce(
                        out, split[0], n_assign, m.rows, y, bias=b, experts=(ids, m.experts)
                    )
                )
        return launches

    def reserve(
        self, max_tokens: int, max_k: int, n_experts: int, topk: int, weights: list[QWeight]
    ) -> None:
        """Size the workspaces for launches of up to max_tokens rows over these weights now,
        so that no launch allocates (a launch inside a graph capture must not)."""
        self._x16_workspace(max_tokens * max_k * 2)
        parts = [gemm_split(w, self._sms)[0] * w.rows for w in weights if w.experts == 1]
        i15w = [w for w in weights if self.takes_i15(w)]
        if i15w:
            # (scales per 32 need the most bytes)
            self._i15_workspace(i15_planes(max_tokens, -(-max_k // 256) * 256, 32)[4])
            tiles = [i15_tiles(w, m) for w in i15w for m in (1, max_tokens)]
            self._i15_tickets(max(tiles, default=1))
            parts += [i15_split(w, self._sms) * w.rows for w in i15w]
        parts += [moe_split(w)[0] * w.rows * topk for w in weights if w.experts > 1]
        moe15 = [w for w in weights if w.experts > 1 and w.qtype in I15_MOE_TYPES]
        if self.int15_experts and moe15:
            self._i15_workspace(i15_planes(max_tokens * topk, max(w.cols for w in moe15), 32)[4])
            # moe15_ffn holds gate's and up's partials at once (+ 256 bytes to align up's)
            parts += [2 * i15_split(w, self._sms) * w.rows * topk + 64 for w in moe15]
        if max(parts, default=1) > 1:
            self._splitk_workspace(max_tokens * max(parts) * 4)
        if n_experts:
            n = max_tokens * topk
            self._moe_workspace(
                max(moe_workspace_bytes(n, n_experts, tm) for tm in (8, MOE_SKINNY_TILE_M, 64, 128))
            )  # (the integer form routes in tiles of 8, 16 or 64)

    def _moe_workspace(self, nbytes: int) -> DevBuf:
        """The routing workspace, grown (never shrunk, never freed while this object lives, so a
        launch still queued on the old one stays valid) to at least nbytes."""
        if self._moe_ws is None or self._moe_ws.nbytes < nbytes:
            import pycuda.driver as drv

            size = max(1 << 16, 1 << (nbytes - 1).bit_length())
            alloc = drv.mem_alloc(size)
            self._moe_ws_keep.append(alloc)
            self._moe_ws = DevBuf(int(alloc), size)
        return self._moe_ws
