"""Checked launch wrappers for the non-matrix kernels (cuda_src/norm.cu, rope.cu,
attention.cu, activation.cu, elementwise.cu, sampling.cu).

Every wrapper validates shapes, strides, alignment and the byte range each pointer will be
read or written over *before* the launch is queued (`LaunchRefused`, a CudaError naming the
kernel); a launch failure or, with `sync_each=True`, a fault seen at the next
synchronisation, is also a CudaError naming the kernel. The checks are pure functions of
`DevBuf`s (tested without a GPU in tests/unit/cuda).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

from worker.backends.cuda.arena import DevBuf, LaunchRefused
from worker.errors import CudaError

F32 = 4
F16 = 2
ATTN_THREADS = 256  # attention.cu AT
ATTN_TILE = 64  # attention.cu DT: keys per decode tile
ATTN_MAX_SPLIT = 32  # decode key chunks a row at most (the merge reuses the score tile)
ATTN_MAX_GROUP_DIMS = 2 * ATTN_THREADS * 4  # query heads a KV head x head_dim (DMAXP)
SAMPLE_THREADS = 1024  # sampling.cu
SAMPLE_GRID = 32  # blocks of the grid-wide sampler (<= SAMPLE_MAX_GRID, all co-resident)
SAMPLE_MAX_GRID = 64
SAMPLE_SMALL_K = 1024  # top-k up to this finishes in one block (sampling.cu sample_small)
# sizeof(GridScratch) in sampling.cu: part_u/f/i and the histograms' sums and counts in
# ping-pong slots, the gathered top-k keys, the found key, the gathered count (padded)
SAMPLE_SCRATCH_BYTES = (
    2 * SAMPLE_MAX_GRID * (8 + 4 + 4)
    + 2 * SAMPLE_MAX_GRID * 256 * (8 + 4)
    + SAMPLE_SMALL_K * 8
    + 8
    + 8
)
MAX_DYN_SMEM = 48 * 1024
KV_BLOCK = 64  # positions per KV-cache block (cuda_src/common.cuh KV_BLOCK)


def need(kernel: str, buf: DevBuf | None, nbytes: int, what: str, align: int = 4) -> None:
    """`buf` must hold `nbytes` from its start and be `align`-byte aligned."""
    if buf is None:
        if nbytes > 0:
            raise LaunchRefused(kernel, f"{what} is missing")
        return
    if nbytes < 0:
        raise LaunchRefused(kernel, f"{what}: negative extent {nbytes}")
    if nbytes > buf.nbytes:
        raise LaunchRefused(
            kernel, f"{what} ({buf.name}) needs {nbytes} bytes but holds {buf.nbytes}"
        )
    if buf.ptr % align:
        raise LaunchRefused(kernel, f"{what} ({buf.name}) is not {align}-byte aligned")


def i15_args(kernel: str, planes: tuple[DevBuf, int] | None, rows: int, n: int) -> tuple[int, ...]:
    """The trailing (hi, lo, d, sq, blk) arguments of a producer that may also write its
    output's 15-bit codes (i15.cuh): null pointers without planes; else checked against the
    layout plans.i15.i15_planes gives the integer products."""
    if planes is None:
        return (0, 0, 0, 0, 0)
    from worker.backends.cuda.plans.i15 import i15_planes

    buf, blk = planes
    if blk not in (32, 256) or n % blk:
        raise LaunchRefused(kernel, f"row length {n} not a multiple of the scale block {blk}")
    hi, lo, d, sq, total = i15_planes(rows, n, blk)
    if buf.ptr % 16:
        raise LaunchRefused(kernel, "planes pointer not 16-byte aligned")
    need(kernel, buf, total, "planes")
    return (buf.ptr + hi, buf.ptr + lo, buf.ptr + d, buf.ptr + sq, blk)


def positive(kernel: str, **dims: int) -> None:
    for k, v in dims.items():
        if not isinstance(v, int) or v <= 0:
            raise LaunchRefused(kernel, f"{k} must be a positive int, got {v!r}")


def strided_extent(rows: int, stride: int, width: int, elem: int = F32) -> int:
    """Bytes spanned by `rows` rows of `width` elements `stride` elements apart."""
    if rows <= 0:
        return 0
    return ((rows - 1) * stride + width) * elem


def ptr(b: DevBuf | None) -> int:
    return 0 if b is None else b.ptr


@dataclass(frozen=True, slots=True)
class AttnShape:
    """A decode attention launch: n_tokens query rows (one per sequence)."""

    n_tokens: int
    n_head: int
    n_kv: int
    head_dim: int
    n_split: int
    max_chunk: int

    def check(self, kernel: str) -> None:
        positive(
            kernel,
            n_tokens=self.n_tokens,
            n_head=self.n_head,
            n_kv=self.n_kv,
            head_dim=self.head_dim,
            n_split=self.n_split,
            max_chunk=self.max_chunk,
        )
        if self.n_head % self.n_kv:
            raise LaunchRefused(kernel, f"n_head {self.n_head} not a multiple of {self.n_kv}")
        if self.n_split > ATTN_MAX_SPLIT:
            raise LaunchRefused(kernel, f"n_split {self.n_split} > {ATTN_MAX_SPLIT}")
        if self.head_dim > 128 or self.head_dim % 8:
            raise LaunchRefused(kernel, f"head_dim {self.head_dim} must be <= 128, % 8 == 0")
        group = self.n_head // self.n_kv * self.head_dim
        if group > ATTN_MAX_GROUP_DIMS:
            raise LaunchRefused(
                kernel,
                f"{self.n_head // self.n_kv} heads a KV head x {self.head_dim} dims "
                f"> {ATTN_MAX_GROUP_DIMS}",
            )
        if self.smem_bytes > MAX_DYN_SMEM:
            raise LaunchRefused(kernel, f"{self.smem_bytes} bytes of shared memory")

    @property
    def smem_bytes(self) -> int:
        """attn_paged_decode's dynamic shared memory: the K and V tiles (fp16, rows padded by
        8 halves), the group's scaled queries, its score tile and softmax state (float)."""
        g, d = self.n_head // self.n_kv, self.head_dim
        return 2 * ATTN_TILE * (d + 8) * F16 + (g * d + g * (ATTN_TILE + 1) + 3 * g) * F32


