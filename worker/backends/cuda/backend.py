"""CudaBackend: the batched backend (worker.engine.batch) on one NVIDIA GPU.

Startup: one context (context.py), the model's tensors in one 256-byte-aligned arena
(quantized as stored; only 1-D vectors that are not F32 are widened to F32), loaded through
pinned staging (loader.py); the model's recipe (worker.models.recipe); scratch sized for
the largest step; the rest of the VRAM budget as the paged FP16 KV pool (kv.py). Nothing is
allocated per step or per job.

A step (`step`): its rows and inputs are laid out on the host (step.py) and copied to the
device in one transfer; the executor (executor.py) queues the whole step; only the sampled
ids (and logits a caller asked for) come back. Two steps may be in flight (the scheduler
launches one before collecting the one before it): the pinned staging and output buffers are
double-buffered, each with the event of the step that last used it, and a pending decode
row's id is looked up on the device in the previous step's sampler output. A step replays a
CUDA graph captured once per bucket (step.py, choose_bucket): decode rows padded to 1, 2, 4,
... 256, prompt rows to 16, 24, 32, 48, ... up to --prefill-chunk, prompt chunks to a power
of two (at least 4); padding rows write only the trash block. Graphs run with programmatic
dependent launch on sm_90; the least recently used are dropped past MAX_GRAPHS. Steps that
want the logits of every prompt position (tests, tools) run eagerly.

Must be created and used on one thread (the one that owns the context).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from worker.backends.base import BackendInfo, ResidencyReport
from worker.backends.cuda.arena import MIB, DevBuf, plan_arena
from worker.backends.cuda.executor import DeviceStep, Executor
from worker.backends.cuda.kernels import KV_BLOCK
from worker.backends.cuda.kv import KvPool, kv_block_bytes
from worker.backends.cuda.step import Bucket, Sizes, choose_bucket, layout_step, prompt_buckets
from worker.config import env_switch
from worker.engine.batch import Chunk, StepOutput
from worker.errors import (
    ContextLengthExceeded,
    CudaError,
    InsufficientVram,
    ModelLoadError,
)
from worker.gguf.hparams import load_hparams
from worker.gguf.reader import GGUFFile, open_gguf
from worker.models.recipe import build_recipe

F32_TYPE = 0
RESERVE_BYTES = 512 * MIB  # left free for the driver, graphs and PyCUDA's own needs
MAX_BATCH_CAP = 256
BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# captured step graphs kept: the decode buckets and the mixed sizes a workload meets (each
# holds its ~300 kernel nodes; the least recently used goes past this many)
MAX_GRAPHS = 128
LOGIT_ROWS = 64  # rows of all-position logits (tests, tools) computed per step
DEFAULT_JOB_TOKENS = 2048  # the default --max-batch gives each running job this much KV
# Batch invariance is on unless WORKER_ORCD_BATCH_INVARIANT=0 / false / no, read as serve
# reads it (then steps of 1-8 rows use the decode gemv: faster at batch 1, but a job's bits
# then depend on the batch it ran in); serve passes its setting explicitly
BATCH_INVARIANT = env_switch(os.environ, "WORKER_ORCD_BATCH_INVARIANT", True)

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


def pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class CudaBackend:
    """See the module docstring. `model`: a path or an open GGUFFile."""

    block_size = KV_BLOCK
    chunk_align = 1  # results do not depend on how a prompt is cut into chunks

    def __init__(
        self,
        model: str | os.PathLike[str] | GGUFFile,
        *,
        ctx_size: int | None = None,
        kv_cache_size_mb: int | None = None,
        gpu_device: int = 0,
        h2d_chunk_mb: float = 1.0,
        progress: Callable[[float], None] | None = None,
        max_batch: int | None = None,
        prefill_chunk: int = 512,
        batch_invariant: bool | None = None,
        graphs: bool = True,
        sync_each: bool = False,
    ) -> None:
        self._owns_file = not isinstance(model, GGUFFile)
        self.gf: GGUFFile = model if isinstance(model, GGUFFile) else open_gguf(Path(model))
        self.path = self.gf.path
        self.ctx: Any = None
        self._graphs: OrderedDict[Bucket, Any] = OrderedDict()
        try:
            self._init(
                ctx_size,
                kv_cache_size_mb,
                gpu_device,
                h2d_chunk_mb,
                progress,
                max_batch,
                prefill_chunk,
                BATCH_INVARIANT if batch_invariant is None else batch_invariant,
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
        max_batch: int | None,
        prefill_chunk: int,
        invariant: bool,
        graphs: bool,
        sync_each: bool,
    ) -> None:
        from worker.backends.cuda.context import CudaContext
        from worker.backends.cuda.kernels import Kernels
        from worker.backends.cuda.loader import upload
        from worker.backends.cuda.matmul import MatmulKernels

        t_start = time.perf_counter()
        hp = load_hparams(self.gf)
        self.hp = hp
        if hp.head_dim != hp.head_dim_v:
            raise ModelLoadError(self.path, "head_dim_v != head_dim is not supported")
        n_ctx = ctx_size if ctx_size is not None else hp.n_ctx_train
        names = set(self.gf.tensors)
        self.recipe = recipe = build_recipe(
            hp, names, n_ctx, lambda n: np.asarray(self.gf.dequantize(n), np.float32)
        )
        self.use_graphs = graphs
        self.invariant = invariant
        self.ctx = ctx = CudaContext(gpu_device)
        t_k = time.perf_counter()
        self.k = Kernels(ctx, sync_each=sync_each)
        self.mm = MatmulKernels(ctx.facts.arch)
        self.mm.invariant = invariant
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
        if recipe.rope.mode:
            sources["__rope_inv_freq"] = np.ascontiguousarray(recipe.rope.inv_freq).view(np.uint8)
        plan = plan_arena((n, a.nbytes) for n, a in sources.items())
        self.plan = plan

        # ---- VRAM: weights, then scratch for the largest step, then the KV pool
        self.width = -(-n_ctx // KV_BLOCK)  # block-table entries per sequence
        self.context_length = n_ctx
        self.qkv_dim = hp.q_dim + 2 * hp.kv_dim
        per_block = kv_block_bytes(hp.n_layer, hp.n_head_kv, hp.head_dim)
        free, total = ctx.mem_info()
        # step buffers are sized for this many jobs (the default, from the KV budget, is
        # decided once the KV pool is allocated, last: it gets whatever VRAM is left)
        cap = MAX_BATCH_CAP if max_batch is None else max_batch
        self.buckets = [b for b in BUCKETS if b <= pow2_at_least(cap)]
        self.sample_rows = self.buckets[-1]  # sampled rows (a padded bucket included)
        # a full decode bucket beside a full prompt chunk fits one step
        self.max_step_tokens = self.sample_rows + max(1, prefill_chunk)
        self.max_logit_rows = self.sample_rows + LOGIT_ROWS
        self.prompt_sizes = [
            b for b in prompt_buckets(max(1, prefill_chunk)) if b <= self.width * KV_BLOCK
        ]
        big = Sizes(self.max_step_tokens, self.sample_rows, cap, self.max_logit_rows, self.width)
        need = plan.total + RESERVE_BYTES + 2 * per_block
        if need > free:
            raise InsufficientVram(
                f"model {self.path} needs more than {need} bytes of VRAM on GPU {gpu_device} "
                f"(weights {plan.total}, two KV blocks, reserve {RESERVE_BYTES}) but {free} "
                "bytes are free"
            )
        self.vocab_size = hp.n_vocab

        # ---- allocate and load; step buffers; then the KV pool from what is left
        self.arena = ctx.alloc(plan.total, "weights arena")
        self.load_stats = upload(
            ctx,
            self.arena,
            plan,
            sources,
            chunk_bytes=max(1, int(h2d_chunk_mb * MIB)),
            progress=progress,
        )
        self.ex = Executor(
            ctx=ctx,
            k=self.k,
            mm=self.mm,
            hp=hp,
            recipe=recipe,
            weight=self._w,
            tensor=self._t,
            rope_inv=self._t("__rope_inv_freq"),
            max_tokens=self.max_step_tokens,
            max_rows=self.max_logit_rows,
            max_batch=self.sample_rows,
            width=self.width,
            hist_len=self.context_length,
        )
        # which arithmetic the matrices take (the integer cores, the fp16 ones): logged at
        # load, recorded by bench
        self.arithmetic: dict[str, Any] = self.ex.arithmetic
        self.inputs = ctx.alloc(big.total * 4, "step inputs")
        # per parity (alternate steps): pinned inputs and outputs, and the event recorded
        # after the step that last used them
        self._staging = [ctx.drv.pagelocked_empty(big.total, np.int32) for _ in range(2)]
        self._out = [ctx.drv.pagelocked_empty(2 * self.max_logit_rows, np.int32) for _ in range(2)]
        self._done = [ctx.drv.Event() for _ in range(2)]
        for ev in self._done:
            ev.record(ctx.stream)
        self._parity = 0
        self._prev_rows: dict[int, int] = {}  # slot -> its sampled row in the last step
        pool_room = ctx.mem_info()[0] - RESERVE_BYTES
        if kv_cache_size_mb is not None:
            pool_room = min(pool_room, kv_cache_size_mb * MIB)
        n_blocks = pool_room // per_block - 1  # one more: the trash block
        if n_blocks < 1:
            raise InsufficientVram(
                f"model {self.path} leaves no room for the KV cache on GPU {gpu_device}: "
                f"{ctx.mem_info()[0]} bytes free after weights ({plan.total}) and step "
                f"buffers, a block needs {per_block} (reserve {RESERVE_BYTES})"
            )
        self.n_blocks = int(n_blocks)
        job_blocks = -(-min(self.context_length, DEFAULT_JOB_TOKENS) // KV_BLOCK)
        self.max_batch = (
            max_batch
            if max_batch is not None
            else max(1, min(MAX_BATCH_CAP, self.n_blocks // job_blocks))
        )
        self.kv = KvPool(ctx, hp.n_layer, hp.n_head_kv, hp.head_dim, self.n_blocks)
        self.ex.kv = self.kv
        # what the sampler's history holds per slot: (length, last id); a slot's generation
        # counts its releases (a step collected after its sequence left updates nothing)
        self._hist: dict[int, tuple[int, int]] = {}
        self._slot_gen: dict[int, int] = {}
        self.pdl: bool | None = None
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

    # ================================================================== tensors

    def _t(self, name: str) -> DevBuf | None:
        """A tensor of the arena (None when the file has none of that name)."""
        off = self.plan.offsets.get(name)
        if off is None:
            return None
        return self.arena.view(off, self.plan.sizes[name], name)

    def _w(self, name: str) -> Any:
        from worker.backends.cuda.plans.base import QWeight

        ti = self.gf.tensors[name]
        if len(ti.shape) == 3:  # experts: ggml ne [K, N, experts]
            k_, n_, e_ = ti.shape
            return QWeight(
                ptr=self.arena.ptr + self.plan.offsets[name],
                qtype=self.qtypes[name],
                rows=n_,
                cols=k_,
                nbytes=self.plan.sizes[name],
                experts=e_,
            )
        rows = 1
        for d in ti.shape[1:]:
            rows *= d
        return QWeight(
            ptr=self.arena.ptr + self.plan.offsets[name],
            qtype=self.qtypes[name],
            rows=rows,
            cols=ti.shape[0],
            nbytes=self.plan.sizes[name],
        )

    # ================================================================== the batched protocol

    def step(self, chunks: Sequence[Chunk]) -> StepOutput:
        return self.collect(self.launch(chunks))

    def launch(self, chunks: Sequence[Chunk]) -> Any:
        """Queue one step (worker.engine.batch); `collect` waits for it. A step that wants
        logits runs to completion here (its logits are read before another step can
        overwrite them); chunks asking for all-position logits are run in pieces of
        LOGIT_ROWS positions (the same results: nothing depends on the chunking)."""
        try:
            if any(c.logits and len(c.tokens) > LOGIT_ROWS for c in chunks):
                return self._step_in_pieces(chunks)
            handle = self._launch(chunks)
            if any(c.logits for c in chunks):
                return self._collect(*handle)
            return handle
        except BaseException:
            self._hist.clear()  # after a failure, re-send every history
            self._prev_rows.clear()
            raise

    def collect(self, handle: Any) -> StepOutput:
        if isinstance(handle, StepOutput):
            return handle
        try:
            return self._collect(*handle)
        except BaseException:
            self._hist.clear()
            self._prev_rows.clear()
            raise

    def _step_in_pieces(self, chunks: Sequence[Chunk]) -> StepOutput:
        out = StepOutput(ids=[-1] * len(chunks), logits=[None] * len(chunks))
        for i, c in enumerate(chunks):
            n = len(c.tokens)
            pieces = [
                dataclasses.replace(
                    c,
                    tokens=list(c.tokens[a : min(n, a + LOGIT_ROWS)]),
                    start=c.start + a,
                    sample=c.sample if a + LOGIT_ROWS >= n else None,
                )
                for a in range(0, n, LOGIT_ROWS)
            ]
            rows: list[np.ndarray] = []
            for piece in pieces:
                res = self._collect(*self._launch([piece]))
                out.ids[i] = res.ids[0]
                lg = res.logits[0]
                if lg is not None:
                    rows.append(lg)
            out.logits[i] = np.concatenate(rows, axis=0) if rows else None
        return out

    def _check(self, chunks: Sequence[Chunk]) -> None:
        if not chunks:
            raise ValueError("a step needs at least one chunk")
        if len(chunks) > self.max_batch:
            raise ValueError(f"{len(chunks)} chunks > max_batch {self.max_batch}")
        total = 0
        for c in chunks:
            n = len(c.tokens)
            if n == 0:
                raise ValueError("a chunk needs at least one token")
            end = c.start + n
            if end > self.context_length or end > len(c.blocks) * KV_BLOCK:
                raise ContextLengthExceeded(
                    f"positions up to {end} exceed the context ({self.context_length}) or "
                    f"the chunk's {len(c.blocks)} blocks"
                )
            if not 0 <= c.slot < self.max_batch:
                raise ValueError(f"slot {c.slot} outside 0..{self.max_batch - 1}")
            if c.pending and (c.prefill or c.sample is None or n != 1):
                raise ValueError("a pending chunk is one sampled decode token")
            # builtins, not NumPy: most chunks are one decode token and a few blocks, where
            # NumPy's per-call cost was most of a 64-row step's check (235 -> 43 us)
            if min(c.tokens) < 0 or max(c.tokens) >= self.vocab_size:
                raise ValueError(f"token id out of range 0..{self.vocab_size - 1}")
            if min(c.blocks) < 0 or max(c.blocks) >= self.n_blocks:
                raise ValueError(f"block id outside 0..{self.n_blocks - 1}")
            total += n
        if total > self.max_step_tokens:
            raise ValueError(f"{total} tokens > {self.max_step_tokens} a step")

    def _launch(
        self, chunks: Sequence[Chunk]
    ) -> tuple[Sequence[Chunk], Any, int, int, list[tuple[int, int]]]:
        self._check(chunks)
        drv, st = self.ctx.drv, self.ctx.stream
        self._sync_histories(chunks)
        # each sampled chunk's (slot generation, history length on the device once drawn)
        hist_after = [
            (self._slot_gen.get(c.slot, 0), len(c.sample.history) + c.pending + 1)
            for c in chunks
            if c.sample is not None
        ]
        bucket = None
        if self.use_graphs:
            bucket = choose_bucket(
                chunks,
                decode_buckets=self.buckets,
                prompt_sizes=self.prompt_sizes,
                max_chunks=self.max_batch,
                max_tokens=self.max_step_tokens,
                max_rows=self.max_logit_rows,
            )
        lay = layout_step(
            chunks,
            width=self.width,
            trash_block=self.kv.trash_block,
            bucket=bucket,
            pad_slot=self.max_batch,  # the history has one slot past the sequences' ones
            prev_rows=self._prev_rows,
        )
        sz = lay.sizes
        if sz.rows > self.max_logit_rows:
            raise ValueError(f"{sz.rows} logits rows > {self.max_logit_rows} a step")
        p = self._parity
        self._parity ^= 1
        self._done[p].synchronize()  # this parity's buffers served the step before last
        n = sz.total
        staging = self._staging[p]
        staging[:n] = lay.packed
        drv.memcpy_htod_async(self.inputs.ptr, staging[:n], st)
        prefill = lay.prefill
        if bucket is not None and bucket.chunks:
            # the graph serves every step of the bucket: its prompt attention is launched
            # for chunks of up to all the prompt rows (the kernel reads each chunk's own
            # rows, length and position from the step's inputs; shorter ones exit early)
            prefill = [(bucket.decode, bucket.prompt, 0)] * bucket.chunks
        n_s = sz.rows if bucket else len(lay.sampled)  # the chunks' own, then padding rows
        if bucket is not None:  # the step's device views are needed only to capture
            self._graph(bucket, lambda: self._device_step(sz, prefill, n_s)).launch("step graph")
        else:
            self.ex.enqueue(self._device_step(sz, prefill, n_s))
        if n_s:
            drv.memcpy_dtoh_async(self._out[p][: 2 * n_s], self.ex.s["out"].ptr, st)
        self._done[p].record(st)
        self._prev_rows = lay.sampled_rows
        return chunks, lay, sz.rows, p, hist_after

    def _collect(
        self,
        chunks: Sequence[Chunk],
        lay: Any,
        n_rows: int,
        p: int,
        hist_after: list[tuple[int, int]],
    ) -> StepOutput:
        ctx = self.ctx
        logits: list[np.ndarray | None] = [None] * len(chunks)
        if any(c.logits for c in chunks):
            V = self.vocab_size
            host = np.empty((n_rows, V), np.float32)
            ctx.dtoh(host, self.ex.s["logits"].view(0, n_rows * V * 4))
            for r, i in enumerate(lay.sampled):  # a sampled one-row chunk: its sampled row
                if chunks[i].logits and len(chunks[i].tokens) == 1:
                    logits[i] = host[r : r + 1]
            for i, (r0, rn) in zip(lay.logits_chunks, lay.logits_rows, strict=True):
                logits[i] = host[r0 : r0 + rn]
        ctx.sync_event(self._done[p], "step")
        out = self._out[p]
        ids = [-1] * len(chunks)
        for r, i in enumerate(lay.sampled):
            tok, nan = int(out[2 * r]), int(out[2 * r + 1])
            c = chunks[i]
            gen, n_hist = hist_after[r]
            ids[i] = -2 if nan else tok
            if gen != self._slot_gen.get(c.slot, 0):
                continue  # the slot's sequence has left since this step was launched
            if nan:
                self._hist.pop(c.slot, None)
            else:
                self._hist[c.slot] = (n_hist, tok)
        return StepOutput(ids=ids, logits=logits)

    def _device_step(
        self, sz: Sizes, prefill: list[tuple[int, int, int]], sampled: int
    ) -> DeviceStep:
        offs, counts = sz.offsets(), sz.counts()
        v = {
            name: self.inputs.view(4 * offs[name], max(4, 4 * counts[name]), name) for name in offs
        }
        bt = v["bt"]
        dec = sz.decode * sz.width * 4
        return DeviceStep(
            tokens=sz.tokens,
            decode=sz.decode,
            prefill=prefill,
            rows=sz.rows,
            sampled=sampled,
            ids=v["ids"],
            pos=v["pos"],
            kvrow=v["kvrow"],
            gidx=v["gidx"],
            slot=v["slot"],
            sargs=v["sargs"],
            seq=v["seq"],
            bt_decode=bt.view(0, max(4, dec), "bt decode"),
            bt_prefill=bt.view(dec, max(4, bt.nbytes - dec), "bt prefill")
            if bt.nbytes > dec
            else bt,
        )

    def _sync_histories(self, chunks: Sequence[Chunk]) -> None:
        """The sampler appends each drawn id to its slot's history on the device; upload a
        history only when the device's copy is not the chunk's (a new sequence in the slot
        or a caller driving the backend by hand)."""
        hist = self.ex.s["hist"]
        stride = self.context_length * 4
        for c in chunks:
            s = c.sample
            if s is None:
                continue
            h = s.history
            n = len(h)
            if n + c.pending > self.context_length:
                raise ValueError("penalty history longer than the context")
            have = self._hist.get(c.slot)
            if n == 0 or (have is not None and have == (n, int(h[-1]))):
                continue  # (a pending id is appended after these by the step before)
            self.ctx.drv.memcpy_htod_async(
                hist.ptr + c.slot * stride, np.asarray(h, dtype=np.int32), self.ctx.stream
            )
            self.ctx.sync("penalty history")
            self._hist[c.slot] = (n, int(h[-1]))

    def _graph(self, bucket: Bucket, dev: Callable[[], DeviceStep]) -> Any:
        g = self._graphs.get(bucket)
        if g is not None:
            self._graphs.move_to_end(bucket)
            return g
        if len(self._graphs) >= MAX_GRAPHS:  # the least recently used goes
            self.ctx.sync("before dropping a step graph")
            self._graphs.popitem(last=False)[1].destroy()
        step = dev()
        with self.ctx.capture(self.pdl) as cap:
            self.ex.enqueue(step)
        g = cap.graph
        self.pdl_edges = cap.pdl_edges
        self._graphs[bucket] = g
        return g

    @property
    def graph_buckets(self) -> list[Bucket]:
        """The buckets whose step graphs are captured, least recently used first."""
        return list(self._graphs)

    def trace_routing(self, on: bool) -> list[tuple[int, np.ndarray]]:
        """Record each MoE layer's expert ids from now on (on) or stop (off); returns the
        list being filled (layer, ids [rows, k]). Only for a backend made with graphs=False."""
        if on and self.use_graphs:
            raise ValueError("routing can only be traced with graphs=False")
        trace: list[tuple[int, np.ndarray]] = []
        self.ex.route_trace = trace if on else None
        return trace

    def copy_blocks(self, pairs: Sequence[tuple[int, int]]) -> None:
        self.kv.copy_blocks(pairs)

    def release_slot(self, slot: int) -> None:
        self._hist.pop(slot, None)
        self._slot_gen[slot] = self._slot_gen.get(slot, 0) + 1

    def set_pdl(self, on: bool | None) -> None:
        """Programmatic dependent launch inside the step graphs (None: the default,
        WORKER_ORCD_PDL and sm_90+); re-captures."""
        self._drop_graphs()
        self.pdl = on

    def _drop_graphs(self) -> None:
        self.ctx.sync("before dropping graphs")
        for g in self._graphs.values():
            g.destroy()
        self._graphs.clear()

    # ================================================================== health

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
        for g in self._graphs.values():
            g.destroy()
        self._graphs.clear()
        if self.ctx is not None:
            self.ctx.close()
            self.ctx = None
        if self._owns_file and not self.gf.closed:
            self.gf.close()
