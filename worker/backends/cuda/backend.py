"""CudaBackend: the Backend protocol on one NVIDIA GPU (docs/design.md).

Startup: one context (context.py), the model's tensors in one 256-byte-aligned arena
(quantized as stored; only 1-D vectors that are not F32 are widened to F32), loaded through
pinned double-buffered staging (loader.py), an FP16 KV cache sized from the context size and
capped to what fits, and fixed scratch buffers. Nothing is allocated per job.

Per step: the per-architecture layer recipe over the matrix kernels (matmul.py) and the
other kernels (kernels.py). Everything that changes per step (the token ids, the position) lives
in device memory, so one CUDA graph captured for a one-token step replays for every decode
step; prefill runs eagerly in chunks of `ubatch` tokens.

Must be created and used on one thread (the one that owns the context).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from worker.backends.base import BackendInfo, ResidencyReport
from worker.backends.cuda.arena import MIB, DevBuf, align_up, kv_bytes_per_token, plan_arena
from worker.backends.cuda.kernels import (
    ARGMAX_BLOCKS,
    SAMPLE_ARGS_BYTES,
    SAMPLE_SCRATCH_BYTES,
    TC_HEAD_DIMS,
    AttnShape,
    Kernels,
    attn_split_count,
    sample_args,
)
from worker.engine.params import SamplingParams
from worker.errors import (
    ContextLengthExceeded,
    CudaError,
    ErrorCode,
    InsufficientVram,
    ModelLoadError,
    WorkerError,
)
from worker.gguf.hparams import HParams, load_hparams
from worker.gguf.reader import GGUFFile, open_gguf

F32_TYPE = 0
DECODE_SPLITS = 16  # attention key chunks per head for a decode step (fixed in the graph)
PREFILL_MAX_SPLITS = 16
# Prefill attention (more than one token): "tc" = attn_prefill_tc, the tensor-core kernel
# (docs/kernels.md, attention), where the head dim has one, else attn_split; "split" = attn_split
# always (the previous path; A/B). Decode steps always use attn_split / attn_decode_rope.
PREFILL_ATTN = os.environ.get("WORKER_ORCD_PREFILL_ATTN", "tc")
# tc's critical path is one block streaming every key tile of its rows, attn_split spreads
# the keys over up to 16 splits: a short chunk far into the context stays on attn_split when
# it has few (query row, head) pairs. Measured at 4096 keys (H100, docs/kernels.md, "Lead"):
# Qwen (14 heads) 4 tokens split 34 us / tc 64, 16 tokens split 95 / tc 64; Phi-3 (32
# heads) and GPT-OSS (64) 4 tokens split 145 / 107 us, tc 83 / 64.
TC_MIN_ROWS = 128  # tokens x query heads
TC_SHORT_KV = 1024
# One-token steps with RoPE + KV store inside the attention launch: bit-identical logits to
# the two-launch path, 909 vs 874-897 tok/s on an H100 (BENCHMARKS.md, GPU section).
FUSED_DECODE = True
# Greedy one-token steps: queue the next step behind the current one before reading its id
# (the argmax advances [position, token] on the device), so that the GPU never waits for the
# host's read-back, return and next launch. WORKER_ORCD_SPEC_DECODE=0 turns it off (A/B).
SPEC_DECODE = os.environ.get("WORKER_ORCD_SPEC_DECODE", "1") != "0"
LOGIT_ROWS = 64  # rows of logits computed per pass when all positions are wanted
RESERVE_BYTES = 256 * MIB  # left free for the driver, graphs and PyCUDA's own needs
ROPE_MODE = {"none": 0, "normal": 1, "neox": 2}

Buf = tuple[int, int]  # (ptr, nbytes) as matmul.py takes it


def _sampler(params: SamplingParams) -> dict[str, Any]:
    """The settings sample_full / sample_args take from a job's SamplingParams (float32
    penalty and temperature, as the reference sampler uses them)."""
    return {
        "penalty": float(np.float32(params.repetition_penalty)),
        "temperature": float(np.float32(params.temperature)),
        "top_k": params.top_k,
        "top_p": params.top_p,
        "min_p": params.min_p,
    }


def _b(d: DevBuf) -> Buf:
    return (d.ptr, d.nbytes)


def rope_inv_freq(hp: HParams, factors: np.ndarray | None) -> tuple[np.ndarray, float]:
    """Per-pair angle rate (float64) with base, factors, linear / YaRN scaling folded in,
    and the cos/sin magnitude; the same function as worker.models.common.rope_angles."""
    rope = hp.rope
    half = rope.n_dims // 2
    i = np.arange(half, dtype=np.float64)
    inv = rope.theta ** (-2.0 * i / rope.n_dims)
    if factors is not None:
        inv = inv / factors.astype(np.float64)[:half]
    mscale = rope.yarn_attn_factor
    if rope.scaling == "linear":
        inv = inv * rope.freq_scale
    elif rope.scaling == "yarn":
        fs = rope.freq_scale
        if rope.yarn_ext_factor != 0.0:
            from worker.models.common import _yarn_corr_dim

            lo = _yarn_corr_dim(rope.n_dims, rope.orig_ctx, rope.yarn_beta_fast, rope.theta)
            hi = _yarn_corr_dim(rope.n_dims, rope.orig_ctx, rope.yarn_beta_slow, rope.theta)
            if rope.yarn_truncate:
                lo, hi = math.floor(lo), math.ceil(hi)
            lo, hi = max(0.0, lo), min(rope.n_dims - 1.0, hi)
            y = (i - lo) / max(0.001, hi - lo)
            mix = (1.0 - np.clip(y, 0.0, 1.0)) * rope.yarn_ext_factor
            inv = inv * (fs * (1.0 - mix) + mix)
        else:
            inv = inv * fs
        mscale = rope.yarn_mscale
    return inv.astype(np.float64), float(mscale)


_GROUPS = (("attn_q", "attn_k", "attn_v"), ("ffn_gate", "ffn_up"))


def arena_order(names: list[str]) -> list[str]:
    """File order, except that each layer's q/k/v (and gate/up) weights, and separately
    their biases, are placed one after another so that one launch can cover them."""
    present = set(names)
    done: set[str] = set()
    order: list[str] = []
    for name in names:
        if name in done:
            continue
        parts = name.split(".")
        group: list[str] = [name]
        if len(parts) == 4 and parts[0] == "blk":
            for g in _GROUPS:
                if parts[2] in g:
                    group = [f"blk.{parts[1]}.{m}.{parts[3]}" for m in g]
                    group = [m for m in group if m in present]
                    break
        for m in group:
            if m not in done:
                done.add(m)
                order.append(m)
    return order


@dataclass(frozen=True, slots=True)
class _W:
    """A weight matrix in the arena, in matmul.py's terms."""

    ptr: int
    qtype: int
    rows: int
    cols: int
    nbytes: int