# attn_prefill_tc_d<D> (attention.cu): head dims with a kernel, query rows and keys per tile,
# threads per block
TC_HEAD_DIMS = (32, 64, 80, 96, 128)
TC_BM = 64
TC_BN = 64
TC_THREADS = 128
LOG2E = 1.4426950408889634


def attn_tc_smem_bytes(head_dim: int) -> int:
    """Dynamic shared memory of attn_prefill_tc_d<head_dim>: two stages of a K and a V tile,
    rows padded by 8 halves."""
    return 2 * 2 * TC_BN * (head_dim + 8) * F16


@dataclass(frozen=True, slots=True)
class TcLaunch:
    kernel: str
    grid: tuple[int, int, int]
    shared: int


def check_attn_prefill_tc(
    *,
    q: DevBuf,
    q_stride: int,
    kcache: DevBuf,
    vcache: DevBuf,
    seq: DevBuf,
    bt: DevBuf,
    bt_stride: int,
    out: DevBuf,
    out_stride: int,
    chunks: list[tuple[int, int, int]],
    n_head: int,
    n_kv: int,
    head_dim: int,
    pool_rows: int,
    window: int,
    sinks: DevBuf | None,
) -> TcLaunch:
    """Every check of a tensor-core prefill attention launch (pure: no GPU needed).
    chunks: per sequence (row0, n_tok, pos0), the values the kernel will read from `seq`;
    its block table (bt row z) must cover positions up to pos0 + n_tok. pool_rows: rows in
    each of kcache / vcache (blocks * KV_BLOCK)."""
    k = "attn_prefill_tc"
    positive(k, n_head=n_head, n_kv=n_kv, head_dim=head_dim, pool_rows=pool_rows)
    if not chunks:
        raise LaunchRefused(k, "no chunks")
    if head_dim not in TC_HEAD_DIMS:
        raise LaunchRefused(k, f"head_dim {head_dim} has no kernel (have {TC_HEAD_DIMS})")
    if n_head % n_kv:
        raise LaunchRefused(k, f"n_head {n_head} not a multiple of {n_kv}")
    if n_head > 65535 or len(chunks) > 65535:
        raise LaunchRefused(k, f"n_head {n_head} / {len(chunks)} chunks over 65535 (grid)")
    if not isinstance(window, int) or window < 0:
        raise LaunchRefused(k, f"window must be a non-negative int, got {window!r}")
    width = n_head * head_dim
    if q_stride < width or out_stride < width:
        raise LaunchRefused(k, "row strides shorter than the rows")
    if q_stride % 2 or out_stride % 2:
        raise LaunchRefused(k, "row strides must be even (8-byte float2 accesses)")
    rows = 0
    longest = 0
    for row0, n_tok, pos0 in chunks:
        positive(k, n_tok=n_tok)
        if row0 < 0 or pos0 < 0:
            raise LaunchRefused(k, f"negative row {row0} or position {pos0}")
        if -(-(pos0 + n_tok) // KV_BLOCK) > bt_stride:
            raise LaunchRefused(k, f"positions to {pos0 + n_tok} past a block-table row")
        rows = max(rows, row0 + n_tok)
        longest = max(longest, n_tok)
    need(k, q, strided_extent(rows, q_stride, width), "q", 8)
    need(k, out, strided_extent(rows, out_stride, width), "out", 8)
    need(k, kcache, pool_rows * n_kv * head_dim * F16, "kcache", 16)
    need(k, vcache, pool_rows * n_kv * head_dim * F16, "vcache", 16)
    need(k, seq, len(chunks) * 3 * 4, "seq")
    need(k, bt, len(chunks) * bt_stride * 4, "block tables")
    need(k, sinks, n_head * F32 if sinks is not None else 0, "sinks")
    grid = (-(-longest // TC_BM), n_head, len(chunks))
    return TcLaunch(f"attn_prefill_tc_d{head_dim}", grid, attn_tc_smem_bytes(head_dim))


class Kernels:
    """Loads the modules on the current context and launches on `ctx.stream`."""

    def __init__(self, ctx: Any, *, sync_each: bool = False) -> None:
        from worker.backends.cuda.compile import load_module

        self.ctx = ctx
        self.stream = ctx.stream
        self.sync_each = sync_each
        arch = ctx.facts.arch
        self.mods = {
            n: load_module(n, arch)
            for n in ("norm", "rope", "attention", "activation", "elementwise", "sampling")
        }
        sig = {
            ("norm", "rmsnorm_f32"): "PPPPifPPPPi",  # + the 15-bit planes (i15_args)
            ("norm", "layernorm_f32"): "PPPPPif",
            ("rope", "qkv_rope_store"): "PPPPPPPPPPiiiiiiPfii",
            ("attention", "attn_paged_decode"): "PiPPPiPPPiiiiifiPPiP",
            **{("attention", f"attn_prefill_tc_d{d}"): "PiPPPPiiifiPPi" for d in TC_HEAD_DIMS},
            ("activation", "swiglu_f32"): "PPPiiiiPPPPi",
            ("activation", "swiglu_oai_f32"): "PPPiiiiff",
            ("activation", "gelu_f32"): "PPi",
            ("elementwise", "add_f32"): "PPiii",
            ("elementwise", "add_pos_embd_f32"): "PPPii",
            ("elementwise", "topk_softmax_f32"): "PiiPP",
            ("elementwise", "moe_combine_f32"): "PPPii",
            ("elementwise", "gather_rows_f32"): "PiPPii",
            ("elementwise", "resolve_pending_ids"): "PPi",
            ("sampling", "sample_rows"): "PqiPPPiPPPP",
        }
        from worker.backends.cuda.matmul import prefer_shared

        self.fn: dict[str, Any] = {}
        for (mod, name), s in sig.items():
            f = self.mods[mod].get_function(name)
            f.prepare(s)
            # the same shared-memory carveout as every matmul kernel: where two kernels in a
            # row ask for different carveouts, each SM drains and reconfigures between them
            # (~150 such switches per Qwen decode step cost ~190 us, docs/kernels.md)
            prefer_shared(f)
            self.fn[name] = f
        from worker.backends.cuda.matmul import allow_dynamic_shared

        for d in TC_HEAD_DIMS:
            nb = attn_tc_smem_bytes(d)
            if nb > MAX_DYN_SMEM:
                name = f"attn_prefill_tc_d{d}"
                allow_dynamic_shared(self.fn[name], name, nb)

    def launch(
        self,
        name: str,
        grid: tuple[int, ...],
        block: tuple[int, ...],
        *args: Any,
        shared: int = 0,
    ) -> None:
        g = (*tuple(grid), 1, 1)[:3]
        b = (*tuple(block), 1, 1)[:3]
        if min(g) <= 0 or g[1] > 65535 or g[2] > 65535 or g[0] >= 2**31:
            raise LaunchRefused(name, f"grid {g} out of range")
        if b[0] * b[1] * b[2] > 1024:
            raise LaunchRefused(name, f"block {b} over 1024 threads")
        drv = self.ctx.drv
        try:
            self.fn[name].prepared_async_call(g, b, self.stream, *args, shared_size=shared)
        except drv.Error as exc:
            raise CudaError(f"{name}: launch failed: {exc}") from exc
        if self.sync_each:
            self.ctx.sync(name)

    # ------------------------------------------------------------------ norms

    def rmsnorm(
        self,
        x: DevBuf,
        w: DevBuf | None,
        out: DevBuf,
        rows: int,
        n: int,
        eps: float,
        delta: DevBuf | None = None,
        planes: tuple[DevBuf, int] | None = None,
    ) -> None:
        """out = x * rsqrt(mean(x^2) + eps) * w per row (x += delta first); `planes` (a
        buffer and a scale block of 32 or 256): also out's 15-bit codes there, laid out as
        plans.i15.i15_planes(rows, n, blk), for the integer products that read out."""
        k = "rmsnorm_f32"
        positive(k, rows=rows, n=n)
        nb = rows * n * F32
        need(k, x, nb, "x")
        need(k, out, nb, "out")
        need(k, delta, nb if delta is not None else 0, "delta")
        need(k, w, n * F32 if w is not None else 0, "weight")
        q = i15_args(k, planes, rows, n)
        block = (256 if n <= 2048 else 1024,)
        self.launch(k, (rows,), block, x.ptr, ptr(delta), ptr(w), out.ptr, n, eps, *q)

    def layernorm(
        self,
        x: DevBuf,
        w: DevBuf | None,
        b: DevBuf | None,
        out: DevBuf,
        rows: int,
        n: int,
        eps: float,
        delta: DevBuf | None = None,
    ) -> None:
        k = "layernorm_f32"
        positive(k, rows=rows, n=n)
        nb = rows * n * F32
        need(k, x, nb, "x")
        need(k, out, nb, "out")
        need(k, delta, nb if delta is not None else 0, "delta")
        need(k, w, n * F32 if w is not None else 0, "weight")
        need(k, b, n * F32 if b is not None else 0, "bias")
        self.launch(
            k,
            (rows,),
            (256 if n <= 2048 else 1024,),
            x.ptr,
            ptr(delta),
            ptr(w),
            ptr(b),
            out.ptr,
            n,
            eps,
        )

    # ------------------------------------------------------------------ rope + kv store

    def qkv_rope_store(
        self,
        *,
        q: DevBuf,
        k: DevBuf,
        v: DevBuf,
        bq: DevBuf | None,
        bk: DevBuf | None,
        bv: DevBuf | None,
        kcache: DevBuf,
        vcache: DevBuf,
        pos: DevBuf,
        kvrow: DevBuf,
        n_tokens: int,
        n_head: int,
        n_kv: int,
        head_dim: int,
        n_rot: int,
        q_stride: int,
        kv_stride: int,
        inv_freq: DevBuf,
        mscale: float,
        mode: int,
        pool_rows: int,
    ) -> None:
        """Token t (position pos[t]) has its k and v stored at pool row kvrow[t] of this
        layer's kcache/vcache (pool_rows rows each; the kernel stores nothing for a row
        outside 0..pool_rows-1)."""
        kn = "qkv_rope_store"
        positive(kn, n_tokens=n_tokens, n_head=n_head, n_kv=n_kv, head_dim=head_dim)
        positive(kn, pool_rows=pool_rows)
        if head_dim > 256 or n_rot > head_dim or n_rot % 2 or n_rot < 0:
            raise LaunchRefused(kn, f"head_dim {head_dim} / n_rot {n_rot} unsupported")
        if mode not in (0, 1, 2):
            raise LaunchRefused(kn, f"mode {mode}")
        if q_stride < n_head * head_dim or kv_stride < n_kv * head_dim:
            raise LaunchRefused(kn, "row strides shorter than the rows")
        need(kn, q, strided_extent(n_tokens, q_stride, n_head * head_dim), "q")
        need(kn, k, strided_extent(n_tokens, kv_stride, n_kv * head_dim), "k")
        need(kn, v, strided_extent(n_tokens, kv_stride, n_kv * head_dim), "v")
        need(kn, bq, n_head * head_dim * F32 if bq is not None else 0, "bq")
        need(kn, bk, n_kv * head_dim * F32 if bk is not None else 0, "bk")
        need(kn, bv, n_kv * head_dim * F32 if bv is not None else 0, "bv")
        need(kn, kcache, pool_rows * n_kv * head_dim * F16, "kcache", 16)
        need(kn, vcache, pool_rows * n_kv * head_dim * F16, "vcache", 16)
        need(kn, pos, 4 * n_tokens, "pos")
        need(kn, kvrow, 4 * n_tokens, "kvrow")
        need(kn, inv_freq, (n_rot // 2) * 8 if mode else 0, "inv_freq", 8)
        threads = min(256, max(32, (head_dim + 31) // 32 * 32))
        self.launch(
            kn,
            (n_tokens, n_head + n_kv),
            (threads,),
            q.ptr,
            k.ptr,
            v.ptr,
            ptr(bq),
            ptr(bk),
            ptr(bv),
            kcache.ptr,
            vcache.ptr,
            pos.ptr,
            kvrow.ptr,
            n_head,
            n_kv,
            head_dim,
            n_rot,
            q_stride,
            kv_stride,
            inv_freq.ptr,
            mscale,
            mode,
            pool_rows,
        )

    # ------------------------------------------------------------------ attention

    def attention_decode(
        self,
        *,
        q: DevBuf,
        q_stride: int,
        kcache: DevBuf,
        vcache: DevBuf,
        bt: DevBuf,
        bt_stride: int,
        pos: DevBuf,
        opart: DevBuf,
        ml: DevBuf,
        out: DevBuf,
        out_stride: int,
        tickets: DevBuf,
        shape: AttnShape,
        pool_rows: int,
        scale: float,
        window: int = 0,
        sinks: DevBuf | None = None,
    ) -> None:
        """attn_paged_decode: one query row per sequence (shape.n_tokens rows), row t at
        position pos[t] over block table row t (bt_stride blocks a row). The host keeps every
        position below bt_stride * KV_BLOCK and shape.n_split * shape.max_chunk (the kernel
        reads keys 0..pos[t]). A block per (key chunk, KV head, row) serves all the query
        heads of its KV head. tickets: n_rows * n_kv zeroed uint32 (left zeroed)."""
        k = "attn_paged_decode"
        s = shape
        s.check(k)
        positive(k, bt_stride=bt_stride, pool_rows=pool_rows)
        if s.max_chunk * s.n_split < bt_stride * KV_BLOCK:
            raise LaunchRefused(
                k, f"{s.n_split} chunks of {s.max_chunk} < {bt_stride * KV_BLOCK} keys"
            )
        need(k, q, strided_extent(s.n_tokens, q_stride, s.n_head * s.head_dim), "q")
        need(k, kcache, pool_rows * s.n_kv * s.head_dim * F16, "kcache", 16)
        need(k, vcache, pool_rows * s.n_kv * s.head_dim * F16, "vcache", 16)
        need(k, bt, s.n_tokens * bt_stride * 4, "block tables")
        need(k, pos, s.n_tokens * 4, "pos")
        parts = s.n_tokens * s.n_head * s.n_split
        need(k, opart, parts * s.head_dim * F32, "opart")
        need(k, ml, parts * 2 * F32, "ml")
        need(k, out, strided_extent(s.n_tokens, out_stride, s.n_head * s.head_dim), "out")
        need(k, sinks, s.n_head * F32 if sinks is not None else 0, "sinks")
        need(k, tickets, s.n_tokens * s.n_kv * 4, "tickets")
        self.launch(
            k,
            (s.n_split, s.n_kv, s.n_tokens),
            (ATTN_THREADS,),
            q.ptr,
            q_stride,
            kcache.ptr,
            vcache.ptr,
            bt.ptr,
            bt_stride,
            pos.ptr,
            opart.ptr,
            ml.ptr,
            s.n_head,
            s.n_kv,
            s.head_dim,
            s.n_split,
            s.max_chunk,
            scale,
            window,
            ptr(sinks),
            out.ptr,
            out_stride,
            tickets.ptr,
            shared=s.smem_bytes,
        )

    def attention_prefill(
        self,
        *,
        q: DevBuf,
        q_stride: int,
        kcache: DevBuf,
        vcache: DevBuf,
        seq: DevBuf,
        bt: DevBuf,
        bt_stride: int,
        out: DevBuf,
        out_stride: int,
        chunks: list[tuple[int, int, int]],
        n_head: int,
        n_kv: int,
        head_dim: int,
        pool_rows: int,
        scale: float,
        window: int = 0,
        sinks: DevBuf | None = None,
    ) -> None:
        """Prompt chunks of several sequences on the tensor cores (attn_prefill_tc_d<D>):
        `seq` holds (row0, n_tok, pos0) per chunk on the device (the values in `chunks`),
        bt one block-table row per chunk. FP16 Q and P, no workspace, no tickets."""
        t = check_attn_prefill_tc(
            q=q,
            q_stride=q_stride,
            kcache=kcache,
            vcache=vcache,
            seq=seq,
            bt=bt,
            bt_stride=bt_stride,
            out=out,
            out_stride=out_stride,
            chunks=chunks,
            n_head=n_head,
            n_kv=n_kv,
            head_dim=head_dim,
            pool_rows=pool_rows,
            window=window,
            sinks=sinks,
        )
        self.launch(
            t.kernel,
            t.grid,
            (TC_THREADS,),
            q.ptr,
            q_stride,
            kcache.ptr,
            vcache.ptr,
            seq.ptr,
            bt.ptr,
            bt_stride,
            n_head,
            n_kv,
            scale * LOG2E,
            window,
            ptr(sinks),
            out.ptr,
            out_stride,
            shared=t.shared,
        )

    # ------------------------------------------------------------------ activations

    def swiglu(
        self,
        gate: DevBuf,
        up: DevBuf,
        out: DevBuf,
        rows: int,
        n: int,
        gate_stride: int,
        up_stride: int,
        out_stride: int,
        oai: tuple[float, float] | None = None,
        planes: tuple[DevBuf, int] | None = None,
    ) -> None:
        """`planes`: as rmsnorm's, for out (plain SwiGLU only)."""
        k = "swiglu_oai_f32" if oai else "swiglu_f32"
        positive(k, rows=rows, n=n)
        if oai and planes is not None:
            raise LaunchRefused(k, "15-bit planes only from the plain SwiGLU")
        if min(gate_stride, up_stride, out_stride) < n:
            raise LaunchRefused(k, "row strides shorter than the rows")
        need(k, gate, strided_extent(rows, gate_stride, n), "gate")
        need(k, up, strided_extent(rows, up_stride, n), "up")
        need(k, out, strided_extent(rows, out_stride, n), "out")
        grid = ((n + 255) // 256, rows)
        if oai:
            self.launch(
                k,
                grid,
                (256,),
                gate.ptr,
                up.ptr,
                out.ptr,
                n,
                gate_stride,
                up_stride,
                out_stride,
                oai[0],
                oai[1],
            )
        else:
            q = i15_args(k, planes, rows, n)
            strides = (gate_stride, up_stride, out_stride)
            self.launch(k, grid, (256,), gate.ptr, up.ptr, out.ptr, n, *strides, *q)

    def gelu(self, x: DevBuf, out: DevBuf, n: int) -> None:
        k = "gelu_f32"
        positive(k, n=n)
        need(k, x, n * F32, "x")
        need(k, out, n * F32, "out")
        self.launch(k, ((n + 255) // 256,), (256,), x.ptr, out.ptr, n)

    def add(self, x: DevBuf, y: DevBuf, rows: int, n: int, x_stride: int, y_stride: int) -> None:
        """x[r] += y[r] (y_stride 0: one row broadcast, e.g. a bias)."""
        k = "add_f32"
        positive(k, rows=rows, n=n)
        need(k, x, strided_extent(rows, x_stride, n), "x")
        need(k, y, strided_extent(rows if y_stride else 1, y_stride, n), "y")
        self.launch(k, ((n + 255) // 256, rows), (256,), x.ptr, y.ptr, n, x_stride, y_stride)

    def add_pos_embd(
        self, x: DevBuf, table: DevBuf, pos: DevBuf, rows: int, n: int, n_pos: int
    ) -> None:
        """x[t] += table[pos[t]] (a position outside the table adds nothing)."""
        k = "add_pos_embd_f32"
        positive(k, rows=rows, n=n, n_pos=n_pos)
        need(k, x, rows * n * F32, "x")
        need(k, table, n_pos * n * F32, "table")
        need(k, pos, 4 * rows, "pos")
        self.launch(k, ((n + 255) // 256, rows), (256,), x.ptr, table.ptr, pos.ptr, n, n_pos)

    def topk_softmax(
        self, logits: DevBuf, rows: int, n_exp: int, k: int, idx: DevBuf, w: DevBuf
    ) -> None:
        kn = "topk_softmax_f32"
        positive(kn, rows=rows, n_exp=n_exp, k=k)
        if n_exp > 256 or k > 8 or k > n_exp:
            raise LaunchRefused(kn, f"n_exp {n_exp} / k {k} unsupported (<= 256 / <= 8)")
        need(kn, logits, rows * n_exp * F32, "logits")
        need(kn, idx, rows * k * 4, "idx")
        need(kn, w, rows * k * F32, "w")
        self.launch(kn, (rows,), (32,), logits.ptr, n_exp, k, idx.ptr, w.ptr)

    def moe_combine(self, x: DevBuf, y: DevBuf, w: DevBuf, rows: int, n: int, k: int) -> None:
        """x[t] += sum_s w[t, s] * y[t*k + s] (slots in order)."""
        kn = "moe_combine_f32"
        positive(kn, rows=rows, n=n, k=k)
        need(kn, x, rows * n * F32, "x")
        need(kn, y, rows * k * n * F32, "y")
        need(kn, w, rows * k * F32, "w")
        self.launch(kn, ((n + 255) // 256, rows), (256,), x.ptr, y.ptr, w.ptr, n, k)

    def gather_rows(
        self,
        x: DevBuf,
        x_stride: int,
        idx: DevBuf,
        out: DevBuf,
        out_stride: int,
        rows: int,
        n: int,
        src_rows: int,
    ) -> None:
        """out[r] = x[idx[r]] (n floats) for r < rows; idx values must be < src_rows (the
        host builds them)."""
        k = "gather_rows_f32"
        positive(k, rows=rows, n=n, src_rows=src_rows)
        need(k, x, strided_extent(src_rows, x_stride, n), "x")
        need(k, idx, rows * 4, "idx")
        need(k, out, strided_extent(rows, out_stride, n), "out")
        self.launch(
            k, ((n + 255) // 256, rows), (256,), x.ptr, x_stride, idx.ptr, out.ptr, out_stride, n
        )

    def resolve_pending_ids(self, ids: DevBuf, prev_out: DevBuf, rows: int) -> None:
        """ids[r] = prev_out[2 * (-2 - ids[r])] where ids[r] <= -2, for r < rows (the
        host names rows of the previous step's sampler output, all inside prev_out)."""
        k = "resolve_pending_ids"
        positive(k, rows=rows)
        need(k, ids, rows * 4, "ids")
        self.launch(k, ((rows + 255) // 256,), (256,), ids.ptr, prev_out.ptr, rows)

    # ------------------------------------------------------------------ sampling

    def sample_rows(
        self,
        *,
        logits: DevBuf,
        ldl: int,
        n: int,
        rows: int,
        args: DevBuf,
        slot: DevBuf,
        hist: DevBuf,
        hist_stride: int,
        n_slots: int,
        xbuf: DevBuf,
        out: DevBuf,
        gscratch: DevBuf,
        barrier: DevBuf,
    ) -> None:
        """One sampler launch for `rows` logits rows (row stride ldl floats): row r with the
        settings args[r] (SAMPLE_ARGS_BYTES each, from sample_args()), penalty history
        hist[slot[r]] (hist_stride ids a slot, n_slots slots), scratch xbuf[r] (n floats),
        gscratch[r], barrier[r] (two zeroed uint32, left consistent), out[r] = (id, NaN)."""
        k = "sample_rows"
        positive(k, n=n, rows=rows, hist_stride=hist_stride, n_slots=n_slots)
        if ldl < n:
            raise LaunchRefused(k, "logits row stride shorter than the rows")
        need(k, logits, strided_extent(rows, ldl, n), "logits")
        need(k, args, rows * SAMPLE_ARGS_BYTES, "args", 8)
        need(k, slot, rows * 4, "slot")
        need(k, hist, n_slots * hist_stride * 4, "hist")
        need(k, xbuf, rows * n * F32, "xbuf")
        need(k, out, rows * 8, "out")
        need(k, gscratch, rows * SAMPLE_SCRATCH_BYTES, "gscratch", 16)
        need(k, barrier, rows * 8, "barrier")
        # a row's blocks must all be resident together; rows need not be
        grid = max(1, min(SAMPLE_GRID, self.ctx.facts.multiprocessors // rows))
        self.launch(
            k,
            (grid, rows),
            (SAMPLE_THREADS,),
            logits.ptr,
            ldl,
            n,
            args.ptr,
            slot.ptr,
            hist.ptr,
            hist_stride,
            xbuf.ptr,
            out.ptr,
            gscratch.ptr,
            barrier.ptr,
        )


# sample_rows' SampleArgs (cuda_src/sampling.cu): top_p_m, wfloor, draw_m (u64), pen,
# temperature (f32), n_pen, top_k, top_p_sh, draw_sh (i32); little-endian, no padding.
SAMPLE_ARGS_BYTES = 48


def sample_fixed_point(top_p: float, min_p: float, draw: float) -> tuple[int, int, int, int, int]:
    """(top_p_m, top_p_sh, wfloor, draw_m, draw_sh): top_p = m * 2^-sh exactly (sh -1: off),
    wfloor = ceil(min_p * 2^40) (1: off), draw = m * 2^-sh exactly."""
    tp_m, tp_sh = (0, -1) if top_p >= 1.0 else exact_fraction(top_p)
    wfloor = 1 if min_p <= 0.0 else max(1, ceil_mul_pow2(min_p, 40))
    d_m, d_sh = exact_fraction(draw)
    return tp_m, tp_sh, wfloor, d_m, d_sh


def sample_args(
    *,
    n_pen: int,
    penalty: float,
    temperature: float,
    top_k: int,
    top_p: float,
    min_p: float,
    draw: float,
) -> bytes:
    """The SAMPLE_ARGS_BYTES sample_rows reads for one row."""
    if n_pen < 0 or top_k < 0:
        raise ValueError("negative penalty count or top_k")
    tp_m, tp_sh, wfloor, d_m, d_sh = sample_fixed_point(top_p, min_p, draw)
    return struct.pack(
        "<QQQffiiii", tp_m, wfloor, d_m, penalty, temperature, n_pen, top_k, tp_sh, d_sh
    )


def exact_fraction(f: float) -> tuple[int, int]:
    """(m, sh) with f == m * 2**-sh exactly, m < 2**53, sh >= 0, for 0 <= f < 2**53
    (the reduced form: m odd unless sh is 0)."""
    if f < 0 or not math.isfinite(f):
        raise ValueError(f"{f} is not a finite non-negative float")
    m, d = f.as_integer_ratio()  # reduced, d a power of two (a float is a dyadic fraction)
    return m, d.bit_length() - 1


def ceil_mul_pow2(f: float, bits: int) -> int:
    """ceil(f * 2**bits) exactly."""
    m, sh = exact_fraction(f)
    sh -= bits
    if sh <= 0:
        return m << (-sh)
    return -((-m) >> sh)
