"""Every non-matrix kernel against its NumPy twin on random inputs, odd sizes and the real
models' shapes, over the paged KV cache (blocks placed at random in a pool, block tables per
sequence) and batches of rows with their own lengths and settings. Bounds: float32 kernels
1e-5 relative (norm of the error over the norm of the reference); FP16 KV-cache stores
within half an FP16 ulp; the sampler bit-exact (same id). Batch invariance: a row's result is
bit-identical alone and among others (1, 2, 7, 64 rows)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from worker.backends.cuda.arena import LaunchRefused
from worker.backends.cuda.kernels import (
    KV_BLOCK,
    SAMPLE_ARGS_BYTES,
    SAMPLE_SCRATCH_BYTES,
    AttnShape,
    sample_args,
)
from worker.engine.params import SamplingParams
from worker.engine.sampling import sample
from worker.gguf.hparams import RopeParams
from worker.models.common import (
    AttnOptions,
    KVCache,
    apply_rope,
    attention,
    gelu_tanh,
    layernorm,
    moe_route,
    rmsnorm,
    rope_angles,
    swiglu,
    swiglu_oai,
)

pytestmark = pytest.mark.gpu
F32_BOUND = 1e-5


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    """||got - ref|| / ||ref|| in float64; a NaN (an unwritten, poisoned output) fails."""
    g = np.asarray(got, np.float64)
    r = np.asarray(ref, np.float64)
    assert not np.isnan(g).any(), "NaN in the output (unwritten or invalid)"
    return float(np.linalg.norm(g - r) / max(float(np.linalg.norm(r)), 1e-30))


@pytest.mark.parametrize("rows,n", [(1, 896), (7, 896), (3, 3072), (5, 2880), (2, 33), (1, 4097)])
@pytest.mark.parametrize("fused", [False, True])
def test_rmsnorm(kern: Any, dev: Any, rows: int, n: int, fused: bool) -> None:
    rng = np.random.default_rng(rows * n)
    x = rng.standard_normal((rows, n)).astype(np.float32)
    d = rng.standard_normal((rows, n)).astype(np.float32)
    w = rng.standard_normal(n).astype(np.float32)
    bx, bw, bo = dev.put(x), dev.put(w), dev.poison(x.nbytes)
    bd = dev.put(d) if fused else None
    kern.rmsnorm(bx, bw, bo, rows, n, 1e-6, delta=bd)
    xs = x + d if fused else x
    assert rel_err(dev.get(bo, (rows, n)), rmsnorm(xs, w, 1e-6)) < F32_BOUND
    if fused:
        assert rel_err(dev.get(bx, (rows, n)), xs) == 0.0


@pytest.mark.parametrize("rows,n", [(1, 768), (9, 768), (2, 37)])
def test_layernorm(kern: Any, dev: Any, rows: int, n: int) -> None:
    rng = np.random.default_rng(n)
    x = (rng.standard_normal((rows, n)) * 3 + 1).astype(np.float32)
    w = rng.standard_normal(n).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    bx, bo = dev.put(x), dev.poison(x.nbytes)
    kern.layernorm(bx, dev.put(w), dev.put(b), bo, rows, n, 1e-5)
    assert rel_err(dev.get(bo, (rows, n)), layernorm(x, w, b, 1e-5)) < F32_BOUND


ROPES = {
    "qwen2": (RopeParams(type="neox", theta=1e6, n_dims=64), 14, 2, 64),
    "llama": (RopeParams(type="normal", theta=5e5, n_dims=128), 8, 2, 128),
    "phi3-partial": (RopeParams(type="neox", theta=1e4, n_dims=64), 4, 4, 96),
    "gpt-oss-yarn": (
        RopeParams(
            type="neox",
            theta=150000.0,
            n_dims=64,
            scaling="yarn",
            factor=32.0,
            orig_ctx=4096,
            yarn_ext_factor=1.0,
        ),
        8,
        1,
        64,
    ),
}


@pytest.mark.parametrize("which", sorted(ROPES))
@pytest.mark.parametrize("n_tok", [1, 13, 64])
def test_qkv_rope_store(kern: Any, dev: Any, which: str, n_tok: int) -> None:
    """Tokens at their own positions (as a batch holds them) store k and v at their own
    pool rows; a token with row -1 (padding) stores nothing."""
    from worker.models.recipe import rope_inv_freq

    rope, nh, nkv, hd = ROPES[which]
    rows = 5000
    rng = np.random.default_rng(n_tok + hd)
    pos = rng.integers(0, 4000, n_tok).astype(np.int32)
    kvrow = rng.permutation(rows)[:n_tok].astype(np.int32)
    if n_tok > 1:
        kvrow[n_tok // 2] = -1
    stride = (nh + 2 * nkv) * hd + 8  # padded rows, as a strided view would be
    qkv = rng.standard_normal((n_tok, stride)).astype(np.float32)
    bq = rng.standard_normal(nh * hd).astype(np.float32)
    bk = rng.standard_normal(nkv * hd).astype(np.float32)
    bv = rng.standard_normal(nkv * hd).astype(np.float32)
    inv, mscale = rope_inv_freq(rope, None)
    b_qkv = dev.put(qkv)
    kc = dev.put(np.full((rows, nkv, hd), np.nan, np.float16))
    vc = dev.put(np.full((rows, nkv, hd), np.nan, np.float16))
    ko, vo = nh * hd * 4, (nh + nkv) * hd * 4
    kern.qkv_rope_store(
        q=b_qkv,
        k=b_qkv.view(ko, b_qkv.nbytes - ko),
        v=b_qkv.view(vo, b_qkv.nbytes - vo),
        bq=dev.put(bq),
        bk=dev.put(bk),
        bv=dev.put(bv),
        kcache=kc,
        vcache=vc,
        pos=dev.put(pos),
        kvrow=dev.put(kvrow),
        n_tokens=n_tok,
        n_head=nh,
        n_kv=nkv,
        head_dim=hd,
        n_rot=rope.n_dims,
        q_stride=stride,
        kv_stride=stride,
        inv_freq=dev.put(inv),
        mscale=mscale,
        mode=2 if rope.type == "neox" else 1,
        pool_rows=rows,
    )
    cos, sin = rope_angles(rope, pos.astype(np.int64))
    q_ref = apply_rope((qkv[:, : nh * hd] + bq).reshape(n_tok, nh, hd), cos, sin, rope)
    k_ref = apply_rope(
        (qkv[:, nh * hd : (nh + nkv) * hd] + bk).reshape(n_tok, nkv, hd), cos, sin, rope
    )
    v_ref = (qkv[:, (nh + nkv) * hd : (nh + 2 * nkv) * hd] + bv).reshape(n_tok, nkv, hd)
    got = dev.get(b_qkv, qkv.shape)
    assert rel_err(got[:, : nh * hd].reshape(q_ref.shape), q_ref) < F32_BOUND
    assert np.array_equal(got[:, nh * hd :], qkv[:, nh * hd :])  # k, v rows untouched
    kcache = dev.get(kc, (rows, nkv, hd), np.float16)
    vcache = dev.get(vc, (rows, nkv, hd), np.float16)
    stored = kvrow >= 0
    # FP16 store: at most half an ulp of fp16 from the exact value (plus fp32 rope error)
    np.testing.assert_allclose(
        kcache[kvrow[stored]].astype(np.float32), k_ref[stored], rtol=2**-11, atol=1e-5
    )
    np.testing.assert_array_equal(vcache[kvrow[stored]], v_ref[stored].astype(np.float16))
    untouched = np.ones(rows, bool)
    untouched[kvrow[stored]] = False
    assert np.isnan(kcache[untouched].astype(np.float32)).all()  # nothing else written
    assert np.isnan(vcache[untouched].astype(np.float32)).all()


# ---------------------------------------------------------------- attention over the pool


def _ref_attention(
    q: np.ndarray,
    kc: np.ndarray,
    vc: np.ndarray,
    pos0: int,
    nh: int,
    scale: float,
    window: int,
    sinks: np.ndarray | None,
) -> np.ndarray:
    """The NumPy reference attention of q's rows (positions pos0 ...) over a sequence's
    FP16 cache kc/vc [positions][n_kv][head_dim], keys up to the last query's position."""
    from worker.gguf.hparams import HParams

    ctx, nkv, hd = kc.shape
    n_tok, kv_max = q.shape[0], pos0 + q.shape[0]
    hp = HParams(
        arch="qwen2",
        n_layer=1,
        n_embd=nh * hd,
        n_head=nh,
        n_head_kv=nkv,
        head_dim=hd,
        head_dim_v=hd,
        n_ff=8,
        n_vocab=8,
        n_ctx_train=ctx,
        norm="rms",
        norm_eps=1e-6,
        rope=RopeParams(type="none"),
    )
    cache = KVCache(hp, ctx)
    cache.k[0][:] = kc.astype(np.float32)
    cache.v[0][:] = vc.astype(np.float32)
    return attention(
        q.reshape(n_tok, nh, hd),
        cache,
        0,
        cache.k[0][pos0:kv_max].copy(),
        cache.v[0][pos0:kv_max].copy(),
        pos0,
        AttnOptions(scale=scale, window=window, sinks=sinks),
    )


