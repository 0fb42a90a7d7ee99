"""Checked launch wrappers for the kernels (cuda_src/norm.cu, rope.cu, attention.cu,
activation.cu, elementwise.cu, sampling.cu).

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

from worker.backends.cuda.arena import DevBuf
from worker.errors import CudaError

F32 = 4
F16 = 2
ATTN_THREADS = 128  # attention.cu AT
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
ARGMAX_BLOCKS = 128
MAX_DYN_SMEM = 48 * 1024


class LaunchRefused(CudaError):
    """A launch whose arguments would read or write outside its buffers (never queued)."""

    def __init__(self, kernel: str, problem: str) -> None:
        super().__init__(f"{kernel}: launch refused: {problem}")
        self.kernel = kernel


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
        if self.n_split > ATTN_THREADS:
            raise LaunchRefused(kernel, f"n_split {self.n_split} > {ATTN_THREADS}")
        if self.head_dim > ATTN_THREADS or self.head_dim % 8:
            raise LaunchRefused(kernel, f"head_dim {self.head_dim} must be <= 128, % 8 == 0")
        if self.max_chunk * F32 > MAX_DYN_SMEM:
            raise LaunchRefused(kernel, f"chunk {self.max_chunk} exceeds shared memory")


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
    grid: tuple[int, int]
    shared: int


def check_attn_prefill_tc(
    *,
    q: DevBuf,
    q_stride: int,
    kcache: DevBuf,
    vcache: DevBuf,
    pos: DevBuf,
    out: DevBuf,
    out_stride: int,
    n_tokens: int,
    n_head: int,
    n_kv: int,
    head_dim: int,
    ctx: int,
    max_kv: int,
    window: int,
    sinks: DevBuf | None,
) -> TcLaunch:
    """Every check of a tensor-core prefill attention launch (pure: no GPU needed).
    max_kv: the host's bound on pos0 + n_tokens (the kernel reads keys up to it)."""
    k = "attn_prefill_tc"
    positive(k, n_tokens=n_tokens, n_head=n_head, n_kv=n_kv, head_dim=head_dim, ctx=ctx)
    if head_dim not in TC_HEAD_DIMS:
        raise LaunchRefused(k, f"head_dim {head_dim} has no kernel (have {TC_HEAD_DIMS})")
    if n_head % n_kv:
        raise LaunchRefused(k, f"n_head {n_head} not a multiple of {n_kv}")
    if n_head > 65535:
        raise LaunchRefused(k, f"n_head {n_head} > 65535 (grid y)")
    if not isinstance(window, int) or window < 0:
        raise LaunchRefused(k, f"window must be a non-negative int, got {window!r}")
    if max_kv > ctx:
        raise LaunchRefused(k, f"key length {max_kv} exceeds the cache ({ctx})")
    if max_kv < n_tokens:
        raise LaunchRefused(k, f"key length {max_kv} shorter than the {n_tokens} queries")
    width = n_head * head_dim
    if q_stride < width or out_stride < width:
        raise LaunchRefused(k, "row strides shorter than the rows")
    if q_stride % 2 or out_stride % 2:
        raise LaunchRefused(k, "row strides must be even (8-byte float2 accesses)")
    need(k, q, strided_extent(n_tokens, q_stride, width), "q", 8)
    need(k, out, strided_extent(n_tokens, out_stride, width), "out", 8)
    need(k, kcache, ctx * n_kv * head_dim * F16, "kcache", 16)
    need(k, vcache, ctx * n_kv * head_dim * F16, "vcache", 16)
    need(k, pos, 4, "pos")
    need(k, sinks, n_head * F32 if sinks is not None else 0, "sinks")
    grid = (-(-n_tokens // TC_BM), n_head)
    return TcLaunch(f"attn_prefill_tc_d{head_dim}", grid, attn_tc_smem_bytes(head_dim))


def attn_split_count(kv_len: int, max_split: int, min_chunk: int = 32) -> int:
    """Splits for a key length: enough parallelism, at least `min_chunk` keys each."""
    return max(1, min(max_split, math.ceil(kv_len / min_chunk)))


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
            ("norm", "rmsnorm_f32"): "PPPPif",
            ("norm", "layernorm_f32"): "PPPPPif",
            ("rope", "qkv_rope_store"): "PPPPPPPPPiiiiiiPfii",
            ("attention", "attn_split"): "PiPPPPPiiiiiifiPPiP",
            ("attention", "attn_decode_rope"): "PPPPPPiiiiifiPPPPfiii",
            **{("attention", f"attn_prefill_tc_d{d}"): "PiPPPiiifiPPi" for d in TC_HEAD_DIMS},
            ("activation", "swiglu_f32"): "PPPiiii",
            ("activation", "swiglu_oai_f32"): "PPPiiiiff",
            ("activation", "gelu_f32"): "PPi",
            ("elementwise", "add_f32"): "PPiii",
            ("elementwise", "add_pos_embd_f32"): "PPPii",
            ("elementwise", "topk_softmax_f32"): "PiiPP",
            ("elementwise", "moe_combine_f32"): "PPPii",
            ("elementwise", "rowdot_f32"): "PiPPP",
            ("sampling", "argmax_partial"): "PiPP",
            ("sampling", "argmax_final"): "PPiPP",
            ("sampling", "sample_full"): "PiPiffiQiQQiPPPP",
            ("sampling", "sample_dev"): "PiPPPPPPP",
        }
        from worker.backends.cuda.matmul import _prefer_shared

        self.fn: dict[str, Any] = {}
        for (mod, name), s in sig.items():
            f = self.mods[mod].get_function(name)
            f.prepare(s)
            # the same shared-memory carveout as every matmul kernel: where two kernels in a
            # row ask for different carveouts, each SM drains and reconfigures between them
            # (~150 such switches per Qwen decode step cost ~190 us, docs/kernels.md)
            _prefer_shared(f)
            self.fn[name] = f
        from worker.backends.cuda.matmul import _allow_dynamic_shared

        for d in TC_HEAD_DIMS:
            nb = attn_tc_smem_bytes(d)
            if nb > MAX_DYN_SMEM:
                name = f"attn_prefill_tc_d{d}"
                _allow_dynamic_shared(self.fn[name], name, nb)

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
    ) -> None:
        k = "rmsnorm_f32"
        positive(k, rows=rows, n=n)
        nb = rows * n * F32
        need(k, x, nb, "x")
        need(k, out, nb, "out")
        need(k, delta, nb if delta is not None else 0, "delta")
        need(k, w, n * F32 if w is not None else 0, "weight")
        self.launch(
            k, (rows,), (256 if n <= 2048 else 1024,), x.ptr, ptr(delta), ptr(w), out.ptr, n, eps
        )

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
        ctx: int,
        max_pos: int,
    ) -> None:
        """max_pos: the host's bound on pos0 + n_tokens (checked against ctx)."""
        kn = "qkv_rope_store"
        positive(kn, n_tokens=n_tokens, n_head=n_head, n_kv=n_kv, head_dim=head_dim, ctx=ctx)
        if head_dim > 256 or n_rot > head_dim or n_rot % 2 or n_rot < 0:
            raise LaunchRefused(kn, f"head_dim {head_dim} / n_rot {n_rot} unsupported")
        if mode not in (0, 1, 2):
            raise LaunchRefused(kn, f"mode {mode}")
        if max_pos > ctx:
            raise LaunchRefused(kn, f"positions up to {max_pos} exceed the cache ({ctx})")
        if q_stride < n_head * head_dim or kv_stride < n_kv * head_dim:
            raise LaunchRefused(kn, "row strides shorter than the rows")
        need(kn, q, strided_extent(n_tokens, q_stride, n_head * head_dim), "q")
        need(kn, k, strided_extent(n_tokens, kv_stride, n_kv * head_dim), "k")
        need(kn, v, strided_extent(n_tokens, kv_stride, n_kv * head_dim), "v")
        need(kn, bq, n_head * head_dim * F32 if bq is not None else 0, "bq")
        need(kn, bk, n_kv * head_dim * F32 if bk is not None else 0, "bk")
        need(kn, bv, n_kv * head_dim * F32 if bv is not None else 0, "bv")
        need(kn, kcache, ctx * n_kv * head_dim * F16, "kcache", 16)
        need(kn, vcache, ctx * n_kv * head_dim * F16, "vcache", 16)
        need(kn, pos, 4, "pos")
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
            n_head,
            n_kv,
            head_dim,
            n_rot,
            q_stride,
            kv_stride,
            inv_freq.ptr,
            mscale,
            mode,
            ctx,
        )

    # ------------------------------------------------------------------ attention

    def attention(
        self,
        *,
        q: DevBuf,
        q_stride: int,
        kcache: DevBuf,
        vcache: DevBuf,
        opart: DevBuf,
        ml: DevBuf,
        pos: DevBuf,
        out: DevBuf,
        out_stride: int,
        tickets: DevBuf,
        shape: AttnShape,
        ctx: int,
        max_kv: int,
        scale: float,
        window: int = 0,
        sinks: DevBuf | None = None,
    ) -> None:
        """max_kv: the host's bound on pos0 + n_tokens (the longest key length).
        tickets: n_tokens * n_head zeroed uint32 (the kernel leaves them zeroed)."""
        k = "attn_split"
        s = shape
        s.check(k)
        if max_kv > ctx:
            raise LaunchRefused(k, f"key length {max_kv} exceeds the cache ({ctx})")
        if s.max_chunk * s.n_split < max_kv:
            raise LaunchRefused(k, f"{s.n_split} chunks of {s.max_chunk} < {max_kv} keys")
        need(k, q, strided_extent(s.n_tokens, q_stride, s.n_head * s.head_dim), "q")
        need(k, kcache, ctx * s.n_kv * s.head_dim * F16, "kcache", 16)
        need(k, vcache, ctx * s.n_kv * s.head_dim * F16, "vcache", 16)
        parts = s.n_tokens * s.n_head * s.n_split
        need(k, opart, parts * s.head_dim * F32, "opart")
        need(k, ml, parts * 2 * F32, "ml")
        need(k, pos, 4, "pos")
        need(k, out, strided_extent(s.n_tokens, out_stride, s.n_head * s.head_dim), "out")
        need(k, sinks, s.n_head * F32 if sinks is not None else 0, "sinks")
        need(k, tickets, s.n_tokens * s.n_head * 4, "tickets")
        self.launch(
            k,
            (s.n_split, s.n_head, s.n_tokens),
            (ATTN_THREADS,),
            q.ptr,
            q_stride,
            kcache.ptr,
            vcache.ptr,
            opart.ptr,
            ml.ptr,
            pos.ptr,
            s.n_tokens,
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
            shared=s.max_chunk * F32,
        )

    def attention_prefill_tc(
        self,
        *,
        q: DevBuf,
        q_stride: int,
        kcache: DevBuf,
        vcache: DevBuf,
        pos: DevBuf,
        out: DevBuf,
        out_stride: int,
        n_tokens: int,
        n_head: int,
        n_kv: int,
        head_dim: int,
        ctx: int,
        max_kv: int,
        scale: float,
        window: int = 0,
        sinks: DevBuf | None = None,
    ) -> None:
        """Prefill attention on the tensor cores (attn_prefill_tc_d<head_dim>): the same
        function and output layout as `attention` (attn_split) with FP16 Q and P (see
        docs/kernels.md, attention); no workspace, no tickets. max_kv: bound on pos0 + n_tokens."""
        t = check_attn_prefill_tc(
            q=q,
            q_stride=q_stride,
            kcache=kcache,
            vcache=vcache,
            pos=pos,
            out=out,
            out_stride=out_stride,
            n_tokens=n_tokens,
            n_head=n_head,
            n_kv=n_kv,
            head_dim=head_dim,
            ctx=ctx,
            max_kv=max_kv,
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
            pos.ptr,
            n_tokens,
            n_head,
            n_kv,
            scale * LOG2E,
            window,
            ptr(sinks),
            out.ptr,
            out_stride,
            shared=t.shared,
        )

    def attention_decode_rope(
        self,
        *,
        qkv: DevBuf,
        kcache: DevBuf,
        vcache: DevBuf,
        opart: DevBuf,
        ml: DevBuf,
        pos: DevBuf,
        out: DevBuf,
        tickets: DevBuf,
        shape: AttnShape,
        ctx: int,
        scale: float,
        inv_freq: DevBuf,
        mscale: float,
        mode: int,
        n_rot: int,
        window: int = 0,
        sinks: DevBuf | None = None,
    ) -> None:
        """One decode token: RoPE + KV store + attention in one launch (attn_decode_rope).
        qkv: the token's raw [q | k | v]; positions up to ctx - 1 (the kernel writes nothing
        for a position at or past ctx; the caller checks first)."""
        k = "attn_decode_rope"
        s = shape
        s.check(k)
        if s.n_tokens != 1:
            raise LaunchRefused(k, "decode only (one token)")
        if s.max_chunk * s.n_split < ctx:
            raise LaunchRefused(k, f"{s.n_split} chunks of {s.max_chunk} < {ctx} keys")
        if mode not in (0, 1, 2) or n_rot > s.head_dim or n_rot % 2 or n_rot < 0:
            raise LaunchRefused(k, f"rope mode {mode} / n_rot {n_rot}")
        width = (s.n_head + 2 * s.n_kv) * s.head_dim
        need(k, qkv, width * F32, "qkv")
        need(k, kcache, ctx * s.n_kv * s.head_dim * F16, "kcache", 16)
        need(k, vcache, ctx * s.n_kv * s.head_dim * F16, "vcache", 16)
        need(k, opart, s.n_head * s.n_split * s.head_dim * F32, "opart")
        need(k, ml, s.n_head * s.n_split * 2 * F32, "ml")
        need(k, pos, 4, "pos")
        need(k, out, s.n_head * s.head_dim * F32, "out")
        need(k, tickets, s.n_head * 4, "tickets")
        need(k, sinks, s.n_head * F32 if sinks is not None else 0, "sinks")
        need(k, inv_freq, (n_rot // 2) * 8 if mode else 0, "inv_freq", 8)
        self.launch(
            k,
            (s.n_split, s.n_head),
            (ATTN_THREADS,),
            qkv.ptr,
            kcache.ptr,
            vcache.ptr,
            opart.ptr,
            ml.ptr,
            pos.ptr,
            s.n_head,
            s.n_kv,
            s.head_dim,
            s.n_split,
            s.max_chunk,
            scale,
            window,
            ptr(sinks),
            out.ptr,
            tickets.ptr,
            inv_freq.ptr,
            mscale,
            mode,
            n_rot,
            ctx,
            shared=s.max_chunk * F32,
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
    ) -> None:
        k = "swiglu_oai_f32" if oai else "swiglu_f32"
        positive(k, rows=rows, n=n)
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
            self.launch(
                k, grid, (256,), gate.ptr, up.ptr, out.ptr, n, gate_stride, up_stride, out_stride
            )

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
        self, x: DevBuf, table: DevBuf, pos: DevBuf, rows: int, n: int, n_pos: int, max_pos: int
    ) -> None:
        k = "add_pos_embd_f32"
        positive(k, rows=rows, n=n, n_pos=n_pos)
        if max_pos > n_pos:
            raise LaunchRefused(k, f"position {max_pos} past the table ({n_pos})")
        need(k, x, rows * n * F32, "x")
        need(k, table, n_pos * n * F32, "table")
        need(k, pos, 4, "pos")
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

    def rowdot(
        self, w: DevBuf, rows: int, k: int, x: DevBuf, bias: DevBuf | None, y: DevBuf
    ) -> None:
        """y[r] = w[r] . x (+ bias[r]) for r < rows: an F32 matrix [rows][k], one token
        (the gpt-oss router; elementwise.cu rowdot_f32)."""
        kn = "rowdot_f32"
        positive(kn, rows=rows, k=k)
        if k % 4:
            raise LaunchRefused(kn, f"k {k} not a multiple of 4")
        need(kn, w, rows * k * F32, "w", 16)
        need(kn, x, k * F32, "x", 16)
        need(kn, bias, rows * F32 if bias is not None else 0, "bias")
        need(kn, y, rows * F32, "y")
        self.launch(kn, (rows,), (256,), w.ptr, k, x.ptr, ptr(bias), y.ptr)

    def moe_combine(self, x: DevBuf, y: DevBuf, w: DevBuf, rows: int, n: int, k: int) -> None:
        """x[t] += sum_s w[t, s] * y[t*k + s] (slots in order)."""
        kn = "moe_combine_f32"
        positive(kn, rows=rows, n=n, k=k)
        need(kn, x, rows * n * F32, "x")
        need(kn, y, rows * k * n * F32, "y")
        need(kn, w, rows * k * F32, "w")
        self.launch(kn, ((n + 255) // 256, rows), (256,), x.ptr, y.ptr, w.ptr, n, k)

    # ------------------------------------------------------------------ sampling

    def argmax(
        self,
        x: DevBuf,
        n: int,
        part_v: DevBuf,
        part_i: DevBuf,
        out: DevBuf,
        io: DevBuf | None = None,
    ) -> None:
        """out[0] = argmax(x[:n]) (ties: lowest index). io: a decode step's [position, token]
        (int32), advanced on the device to [position + 1, the id] (chained greedy steps)."""
        positive("argmax_partial", n=n)
        need("argmax_final", io, 8 if io is not None else 0, "io")
        need("argmax_partial", x, n * F32, "x")
        need("argmax_partial", part_v, ARGMAX_BLOCKS * F32, "part_v")
        need("argmax_partial", part_i, ARGMAX_BLOCKS * 4, "part_i")
        need("argmax_final", out, 4, "out")
        self.launch("argmax_partial", (ARGMAX_BLOCKS,), (256,), x.ptr, n, part_v.ptr, part_i.ptr)
        self.launch(
            "argmax_final", (1,), (128,), part_v.ptr, part_i.ptr, ARGMAX_BLOCKS, out.ptr, ptr(io)
        )

    def sample_full(
        self,
        *,
        logits: DevBuf,
        n: int,
        pen_ids: DevBuf,
        n_pen: int,
        penalty: float,
        temperature: float,
        top_k: int,
        top_p: float,
        min_p: float,
        draw: float,
        xbuf: DevBuf,
        out: DevBuf,
        gscratch: DevBuf,
        barrier: DevBuf,
    ) -> None:
        """barrier: two zeroed uint32 (left consistent for the next launch)."""
        k = "sample_full"
        if n_pen < 0:
            raise LaunchRefused(k, "negative penalty count")
        need(k, pen_ids, n_pen * 4, "pen_ids")
        grid = self._sampler_grid(k, n, logits, xbuf, out, gscratch, barrier)
        tp_m, tp_sh, wfloor, d_m, d_sh = sample_fixed_point(top_p, min_p, draw)
        self.launch(
            k,
            (grid,),
            (SAMPLE_THREADS,),
            logits.ptr,
            n,
            pen_ids.ptr,
            n_pen,
            penalty,
            temperature,
            top_k,
            tp_m,
            tp_sh,
            wfloor,
            d_m,
            d_sh,
            xbuf.ptr,
            out.ptr,
            gscratch.ptr,
            barrier.ptr,
        )

    def _sampler_grid(
        self, k: str, n: int, logits: DevBuf, xbuf: DevBuf, out: DevBuf, gs: DevBuf, bar: DevBuf
    ) -> int:
        """The checks sample_full and sample_dev share; their grid (co-resident blocks)."""
        positive(k, n=n)
        need(k, logits, n * F32, "logits")
        need(k, xbuf, n * F32, "xbuf")
        need(k, out, 8, "out")
        need(k, gs, SAMPLE_SCRATCH_BYTES, "gscratch", 16)
        need(k, bar, 8, "barrier")
        return min(SAMPLE_GRID, self.ctx.facts.multiprocessors)

    def sample_dev(
        self,
        *,
        logits: DevBuf,
        n: int,
        pen_ids: DevBuf,
        args: DevBuf,
        xbuf: DevBuf,
        out: DevBuf,
        gscratch: DevBuf,
        barrier: DevBuf,
        io: DevBuf | None,
    ) -> None:
        """sample_full with its settings in device memory (`args`: SAMPLE_ARGS_BYTES written
        from sample_args()), so a captured graph can end with it; io as for argmax."""
        k = "sample_dev"
        need(k, args, SAMPLE_ARGS_BYTES, "args", 8)
        need(k, io, 8 if io is not None else 0, "io")
        grid = self._sampler_grid(k, n, logits, xbuf, out, gscratch, barrier)
        self.launch(
            k,
            (grid,),
            (SAMPLE_THREADS,),
            logits.ptr,
            n,
            pen_ids.ptr,
            args.ptr,
            xbuf.ptr,
            out.ptr,
            gscratch.ptr,
            barrier.ptr,
            ptr(io),
        )


# sample_dev's SampleArgs (cuda_src/sampling.cu): top_p_m, wfloor, draw_m (u64), pen,
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
    """The SAMPLE_ARGS_BYTES that sample_dev reads: the same values sample_full is passed."""
    if n_pen < 0 or top_k < 0:
        raise ValueError("negative penalty count or top_k")
    tp_m, tp_sh, wfloor, d_m, d_sh = sample_fixed_point(top_p, min_p, draw)
    return struct.pack(
        "<QQQffiiii", tp_m, wfloor, d_m, penalty, temperature, n_pen, top_k, tp_sh, d_sh
    )


def exact_fraction(f: float) -> tuple[int, int]:
    """(m, sh) with f == m * 2**-sh exactly, m < 2**53, sh >= 0, for 0 <= f < 2**53."""
    if f < 0 or not math.isfinite(f):
        raise ValueError(f"{f} is not a finite non-negative float")
    if f == 0.0:
        return 0, 0
    mant, exp = math.frexp(f)  # f = mant * 2**exp, 0.5 <= mant < 1
    m = int(mant * (1 << 53))
    sh = 53 - exp
    while sh > 0 and m % 2 == 0:
        m //= 2
        sh -= 1
    if sh < 0:
        return m << (-sh), 0
    return m, sh


def ceil_mul_pow2(f: float, bits: int) -> int:
    """ceil(f * 2**bits) exactly."""
    m, sh = exact_fraction(f)
    sh -= bits
    if sh <= 0:
        return m << (-sh)
    return -((-m) >> sh)
