"""Launch plans of the 15-bit integer products (cuda_src/i15.cu; docs/kernels.md, "Integer
products"): X quantized to 15-bit codes (quant_x15), the dense and routed int8 tensor-core
cores, and the MoE layer's fused ends. Splits and folds are functions of the weight shape,
so a row's bits never depend on the row count."""

from __future__ import annotations

import os

from worker.backends.cuda.plans.base import (
    ARG_FORMATS,
    INT32_MAX,
    MAX_GRID_YZ,
    BufLike,
    Launch,
    QWeight,
    as_buf,
    bias_ptr,
    check_epilogue,
    check_f32,
    check_weight,
    disjoint,
    opt_buf,
    require,
)
from worker.backends.cuda.plans.moe import (
    MOE_SKINNY_MAX_TOKENS,
    MoeRoute,
    check_moe_ws,
    moe_tile_bound,
    moe_ws_ptrs,
)


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
    require(kernel, blk in (32, 256), f"scale block {blk} not 32 or 256")
    require(kernel, 1 <= m <= MAX_GRID_YZ, f"row count {m} out of range")
    require(
        kernel, blk <= k <= INT32_MAX and k % blk == 0, f"row length {k} not a multiple of {blk}"
    )
    xb, pb = as_buf(x), as_buf(planes)
    xr = check_f32(kernel, "x", xb, m, k, ldx)
    hi, lo, d, sq, total = i15_planes(m, k, blk)
    require(kernel, pb.ptr > 0 and pb.ptr % 16 == 0, "planes pointer null or not 16-byte aligned")
    require(kernel, pb.nbytes >= total, f"planes buffer {pb.nbytes} bytes < {total} needed")
    disjoint(kernel, xr, (pb.ptr, pb.ptr + total), "x and planes")
    args = (xb.ptr, ldx, m, k, blk, pb.ptr + hi, pb.ptr + lo, pb.ptr + d, pb.ptr + sq)
    grid = (-(-k // 256), m, 1)
    return Launch("i15", kernel, grid, (256, 1, 1), args, ARG_FORMATS[kernel])


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
    lay = check_weight("i15", w)
    blk = i15_block(w.qtype)
    core = i15_core(m)
    kernel = f"{core}{'f' if fold else ''}_{lay.name}"
    require(kernel, not fold or core == "gemm15p", f"no folded form of {core}")
    require(kernel, not fold or w.qtype != I15_Q6_K, "no folded form for q6_k (i15_fold)")
    require(kernel, w.qtype in I15_TYPES and w.experts == 1, f"no 15-bit product for {lay.name}")
    require(kernel, 1 <= m <= MAX_GRID_YZ * I15_GEMM_TOK, f"row count {m} out of range")
    require(kernel, w.cols % blk == 0, f"row length {w.cols} not a multiple of {blk}")
    units = -(-(w.cols // 32) // I15_CHUNK) if blk == 32 else w.cols // 256
    what = "chunks of 8 blocks" if blk == 32 else "super-blocks"
    require(kernel, 1 <= splits <= units, f"{splits} splits of {units} {what}")
    per = -(-units // splits)
    require(kernel, (splits - 1) * per < units, f"{splits} splits of {units} {what}: one empty")
    pb, qb = as_buf(part), as_buf(planes)
    hi, lo, d, sq, total = i15_planes(m, w.cols, blk)
    require(kernel, qb.ptr > 0 and qb.nbytes >= total, f"planes buffer {qb.nbytes} < {total} bytes")
    need = (1 if fold else splits) * m * w.rows * 4
    require(kernel, pb.ptr > 0 and pb.nbytes >= need, f"partials buffer {pb.nbytes} < {need} bytes")
    disjoint(kernel, (qb.ptr, qb.ptr + total), (pb.ptr, pb.ptr + need), "planes and partials")
    q = qb.ptr
    out: tuple[int, ...] = (0, 0, 0, 0, 0)
    if y is not None:
        ldy = w.rows if ldy is None else ldy
        yr = check_f32(kernel, "y", as_buf(y), m, w.rows, ldy)
        disjoint(kernel, (qb.ptr, qb.ptr + total), yr, "planes and y")
        bptr, rptr = check_epilogue(kernel, yr, bias, residual, m, w.rows, ldy)
        tk = 0
        if splits > 1 and not fold:  # a tile's last block sums its partials: a ticket a tile
            disjoint(kernel, (pb.ptr, pb.ptr + need), yr, "partials and y")
            tb = opt_buf(tickets)
            require(
                kernel, tb is not None and tb.nbytes >= 4 * i15_tiles(w, m), "tickets too small"
            )
            assert tb is not None
            tk = tb.ptr
        out = (as_buf(y).ptr, bptr, rptr, ldy, tk)
    else:
        require(kernel, bias is None and residual is None, "bias or residual without y")
    args = (w.ptr, w.rows, w.cols, q + hi, q + lo, q + d, q + sq, m, splits, pb.ptr, *out)
    tok = i15_core_tok(core)
    ring = units if fold else per  # units a block walks
    shared = min(ring, i15_dense_slots(tok)) * i15_gemmp_slot(w.qtype, lay.block_bytes, tok)
    grid = (-(-w.rows // I15_GEMM_ROWS), -(-m // tok), 1 if fold else splits)
    block = (128, 1, 1)
    return Launch("i15", kernel, grid, block, args, ARG_FORMATS["i15"], shared=shared)


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
    lay = check_weight("moe15", w)
    kernel = f"moe15p{route.tile_m}_{lay.name}"
    require(kernel, w.qtype in I15_MOE_TYPES and w.experts > 1, f"no routed 15-bit {lay.name}")
    require(
        kernel, route.tile_m in (8, 16, 64) and route.workspace is not None, "not routed for it"
    )
    require(kernel, route.experts == w.experts, f"routed for {route.experts} experts")
    require(kernel, n_assign == route.ntok * route.topk, f"{n_assign} assignments")
    require(kernel, w.cols % 32 == 0, f"row length {w.cols} not a multiple of 32")
    units = -(-(w.cols // 32) // I15_CHUNK)
    require(kernel, 1 <= splits <= units, f"{splits} splits of {units} chunks")
    per = -(-units // splits)
    require(kernel, (splits - 1) * per < units, f"{splits} splits of {units} chunks: one empty")
    pb, qb = as_buf(part), as_buf(planes)
    hi, lo, d, sq, total = i15_planes(x_rows, w.cols, 32)
    require(kernel, x_rows >= (n_assign if per_slot_input else route.ntok), f"{x_rows} rows of X")
    require(kernel, qb.ptr > 0 and qb.nbytes >= total, f"planes buffer {qb.nbytes} < {total} bytes")
    need = splits * n_assign * w.rows * 4
    require(kernel, pb.ptr > 0 and pb.nbytes >= need, f"partials buffer {pb.nbytes} < {need} bytes")
    disjoint(kernel, (qb.ptr, qb.ptr + total), (pb.ptr, pb.ptr + need), "planes and partials")
    ws = route.workspace
    assert ws is not None
    check_moe_ws(kernel, ws, n_assign, w.experts, route.tile_m)
    q = qb.ptr
    args = (
        w.ptr, w.rows, w.cols, q + hi, q + lo, q + d, q + sq, n_assign, splits, pb.ptr,
        *moe_ws_ptrs(ws, n_assign, w.experts, route.tile_m), route.topk,
        int(per_slot_input), w.expert_bytes,
    )  # fmt: skip
    slot = i15_gemmp_slot(w.qtype, lay.block_bytes, route.tile_m)
    shared = min(per, 2 if route.tile_m == 64 else I15_GEMMP_SLOTS) * slot
    bound = moe_tile_bound(n_assign, w.experts, route.tile_m)
    grid = (-(-w.rows // I15_GEMM_ROWS), bound, splits)
    return Launch("i15", kernel, grid, (128, 1, 1), args, ARG_FORMATS["moe15"], shared=shared)


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
    require(
        kernel, 1 <= n_assign <= MAX_GRID_YZ and splits >= 1, f"{n_assign} rows, {splits} splits"
    )
    require(kernel, n >= 32 and n % 32 == 0, f"row length {n} not a multiple of 32")
    part = splits * n_assign * n * 4
    require(kernel, gb.nbytes >= part and ub.nbytes >= part, "partials buffers too small")
    disjoint(kernel, (gb.ptr, gb.ptr + part), (ub.ptr, ub.ptr + part), "gate and up partials")
    hi, lo, d, sq, total = i15_planes(n_assign, n, 32)
    require(kernel, qb.ptr > 0 and qb.ptr % 16 == 0, "planes pointer null or not 16-byte aligned")
    require(kernel, qb.nbytes >= total, f"planes buffer {qb.nbytes} bytes < {total} needed")
    for what, pb in (("gate", gb), ("up", ub)):
        disjoint(kernel, (pb.ptr, pb.ptr + part), (qb.ptr, qb.ptr + total), f"{what} and planes")
    require(kernel, ib.nbytes >= 4 * n_assign and n_expert >= 1, "expert ids buffer too small")
    biases = [bias_ptr(kernel, b, n_expert, n) for b in (gate_bias, up_bias)]
    q = qb.ptr
    args = (
        gb.ptr, ub.ptr, splits, n_assign * n, n_assign, n, *biases, ib.ptr, n_expert,
        float(alpha), float(limit), q + hi, q + lo, q + d, q + sq,
    )  # fmt: skip
    grid = (-(-n // 256), n_assign, 1)
    return Launch("i15", kernel, grid, (256, 1, 1), args, ARG_FORMATS[kernel])


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
    require(kernel, 1 <= ntok <= MAX_GRID_YZ and topk >= 1 and splits >= 1, "rows, slots, splits")
    need = splits * n_assign * n * 4
    require(kernel, pb.nbytes >= need, f"partials buffer {pb.nbytes} bytes < {need}")
    xr = check_f32(kernel, "x", xb, ntok, n, n)
    disjoint(kernel, (pb.ptr, pb.ptr + need), xr, "partials and x")
    require(kernel, ib.nbytes >= 4 * n_assign and n_expert >= 1, "expert ids buffer too small")
    require(kernel, wb.nbytes >= 4 * n_assign, "slot weights buffer too small")
    bptr = bias_ptr(kernel, bias, n_expert, n)
    args = (xb.ptr, pb.ptr, splits, n_assign * n, n, bptr, ib.ptr, n_expert, wb.ptr, topk)
    grid = (-(-n // 256), ntok, 1)
    return Launch("i15", kernel, grid, (256, 1, 1), args, ARG_FORMATS[kernel])
