"""The step on the GPU: a model recipe (worker.models.recipe) as a sequence of kernel launches.

`Executor.enqueue(step)` queues, on the context's stream, everything one step computes for
its T rows: the ids of pending decode rows from the previous step's sampler output, the
embedding, every layer (norm, q/k/v projections, RoPE and the paged KV
store, decode attention for the decode rows and tensor-core attention for the prompt
chunks, output projection, FFN: gated, GELU or mixture of experts), then the LM head over
the R rows whose logits are wanted, and one sampler launch for the sampled ones. It reads
its inputs from device memory only (`DeviceStep`: views into the packed input region), so a
captured step graph replays for every step of its sizes.

Batch invariance (the default; WORKER_ORCD_BATCH_INVARIANT=0 turns it off): each kernel
computes a row exactly as it would alone. The matrix products take the tensor-core form for
every row count (`MatmulKernels.invariant`: no reduction order depends on the rows in a
launch), attention splits a row's keys by its own length only,
and the sampler's integer arithmetic picks the same id whatever its grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from worker.backends.cuda.arena import DevBuf, plan_arena
from worker.backends.cuda.kernels import (
    KV_BLOCK,
    SAMPLE_SCRATCH_BYTES,
    AttnShape,
    Kernels,
)
from worker.backends.cuda.kv import KvPool
from worker.backends.cuda.matmul import MatmulKernels
from worker.backends.cuda.plans.base import QWeight
from worker.backends.cuda.plans.i15 import i15_planes
from worker.gguf.hparams import HParams
from worker.models.recipe import LayerRecipe, ModelRecipe

DECODE_SPLITS = 16  # key chunks per decode row (fixed: a row's chunks depend only on its length)
MIN_CHUNK = 64  # keys a decode split takes at least (attention.cu MIN_CHUNK)
F32_TYPE = 0
Buf = tuple[int, int]  # (ptr, nbytes) as the launch plans take it


def _b(d: DevBuf) -> Buf:
    return (d.ptr, d.nbytes)


@dataclass(frozen=True, slots=True)
class DeviceStep:
    """What one step reads on the device (views into the packed input region)."""

    tokens: int  # T
    decode: int  # D (rows 0..D-1)
    prefill: list[tuple[int, int, int]]  # per chunk (first row, tokens, first position)
    rows: int  # R logits rows
    sampled: int  # the first `sampled` of them are sampled
    ids: DevBuf
    pos: DevBuf
    kvrow: DevBuf
    gidx: DevBuf
    slot: DevBuf
    sargs: DevBuf
    seq: DevBuf
    bt_decode: DevBuf
    bt_prefill: DevBuf


class Executor:
    """Weights, KV pool and scratch of one model on one context (see the module doc)."""

    def __init__(
        self,
        *,
        ctx: Any,
        k: Kernels,
        mm: MatmulKernels,
        hp: HParams,
        recipe: ModelRecipe,
        weight: Any,  # name -> QWeight of a matrix in the arena
        tensor: Any,  # name -> DevBuf of a (float32) vector in the arena, or None
        rope_inv: DevBuf | None,
        max_tokens: int,
        max_rows: int,
        max_batch: int,
        width: int,
        hist_len: int,
    ) -> None:
        self.ctx, self.k, self.mm, self.hp, self.r = ctx, k, mm, hp, recipe
        self.weight, self.tensor = weight, tensor
        self.kv: KvPool  # set by the backend once the pool is allocated (last: it takes the rest)
        self.rope_inv = rope_inv
        self.max_tokens, self.max_rows, self.width = max_tokens, max_rows, width
        self.max_batch, self.hist_len = max_batch, hist_len
        E, V = hp.n_embd, hp.n_vocab
        T, R = max_tokens, max_rows
        self.qkv_dim = hp.q_dim + 2 * hp.kv_dim
        ff, fe, kx = hp.n_ff, max(1, hp.n_ff_exp), max(1, hp.n_expert_used)
        self.max_chunk = max(MIN_CHUNK, -(-width * KV_BLOCK // DECODE_SPLITS))
        items = [
            ("x", T * E * 4),
            ("xn", T * E * 4),
            ("qkv", T * self.qkv_dim * 4),
            ("attn", T * hp.q_dim * 4),
            ("gu", T * 2 * ff * 4),
            ("act", T * ff * 4),
            ("router", T * max(1, hp.n_expert) * 4),
            ("eidx", T * kx * 4),
            ("ew", T * kx * 4),
            ("eg", T * kx * fe * 4 if hp.n_expert else 4),
            ("eu", T * kx * fe * 4 if hp.n_expert else 4),
            ("ed", T * kx * E * 4 if hp.n_expert else 4),
            ("xsel", R * E * 4),
            ("xnsel", R * E * 4),
            ("logits", R * V * 4),
            ("opart", R * hp.n_head * DECODE_SPLITS * hp.head_dim * 4),
            ("ml", R * hp.n_head * DECODE_SPLITS * 2 * 4),
            ("tickets", R * hp.n_head_kv * 4),
            ("xbuf", R * V * 4),
            ("gscratch", R * SAMPLE_SCRATCH_BYTES),
            ("barrier", R * 8),
            ("out", R * 8),
            ("hist", (max_batch + 1) * hist_len * 4),  # one slot more: padding rows
        ]
        self._qkv_plan = [self._group(L.qkv, hp.q_dim, hp.kv_dim) for L in recipe.layers]
        self._gu_plan = [
            self._group(L.ffn_in, ff, ff) if L.ffn == "gated" else [] for L in recipe.layers
        ]
        # 15-bit codes written by an input's producer (the RMSNorm before q/k/v and gate/up,
        # the SwiGLU before down) where every product of that input takes the integer cores
        # at one scale block: per layer, that block or None (then each product quantizes)
        rms = recipe.norm == "rms"
        self._q15_attn = [
            mm.i15_input_block([qw for qw, _, _ in plan]) if rms else None
            for plan in self._qkv_plan
        ]
        self._q15_ffn = [
            mm.i15_input_block([qw for qw, _, _ in plan]) if rms and plan else None
            for plan in self._gu_plan
        ]
        for il, L in enumerate(recipe.layers):  # MoE: the experts' gate and up read xn
            if L.ffn == "moe_oai" and rms and mm.moe_takes_i15(self._expert_qtype(L)):
                self._q15_ffn[il] = 32
        self._q15_down = [
            mm.i15_input_block([weight(f"{L.ffn_out}.weight")]) if L.ffn == "gated" else None
            for L in recipe.layers
        ]
        q15 = any(b for b in self._q15_attn + self._q15_ffn + self._q15_down)
        items.append(("xq", i15_planes(T, max(E, ff), 32)[4] if q15 else 16))
        plan = plan_arena(items)
        self.scratch = ctx.alloc(plan.total, "scratch")
        self.s = {n: self.scratch.view(plan.offsets[n], plan.sizes[n], n) for n in plan.offsets}
        self._zero(self.s["tickets"])
        self._zero(self.s["barrier"])
        # (layer, expert ids [T, k]) per MoE layer run, while a test traces the routing
        # (eager steps only: a graph replay runs no Python)
        self.route_trace: list[tuple[int, Any]] | None = None
        # workspaces the matrix kernels grow on demand: sized now (no allocation in a capture)
        mats = [qw for plan in self._qkv_plan + self._gu_plan for qw, _, _ in plan]
        for L in recipe.layers:
            names = [L.attn_output, L.ffn_out] + (
                list(L.ffn_in[:1]) if L.ffn in ("gelu", "moe_oai") else []
            )
            mats += [weight(f"{n}.weight") for n in names]
        mats.append(weight(recipe.head))
        mm.reserve(max(max_tokens, max_rows), max(E, ff, hp.q_dim), hp.n_expert, kx, mats)
        self.arithmetic = mm.arithmetic(mats)  # what the load log and bench record

    def _zero(self, buf: DevBuf) -> None:
        import numpy as np

        self.ctx.htod(buf, np.zeros(buf.nbytes // 4, np.uint32))

    # ------------------------------------------------------------------ launch helpers

    def _lin(
        self,
        wname: str,
        x: Buf,
        y: Buf,
        n: int,
        *,
        residual: Buf | None = None,
        bias: str | None = None,
        ldy: int | None = None,
        planes: DevBuf | None = None,
    ) -> None:
        w = self.weight(f"{wname}.weight")
        b = self.tensor(f"{bias}.bias") if bias else None
        self.mm.linear(
            w,
            x,
            y,
            n,
            stream=self.ctx.stream,
            bias=_b(b) if b is not None else None,
            residual=residual,
            ldy=ldy,
            planes=planes,
        )
        self._checked(f"matmul {wname}")

    def _checked(self, what: str) -> None:
        if self.k.sync_each:
            self.ctx.sync(what)

    def _group(self, prefixes: tuple[str, ...], first_cols: int, other_cols: int) -> list[Any]:
        """Launch plan for projections whose outputs sit side by side in one row: adjacent
        matrices of one type and width (and their biases, if all have adjacent ones) become
        one matrix with the rows of all. Returns (QWeight, bias, output column) per launch."""
        out: list[Any] = []
        col = 0
        run: list[str] = []
        run_col = 0

        def flush() -> None:
            if not run:
                return
            ws = [self.weight(f"{r}.weight") for r in run]
            qw = QWeight(
                ptr=ws[0].ptr,
                qtype=ws[0].qtype,
                rows=sum(w.rows for w in ws),
                cols=ws[0].cols,
                nbytes=sum(w.nbytes for w in ws),
            )
            bs = [self.tensor(f"{r}.bias") for r in run]
            bias: Buf | None = None
            if bs[0] is not None:
                bias = (bs[0].ptr, sum(b.nbytes for b in bs if b is not None))
            out.append((qw, bias, run_col))

        def joins(prev: str, nxt: str) -> bool:
            a, b = self.weight(f"{prev}.weight"), self.weight(f"{nxt}.weight")
            if a.qtype != b.qtype or a.cols != b.cols or b.ptr != a.ptr + a.nbytes:
                return False
            ba, bb = self.tensor(f"{prev}.bias"), self.tensor(f"{nxt}.bias")
            if (ba is None) != (bb is None):
                return False
            return ba is None or (bb is not None and bb.ptr == ba.ptr + ba.nbytes)

        for i, pre in enumerate(prefixes):
            if run and joins(run[-1], pre):
                run.append(pre)
            else:
                flush()
                run, run_col = [pre], col
            col += first_cols if i == 0 else other_cols
        flush()
        return out

    def _norm(
        self, x: DevBuf, out: DevBuf, prefix: str, rows: int, q15: int | None = None
    ) -> DevBuf | None:
        """out = the layer's norm of x; with q15 (RMSNorm only) also out's 15-bit codes at that
        scale block, in s["xq"], which is returned for the products that read out."""
        hp, r = self.hp, self.r
        w = self.tensor(f"{prefix}.weight")
        if r.norm == "rms":
            planes = (self.s["xq"], q15) if q15 else None
            self.k.rmsnorm(x, w, out, rows, hp.n_embd, r.norm_eps, planes=planes)
            return self.s["xq"] if q15 else None
        self.k.layernorm(x, w, self.tensor(f"{prefix}.bias"), out, rows, hp.n_embd, r.norm_eps)
        return None

    # ------------------------------------------------------------------ the step

    def enqueue(self, st: DeviceStep) -> None:
        """Queue the whole step (see the module docstring)."""
        hp, k, s = self.hp, self.k, self.s
        T, E = st.tokens, hp.n_embd
        if st.decode:  # pending decode rows take the ids the step before drew (batch.py)
            k.resolve_pending_ids(st.ids, s["out"], st.decode)
        self.mm.embed(
            self.weight("token_embd.weight"), _b(st.ids), T, _b(s["x"]), stream=self.ctx.stream
        )
        if self.r.learned_pos is not None:
            table = self.tensor(self.r.learned_pos)
            assert table is not None
            k.add_pos_embd(s["x"], table, st.pos, T, E, table.nbytes // (4 * E))
        for il, L in enumerate(self.r.layers):
            self._layer = il
            self._attention_block(il, L, st)
            blk = self._q15_ffn[il]
            if L.ffn == "moe_oai" and self.mm.moe_form(T) == "gemv":
                blk = None  # (invariance off, a step of 1-2 tokens: the gemv reads xn)
            planes = self._norm(s["x"], s["xn"], L.ffn_norm, T, blk)
            if L.ffn == "moe_oai":
                self._moe(L, T, planes)
            else:
                self._ffn(il, L, T, planes)
        if st.rows:
            self._head(st)

    def _attention_block(self, il: int, L: LayerRecipe, st: DeviceStep) -> None:
        hp, k, s, r = self.hp, self.k, self.s, self.r
        T, QKV, qd, kvd = st.tokens, self.qkv_dim, hp.q_dim, hp.kv_dim
        planes = self._norm(s["x"], s["xn"], L.attn_norm, T, self._q15_attn[il])
        qkv = s["qkv"]
        for qw, bias, col in self._qkv_plan[il]:
            self.mm.linear(
                qw,
                _b(s["xn"]),
                (qkv.ptr + col * 4, qkv.nbytes - col * 4),
                T,
                stream=self.ctx.stream,
                bias=bias,
                ldy=QKV,
                planes=planes,
            )
            self._checked("matmul qkv")
        kc, vc = self.kv.layer(il)
        rope = r.rope
        k.qkv_rope_store(
            q=qkv,
            k=qkv.view(qd * 4, qkv.nbytes - qd * 4),
            v=qkv.view((qd + kvd) * 4, qkv.nbytes - (qd + kvd) * 4),
            bq=None,
            bk=None,
            bv=None,
            kcache=kc,
            vcache=vc,
            pos=st.pos,
            kvrow=st.kvrow,
            n_tokens=T,
            n_head=hp.n_head,
            n_kv=hp.n_head_kv,
            head_dim=hp.head_dim,
            n_rot=rope.n_rot,
            q_stride=QKV,
            kv_stride=QKV,
            inv_freq=self.rope_inv if self.rope_inv is not None else st.pos,
            mscale=rope.mscale,
            mode=rope.mode,
            pool_rows=self.kv.rows,
        )
        sinks = self.tensor(L.sinks) if L.sinks else None
        if st.decode:
            k.attention_decode(
                q=qkv,
                q_stride=QKV,
                kcache=kc,
                vcache=vc,
                bt=st.bt_decode,
                bt_stride=self.width,
                pos=st.pos,
                opart=s["opart"],
                ml=s["ml"],
                out=s["attn"],
                out_stride=qd,
                tickets=s["tickets"],
                shape=AttnShape(
                    st.decode, hp.n_head, hp.n_head_kv, hp.head_dim, DECODE_SPLITS, self.max_chunk
                ),
                pool_rows=self.kv.rows,
                scale=r.attn_scale,
                window=L.window,
                sinks=sinks,
            )
        if st.prefill:
            k.attention_prefill(
                q=qkv,
                q_stride=QKV,
                kcache=kc,
                vcache=vc,
                seq=st.seq,
                bt=st.bt_prefill,
                bt_stride=self.width,
                out=s["attn"],
                out_stride=qd,
                chunks=st.prefill,
                n_head=hp.n_head,
                n_kv=hp.n_head_kv,
                head_dim=hp.head_dim,
                pool_rows=self.kv.rows,
                scale=r.attn_scale,
                window=L.window,
                sinks=sinks,
            )
        x = _b(s["x"])
        self._lin(L.attn_output, _b(s["attn"]), x, T, residual=x, bias=L.attn_output)

    def _ffn(self, il: int, L: LayerRecipe, T: int, planes: DevBuf | None = None) -> None:
        """`planes`: xn's 15-bit codes (written by the norm) for the gate/up products."""
        hp, k, s = self.hp, self.k, self.s
        ff = hp.n_ff
        xn, gu, act, x = _b(s["xn"]), s["gu"], s["act"], _b(s["x"])
        if L.ffn == "gelu":
            up = L.ffn_in[0]
            self._lin(up, xn, _b(act), T, bias=up)
            k.gelu(act, act, T * ff)
            planes = None
        else:  # gate and up side by side in gu: [gate | up] per row
            for qw, bias, col in self._gu_plan[il]:
                self.mm.linear(
                    qw,
                    xn,
                    (gu.ptr + col * 4, gu.nbytes - col * 4),
                    T,
                    stream=self.ctx.stream,
                    bias=bias,
                    ldy=2 * ff,
                    planes=planes,
                )
                self._checked("matmul gate/up")
            q15 = self._q15_down[il]
            down = (s["xq"], q15) if q15 else None  # (gate/up has read the norm's codes)
            k.swiglu(
                gu, gu.view(ff * 4, gu.nbytes - ff * 4), act, T, ff, 2 * ff, 2 * ff, ff, planes=down
            )
            planes = s["xq"] if q15 else None
        self._lin(L.ffn_out, _b(act), x, T, residual=x, bias=L.ffn_out, planes=planes)

    def _expert_qtype(self, L: LayerRecipe) -> int | None:
        """The format of a MoE layer's expert tensors (gate, up, down), None if they differ."""
        names = (*L.ffn_in[1:], L.ffn_out)
        types = {self.weight(f"{n}.weight").qtype for n in names}
        return types.pop() if len(types) == 1 else None

    def _moe(self, L: LayerRecipe, T: int, planes: DevBuf | None = None) -> None:
        """gpt-oss: router top-k + softmax over the chosen, expert gate/up (+bias), clamped
        SwiGLU, expert down (+bias), weighted sum into the residual stream. Tokens are
        grouped by expert inside the routed matrix kernels. `planes`: xn's 15-bit codes
        (written by the norm) for the integer form's gate and up."""
        hp, k, s = self.hp, self.k, self.s
        kk, ff = hp.n_expert_used, hp.n_ff_exp
        router, gate, up = L.ffn_in
        self._lin(router, _b(s["xn"]), _b(s["router"]), T, bias=router)
        k.topk_softmax(s["router"], T, hp.n_expert, kk, s["eidx"], s["ew"])
        if self.route_trace is not None:
            import numpy as np

            ids = np.empty((T, kk), np.int32)
            self.ctx.dtoh(ids, s["eidx"])
            self.route_trace.append((self._layer, ids))
        st = self.ctx.stream
        # one routing pre-pass for the layer's three expert products; gate and up in one
        # launch (the skinny form pairs them: fuller waves at one token)
        eidx = _b(s["eidx"])
        # (the experts' format picks the integer form when it is on: one format for all three)
        qtype = self._expert_qtype(L)
        route = self.mm.moe_route(eidx, T, kk, hp.n_expert, stream=st, qtype=qtype)

        def expert(name: str) -> tuple[QWeight, Buf | None]:
            b = self.tensor(f"{name}.bias")
            return self.weight(f"{name}.weight"), _b(b) if b is not None else None

        def experts(name: str, out: str) -> tuple[QWeight, Buf, Buf | None]:
            w, b = expert(name)
            return w, _b(s[out]), b

        if route.form == "i15":  # each half of the layer ends in one launch
            self.mm.moe15_ffn(
                expert(gate),
                expert(up),
                expert(L.ffn_out),
                eidx,
                _b(s["ew"]),
                T,
                kk,
                _b(s["xn"]),
                _b(s["x"]),
                route,
                swiglu=(1.702, 7.0),
                planes=planes,
                stream=st,
            )
            self._checked("moe")
            return
        wg, yg, bg = experts(gate, "eg")
        xn = _b(s["xn"])
        self.mm.moe(
            wg,
            eidx,
            T,
            kk,
            xn,
            yg,
            per_slot_input=False,
            stream=st,
            route=route,
            bias=bg,
            pair=experts(up, "eu"),
            planes=planes if route.form == "i15" else None,
        )
        k.swiglu(s["eg"], s["eu"], s["eg"], T * kk, ff, ff, ff, ff, oai=(1.702, 7.0))
        wd, yd, bd = experts(L.ffn_out, "ed")
        self.mm.moe(wd, eidx, T, kk, yg, yd, per_slot_input=True, stream=st, route=route, bias=bd)
        k.moe_combine(s["x"], s["ed"], s["ew"], T, hp.n_embd, kk)
        self._checked("moe")

    def _head(self, st: DeviceStep) -> None:
        """Logits of the R wanted rows; the first `sampled` of them sampled."""
        hp, k, s, r = self.hp, self.k, self.s, self.r
        E, V, R = hp.n_embd, hp.n_vocab, st.rows
        k.gather_rows(s["x"], E, st.gidx, s["xsel"], E, R, E, st.tokens)
        self._norm(s["xsel"], s["xnsel"], r.output_norm, R)
        self.mm.linear(
            self.weight(r.head), _b(s["xnsel"]), _b(s["logits"]), R, stream=self.ctx.stream
        )
        self._checked("lm head")
        if st.sampled:
            k.sample_rows(
                logits=s["logits"],
                ldl=V,
                n=V,
                rows=st.sampled,
                args=st.sargs,
                slot=st.slot,
                hist=s["hist"],
                hist_stride=self.hist_len,
                n_slots=self.max_batch + 1,
                xbuf=s["xbuf"],
                out=s["out"],
                gscratch=s["gscratch"],
                barrier=s["barrier"],
            )