class Pool:
    """A KV pool holding several sequences' caches in shuffled blocks (NaN elsewhere)."""

    def __init__(self, rng: np.random.Generator, lengths: list[int], nkv: int, hd: int) -> None:
        self.width = max(-(-n // KV_BLOCK) for n in lengths) + 1
        n_blocks = sum(-(-n // KV_BLOCK) for n in lengths) + 3
        perm = list(rng.permutation(n_blocks))
        self.k = np.full((n_blocks * KV_BLOCK, nkv, hd), np.nan, np.float16)
        self.v = np.full((n_blocks * KV_BLOCK, nkv, hd), np.nan, np.float16)
        self.caches: list[tuple[np.ndarray, np.ndarray]] = []
        self.tables = np.full((len(lengths), self.width), n_blocks - 1, np.int32)
        for s, n in enumerate(lengths):
            kc = (rng.standard_normal((n, nkv, hd)) * 0.5).astype(np.float16)
            vc = rng.standard_normal((n, nkv, hd)).astype(np.float16)
            self.caches.append((kc, vc))
            for b in range(-(-n // KV_BLOCK)):
                p = int(perm.pop())
                self.tables[s, b] = p
                m = min(KV_BLOCK, n - b * KV_BLOCK)
                self.k[p * KV_BLOCK : p * KV_BLOCK + m] = kc[b * KV_BLOCK : b * KV_BLOCK + m]
                self.v[p * KV_BLOCK : p * KV_BLOCK + m] = vc[b * KV_BLOCK : b * KV_BLOCK + m]

    @property
    def rows(self) -> int:
        return int(self.k.shape[0])


def _decode_run(
    kern: Any,
    dev: Any,
    pool: Pool,
    kb: Any,
    vb: Any,
    q: np.ndarray,
    lengths: list[int],
    seqs: list[int],
    nh: int,
    window: int,
    sk: np.ndarray | None,
) -> np.ndarray:
    """attn_paged_decode for rows `seqs` (row t: sequence seqs[t], query q[t] at position
    lengths[seqs[t]] - 1)."""
    nkv, hd = pool.k.shape[1], pool.k.shape[2]
    n = len(seqs)
    width = pool.width
    splits = 16
    max_chunk = max(64, -(-width * KV_BLOCK // splits))
    tickets = dev.put(np.zeros(n * nh, np.uint32))
    out = dev.poison(n * nh * hd * 4)
    kern.attention_decode(
        q=dev.put(q[seqs] if q.shape[0] != n else q),
        q_stride=nh * hd,
        kcache=kb,
        vcache=vb,
        bt=dev.put(pool.tables[seqs]),
        bt_stride=width,
        pos=dev.put(np.array([lengths[s] - 1 for s in seqs], np.int32)),
        opart=dev.poison(n * nh * splits * hd * 4),
        ml=dev.poison(n * nh * splits * 8),
        out=out,
        out_stride=nh * hd,
        tickets=tickets,
        shape=AttnShape(n, nh, nkv, hd, splits, max_chunk),
        pool_rows=pool.rows,
        scale=float(1.0 / np.sqrt(hd)),
        window=window,
        sinks=dev.put(sk) if sk is not None else None,
    )
    assert not dev.get(tickets, (n * nh,), np.uint32).any()  # left zeroed for reuse
    return dev.get(out, (n, nh * hd))


@pytest.mark.parametrize(
    "nh,nkv,hd,window,sinks",
    [
        (14, 2, 64, 0, False),  # qwen2
        (32, 32, 96, 0, False),  # phi3 MHA, head_dim 96
        (64, 8, 64, 128, True),  # gpt-oss sliding layer
        (64, 8, 64, 0, True),  # gpt-oss full layer
        (12, 12, 64, 0, False),  # gpt2
        (8, 2, 128, 0, False),  # llama head_dim 128
        (16, 2, 32, 16, True),  # tiny presets
    ],
)
def test_decode_attention_batch(
    kern: Any, dev: Any, nh: int, nkv: int, hd: int, window: int, sinks: bool
) -> None:
    """64 sequences of their own lengths (1 .. 1500) in one launch: each row equals the
    reference over its own cache, and equals itself launched alone, among 2 and among 7
    (bit for bit)."""
    rng = np.random.default_rng(nh * hd + window)
    lengths = [1, 2, 63, 64, 65, 128, 129, 700, 1500, *(int(v) for v in rng.integers(1, 1500, 55))]
    pool = Pool(rng, lengths, nkv, hd)
    kb, vb = dev.put(pool.k), dev.put(pool.v)
    q = rng.standard_normal((len(lengths), nh * hd)).astype(np.float32)
    sk = (rng.standard_normal(nh) * 2).astype(np.float32) if sinks else None
    everyone = list(range(len(lengths)))
    full = _decode_run(kern, dev, pool, kb, vb, q, lengths, everyone, nh, window, sk)
    for t, n in enumerate(lengths):
        kc, vc = pool.caches[t]
        ref = _ref_attention(q[t : t + 1], kc, vc, n - 1, nh, float(1 / np.sqrt(hd)), window, sk)
        assert rel_err(full[t : t + 1], ref) < 2e-5, (t, n)
    for group in ([5], [7, 3], [8, 0, 63, 11, 2, 40, 1]):
        got = _decode_run(kern, dev, pool, kb, vb, q[group], lengths, group, nh, window, sk)
        assert np.array_equal(got.view(np.uint32), full[group].view(np.uint32)), group


def _prefill_run(
    kern: Any,
    dev: Any,
    pool: Pool,
    q: np.ndarray,
    chunks: list[tuple[int, int, int]],
    seqs: list[int],
    nh: int,
    window: int,
    sk: np.ndarray | None,
    pad_rows: int = 1,
) -> np.ndarray:
    """One tensor-core launch over `chunks` (row0, n, pos0) of sequences `seqs`; the output
    has pad_rows poisoned rows past the tokens and a 4-float gap between rows (out_stride >
    width): both must stay NaN."""
    n, hd = q.shape[0], pool.k.shape[2]
    nkv = pool.k.shape[1]
    width = nh * hd
    stride = width + 4
    out = dev.poison((n + pad_rows) * stride * 4)
    kern.attention_prefill(
        q=dev.put(q),
        q_stride=width,
        kcache=dev.put(pool.k),
        vcache=dev.put(pool.v),
        seq=dev.put(np.array(chunks, np.int32).reshape(-1)),
        bt=dev.put(pool.tables[seqs]),
        bt_stride=pool.width,
        out=out,
        out_stride=stride,
        chunks=chunks,
        n_head=nh,
        n_kv=nkv,
        head_dim=hd,
        pool_rows=pool.rows,
        scale=float(1.0 / np.sqrt(hd)),
        window=window,
        sinks=dev.put(sk) if sk is not None else None,
    )
    full = dev.get(out, (n + pad_rows, stride))
    assert np.isnan(full[n:]).all(), "tc wrote past the last token"
    assert np.isnan(full[:, width:]).all(), "tc wrote into the row gap"
    return np.ascontiguousarray(full[:n, :width])


def _prefill_case(
    kern: Any,
    dev: Any,
    n_tok: int,
    pos0: int,
    nh: int,
    nkv: int,
    hd: int,
    window: int,
    sinks: bool,
    seed: int = 0,
) -> float:
    rng = np.random.default_rng(seed * 1009 + pos0 * 7 + n_tok)
    kv_max = pos0 + n_tok
    pool = Pool(rng, [kv_max, 37], nkv, hd)
    q = rng.standard_normal((n_tok, nh * hd)).astype(np.float32)
    sk = (rng.standard_normal(nh) * 2).astype(np.float32) if sinks else None
    got = _prefill_run(kern, dev, pool, q, [(0, n_tok, pos0)], [0], nh, window, sk)
    kc, vc = pool.caches[0]
    ref = _ref_attention(q, kc, vc, pos0, nh, float(1.0 / np.sqrt(hd)), window, sk)
    err = rel_err(got, ref)
    assert err < TC_BOUND, (n_tok, pos0, nh, nkv, hd, window, sinks, err)
    return err


# FP16 Q (scaled) and P in the tensor-core prefill attention: measured <= ~4e-4 in
# tests/unit/cuda/test_attn_args.py's emulation; the bound leaves margin
TC_BOUND = 2e-3


@pytest.mark.parametrize(
    "n_tok,pos0,nh,nkv,hd,window,sinks",
    [
        (1, 0, 14, 2, 64, 0, False),  # one token (a 1-row tile)
        (37, 0, 14, 2, 64, 0, False),  # qwen2, odd length
        (512, 0, 14, 2, 64, 0, False),  # qwen2 pp512
        (600, 0, 14, 2, 64, 0, False),
        (512, 0, 32, 32, 96, 0, False),  # phi3 (MHA, head_dim 96)
        (129, 0, 32, 32, 96, 2047, False),  # phi3's window (wider than the prompt)
        (512, 0, 64, 8, 64, 128, True),  # gpt-oss sliding layer
        (512, 0, 64, 8, 64, 0, True),  # gpt-oss full layer
        (70, 300, 64, 8, 64, 128, True),  # second prefill chunk, window + sinks
        (100, 512, 32, 32, 96, 0, False),  # second chunk after 512 tokens
        (64, 64, 14, 2, 64, 0, False),  # tile-aligned second chunk
        (1, 1000, 14, 2, 64, 0, False),  # a one-token chunk far in
        (3, 600, 8, 2, 128, 0, False),  # llama head_dim 128, short chunk far in
        (77, 5, 7, 1, 80, 0, True),  # GQA 7, head_dim 80
        (130, 0, 16, 2, 32, 16, True),  # tiny presets: head_dim 32, window 16
        (257, 0, 4, 4, 64, 0, False),  # gpt2 (MHA 64)
        (129, 31, 8, 1, 64, 1, False),  # window 1: only the own key
    ],
)
def test_prefill_attention(
    kern: Any,
    dev: Any,
    n_tok: int,
    pos0: int,
    nh: int,
    nkv: int,
    hd: int,
    window: int,
    sinks: bool,
) -> None:
    _prefill_case(kern, dev, n_tok, pos0, nh, nkv, hd, window, sinks)


def test_prefill_attention_lengths(kern: Any, dev: Any) -> None:
    """Every tile edge from 1 to 600 tokens (and a sample in between), GQA 2 and 8, fresh
    prompts and second chunks."""
    lengths = sorted(
        set(range(1, 601, 29))
        | {2, 15, 16, 17, 63, 64, 65, 127, 128, 129, 255, 256, 257, 511, 512, 513, 599, 600}
    )
    worst = 0.0
    for i, n in enumerate(lengths):
        nh, nkv = (8, 1) if i % 2 else (4, 2)
        pos0 = 0 if i % 3 else 97 * (i % 7)
        window = 128 if i % 4 == 1 else 0
        worst = max(worst, _prefill_case(kern, dev, n, pos0, nh, nkv, 64, window, i % 4 == 1, i))
    print(f"tc lengths 1..600: worst rel err {worst:.2e}")


@pytest.mark.parametrize("nh,nkv,hd,window,sinks", [(14, 2, 64, 0, False), (64, 8, 64, 128, True)])
def test_prefill_attention_is_chunking_invariant(
    kern: Any, dev: Any, nh: int, nkv: int, hd: int, window: int, sinks: bool
) -> None:
    """A 300-token prompt's rows are bit-identical computed as one chunk, as three chunks of
    one launch (cut off tile edges), and beside other sequences' chunks; and equal to the
    decode kernel's within the FP16 bound."""
    rng = np.random.default_rng(nh + window)
    pool = Pool(rng, [300, 90, 700], nkv, hd)
    q = rng.standard_normal((300, nh * hd)).astype(np.float32)
    sk = (rng.standard_normal(nh) * 2).astype(np.float32) if sinks else None
    whole = _prefill_run(kern, dev, pool, q, [(0, 300, 0)], [0], nh, window, sk)
    cut = [(0, 37, 0), (37, 64, 37), (101, 199, 101)]
    parts = _prefill_run(kern, dev, pool, q, cut, [0, 0, 0], nh, window, sk)
    assert np.array_equal(whole.view(np.uint32), parts.view(np.uint32))
    other = rng.standard_normal((30, nh * hd)).astype(np.float32)
    q2 = np.concatenate([other, q[37:101], other[:7]])
    beside = _prefill_run(
        kern, dev, pool, q2, [(0, 30, 60), (30, 64, 37), (94, 7, 690)], [1, 0, 2], nh, window, sk
    )
    assert np.array_equal(beside[30:94].view(np.uint32), whole[37:101].view(np.uint32))
    for _ in range(2):  # reruns: bit-identical
        again = _prefill_run(kern, dev, pool, q, [(0, 300, 0)], [0], nh, window, sk)
        assert np.array_equal(again, whole)


def test_attention_launches_are_refused(kern: Any, dev: Any) -> None:
    with pytest.raises(LaunchRefused, match="attn_prefill_tc"):
        kern.attention_prefill(
            q=dev.poison(2 * 896 * 4),
            q_stride=896,
            kcache=dev.poison(128 * 128 * 2),
            vcache=dev.poison(128 * 128 * 2),
            seq=dev.put(np.array([0, 2, 0], np.int32)),
            bt=dev.put(np.zeros(2, np.int32)),
            bt_stride=2,
            out=dev.poison(896 * 4),  # one row for two tokens
            out_stride=896,
            chunks=[(0, 2, 0)],
            n_head=14,
            n_kv=2,
            head_dim=64,
            pool_rows=128,
            scale=0.125,
        )
    with pytest.raises(LaunchRefused, match="attn_paged_decode"):
        kern.attention_decode(
            q=dev.poison(896 * 4),
            q_stride=896,
            kcache=dev.poison(128 * 128 * 2),
            vcache=dev.poison(128 * 128 * 2),
            bt=dev.put(np.zeros(2, np.int32)),
            bt_stride=2,
            pos=dev.put(np.array([0], np.int32)),
            opart=dev.poison(14 * 16 * 64 * 4),
            ml=dev.poison(14 * 16 * 8),
            out=dev.poison(896 * 4),
            out_stride=896,
            tickets=dev.put(np.zeros(14, np.uint32)),
            shape=AttnShape(1, 14, 2, 64, 2, 32),  # 2 chunks of 32 keys < 2 blocks
            pool_rows=128,
            scale=0.125,
        )
    x = dev.poison(896 * 4)
    with pytest.raises(LaunchRefused, match="rmsnorm_f32"):
        kern.rmsnorm(x, dev.poison(896 * 4), x, 2, 896, 1e-6)  # 2 rows in a 1-row buffer
    kern.rmsnorm(x, None, x, 1, 896, 1e-6)  # the context is still healthy afterwards
    kern.ctx.sync("after refused launches")


@pytest.mark.parametrize("rows,n", [(1, 4864), (5, 4864), (3, 8192), (2, 7)])
def test_swiglu_variants(kern: Any, dev: Any, rows: int, n: int) -> None:
    rng = np.random.default_rng(n + rows)
    gu = (rng.standard_normal((rows, 2 * n)) * 4).astype(np.float32)  # fused [gate | up]
    b = dev.put(gu)
    up = b.view(n * 4, b.nbytes - n * 4)
    out = dev.poison(rows * n * 4)
    kern.swiglu(b, up, out, rows, n, 2 * n, 2 * n, n)
    assert rel_err(dev.get(out, (rows, n)), swiglu(gu[:, :n], gu[:, n:])) < F32_BOUND
    out2 = dev.poison(rows * n * 4)
    kern.swiglu(b, up, out2, rows, n, 2 * n, 2 * n, n, oai=(1.702, 7.0))
    assert rel_err(dev.get(out2, (rows, n)), swiglu_oai(gu[:, :n], gu[:, n:])) < F32_BOUND


@pytest.mark.parametrize(("n", "blk"), [(896, 32), (3072, 256), (4864, 256), (4864, 32)])
def test_norm_and_swiglu_write_the_codes_of_their_output(
    kern: Any, dev: Any, n: int, blk: int
) -> None:
    """rmsnorm / swiglu with planes: the output they write without, and quant_x15's codes of
    it (tools.i15's twin; cuda_src/i15.cuh), bit for bit, for the integer products."""
    from tools.i15 import quant_x15
    from worker.backends.cuda.plans.i15 import i15_planes

    rows = 3
    rng = np.random.default_rng(n + blk)
    x = rng.standard_normal((rows, n)).astype(np.float32)
    w = rng.standard_normal(n).astype(np.float32)
    gu = (rng.standard_normal((rows, 2 * n)) * 4).astype(np.float32)
    hi, lo, d, sq, total = i15_planes(rows, n, blk)
    for which in ("rmsnorm", "swiglu"):
        plain, out = dev.poison(rows * n * 4), dev.poison(rows * n * 4)
        planes = dev.put(np.full(total, 0x5A, np.uint8))
        for o, q in ((plain, None), (out, (planes, blk))):
            if which == "rmsnorm":
                kern.rmsnorm(dev.put(x), dev.put(w), o, rows, n, 1e-6, planes=q)
            else:
                b = dev.put(gu)
                up = b.view(n * 4, b.nbytes - n * 4)
                kern.swiglu(b, up, o, rows, n, 2 * n, 2 * n, n, planes=q)
        got = dev.get(out, (rows, n))
        assert got.tobytes() == dev.get(plain, (rows, n)).tobytes(), which
        raw = dev.get(planes, (total,), np.uint8)
        want = quant_x15(got, blk)
        have = (
            raw[hi:lo].view(np.int8),
            raw[lo : lo + rows * n].view(np.int8),
            raw[d : d + 4 * rows * (n // blk)].view(np.float32),
            raw[sq : sq + 4 * rows * (n // 32)].view(np.int32),
        )
        for a, b_ in zip(have, want, strict=True):
            assert a.tobytes() == b_.tobytes(), which


@pytest.mark.parametrize("n", [1, 3072, 100003])
def test_gelu_and_add(kern: Any, dev: Any, n: int) -> None:
    rng = np.random.default_rng(n)
    x = (rng.standard_normal(n) * 3).astype(np.float32)
    y = rng.standard_normal(n).astype(np.float32)
    bx, out = dev.put(x), dev.poison(n * 4)
    kern.gelu(bx, out, n)
    assert rel_err(dev.get(out, (n,)), gelu_tanh(x)) < F32_BOUND
    kern.add(bx, dev.put(y), 1, n, n, n)
    assert np.array_equal(dev.get(bx, (n,)), x + y)
    bias = rng.standard_normal(7).astype(np.float32)
    z = rng.standard_normal((5, 7)).astype(np.float32)
    bz = dev.put(z)
    kern.add(bz, dev.put(bias), 5, 7, 7, 0)
    assert np.array_equal(dev.get(bz, (5, 7)), z + bias)


@pytest.mark.parametrize("rows,n_exp,k", [(1, 32, 4), (7, 32, 4), (3, 128, 8), (2, 5, 2)])
def test_router_topk_softmax(kern: Any, dev: Any, rows: int, n_exp: int, k: int) -> None:
    rng = np.random.default_rng(rows * n_exp)
    logits = rng.standard_normal((rows, n_exp)).astype(np.float32)
    logits[0, 3] = logits[0, 1]  # a tie: the lower index must win
    idx, w = dev.put(np.full((rows, k), -1, np.int32)), dev.poison(rows * k * 4)
    kern.topk_softmax(dev.put(logits), rows, n_exp, k, idx, w)
    ref_i, ref_w = moe_route(logits, k)
    assert np.array_equal(dev.get(idx, (rows, k), np.int32), ref_i)
    assert rel_err(dev.get(w, (rows, k)), ref_w) < F32_BOUND


def test_gather_rows(kern: Any, dev: Any) -> None:
    rng = np.random.default_rng(5)
    x = rng.standard_normal((40, 896)).astype(np.float32)
    idx = np.array([39, 0, 7, 7, 12], np.int32)
    out = dev.poison(5 * 896 * 4)
    kern.gather_rows(dev.put(x), 896, dev.put(idx), out, 896, 5, 896, 40)
    assert np.array_equal(dev.get(out, (5, 896)), x[idx])


def _sampler_cases() -> list[tuple[int, SamplingParams]]:
    cases = []
    rng = np.random.default_rng(0)
    for i in range(64):
        cases.append(
            (
                i,
                SamplingParams(
                    temperature=float(rng.choice([0.0, 0.3, 0.7, 1.0, 1.5, 2.0])),
                    top_p=float(rng.choice([1.0, 0.9, 0.5, 0.05, 0.0])),
                    top_k=int(rng.choice([0, 0, 1, 5, 40, 1000, 1024, 1025])),  # 1024: one block
                    min_p=float(rng.choice([0.0, 0.0, 0.05, 0.3])),
                    repetition_penalty=float(rng.choice([1.0, 1.0, 1.1, 0.8, 0.0])),
                ),
            )
        )
    return cases


class Sampler:
    """sample_rows over R rows with their own settings, histories and draws."""

    def __init__(self, kern: Any, dev: Any, n: int, slots: int, hist_len: int) -> None:
        self.kern, self.dev, self.n, self.slots, self.hist_len = kern, dev, n, slots, hist_len
        self.hist = dev.put(np.full((slots, hist_len), -1, np.int32))

    def set_history(self, slot: int, ids: list[int]) -> None:
        h = self.dev.get(self.hist, (self.slots, self.hist_len), np.int32)
        h[slot, : len(ids)] = ids
        self.kern.ctx.htod(self.hist, h)

    def history(self, slot: int, n: int) -> list[int]:
        h = self.dev.get(self.hist, (self.slots, self.hist_len), np.int32)
        return [int(v) for v in h[slot, :n]]

    def run(
        self,
        logits: np.ndarray,
        params: list[SamplingParams],
        draws: list[float],
        slots: list[int],
        n_pen: list[int],
    ) -> np.ndarray:
        rows, n = logits.shape
        args = b"".join(
            sample_args(
                n_pen=k,
                penalty=float(np.float32(p.repetition_penalty)),
                temperature=float(np.float32(p.temperature)),
                top_k=p.top_k,
                top_p=p.top_p,
                min_p=p.min_p,
                draw=d,
            )
            for p, d, k in zip(params, draws, n_pen, strict=True)
        )
        assert len(args) == rows * SAMPLE_ARGS_BYTES
        out = self.dev.put(np.full(2 * rows, -1, np.int32))
        dev = self.dev
        self.kern.sample_rows(
            logits=dev.put(logits),
            ldl=n,
            n=n,
            rows=rows,
            args=dev.put(np.frombuffer(args, np.uint8)),
            slot=dev.put(np.array(slots, np.int32)),
            hist=self.hist,
            hist_stride=self.hist_len,
            n_slots=self.slots,
            xbuf=dev.poison(rows * n * 4),
            out=out,
            gscratch=dev.poison(rows * SAMPLE_SCRATCH_BYTES),
            barrier=dev.put(np.zeros(2 * rows, np.uint32)),
        )
        return dev.get(out, (rows, 2), np.int32)


@pytest.mark.parametrize("n", [1000, 151936])
def test_sampler_rows_match_reference(kern: Any, dev: Any, n: int) -> None:
    """64 rows, each with its own settings, history (repeats included) and draw, in one
    launch: every row picks the reference sampler's id and appends it to its history; the
    same rows in launches of 1, 2 and 7 pick the same ids (the grid differs)."""
    cases = _sampler_cases()
    rng = np.random.default_rng(n)
    rows = len(cases)
    logits = np.empty((rows, n), np.float32)
    hists: list[list[int]] = []
    for i in range(rows):
        scale = [1.0, 3.0, 0.05][i % 3]  # peaked, typical and very flat distributions
        row = (rng.standard_normal(n) * scale).astype(np.float32)
        if i % 4 == 0:
            row = (np.round(row * 4) / 4).astype(np.float32)  # many exact ties
        logits[i] = row
        hists.append([int(v) for v in rng.integers(0, n, size=int(rng.integers(0, 50)))])
    params = [p for _, p in cases]
    draws = [float(rng.random()) for _ in range(rows)]
    sm = Sampler(kern, dev, n, rows + 1, 64)
    for i, h in enumerate(hists):
        sm.set_history(i, h)
    got = sm.run(logits, params, draws, list(range(rows)), [len(h) for h in hists])
    for i in range(rows):
        want = sample(logits[i], params[i], draws[i], hists[i])
        assert int(got[i, 1]) == 0
        assert int(got[i, 0]) == want, (i, params[i], draws[i])
        assert sm.history(i, len(hists[i]) + 1) == [*hists[i], want]  # appended
    for group in ([9], [3, 40], [0, 63, 5, 17, 22, 31, 2]):
        for i in group:
            sm.set_history(i, hists[i])
        some = sm.run(
            logits[group],
            [params[i] for i in group],
            [draws[i] for i in group],
            group,
            [len(hists[i]) for i in group],
        )
        assert [int(v) for v in some[:, 0]] == [int(got[i, 0]) for i in group]


def test_sampler_reports_nan(kern: Any, dev: Any) -> None:
    x = np.zeros((2, 100), np.float32)
    x[1, 5] = np.nan
    sm = Sampler(kern, dev, 100, 3, 8)
    got = sm.run(x, [SamplingParams()] * 2, [0.5, 0.5], [0, 1], [0, 0])
    assert int(got[0, 1]) == 0 and int(got[1, 1]) == 1
    assert sm.history(1, 1) == [-1]  # nothing appended after a NaN
