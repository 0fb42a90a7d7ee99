"""Launch plans of the dense quantized products (cuda_src/gemv.cu, gemm.cu, embed.cu): the
decode gemv, the tensor-core gemm (versions 2 and 3) with its split-K reduce, the skinny
decode form of the gemm's arithmetic, and the embedding lookup. How K is split is a function
of the weight shape only (gemm_split), never of the row count: batch invariance."""

from __future__ import annotations

import os
from dataclasses import replace

from worker.backends.cuda.plans.base import (
    ARG_FORMATS,
    INT32_MAX,
    MAX_GRID_YZ,
    BufLike,
    Launch,
    QWeight,
    as_buf,
    check_epilogue,
    check_f32,
    check_weight,
    disjoint,
    kname,
    plan_linear,
    require,
)
from worker.backends.cuda.quant_layout import QLayout, layout

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
    lay = check_weight(kname("gemv", w.qtype), w)
    kernel = f"gemv_{lay.name}"
    require(kernel, w.experts == 1, "an expert tensor needs moe_gemv")
    require(kernel, 1 <= ntok <= GEMV_MAX_TOKENS, f"ntok {ntok} not in 1..{GEMV_MAX_TOKENS}")
    nb = 1 << (ntok - 1).bit_length()
    dmode, drw = gemv_mode(w.rows, nb)
    if mode is None:
        mode = dmode if rows_per_warp is None else "plain"
    rw = (drw if mode == dmode else 1) if rows_per_warp is None else rows_per_warp
    require(kernel, mode in ("plain", "xpf", "async"), f"gemv mode {mode!r} unknown")
    require(kernel, mode == "plain" or nb == 1, f"gemv mode {mode} needs ntok 1")
    require(kernel, rw in (1, 2, 4), f"rows_per_warp {rw} not 1, 2 or 4")
    require(kernel, rw < 4 or nb <= 2, "rows_per_warp 4 needs ntok <= 2")
    require(kernel, mode != "xpf" or rw == 1, "gemv mode xpf has one row per warp")
    tag = {"plain": "", "xpf": "_x", "async": "_a"}[mode]
    kernel = f"gemv_{lay.name}_nb{nb}{tag}" + ("" if rw == 1 else f"_r{rw}")
    rows_per_block = GEMV_WARPS * rw
    blocks = -(-w.rows // rows_per_block)
    if max_blocks is not None:
        require(kernel, max_blocks >= 1, f"max_blocks {max_blocks} < 1")
        blocks = min(blocks, max_blocks)
    launch = plan_linear(
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
    lay = check_weight(kname("gemm", w.qtype), w)
    kernel = f"gemm_{lay.name}"
    version = gemm_version(w) if version is None else version
    require(kernel, version in (2, 3), f"gemm version {version} not 2 or 3")
    require(kernel, w.experts == 1, "an expert tensor needs moe_gemm")
    require(kernel, 1 <= m <= INT32_MAX, f"token count {m} out of range")
    tiles_n = -(-w.rows // GEMM2_ROWS)
    require(kernel, tiles_n <= MAX_GRID_YZ, f"{w.rows} rows exceed the grid limit")
    if tile_m is None:
        # (at most 64 rows: a 128-row tile would only multiply zeros)
        tile_m = 128 if m > 64 and -(-m // 128) * tiles_n >= GEMM2_MIN_BLOCKS_128 else 64
    require(kernel, tile_m in (64, 128), f"tile_m {tile_m} not 64 or 128")
    kernel = f"gemm{version}_{lay.name}_m{tile_m}"
    launch = plan_linear(
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
        require(kernel, bias is None and residual is None, "a split launch adds no bias/residual")
        require(kernel, ldy in (None, w.rows), "split partials are dense rows")
        require(kernel, yb.nbytes >= n_split * m * w.rows * 4, "split workspace too small")
        require(kernel, kps > 0 and (kps * GEMM2_BK) % max(lay.qk, 128) == 0, "split not chunked")
        require(kernel, n_split * kps >= w.cols // GEMM2_BK > (n_split - 1) * kps, "bad split")
    extra = (kps if n_split > 1 else 0, m * w.rows if n_split > 1 else 0)
    launch = replace(
        launch,
        grid=(launch.grid[0], launch.grid[1], n_split),
        args=(*launch.args, *extra),
        arg_format=ARG_FORMATS["gemm2"],
    )
    if version == 2:
        return replace(launch, shared=gemm2_smem_bytes(lay, tile_m))
    require(kernel, xh is not None, "version 3 needs the fp16 X workspace xh")
    assert xh is not None
    hb, yb = as_buf(xh), as_buf(y)
    hbytes = m * w.cols * 2  # m rows of K halves
    require(kernel, hb.ptr > 0 and hb.ptr % 16 == 0, "xh pointer null or not 16-byte aligned")
    require(kernel, hb.nbytes >= hbytes, f"xh buffer {hb.nbytes} bytes < {hbytes} needed")
    ybytes = ((m - 1) * (w.rows if ldy is None else ldy) + w.rows) * 4
    disjoint(kernel, (hb.ptr, hb.ptr + hbytes), (yb.ptr, yb.ptr + ybytes), "xh and y")
    args = (*launch.args[:4], hb.ptr, w.cols, *launch.args[6:])
    return replace(launch, args=args, shared=gemm2_smem_bytes(lay, tile_m, x_stages=GEMM3_X_STAGES))


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
    require(kernel, n_split >= 1 and 1 <= m <= MAX_GRID_YZ, f"{n_split} splits, {m} rows")
    require(kernel, pb.nbytes >= n_split * m * n * 4, "partials buffer too small")
    yr = check_f32(kernel, "y", yb, m, n, ldy)
    disjoint(kernel, (pb.ptr, pb.ptr + n_split * m * n * 4), yr, "partials and y")
    ib, n_expert = (as_buf(experts[0]), experts[1]) if experts is not None else (None, 0)
    if ib is not None:
        require(kernel, ib.nbytes >= 4 * m, f"expert ids buffer {ib.nbytes} bytes < {4 * m}")
        require(kernel, n_expert >= 1, f"{n_expert} experts")
    bptr, rptr = check_epilogue(kernel, yr, bias, residual, m, n, ldy, max(1, n_expert))
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
    return Launch("gemm", kernel, grid, (256, 1, 1), args, ARG_FORMATS[kernel])


def gemm_version(w: QWeight) -> int:
    """Tensor-core gemm version for w: 3 (fp16 X pre-pass) for matrices of at least
    GEMM3_MIN_ELEMENTS weights, 2 below."""
    return 3 if w.rows * w.cols >= GEMM3_MIN_ELEMENTS else 2


def plan_gemm_x16(x: BufLike, xh: BufLike, m: int, k: int, *, ldx: int | None = None) -> Launch:
    """gemm3's pre-pass: xh[t][j] = fp16(x[t][j]) for t < m, j < k (xh rows of k halves)."""
    kernel = "gemm_x16"
    ldx = k if ldx is None else ldx
    require(kernel, 1 <= m <= INT32_MAX, f"token count {m} out of range")
    require(kernel, 8 <= k <= INT32_MAX and k % 8 == 0, f"row length {k} not a multiple of 8")
    require(kernel, ldx % 4 == 0, f"x row stride {ldx} not a multiple of 4 elements")
    xb, hb = as_buf(x), as_buf(xh)
    xr = check_f32(kernel, "x", xb, m, k, ldx, align=16)
    require(kernel, hb.ptr > 0 and hb.ptr % 16 == 0, "xh pointer null or not 16-byte aligned")
    require(kernel, hb.nbytes >= m * k * 2, f"xh buffer {hb.nbytes} bytes < {m * k * 2} needed")
    disjoint(kernel, xr, (hb.ptr, hb.ptr + m * k * 2), "x and xh")
    grid = (m, -(-k // (8 * X16_THREADS)), 1)
    args = (xb.ptr, ldx, m, k, hb.ptr, k)
    return Launch("gemm", kernel, grid, (X16_THREADS, 1, 1), args, ARG_FORMATS["gemm_x16"])


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
    lay = check_weight(kname("skinny", w.qtype), w)
    kernel = f"skinny_{lay.name}"
    require(kernel, w.experts == 1, "an expert tensor needs moe_gemm")
    require(kernel, 1 <= m <= 16, f"{m} rows: skinny takes 1..16")
    n_split, kps = split
    require(kernel, n_split >= 1 and (n_split == 1) == (kps == 0), f"split {split}")
    if n_split > 1:
        require(kernel, (kps * GEMM2_BK) % max(lay.qk, 128) == 0, "split not chunked")
        require(kernel, n_split * kps >= w.cols // GEMM2_BK > (n_split - 1) * kps, "bad split")
    g, warps, blocks, shared = skinny_launch(w, n_split)
    launch = plan_linear(
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
    require(kernel, shared <= SMEM_MAX, f"{n_split} splits need {shared} bytes of shared memory")
    return replace(
        launch,
        args=(*launch.args, n_split, kps, g),
        arg_format=ARG_FORMATS["skinny"],
        shared=shared,
    )


def plan_embed(w: QWeight, ids: BufLike, n: int, out: BufLike, *, ldo: int | None = None) -> Launch:
    """out[i] = row ids[i] of w as float32, i < n (ids int32 on the device; a bad id -> NaN)."""
    lay = check_weight(kname("embed", w.qtype), w)
    kernel = f"embed_{lay.name}"
    require(kernel, w.experts == 1, "embedding table must be 2-D")
    require(kernel, 1 <= n <= MAX_GRID_YZ, f"row count {n} not in 1..{MAX_GRID_YZ}")
    ldo = w.cols if ldo is None else ldo
    require(kernel, ldo % 4 == 0, f"out row stride {ldo} not a multiple of 4 elements")
    ib, ob = as_buf(ids), as_buf(out)
    require(kernel, ib.ptr > 0 and ib.ptr % 4 == 0, "ids pointer null or not 4-byte aligned")
    require(kernel, ib.nbytes >= 4 * n, f"ids buffer {ib.nbytes} bytes < {4 * n} needed")
    orng = check_f32(kernel, "out", ob, n, w.cols, ldo, align=16)
    disjoint(kernel, (ib.ptr, ib.ptr + 4 * n), orng, "ids and out")
    grid = (-(-(w.cols // 8) // EMBED_THREADS), n, 1)
    args = (w.ptr, lay.row_bytes(w.cols), w.rows, w.cols, ib.ptr, ob.ptr, ldo)
    return Launch("embed", kernel, grid, (EMBED_THREADS, 1, 1), args, ARG_FORMATS["embed"])
