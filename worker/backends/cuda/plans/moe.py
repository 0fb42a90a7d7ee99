"""Launch plans of the routed expert products (cuda_src/moe.cu): the routing pre-pass that
groups a step's (token, expert) assignments by expert into tiles, and the routed gemv,
skinny and gemm forms over those tiles."""

from __future__ import annotations

from dataclasses import dataclass

from worker.backends.cuda.arena import DevBuf
from worker.backends.cuda.plans.base import (
    ARG_FORMATS,
    INT32_MAX,
    MAX_GRID_YZ,
    BufLike,
    Launch,
    QWeight,
    as_buf,
    check_f32,
    check_weight,
    disjoint,
    kname,
    opt_buf,
    require,
)
from worker.backends.cuda.plans.dense import (
    GEMM2_BK,
    GEMM2_ROWS,
    GEMM2_THREADS,
    GEMV_THREADS,
    GEMV_WARPS,
    SKINNY_ITEM_BYTES,
    SKINNY_ROWS,
    SMEM_MAX,
    gemm2_smem_bytes,
    skinny_shape,
    skinny_warp_bytes,
    split_k,
)

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


# Routed gemm (docs/kernels.md, MoE): moe_gemm5_<type>_m128/_m64 (gemm2 core, 128 weight rows a
# block, gathered token rows); on an H100 against the gemm_tile-core kernel it replaced
# (gpt-oss 32 experts top-4): 512 tokens 727.7 -> 523.1 us a launch, pp512 7453 -> 9534 tok/s.
# v5 token tile: 128 when the assignments per expert average at least this many (fewer, fuller
# tiles: one 128-row tile costs ~1.3 64-row tiles in the dense gemm2 at 512 tokens), else 64
# (H100: m128 523 vs m64 596 us at an average of 64, m64 439 vs 501 at 16)
MOE5_MIN_AVG_128 = 56


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