class CudaBackend:
    """See the module docstring. `model`: a path or an open GGUFFile."""

    def __init__(
        self,
        model: str | os.PathLike[str] | GGUFFile,
        *,
        ctx_size: int | None = None,
        kv_cache_size_mb: int | None = None,
        gpu_device: int = 0,
        h2d_chunk_mb: float = 1.0,
        progress: Callable[[float], None] | None = None,
        ubatch: int = 512,
        graphs: bool = True,
        sync_each: bool = False,
    ) -> None:
        self._owns_file = not isinstance(model, GGUFFile)
        self.gf: GGUFFile = model if isinstance(model, GGUFFile) else open_gguf(Path(model))
        self.path = self.gf.path
        self.ctx: Any = None
        try:
            self._init(
                ctx_size,
                kv_cache_size_mb,
                gpu_device,
                h2d_chunk_mb,
                progress,
                ubatch,
                graphs,
                sync_each,
            )
        except BaseException:
            self.close()
            raise

    # ================================================================== startup

    def _init(
        self,
        ctx_size: int | None,
        kv_cache_size_mb: int | None,
        gpu_device: int,
        h2d_chunk_mb: float,
        progress: Callable[[float], None] | None,
        ubatch: int,
        graphs: bool,
        sync_each: bool,
    ) -> None:
        from worker.backends.cuda.context import CudaContext
        from worker.backends.cuda.loader import upload
        from worker.backends.cuda.matmul import MOE_PAIR, MatmulKernels

        t_start = time.perf_counter()
        hp = load_hparams(self.gf)
        self.hp = hp
        if hp.arch not in ("qwen2", "llama", "phi3", "gpt2", "gpt-oss"):
            raise ModelLoadError(
                self.path, f"architecture {hp.arch!r} is not on the CUDA backend yet"
            )
        if hp.head_dim != hp.head_dim_v:
            raise ModelLoadError(self.path, "head_dim_v != head_dim is not supported")
        self.ubatch = max(1, ubatch)
        self.decode_splits = DECODE_SPLITS
        self.fused_decode = FUSED_DECODE
        self.prefill_attn = PREFILL_ATTN  # "tc" | "split" (read at every enqueue)
        self.moe_pair = MOE_PAIR  # MoE decode: gate and up in one launch
        self.use_graphs = graphs
        self.ctx = ctx = CudaContext(gpu_device)
        t_k = time.perf_counter()
        self.k = Kernels(ctx, sync_each=sync_each)
        self.mm = MatmulKernels(ctx.facts.arch)
        self.kernel_load_s = time.perf_counter() - t_k

        # ---- what goes into the arena (matrices that one launch can cover placed adjacently)
        sources: dict[str, np.ndarray] = {}
        self.qtypes: dict[str, int] = {}
        for name in arena_order(list(self.gf.tensors)):
            ti = self.gf.tensors[name]
            widen = ti.ggml_type != F32_TYPE and (
                len(ti.shape) == 1 or name == "position_embd.weight"
            )
            if widen:
                arr = np.ascontiguousarray(self.gf.dequantize(name), dtype=np.float32)
                sources[name] = arr.reshape(-1).view(np.uint8)
                self.qtypes[name] = F32_TYPE
            else:
                sources[name] = self.gf.raw(name)
                self.qtypes[name] = int(ti.ggml_type)
        # rope angle table (float64) as one more arena entry
        factors = self._rope_factors(ctx_size)
        inv, self.rope_mscale = rope_inv_freq(hp, factors)
        if hp.rope.type != "none":
            sources["__rope_inv_freq"] = inv.view(np.uint8)
        plan = plan_arena((n, a.nbytes) for n, a in sources.items())
        self.plan = plan

        # ---- scratch
        E, V = hp.n_embd, hp.n_vocab
        B = self.ubatch
        self.qkv_dim = hp.q_dim + 2 * hp.kv_dim
        ff = hp.n_ff
        scratch_items = [
            ("x", B * E * 4),
            ("xn", B * E * 4),
            ("qkv", B * self.qkv_dim * 4),
            ("attn", B * hp.q_dim * 4),
            ("gu", B * 2 * ff * 4),
            ("act", B * ff * 4),
            ("logits", max(LOGIT_ROWS, 1) * V * 4),
            ("router", B * max(1, hp.n_expert) * 4),
            ("eidx", B * max(1, hp.n_expert_used) * 4),
            ("ew", B * max(1, hp.n_expert_used) * 4),
            ("eg", B * hp.n_expert_used * hp.n_ff_exp * 4),
            ("eu", B * hp.n_expert_used * hp.n_ff_exp * 4),
            ("ed", B * hp.n_expert_used * E * 4),
            ("xbuf", V * 4),
            ("gscratch", SAMPLE_SCRATCH_BYTES),
            ("barrier", 8),
            ("sargs", SAMPLE_ARGS_BYTES),  # sample_dev's settings for the sampled graph
            ("opart", max(B * PREFILL_MAX_SPLITS, DECODE_SPLITS) * hp.n_head * hp.head_dim * 4),
            ("ml", max(B * PREFILL_MAX_SPLITS, DECODE_SPLITS) * hp.n_head * 2 * 4),
            ("io", (B + 1) * 4),  # [position, token ids...]: one copy per decode step
            ("tickets", B * hp.n_head * 4),
            ("argv", ARGMAX_BLOCKS * 4),
            ("argi", ARGMAX_BLOCKS * 4),
            ("out", 256),
        ]
        splan = plan_arena(scratch_items)

        # ---- VRAM budget and context length
        per_tok = kv_bytes_per_token(hp.n_layer, hp.n_head_kv, hp.head_dim, hp.head_dim_v)
        pen_per_tok = 4  # repetition-penalty id list
        free, total = ctx.mem_info()
        fixed = plan.total + splan.total
        want = ctx_size if ctx_size is not None else hp.n_ctx_train
        if kv_cache_size_mb is not None:
            want = min(want, kv_cache_size_mb * MIB // per_tok)
        room = free - fixed - RESERVE_BYTES
        n_ctx = min(want, max(0, room // (per_tok + pen_per_tok)))
        min_ctx = min(want, 16)
        if n_ctx < min_ctx or n_ctx <= 0:
            need = fixed + RESERVE_BYTES + min_ctx * (per_tok + pen_per_tok)
            raise InsufficientVram(
                f"model {self.path} needs {need} bytes of VRAM on GPU {gpu_device} "
                f"(weights {plan.total}, scratch {splan.total}, KV for {min_ctx} tokens, "
                f"reserve {RESERVE_BYTES}) but {free} bytes are free"
            )
        self.context_length = int(n_ctx)
        self.vocab_size = V

        # ---- allocate and load
        self.arena = ctx.alloc(plan.total, "weights arena")
        self.load_stats = upload(
            ctx,
            self.arena,
            plan,
            sources,
            chunk_bytes=max(1, int(h2d_chunk_mb * MIB)),
            progress=progress,
        )
        kv_layer = self.context_length * hp.n_head_kv * hp.head_dim * 2
        self.kv = ctx.alloc(align_up(kv_layer) * 2 * hp.n_layer, "KV cache")
        self.kv_layer_bytes = align_up(kv_layer)
        self.scratch = ctx.alloc(splan.total, "scratch")
        self.pen = ctx.alloc(self.context_length * 4, "penalty ids")
        self.s = {n: self.scratch.view(splan.offsets[n], splan.sizes[n], n) for n in splan.offsets}
        self.s["pos"] = self.s["io"].view(0, 4, "pos")
        self.s["ids"] = self.s["io"].view(4, B * 4, "ids")
        ctx.htod(self.s["tickets"], np.zeros(B * hp.n_head, np.uint32))
        ctx.htod(self.s["barrier"], np.zeros(2, np.uint32))
        self._qkv_plan = [
            self._group(self._qkv_names(il), hp.q_dim, hp.kv_dim) for il in range(hp.n_layer)
        ]
        self._gu_plan = [self._group(self._gu_names(il), ff, ff) for il in range(hp.n_layer)]
        self._host_pos = ctx.drv.pagelocked_empty(2, np.int32)
        self._io_done = ctx.drv.Event()
        self._io_done.record(ctx.stream)
        self._host_out = ctx.drv.pagelocked_empty(2, np.int32)
        # speculative greedy steps: two read-back slots, each with its own event
        self.spec_decode = SPEC_DECODE and graphs
        self._spec_out = [ctx.drv.pagelocked_empty(2, np.int32) for _ in range(2)]
        self._spec_done = [ctx.drv.Event() for _ in range(2)]
        self._sargs_host = [ctx.drv.pagelocked_empty(SAMPLE_ARGS_BYTES, np.uint8) for _ in range(2)]
        self._spec_slot = 0
        # a queued step: (position, the token it decodes, its slot, (params, draw) when
        # sampled / None when greedy); the token is the id the step before it returned
        self._spec: tuple[int, int, int, tuple[SamplingParams, float] | None] | None = None
        self._n_past = 0
        self._graphs: dict[str, Any] = {}
        # (layer, expert ids [n, k]) per MoE layer run, in order, while a test traces the
        # routing (trace_routing; eager launches only: a graph replay runs no Python)
        self.route_trace: list[tuple[int, np.ndarray]] | None = None
        self.pdl: bool | None = None  # set_pdl
        self.pdl_edges = (0, 0)  # programmatic / all edges of the last captured graph
        self.load_seconds = time.perf_counter() - t_start

        resid = self.check_residency()
        self.info = BackendInfo(
            device="cuda",
            resident=resid.ok,
            gpu_device=gpu_device,
            gpu_name=ctx.facts.name,
            sm=ctx.facts.sm,
            cuda_runtime_version=ctx.facts.driver_version,
            vram_total_bytes=total,
            vram_bytes_used=ctx.used_bytes,
        )
        if not resid.ok:
            raise CudaError(f"residency check failed at load: {resid.failures[:3]}")

    def _rope_factors(self, ctx_size: int | None) -> np.ndarray | None:
        t = self.gf.tensors
        hp = self.hp
        n_ctx = ctx_size if ctx_size is not None else min(hp.n_ctx_train, 4096)
        if hp.arch == "phi3":
            long_, short = "rope_factors_long.weight" in t, "rope_factors_short.weight" in t
            if long_ and (n_ctx > hp.rope.orig_ctx or not short):
                return self.gf.dequantize("rope_factors_long.weight").reshape(-1)
            if short:
                return self.gf.dequantize("rope_factors_short.weight").reshape(-1)
        if "rope_freqs.weight" in t:
            return self.gf.dequantize("rope_freqs.weight").reshape(-1)
        return None

    # ================================================================== tensors

    def _t(self, name: str) -> DevBuf:
        return self.arena.view(self.plan.offsets[name], self.plan.sizes[name], name)

    def _opt(self, name: str) -> Buf | None:
        return _b(self._t(name)) if name in self.plan.offsets else None

    def _w(self, name: str) -> _W:
        ti = self.gf.tensors[name]
        rows = 1
        for d in ti.shape[1:]:
            rows *= d
        return _W(
            self.arena.ptr + self.plan.offsets[name],
            self.qtypes[name],
            rows,
            ti.shape[0],
            self.plan.sizes[name],
        )

    def _kv(self, layer: int) -> tuple[DevBuf, DevBuf]:
        base = 2 * layer * self.kv_layer_bytes
        kb = self.kv.view(base, self.kv_layer_bytes, f"K[{layer}]")
        vb = self.kv.view(base + self.kv_layer_bytes, self.kv_layer_bytes, f"V[{layer}]")
        return kb, vb

    def _rows(self, name: str, row0: int, row_elems: int) -> Buf:
        """(ptr, bytes to the end) of scratch buffer `name` from row row0."""
        d = self.s[name]
        off = row0 * row_elems * 4
        return (d.ptr + off, d.nbytes - off)

    def _lin(
        self,
        wname: str,
        x: Buf,
        y: Buf,
        n: int,
        *,
        ldx: int | None = None,
        ldy: int | None = None,
        residual: Buf | None = None,
        bias: str | None = None,
    ) -> None:
        from worker.backends.cuda.matmul import QWeight

        w = self._w(wname)
        qw = QWeight(ptr=w.ptr, qtype=w.qtype, rows=w.rows, cols=w.cols, nbytes=w.nbytes)
        b = self._opt(bias) if bias else None
        self.mm.linear(
            qw, x, y, n, stream=self.ctx.stream, bias=b, residual=residual, ldx=ldx, ldy=ldy
        )
        if self.k.sync_each:
            self.ctx.sync(f"matmul {wname}")

    def _qkv_names(self, il: int) -> list[str]:
        p = f"blk.{il}"
        if f"{p}.attn_qkv.weight" in self.plan.offsets:
            return [f"{p}.attn_qkv"]
        return [f"{p}.attn_q", f"{p}.attn_k", f"{p}.attn_v"]

    def _gu_names(self, il: int) -> list[str]:
        p = f"blk.{il}"
        if f"{p}.ffn_gate.weight" in self.plan.offsets:
            return [f"{p}.ffn_gate", f"{p}.ffn_up"]
        if self.hp.arch in ("gpt2", "gpt-oss"):
            return []
        return [f"{p}.ffn_up"]

    def _group(self, prefixes: list[str], first_cols: int, other_cols: int) -> list[Any]:
        """Launch plan for projections whose outputs sit side by side in one row: adjacent
        matrices of one type and width (and their biases, if all have adjacent ones) become
        one matrix with the rows of all. Returns (QWeight, bias, output column) per launch."""
        from worker.backends.cuda.matmul import QWeight

        out: list[Any] = []
        col = 0
        run: list[str] = []
        run_col = 0

        def flush() -> None:
            if not run:
                return
            ws = [self._w(f"{r}.weight") for r in run]
            qw = QWeight(
                ptr=ws[0].ptr,
                qtype=ws[0].qtype,
                rows=sum(w.rows for w in ws),
                cols=ws[0].cols,
                nbytes=sum(w.nbytes for w in ws),
            )
            bnames = [f"{r}.bias" for r in run]
            bias: Buf | None = None
            if bnames[0] in self.plan.offsets:
                b0 = self._t(bnames[0])
                bias = (b0.ptr, sum(self.plan.sizes[b] for b in bnames))
            out.append((qw, bias, run_col))

        def joins(prev: str, nxt: str) -> bool:
            a, b = self._w(f"{prev}.weight"), self._w(f"{nxt}.weight")
            if a.qtype != b.qtype or a.cols != b.cols or b.ptr != a.ptr + a.nbytes:
                return False
            ba, bb = f"{prev}.bias", f"{nxt}.bias"
            if (ba in self.plan.offsets) != (bb in self.plan.offsets):
                return False
            if ba in self.plan.offsets:
                return self._t(bb).ptr == self._t(ba).ptr + self.plan.sizes[ba]
            return True

        for i, pre in enumerate(prefixes):
            if run and joins(run[-1], pre):
                run.append(pre)
            else:
                flush()
                run, run_col = [pre], col
            col += first_cols if i == 0 else other_cols
        flush()
        return out

    def _mm_run(self, qw: Any, x: Buf, y: Buf, n: int, *, ldy: int, bias: Buf | None) -> None:
        self.mm.linear(qw, x, y, n, stream=self.ctx.stream, bias=bias, ldy=ldy)
        if self.k.sync_each:
            self.ctx.sync("matmul")

    def _norm(self, x: DevBuf, out: DevBuf, prefix: str, rows: int) -> None:
        hp = self.hp
        w = self._t(f"{prefix}.weight")
        if hp.norm == "rms":
            self.k.rmsnorm(x, w, out, rows, hp.n_embd, hp.norm_eps)
        else:
            bname = f"{prefix}.bias"
            b = self._t(bname) if bname in self.plan.offsets else None
            self.k.layernorm(x, w, b, out, rows, hp.n_embd, hp.norm_eps)

    # ================================================================== the recipe

    def _enqueue_layers(self, n: int, kv_max: int) -> None:
        """Queue embedding + every block for the n tokens in s['ids'] at position s['pos'].
        Leaves the final residual stream in s['x'] (rows 0..n-1). kv_max: pos0 + n bound."""
        hp, k, s = self.hp, self.k, self.s
        E, QKV = hp.n_embd, self.qkv_dim
        from worker.backends.cuda.matmul import QWeight

        emb = self._w("token_embd.weight")
        self.mm.embed(
            QWeight(emb.ptr, emb.qtype, emb.rows, emb.cols, emb.nbytes),
            _b(s["ids"]),
            n,
            _b(s["x"]),
            stream=self.ctx.stream,
        )
        if hp.learned_pos:
            pe = self.gf.tensors["position_embd.weight"]
            k.add_pos_embd(
                s["x"], self._t("position_embd.weight"), s["pos"], n, E, pe.shape[1], kv_max
            )
        decode = n == 1
        if decode:
            n_split = self.decode_splits
            max_chunk = -(-self.context_length // n_split)
        else:
            n_split = attn_split_count(kv_max, PREFILL_MAX_SPLITS, 64)
            max_chunk = -(-kv_max // n_split)
        shape = AttnShape(n, hp.n_head, hp.n_head_kv, hp.head_dim, n_split, max_chunk)
        scale = 1.0 / math.sqrt(hp.head_dim)
        mode = ROPE_MODE[hp.rope.type]
        inv = self._t("__rope_inv_freq") if mode else s["pos"]
        qkv = s["qkv"]
        for il in range(hp.n_layer):
            p = f"blk.{il}"
            self._norm(s["x"], s["xn"], f"{p}.attn_norm", n)
            xn = _b(s["xn"])
            for qw, bias, col in self._qkv_plan[il]:
                y = (qkv.ptr + col * 4, qkv.nbytes - col * 4)
                self._mm_run(qw, xn, y, n, ldy=QKV, bias=bias)
            kc, vc = self._kv(il)
            window = hp.sliding_window if hp.is_swa(il) else 0
            sinks = self._t(f"{p}.attn_sinks.weight") if hp.has_sinks else None
            if decode and self.fused_decode:
                k.attention_decode_rope(
                    qkv=qkv,
                    kcache=kc,
                    vcache=vc,
                    opart=s["opart"],
                    ml=s["ml"],
                    pos=s["pos"],
                    out=s["attn"],
                    tickets=s["tickets"],
                    shape=shape,
                    ctx=self.context_length,
                    scale=scale,
                    inv_freq=inv,
                    mscale=self.rope_mscale,
                    mode=mode,
                    n_rot=hp.rope.n_dims if mode else 0,
                    window=window,
                    sinks=sinks,
                )
            else:
                self._rope_attention(il, n, kv_max, shape, scale, mode, inv, window, sinks)
            x = _b(s["x"])
            self._lin(
                f"{p}.attn_output.weight",
                _b(s["attn"]),
                x,
                n,
                residual=x,
                bias=f"{p}.attn_output.bias",
            )
            if hp.arch == "gpt-oss":
                self._norm(s["x"], s["xn"], f"{p}.post_attention_norm", n)
                self._moe(il, n)
            else:
                self._norm(s["x"], s["xn"], f"{p}.ffn_norm", n)
                self._ffn(il, n)

    def _rope_attention(
        self,
        il: int,
        n: int,
        kv_max: int,
        shape: AttnShape,
        scale: float,
        mode: int,
        inv: DevBuf,
        window: int,
        sinks: DevBuf | None,
    ) -> None:
        hp, k, s = self.hp, self.k, self.s
        qd, kvd, QKV = hp.q_dim, hp.kv_dim, self.qkv_dim
        qkv = s["qkv"]
        kc, vc = self._kv(il)
        k.qkv_rope_store(
            q=qkv,
            k=qkv.view(qd * 4, qkv.nbytes - qd * 4),
            v=qkv.view((qd + kvd) * 4, qkv.nbytes - (qd + kvd) * 4),
            bq=None,
            bk=None,
            bv=None,
            kcache=kc,
            vcache=vc,
            pos=s["pos"],
            n_tokens=n,
            n_head=hp.n_head,
            n_kv=hp.n_head_kv,
            head_dim=hp.head_dim,
            n_rot=hp.rope.n_dims if mode else 0,
            q_stride=QKV,
            kv_stride=QKV,
            inv_freq=inv,
            mscale=self.rope_mscale,
            mode=mode,
            ctx=self.context_length,
            max_pos=kv_max,
        )
        use_tc = n > 1 and (n * hp.n_head >= TC_MIN_ROWS or kv_max <= TC_SHORT_KV)
        if use_tc and self.prefill_attn == "tc" and hp.head_dim in TC_HEAD_DIMS:
            k.attention_prefill_tc(
                q=qkv,
                q_stride=QKV,
                kcache=kc,
                vcache=vc,
                pos=s["pos"],
                out=s["attn"],
                out_stride=qd,
                n_tokens=n,
                n_head=hp.n_head,
                n_kv=hp.n_head_kv,
                head_dim=hp.head_dim,
                ctx=self.context_length,
                max_kv=kv_max,
                scale=scale,
                window=window,
                sinks=sinks,
            )
            return
        k.attention(
            q=qkv,
            q_stride=QKV,
            kcache=kc,
            vcache=vc,
            opart=s["opart"],
            ml=s["ml"],
            pos=s["pos"],
            out=s["attn"],
            out_stride=qd,
            tickets=s["tickets"],
            shape=shape,
            ctx=self.context_length,
            max_kv=kv_max,
            scale=scale,
            window=window,
            sinks=sinks,
        )

    def _ffn(self, il: int, n: int) -> None:
        hp, k, s = self.hp, self.k, self.s
        p = f"blk.{il}"
        ff = hp.n_ff
        xn, gu, act, x = _b(s["xn"]), s["gu"], s["act"], _b(s["x"])
        if hp.arch == "gpt2":
            self._lin(f"{p}.ffn_up.weight", xn, _b(act), n, bias=f"{p}.ffn_up.bias")
            k.gelu(act, act, n * ff)
        else:
            for qw, bias, col in self._gu_plan[il]:  # gate and up (phi3: fused ffn_up)
                self._mm_run(
                    qw, xn, (gu.ptr + col * 4, gu.nbytes - col * 4), n, ldy=2 * ff, bias=bias
                )
            k.swiglu(gu, gu.view(ff * 4, gu.nbytes - ff * 4), act, n, ff, 2 * ff, 2 * ff, ff)
        self._lin(f"{p}.ffn_down.weight", _b(act), x, n, residual=x, bias=f"{p}.ffn_down.bias")

    def _experts(self, name: str) -> Any:
        from worker.backends.cuda.matmul import QWeight

        ti = self.gf.tensors[name]
        k_, n_, e_ = ti.shape  # ggml ne: [K, N, experts]
        return QWeight(
            ptr=self.arena.ptr + self.plan.offsets[name],
            qtype=self.qtypes[name],
            rows=n_,
            cols=k_,
            nbytes=self.plan.sizes[name],
            experts=e_,
        )

    def _moe(self, il: int, n: int) -> None:
        """gpt-oss: router top-k + softmax over the chosen, expert gate/up (+bias), clamped
        SwiGLU, expert down (+bias), weighted sum into the residual stream."""
        hp, k, s = self.hp, self.k, self.s
        p = f"blk.{il}"
        kk, ff = hp.n_expert_used, hp.n_ff_exp
        rname = f"{p}.ffn_gate_inp.weight"
        if n == 1 and self.qtypes[rname] == F32_TYPE and hp.n_embd % 4 == 0:
            # decode: a block a router row, all its loads at once (elementwise.cu rowdot_f32)
            bname = f"{p}.ffn_gate_inp.bias"
            k.rowdot(
                self._t(rname),
                hp.n_expert,
                hp.n_embd,
                s["xn"],
                self._t(bname) if bname in self.plan.offsets else None,
                s["router"],
            )
        else:
            self._lin(rname, _b(s["xn"]), _b(s["router"]), n, bias=f"{p}.ffn_gate_inp.bias")
        k.topk_softmax(s["router"], n, hp.n_expert, kk, s["eidx"], s["ew"])
        if self.route_trace is not None:  # a test's view of the routing (eager mode only)
            ids = np.empty((n, kk), np.int32)
            self.ctx.dtoh(ids, s["eidx"])
            self.route_trace.append((il, ids))
        form = "gemv" if n <= 2 else "gemm"
        st = self.ctx.stream
        wg, wu = (self._experts(f"{p}.ffn_{w}_exps.weight") for w in ("gate", "up"))
        shape = (wg.qtype, wg.rows, wg.cols, wg.experts)
        if self.moe_pair and form == "gemv" and shape == (wu.qtype, wu.rows, wu.cols, wu.experts):
            # decode: gate and up in one launch (docs/kernels.md, MoE)
            self.mm.moe_pair(
                wg,
                wu,
                _b(s["eidx"]),
                n,
                kk,
                _b(s["xn"]),
                _b(s["eg"]),
                _b(s["eu"]),
                stream=st,
                bias0=self._opt(f"{p}.ffn_gate_exps.bias"),
                bias1=self._opt(f"{p}.ffn_up_exps.bias"),
            )
        else:
            for wt, which, dst in ((wg, "gate", "eg"), (wu, "up", "eu")):
                self.mm.moe(
                    wt,
                    _b(s["eidx"]),
                    n,
                    kk,
                    _b(s["xn"]),
                    _b(s[dst]),
                    per_slot_input=False,
                    stream=st,
                    bias=self._opt(f"{p}.ffn_{which}_exps.bias"),
                    form=form,
                )
        k.swiglu(s["eg"], s["eu"], s["eg"], n * kk, ff, ff, ff, ff, oai=(1.702, 7.0))
        self.mm.moe(
            self._experts(f"{p}.ffn_down_exps.weight"),
            _b(s["eidx"]),
            n,
            kk,
            _b(s["eg"]),
            _b(s["ed"]),
            per_slot_input=True,
            stream=st,
            bias=self._opt(f"{p}.ffn_down_exps.bias"),
            form=form,
        )
        k.moe_combine(s["x"], s["ed"], s["ew"], n, hp.n_embd, kk)
        if self.k.sync_each:
            self.ctx.sync("moe")

    def trace_routing(self, on: bool) -> list[tuple[int, np.ndarray]]:
        """Record each MoE layer's expert ids from now on (on) or stop (off); returns the
        list being filled. Only for a backend made with graphs=False."""
        if on and self.use_graphs:
            raise ValueError("routing can only be traced with graphs=False")
        trace: list[tuple[int, np.ndarray]] = []
        self.route_trace = trace if on else None
        return trace

    def _lm_head(self, row0: int, rows: int) -> None:
        """logits[0..rows) = head(norm(x[row0..row0+rows)))."""
        hp, s = self.hp, self.s
        E = hp.n_embd
        xr = s["x"].view(row0 * E * 4, rows * E * 4, "x rows")
        self._norm(xr, s["xn"], "output_norm", rows)
        head = "output.weight" if "output.weight" in self.plan.offsets else "token_embd.weight"
        self._lin(head, _b(s["xn"]), _b(s["logits"]), rows, bias=None)

    # ================================================================== steps

    def _set_inputs(self, ids: Sequence[int], pos: int) -> None:
        n = len(ids)
        arr = np.asarray(ids, dtype=np.int64)
        if arr.min() < 0 or arr.max() >= self.vocab_size:
            raise ValueError(f"token id out of range 0..{self.vocab_size - 1}")
        drv, st = self.ctx.drv, self.ctx.stream
        if n == 1:
            self._io_done.synchronize()  # the pinned staging may still feed the last copy
            self._host_pos[0] = pos
            self._host_pos[1] = int(arr[0])
            drv.memcpy_htod_async(self.s["io"].ptr, self._host_pos, st)
            self._io_done.record(st)
        else:
            st.synchronize()
            io = np.empty(n + 1, np.int32)
            io[0] = pos
            io[1:] = arr
            drv.memcpy_htod(self.s["io"].ptr, io)

    def _decode_graph(self, tail: str) -> Any:
        """The captured one-token step (_enqueue_decode) ending in `tail`."""
        g = self._graphs.get(tail)
        if g is None:
            with self.ctx.capture(self.pdl) as cap:
                self._enqueue_decode(tail)
            g = cap.graph
            self.pdl_edges = cap.pdl_edges
            self._graphs[tail] = g
        return g

    def _enqueue_decode(self, tail: str) -> None:
        """One-token step ending in "logits" (logits row 0 only), "greedy" (argmax) or
        "sampled" (sample_dev on the settings in s['sargs'])."""
        self._enqueue_layers(1, self.context_length)
        self._lm_head(0, 1)
        s = self.s
        if tail == "greedy":
            self.k.argmax(s["logits"], self.vocab_size, s["argv"], s["argi"], s["out"], io=s["io"])
        elif tail == "sampled":
            self.k.sample_dev(
                logits=s["logits"],
                n=self.vocab_size,
                pen_ids=self.pen,
                args=s["sargs"],
                xbuf=s["xbuf"],
                out=s["out"],
                gscratch=s["gscratch"],
                barrier=s["barrier"],
                io=s["io"],
            )

    def _check_len(self, n: int) -> None:
        if n == 0:
            raise ValueError("forward needs at least one token")
        if self._n_past + n > self.context_length:
            raise ContextLengthExceeded(
                f"{self._n_past} tokens in context + {n} new > context length {self.context_length}"
            )

    def _run(self, ids: Sequence[int], *, all_logits: bool, greedy_tail: bool) -> np.ndarray | None:
        """Run ids; return all logits (all_logits) or leave the last row's logits in
        s['logits'][0] (and, with greedy_tail on a one-token graph step, the argmax in out)."""
        self._drain()
        n = len(ids)
        self._check_len(n)
        V = self.vocab_size
        outs: list[np.ndarray] = []
        for c0 in range(0, n, self.ubatch):
            chunk = ids[c0 : c0 + self.ubatch]
            m = len(chunk)
            pos = self._n_past
            self._set_inputs(chunk, pos)
            if m == 1 and not all_logits:
                tail = "greedy" if greedy_tail else "logits"
                if self.use_graphs:
                    self._decode_graph(tail).launch("decode graph")
                else:
                    self._enqueue_decode(tail)
                self._n_past += 1
                continue
            self._enqueue_layers(m, pos + m)
            self._n_past += m
            if all_logits:
                for r0 in range(0, m, LOGIT_ROWS):
                    rows = min(LOGIT_ROWS, m - r0)
                    self._lm_head(r0, rows)
                    host = np.empty((rows, V), np.float32)
                    self.ctx.dtoh(host, self.s["logits"])
                    outs.append(host)
            elif c0 + self.ubatch >= n:
                self._lm_head(m - 1, 1)
                if greedy_tail:
                    s = self.s
                    self.k.argmax(s["logits"], V, s["argv"], s["argi"], s["out"])
        self.ctx.sync("forward")
        return np.concatenate(outs, axis=0) if all_logits else None

    # ================================================================== Backend protocol

    @property
    def n_past(self) -> int:
        return self._n_past

    def reset(self) -> None:
        self._drain()
        self._n_past = 0

    def forward(self, ids: Sequence[int], *, all_logits: bool = False) -> np.ndarray:
        try:
            out = self._run(ids, all_logits=all_logits, greedy_tail=False)
        except BaseException:
            self._recover()
            raise
        if all_logits:
            assert out is not None
            return out
        host = np.empty(self.vocab_size, np.float32)
        self.ctx.dtoh(host, self.s["logits"])
        return host

    def forward_sample(
        self,
        ids: Sequence[int],
        params: SamplingParams,
        draw: float,
        generated: Sequence[int],
        next_draw: float | None = None,
    ) -> int:
        """Backend.forward_sample. `next_draw`: the draw the caller will pass with the next
        token; with it a sampled step (no repetition penalty) queues the next step before
        returning, as greedy steps always do."""
        from worker.engine.sampling import _check

        _check(params, draw)
        pen = params.repetition_penalty != 1.0 and len(generated) > 0
        greedy_fast = params.greedy and not pen
        if len(ids) == 1 and self.spec_decode and not pen:
            if next_draw is not None:
                _check(params, next_draw)
            try:
                if greedy_fast:
                    return self._graph_step(int(ids[0]), None)
                return self._graph_step(int(ids[0]), (params, draw, next_draw))
            except BaseException:
                self._recover()
                raise
        try:
            self._run(ids, all_logits=False, greedy_tail=greedy_fast)
            if not greedy_fast:
                self._sample(params, draw, generated if pen else ())
            out = self._host_out
            self.ctx.drv.memcpy_dtoh_async(out, self.s["out"].ptr, self.ctx.stream)
            self.ctx.sync("sampling")
        except BaseException:
            self._recover()
            raise
        if not greedy_fast and int(out[1]) == 1:
            raise WorkerError(ErrorCode.INTERNAL, "NaN in logits")
        return int(out[0])

    def _drain(self) -> None:
        """Wait for a queued speculative step and forget it (its KV row at position n_past
        is rewritten by whatever step comes next at that position)."""
        if self._spec is not None:
            self._spec = None
            self.ctx.sync("speculative decode step")

    def _graph_step(
        self, tok: int, sampled: tuple[SamplingParams, float, float | None] | None
    ) -> int:
        """One graph step for `tok` at n_past, greedy (sampled None) or drawn with
        (params, draw, next_draw); queues the next step (its input is this step's id, set on
        the device) before waiting for this one's id: always when greedy, when next_draw is
        given when sampled. The queued step is used if the next call asks for exactly that
        (position, token, settings, draw); anything else waits for it and forgets it."""
        pos = self._n_past
        want = None if sampled is None else (sampled[0], sampled[1])
        spec, self._spec = self._spec, None
        if spec is not None and spec[0] == pos and spec[1] == tok and spec[3] == want:
            slot = spec[2]  # already queued behind the previous step
        else:
            if spec is not None:
                self.ctx.sync("speculative decode step")  # a different token: redo it
            self._check_len(1)
            if not 0 <= tok < self.vocab_size:
                raise ValueError(f"token id out of range 0..{self.vocab_size - 1}")
            slot = self._spec_slot = self._spec_slot ^ 1
            self._queue_step(pos, tok, slot, want)
        self._n_past = pos + 1
        nxt, nwant = -1, None
        if sampled is not None and sampled[2] is not None:
            nwant = (sampled[0], sampled[2])
        if self._n_past < self.context_length and (sampled is None or nwant is not None):
            nxt = slot ^ 1
            self._queue_step(self._n_past, None, nxt, nwant)
            self._spec_slot = nxt
        self._spec_done[slot].synchronize()
        out, nan = int(self._spec_out[slot][0]), int(self._spec_out[slot][1])
        if sampled is not None and nan == 1:
            if nxt >= 0:
                self._spec_done[nxt].synchronize()  # the step queued behind it is forgotten
            raise WorkerError(ErrorCode.INTERNAL, "NaN in logits")
        if nxt >= 0:
            self._spec = (self._n_past, out, nxt, nwant)
        return out

    def _queue_step(
        self, pos: int, tok: int | None, slot: int, sampled: tuple[SamplingParams, float] | None
    ) -> None:
        """Queue one graph step at pos (tok None: the input left on the device by the step
        queued just before; sampled: (params, draw) for the sampled graph, else greedy) and
        the read-back of its [id, NaN flag] into slot."""
        st = self.ctx.stream
        if tok is not None:
            self._set_inputs([tok], pos)
        if sampled is not None:
            params, draw = sampled
            host = self._sargs_host[slot]
            self._spec_done[slot].synchronize()  # its last copy out of this staging is done
            host[:] = np.frombuffer(sample_args(n_pen=0, draw=draw, **_sampler(params)), np.uint8)
            self.ctx.drv.memcpy_htod_async(self.s["sargs"].ptr, host, st)
        self._decode_graph("sampled" if sampled is not None else "greedy").launch("decode graph")
        self.ctx.drv.memcpy_dtoh_async(self._spec_out[slot], self.s["out"].ptr, st)
        self._spec_done[slot].record(st)

    def _sample(self, params: SamplingParams, draw: float, generated: Sequence[int]) -> None:
        uniq = np.unique(np.asarray(generated, dtype=np.int64))
        uniq = uniq[(uniq >= 0) & (uniq < self.vocab_size)].astype(np.int32)
        if uniq.size > self.pen.nbytes // 4:
            raise WorkerError(ErrorCode.INTERNAL, "penalty history longer than the context")
        if uniq.size:
            self.ctx.drv.memcpy_htod_async(self.pen.ptr, uniq, self.ctx.stream)
        s = self.s
        self.k.sample_full(
            logits=s["logits"],
            n=self.vocab_size,
            pen_ids=self.pen,
            n_pen=int(uniq.size),
            draw=draw,
            **_sampler(params),
            xbuf=s["xbuf"],
            out=s["out"],
            gscratch=s["gscratch"],
            barrier=s["barrier"],
        )
        self.ctx.sync("sample_full")

    def _recover(self) -> None:
        """After a failed step the sequence is undefined: start over (the next job resets)."""
        self._spec = None
        self._n_past = 0

    def _drop_graphs(self) -> None:
        """Before a setting that changes what a step launches: the queued step finished,
        every captured graph destroyed (the next step captures again)."""
        self._drain()
        for g in self._graphs.values():
            g.destroy()
        self._graphs.clear()

    def set_pdl(self, on: bool | None) -> None:
        """Programmatic dependent launch inside the decode graphs (cuda_src/pdl.cuh; None:
        the default, WORKER_ORCD_PDL and sm_90+); re-captures."""
        self._drop_graphs()
        self.pdl = on

    def set_fused_decode(self, on: bool) -> None:
        """One-token steps with RoPE + KV store inside the attention launch (re-captures)."""
        self._drop_graphs()
        self.fused_decode = on

    def set_decode_splits(self, n: int) -> None:
        """Key chunks per head for a one-token step (re-captures the decode graphs)."""
        if not 1 <= n <= min(128, self.ubatch * PREFILL_MAX_SPLITS):
            raise ValueError(f"decode splits must be in 1..128, got {n}")
        self._drop_graphs()
        self.decode_splits = n

    def check_residency(self) -> ResidencyReport:
        if self.ctx is None:
            return ResidencyReport(ok=False, checked=0, failures=["no context"])
        failures: list[str] = []
        checked = 0
        ptrs: list[tuple[str, int]] = []
        for a in self.ctx.allocations():
            ptrs += [(a.name, a.ptr), (f"{a.name} end", a.ptr + a.nbytes - 1)]
        for name, off in self.plan.offsets.items():
            ptrs.append((name, self.arena.ptr + off))
        for name, p in ptrs:
            checked += 1
            problem = self.ctx.pointer_problem(p)
            if problem:
                failures.append(f"{name}: {problem}")
        info = getattr(self, "info", None)
        if info is not None:  # health reads this cached copy (no GPU call on its path)
            self.info = dataclasses.replace(
                info, resident=not failures, vram_bytes_used=self.ctx.used_bytes
            )
        return ResidencyReport(ok=not failures, checked=checked, failures=failures)

    def vram_bytes_used(self) -> int:
        return int(self.ctx.used_bytes) if self.ctx is not None else 0

    def close(self) -> None:
        if getattr(self, "_spec", None) is not None and self.ctx is not None:
            try:
                self._drain()
            except Exception:  # closing anyway: a failed queued step has nothing to report
                self._spec = None
        for g in getattr(self, "_graphs", {}).values():
            g.destroy()
        if getattr(self, "_graphs", None):
            self._graphs.clear()
        if self.ctx is not None:
            self.ctx.close()
            self.ctx = None
        if self._owns_file and not self.gf.closed:
            self.gf.close()