def moe_tile_bound(n_assign: int, n_experts: int, tile_m: int) -> int:
    """Upper bound on the routed token tiles of moe_gemm: sum over experts of
    ceil(count / tile_m) <= ceil(n_assign / tile_m) + (experts with a non-zero count)."""
    return -(-n_assign // tile_m) + min(n_experts, n_assign)


def moe_workspace_bytes(n_assign: int, n_experts: int, tile_m: int) -> int:
    """Bytes of moe_route's workspace: the tile count (16 bytes), the tile table (16 bytes a
    tile: expert, first list entry, rows, 0) and the sorted assignment list (4 bytes each)."""
    return 16 + 16 * moe_tile_bound(n_assign, n_experts, tile_m) + 4 * n_assign


def moe_ws_ptrs(ws: DevBuf, n_assign: int, n_experts: int, tile_m: int) -> tuple[int, int, int]:
    """(ntiles, tiles, list) pointers inside a routing workspace."""
    bound = moe_tile_bound(n_assign, n_experts, tile_m)
    return ws.ptr, ws.ptr + 16, ws.ptr + 16 + 16 * bound


def check_moe_ws(kernel: str, ws: DevBuf, n_assign: int, n_experts: int, tile_m: int) -> None:
    require(
        kernel, ws.ptr > 0 and ws.ptr % 16 == 0, "workspace pointer null or not 16-byte aligned"
    )
    need = moe_workspace_bytes(n_assign, n_experts, tile_m)
    require(kernel, ws.nbytes >= need, f"workspace {ws.nbytes} bytes < {need} needed")


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
    require(kernel, 1 <= n_assign <= INT32_MAX // 2, f"n_assign {n_assign} out of range")
    require(
        kernel,
        1 <= n_experts <= MOE_MAX_EXPERTS,
        f"{n_experts} experts not in 1..{MOE_MAX_EXPERTS}",
    )
    require(kernel, tile_m in (8, 16, 64, 128), f"tile_m {tile_m} not 8, 16, 64 or 128")
    ib, wb = as_buf(ids), as_buf(workspace)
    require(kernel, ib.ptr > 0 and ib.ptr % 4 == 0, "ids pointer null or not 4-byte aligned")
    require(kernel, ib.nbytes >= 4 * n_assign, f"ids buffer {ib.nbytes} bytes < {4 * n_assign}")
    check_moe_ws(kernel, wb, n_assign, n_experts, tile_m)
    need = moe_workspace_bytes(n_assign, n_experts, tile_m)
    disjoint(kernel, (ib.ptr, ib.ptr + 4 * n_assign), (wb.ptr, wb.ptr + need), "ids and workspace")
    args = (ib.ptr, n_assign, n_experts, tile_m, *moe_ws_ptrs(wb, n_assign, n_experts, tile_m))
    return Launch(
        "moe", kernel, (1, 1, 1), (MOE_ROUTE_THREADS, 1, 1), args, ARG_FORMATS["moe_route"]
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
    lay = check_weight(kname("moe", w.qtype), w)
    require("moe", form in ("auto", "gemv", "gemm", "skinny"), f"unknown form {form!r}")
    if form == "auto":
        form = "gemv" if ntok <= 2 else "gemm"
    kernel = f"moe_{form}_{lay.name}"
    n, k = w.rows, w.cols
    require(kernel, 1 <= topk <= w.experts, f"topk {topk} not in 1..{w.experts}")
    require(kernel, ntok >= 1, f"ntok {ntok} < 1")
    n_assign = ntok * topk
    ldx_slot = k if per_slot_input else 0
    if ldx_tok is None:
        ldx_tok = topk * k if per_slot_input else k
    require(kernel, ldx_tok % 4 == 0, f"x token stride {ldx_tok} not a multiple of 4 elements")
    require(kernel, ldx_tok >= (topk * k if per_slot_input else k), "x token stride too small")
    xb, yb, ib = as_buf(x), as_buf(y), as_buf(ids)
    bb = opt_buf(bias)
    xr = check_f32(kernel, "x", xb, ntok, topk * k if per_slot_input else k, ldx_tok, align=16)
    n_split, kps = split
    require(kernel, n_split >= 1 and (n_split == 1) == (kps == 0), f"split {split}")
    require(kernel, n_split == 1 or form in ("skinny", "gemm"), "only the routed forms split K")
    # the gemm form with splits writes them all into y ([splits][n_assign][N] partials)
    y_rows = n_assign * (n_split if form == "gemm" else 1)
    yr = check_f32(kernel, "y", yb, y_rows, n, n)
    disjoint(kernel, xr, yr, "x and y")
    require(kernel, ib.ptr > 0 and ib.ptr % 4 == 0, "ids pointer null or not 4-byte aligned")
    require(kernel, ib.nbytes >= 4 * n_assign, f"ids buffer {ib.nbytes} bytes < {4 * n_assign}")
    disjoint(kernel, (ib.ptr, ib.ptr + 4 * n_assign), yr, "ids and y")
    if bb is not None:
        check_f32(kernel, "bias", bb, w.experts, n, n)
    bptr = bb.ptr if bb else 0
    if form == "gemv":
        require(kernel, n_assign <= MAX_GRID_YZ, f"{n_assign} assignments exceed the grid limit")
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
        require(kernel, rw in (1, 2, 4), f"rows_per_warp {rw} not 1, 2 or 4")
        kernel += "" if rw == 1 else f"_r{rw}"
        grid = (-(-n // (GEMV_WARPS * rw)), n_assign, 1)
        return Launch("moe", kernel, grid, (GEMV_THREADS, 1, 1), args, ARG_FORMATS["moe_gemv"])
    if n_split > 1:
        require(kernel, (kps * GEMM2_BK) % max(lay.qk, 128) == 0, "split not chunked")
        require(kernel, n_split * kps >= k // GEMM2_BK > (n_split - 1) * kps, "bad split")
        require(kernel, n_split <= MAX_GRID_YZ, f"{n_split} splits")
    g, warps = skinny_shape(n_split, skinny_warp_bytes(lay))
    row_tiles = -(-n // SKINNY_ROWS)
    if form == "skinny":
        tm = MOE_SKINNY_TILE_M if tile_m is None else tile_m
        require(kernel, tm == MOE_SKINNY_TILE_M, f"tile_m {tm} not {MOE_SKINNY_TILE_M}")
        tiles_n = -(-row_tiles // g)
    else:
        tm = moe5_tile_m(n_assign, w.experts) if tile_m is None else tile_m
        require(kernel, tm in (64, 128), f"tile_m {tm} not 64 or 128")
        tiles_n = -(-n // GEMM2_ROWS)
        kernel = f"moe_gemm5_{lay.name}_m{tm}"
    require(kernel, tiles_n <= MAX_GRID_YZ, f"{n} rows exceed the grid limit")
    require(kernel, w.experts <= MOE_MAX_EXPERTS, f"{w.experts} experts > {MOE_MAX_EXPERTS}")
    require(kernel, n_assign <= INT32_MAX // 2, f"{n_assign} assignments out of range")
    require(kernel, workspace is not None, "the routed gemm needs a workspace (plan_moe_route)")
    wb = as_buf(workspace)
    check_moe_ws(kernel, wb, n_assign, w.experts, tm)
    wr = (wb.ptr, wb.ptr + moe_workspace_bytes(n_assign, w.experts, tm))
    disjoint(kernel, wr, yr, "workspace and y")
    disjoint(kernel, wr, xr, "workspace and x")
    grid = (moe_tile_bound(n_assign, w.experts, tm), tiles_n, n_split if form == "gemm" else 1)
    args = (
        w.ptr,
        w.expert_bytes,
        lay.row_bytes(k),
        n,
        k,
        *moe_ws_ptrs(wb, n_assign, w.experts, tm),
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
        require(
            kernel, shared <= SMEM_MAX, f"{n_split} splits need {shared} bytes of shared memory"
        )
        block = (32 * warps, 1, 1)
        if pair is not None:
            w2, y2, bias2 = pair
            require(kernel, same_shape(w, w2), "the paired tensor differs in type or shape")
            check_weight(kernel, w2)
            y2b, b2b = as_buf(y2), opt_buf(bias2)
            y2r = check_f32(kernel, "y2", y2b, y_rows, n, n)
            disjoint(kernel, xr, y2r, "x and y2")
            disjoint(kernel, yr, y2r, "y and y2")
            disjoint(kernel, (ib.ptr, ib.ptr + 4 * n_assign), y2r, "ids and y2")
            disjoint(kernel, wr, y2r, "workspace and y2")
            require(kernel, (b2b is None) == (bb is None), "bias for one tensor of the pair only")
            if b2b is not None:
                check_f32(kernel, "bias2", b2b, w.experts, n, n)
            grid = (grid[0], 2 * grid[1], grid[2])
            require(kernel, grid[1] <= MAX_GRID_YZ, f"{n} rows a tensor exceed the grid limit")
            return Launch(
                "moe",
                f"{kernel}_pair",
                grid,
                block,
                (*args, w2.ptr, b2b.ptr if b2b else 0, y2b.ptr),
                ARG_FORMATS["moe_skinny_pair"],
                shared=shared,
            )
        return Launch("moe", kernel, grid, block, args, ARG_FORMATS["moe_gemm"], shared=shared)
    require(kernel, pair is None, "only the skinny form pairs two tensors in one launch")
    return Launch(
        "moe",
        kernel,
        grid,
        (GEMM2_THREADS, 1, 1),
        args,
        ARG_FORMATS["moe_gemm"],
        shared=gemm2_smem_bytes(lay, tm),
    )


def same_shape(a: QWeight, b: QWeight) -> bool:
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
