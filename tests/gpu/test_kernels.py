"""Every kernel against its NumPy twin on random inputs, odd sizes and the real models'
shapes. Bounds: float32 kernels 1e-5 relative (norm of the error over the norm of the
reference); FP16 KV-cache stores within half an FP16 ulp; the sampler bit-exact (same id)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from worker.backends.cuda.kernels import (
    SAMPLE_SCRATCH_BYTES,
    AttnShape,
    LaunchRefused,
    attn_split_count,
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
@pytest.mark.parametrize("n_tok,pos0", [(1, 0), (1, 777), (13, 5), (64, 2000)])
def test_qkv_rope_store(kern: Any, dev: Any, which: str, n_tok: int, pos0: int) -> None:
    from worker.backends.cuda.backend import rope_inv_freq
    from worker.gguf.hparams import HParams

    rope, nh, nkv, hd = ROPES[which]
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
        n_ctx_train=4096,
        norm="rms",
        norm_eps=1e-6,
        rope=rope,
    )
    ctx = 2100
    rng = np.random.default_rng(n_tok + pos0)
    stride = (nh + 2 * nkv) * hd + 8  # padded rows, as a strided view would be
    qkv = rng.standard_normal((n_tok, stride)).astype(np.float32)
    bq = rng.standard_normal(nh * hd).astype(np.float32)
    bk = rng.standard_normal(nkv * hd).astype(np.float32)
    bv = rng.standard_normal(nkv * hd).astype(np.float32)
    inv, mscale = rope_inv_freq(hp, None)
    b_qkv = dev.put(qkv)
    kc = dev.put(np.full((ctx, nkv, hd), np.nan, np.float16))
    vc = dev.put(np.full((ctx, nkv, hd), np.nan, np.float16))
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
        pos=dev.put(np.array([pos0], np.int32)),
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
        ctx=ctx,
        max_pos=pos0 + n_tok,
    )
    pos = np.arange(pos0, pos0 + n_tok)
    cos, sin = rope_angles(rope, pos)
    q_ref = apply_rope((qkv[:, : nh * hd] + bq).reshape(n_tok, nh, hd), cos, sin, rope)
    k_ref = apply_rope(
        (qkv[:, nh * hd : (nh + nkv) * hd] + bk).reshape(n_tok, nkv, hd), cos, sin, rope
    )
    v_ref = (qkv[:, (nh + nkv) * hd : (nh + 2 * nkv) * hd] + bv).reshape(n_tok, nkv, hd)
    got = dev.get(b_qkv, qkv.shape)
    assert rel_err(got[:, : nh * hd].reshape(q_ref.shape), q_ref) < F32_BOUND
    assert np.array_equal(got[:, nh * hd :], qkv[:, nh * hd :])  # k, v rows untouched
    kcache = dev.get(kc, (ctx, nkv, hd), np.float16)
    vcache = dev.get(vc, (ctx, nkv, hd), np.float16)
    # FP16 store: at most half an ulp of fp16 from the exact value (plus fp32 rope error)
    np.testing.assert_allclose(
        kcache[pos0 : pos0 + n_tok].astype(np.float32), k_ref, rtol=2**-11, atol=1e-5
    )
    np.testing.assert_array_equal(vcache[pos0 : pos0 + n_tok], v_ref.astype(np.float16))
    assert np.isnan(kcache[:pos0].astype(np.float32)).all()  # nothing else written
    assert np.isnan(kcache[pos0 + n_tok :].astype(np.float32)).all()


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
    """The NumPy reference attention of q's rows (positions pos0 ...) over an FP16 cache
    kc/vc [ctx][n_kv][head_dim] (float32 copies), keys up to the last query's position."""
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


def _attn_case(
    kern: Any,
    dev: Any,
    n_tok: int,
    pos0: int,
    nh: int,
    nkv: int,
    hd: int,
    ctx: int,
    window: int,
    sinks: bool,
    n_split: int,
) -> None:
    rng = np.random.default_rng(pos0 * 7 + n_tok)
    kc = (rng.standard_normal((ctx, nkv, hd)) * 0.5).astype(np.float16)
    vc = rng.standard_normal((ctx, nkv, hd)).astype(np.float16)
    q = rng.standard_normal((n_tok, nh * hd)).astype(np.float32)
    sk = rng.standard_normal(nh).astype(np.float32) if sinks else None
    kv_max = pos0 + n_tok
    max_chunk = -(-kv_max // n_split)
    shape = AttnShape(n_tok, nh, nkv, hd, n_split, max_chunk)
    tickets = dev.put(np.zeros(n_tok * nh, np.uint32))
    out = dev.poison(n_tok * nh * hd * 4)
    scale = 1.0 / np.sqrt(hd)
    kern.attention(
        q=dev.put(q),
        q_stride=nh * hd,
        kcache=dev.put(kc),
        vcache=dev.put(vc),
        opart=dev.poison(n_tok * nh * n_split * hd * 4),
        ml=dev.poison(n_tok * nh * n_split * 8),
        pos=dev.put(np.array([pos0], np.int32)),
        out=out,
        out_stride=nh * hd,
        tickets=tickets,
        shape=shape,
        ctx=ctx,
        max_kv=kv_max,
        scale=float(scale),
        window=window,
        sinks=dev.put(sk) if sk is not None else None,
    )
    ref = _ref_attention(q, kc, vc, pos0, nh, float(scale), window, sk)
    assert not dev.get(tickets, (n_tok * nh,), np.uint32).any()  # left zeroed for reuse
    assert rel_err(dev.get(out, (n_tok, nh * hd)), ref) < 2e-5


@pytest.mark.parametrize(
    "n_tok,pos0,nh,nkv,hd,window,sinks",
    [
        (1, 0, 14, 2, 64, 0, False),  # first decode step
        (1, 639, 14, 2, 64, 0, False),  # qwen2 decode after a 640-token context
        (1, 4095, 14, 2, 64, 0, False),
        (37, 0, 14, 2, 64, 0, False),  # prefill, odd length
        (64, 100, 32, 32, 96, 0, False),  # phi3 MHA, head_dim 96
        (5, 300, 64, 8, 64, 128, True),  # gpt-oss: window + sinks
        (1, 1000, 64, 8, 64, 128, True),
        (1, 50, 12, 12, 64, 0, False),  # gpt2
        (3, 17, 8, 2, 128, 0, False),  # llama head_dim 128
    ],
)
@pytest.mark.parametrize("split_mode", ["one", "many"])
def test_attention(
    kern: Any,
    dev: Any,
    n_tok: int,
    pos0: int,
    nh: int,
    nkv: int,
    hd: int,
    window: int,
    sinks: bool,
    split_mode: str,
) -> None:
    n_split = 1 if split_mode == "one" else attn_split_count(pos0 + n_tok, 16, 32)
    if split_mode == "one" and pos0 + n_tok > 12000:
        pytest.skip("one chunk of this length exceeds shared memory")
    _attn_case(kern, dev, n_tok, pos0, nh, nkv, hd, 4096 + 8, window, sinks, n_split)


def test_attention_deterministic(kern: Any, dev: Any) -> None:
    outs = []
    for _ in range(3):
        rng = np.random.default_rng(5)
        kc = rng.standard_normal((2048, 2, 64)).astype(np.float16)
        vc = rng.standard_normal((2048, 2, 64)).astype(np.float16)
        q = rng.standard_normal((1, 14 * 64)).astype(np.float32)
        out = dev.poison(14 * 64 * 4)
        kern.attention(
            q=dev.put(q),
            q_stride=896,
            kcache=dev.put(kc),
            vcache=dev.put(vc),
            opart=dev.poison(14 * 16 * 64 * 4),
            ml=dev.poison(14 * 16 * 8),
            pos=dev.put(np.array([2000], np.int32)),
            out=out,
            out_stride=896,
            tickets=dev.put(np.zeros(64, np.uint32)),
            shape=AttnShape(1, 14, 2, 64, 16, 128),
            ctx=2048,
            max_kv=2001,
            scale=0.125,
        )
        outs.append(dev.get(out, (896,)))
    assert all(np.array_equal(outs[0], o) for o in outs[1:])


# ---------------------------------------------------------------- tensor-core prefill
# attn_prefill_tc_d<D>: Q (scaled by scale*log2 e) and P are rounded to FP16 for the tensor
# cores (K and V are FP16 in the cache already); each rounding is <= 2^-11 relative, the
# scores move by ~|q||k| 2^-11 and O = sum p v / sum p uses the same rounded p in both sums.
# The kernel's tiling emulated in NumPy (tests/unit/cuda/test_attn_args.py) lands at
# 1.5e-4..2.5e-4 on these input scales; the bound is 2e-3 (fp32 kernels: 2e-5).
TC_BOUND = 2e-3


def _attn_tc_run(
    kern: Any,
    dev: Any,
    q: np.ndarray,
    kc: np.ndarray,
    vc: np.ndarray,
    pos0: int,
    nh: int,
    nkv: int,
    window: int,
    sk: np.ndarray | None,
    pad_rows: int = 1,
) -> np.ndarray:
    """One tc launch; the output buffer has pad_rows poisoned rows past the tokens and a
    4-float gap between rows (out_stride > width): both must stay NaN."""
    n, hd = q.shape[0], kc.shape[2]
    width = nh * hd
    stride = width + 4
    out = dev.poison((n + pad_rows) * stride * 4)
    kern.attention_prefill_tc(
        q=dev.put(q),
        q_stride=width,
        kcache=dev.put(kc),
        vcache=dev.put(vc),
        pos=dev.put(np.array([pos0], np.int32)),
        out=out,
        out_stride=stride,
        n_tokens=n,
        n_head=nh,
        n_kv=nkv,
        head_dim=hd,
        ctx=kc.shape[0],
        max_kv=pos0 + n,
        scale=float(1.0 / np.sqrt(hd)),
        window=window,
        sinks=dev.put(sk) if sk is not None else None,
    )
    full = dev.get(out, (n + pad_rows, stride))
    assert np.isnan(full[n:]).all(), "tc wrote past the last token"
    assert np.isnan(full[:, width:]).all(), "tc wrote into the row gap"
    return np.ascontiguousarray(full[:n, :width])


def _attn_tc_case(
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
    ctx = kv_max + 5
    kc = (rng.standard_normal((ctx, nkv, hd)) * 0.5).astype(np.float16)
    vc = rng.standard_normal((ctx, nkv, hd)).astype(np.float16)
    kc[kv_max:] = np.nan  # past the keys: never read (a NaN would reach every output)
    vc[kv_max:] = np.nan
    q = rng.standard_normal((n_tok, nh * hd)).astype(np.float32)
    sk = (rng.standard_normal(nh) * 2).astype(np.float32) if sinks else None
    got = _attn_tc_run(kern, dev, q, kc, vc, pos0, nh, nkv, window, sk)
    ref = _ref_attention(q, kc, vc, pos0, nh, float(1.0 / np.sqrt(hd)), window, sk)
    err = rel_err(got, ref)
    assert err < TC_BOUND, (n_tok, pos0, nh, nkv, hd, window, sinks, err)
    return err


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
        (333, 0, 64, 8, 64, 128, True),
        (70, 300, 64, 8, 64, 128, True),  # second prefill chunk, window + sinks
        (100, 512, 32, 32, 96, 0, False),  # second chunk after 512 tokens
        (64, 64, 14, 2, 64, 0, False),  # tile-aligned second chunk
        (3, 600, 8, 2, 128, 0, False),  # llama head_dim 128, short chunk far in
        (200, 17, 8, 2, 128, 0, False),
        (77, 5, 7, 1, 80, 0, True),  # GQA 7, head_dim 80
        (130, 0, 16, 2, 32, 16, True),  # tiny presets: head_dim 32, window 16
        (65, 0, 8, 8, 32, 0, False),
        (257, 0, 4, 4, 64, 0, False),  # gpt2 (MHA 64)
        (129, 31, 8, 1, 64, 1, False),  # window 1: only the own key
    ],
)
def test_attention_tc(
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
    _attn_tc_case(kern, dev, n_tok, pos0, nh, nkv, hd, window, sinks)


def test_attention_tc_lengths(kern: Any, dev: Any) -> None:
    """Every tile edge from 1 to 600 tokens (and a sample in between), GQA 2 and 8,
    fresh prompts and second chunks."""
    lengths = sorted(
        set(range(1, 601, 29))
        | {2, 15, 16, 17, 63, 64, 65, 127, 128, 129, 255, 256, 257, 511, 512, 513, 599, 600}
    )
    worst = 0.0
    for i, n in enumerate(lengths):
        nh, nkv = (8, 1) if i % 2 else (4, 2)
        pos0 = 0 if i % 3 else 97 * (i % 7)
        window = 128 if i % 4 == 1 else 0
        worst = max(worst, _attn_tc_case(kern, dev, n, pos0, nh, nkv, 64, window, i % 4 == 1, i))
    print(f"tc lengths 1..600: worst rel err {worst:.2e}")


@pytest.mark.parametrize("nh,nkv,hd", [(14, 2, 64), (32, 32, 96), (64, 8, 64), (8, 2, 128)])
def test_attention_tc_matches_split(kern: Any, dev: Any, nh: int, nkv: int, hd: int) -> None:
    """The new prefill kernel and the old one on the same cache and q (real shapes, 300
    tokens after 211 earlier ones)."""
    n, pos0 = 300, 211
    kv = pos0 + n
    rng = np.random.default_rng(nh + hd)
    kc = (rng.standard_normal((kv, nkv, hd)) * 0.5).astype(np.float16)
    vc = rng.standard_normal((kv, nkv, hd)).astype(np.float16)
    q = rng.standard_normal((n, nh * hd)).astype(np.float32)
    sk = rng.standard_normal(nh).astype(np.float32) if nh == 64 else None
    window = 128 if nh == 64 else 0
    got = _attn_tc_run(kern, dev, q, kc, vc, pos0, nh, nkv, window, sk)
    n_split = attn_split_count(kv, 16, 64)
    out = dev.poison(n * nh * hd * 4)
    kern.attention(
        q=dev.put(q),
        q_stride=nh * hd,
        kcache=dev.put(kc),
        vcache=dev.put(vc),
        opart=dev.poison(n * nh * n_split * hd * 4),
        ml=dev.poison(n * nh * n_split * 8),
        pos=dev.put(np.array([pos0], np.int32)),
        out=out,
        out_stride=nh * hd,
        tickets=dev.put(np.zeros(n * nh, np.uint32)),
        shape=AttnShape(n, nh, nkv, hd, n_split, -(-kv // n_split)),
        ctx=kv,
        max_kv=kv,
        scale=float(1.0 / np.sqrt(hd)),
        window=window,
        sinks=dev.put(sk) if sk is not None else None,
    )
    assert rel_err(got, dev.get(out, (n, nh * hd))) < TC_BOUND


def test_attention_tc_deterministic(kern: Any, dev: Any) -> None:
    rng = np.random.default_rng(11)
    n, pos0, nh, nkv, hd = 450, 70, 64, 8, 64
    kc = rng.standard_normal((n + pos0, nkv, hd)).astype(np.float16)
    vc = rng.standard_normal((n + pos0, nkv, hd)).astype(np.float16)
    q = rng.standard_normal((n, nh * hd)).astype(np.float32)
    sk = rng.standard_normal(nh).astype(np.float32)
    outs = [_attn_tc_run(kern, dev, q, kc, vc, pos0, nh, nkv, 128, sk) for _ in range(3)]
    outs += [_attn_tc_run(kern, dev, q, kc, vc, pos0, nh, nkv, 0, sk) for _ in range(2)]
    assert all(np.array_equal(outs[0], o) for o in outs[1:3])
    assert np.array_equal(outs[3], outs[4])


def test_attention_tc_refuses(kern: Any, dev: Any) -> None:
    with pytest.raises(LaunchRefused, match="attn_prefill_tc"):
        kern.attention_prefill_tc(
            q=dev.poison(2 * 896 * 4),
            q_stride=896,
            kcache=dev.poison(100 * 128 * 2),
            vcache=dev.poison(100 * 128 * 2),
            pos=dev.put(np.array([0], np.int32)),
            out=dev.poison(896 * 4),  # one row for two tokens
            out_stride=896,
            n_tokens=2,
            n_head=14,
            n_kv=2,
            head_dim=64,
            ctx=100,
            max_kv=2,
            scale=0.125,
        )
    kern.ctx.sync("after a refused tc launch")


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


@pytest.mark.parametrize("rows,k,bias", [(32, 2880, True), (7, 64, False), (3, 4100, True)])
def test_router_rowdot(kern: Any, dev: Any, rows: int, k: int, bias: bool) -> None:
    """rowdot_f32 (the decode router): y = W x + b against float64, bit-identical reruns;
    4100 columns take the loop past the 4 loads a thread issued before the wait."""
    rng = np.random.default_rng(rows * k)
    w = rng.standard_normal((rows, k)).astype(np.float32)
    x = rng.standard_normal(k).astype(np.float32)
    b = rng.standard_normal(rows).astype(np.float32) if bias else None
    bw, bx, y = dev.put(w), dev.put(x), dev.poison(rows * 4)
    bb = dev.put(b) if b is not None else None
    kern.rowdot(bw, rows, k, bx, bb, y)
    got = dev.get(y, (rows,))
    want = w.astype(np.float64) @ x.astype(np.float64) + (b if b is not None else 0.0)
    # fp32 sums of k products: relative to sum |w x|, ~k * 2^-24 in the worst case
    scale = np.abs(w.astype(np.float64)) @ np.abs(x.astype(np.float64))
    assert np.max(np.abs(got - want) / scale) < k * 2.0**-24
    kern.rowdot(bw, rows, k, bx, bb, y)
    assert np.array_equal(dev.get(y, (rows,)), got)
    with pytest.raises(LaunchRefused, match="rowdot_f32"):
        kern.rowdot(bw, rows, k + 2, bx, bb, y)  # not a multiple of 4
    with pytest.raises(LaunchRefused, match="rowdot_f32"):
        kern.rowdot(bw, rows + 1, k, bx, bb, y)  # one row past the matrix


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


@pytest.mark.parametrize("n", [1, 1000, 151936, 201088])
def test_argmax(kern: Any, dev: Any, n: int) -> None:
    rng = np.random.default_rng(n)
    x = rng.standard_normal(n).astype(np.float32)
    if n > 10:
        x[n // 3] = x[n - 2] = 9.0  # tie: the first wins
    out = dev.put(np.array([-1], np.int32))
    kern.argmax(dev.put(x), n, dev.poison(512), dev.poison(512), out)
    assert int(dev.get(out, (1,), np.int32)[0]) == int(np.argmax(x))


def _sampler_cases() -> list[tuple[int, SamplingParams, int]]:
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
                int(rng.choice([1000, 151936])),
            )
        )
    return cases


@pytest.mark.parametrize("case", _sampler_cases(), ids=lambda c: f"case{c[0]}")
def test_sampler_matches_reference(
    kern: Any, dev: Any, case: tuple[int, SamplingParams, int]
) -> None:
    i, params, n = case
    rng = np.random.default_rng(100 + i)
    scale = [1.0, 3.0, 0.05][i % 3]  # peaked, typical and very flat distributions
    logits = (rng.standard_normal(n) * scale).astype(np.float32)
    if i % 4 == 0:
        logits = (np.round(logits * 4) / 4).astype(np.float32)  # many exact ties
    generated = list(rng.integers(0, n, size=int(rng.integers(0, 50))))
    gen_u = np.unique(np.asarray(generated, np.int64)).astype(np.int32)
    pen = dev.put(gen_u if gen_u.size else np.zeros(1, np.int32))
    xbuf, out = dev.poison(n * 4), dev.put(np.array([-1, -1], np.int32))
    gs, bar = dev.poison(SAMPLE_SCRATCH_BYTES), dev.put(np.zeros(2, np.uint32))
    lb = dev.put(logits)
    for j in range(5):
        draw = float(rng.random())
        kern.sample_full(
            logits=lb,
            n=n,
            pen_ids=pen,
            n_pen=int(gen_u.size) if generated else 0,
            penalty=float(np.float32(params.repetition_penalty)),
            temperature=float(np.float32(params.temperature)),
            top_k=params.top_k,
            top_p=params.top_p,
            min_p=params.min_p,
            draw=draw,
            xbuf=xbuf,
            out=out,
            gscratch=gs,
            barrier=bar,
        )
        got = dev.get(out, (2,), np.int32)
        want = sample(logits, params, draw, generated)
        assert int(got[1]) == 0
        assert int(got[0]) == want, (params, draw, j)


def test_sampler_reports_nan(kern: Any, dev: Any) -> None:
    x = np.zeros(100, np.float32)
    x[5] = np.nan
    out = dev.put(np.array([-1, -1], np.int32))
    kern.sample_full(
        logits=dev.put(x),
        n=100,
        pen_ids=dev.poison(4),
        n_pen=0,
        penalty=1.0,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        min_p=0.0,
        draw=0.5,
        xbuf=dev.poison(400),
        out=out,
        gscratch=dev.poison(SAMPLE_SCRATCH_BYTES),
        barrier=dev.put(np.zeros(2, np.uint32)),
    )
    assert int(dev.get(out, (2,), np.int32)[1]) == 1


def test_out_of_range_launches_are_refused(kern: Any, dev: Any) -> None:
    x = dev.poison(896 * 4)
    with pytest.raises(LaunchRefused, match="rmsnorm_f32"):
        kern.rmsnorm(x, dev.poison(896 * 4), x, 2, 896, 1e-6)  # 2 rows in a 1-row buffer
    with pytest.raises(LaunchRefused, match="attn_split"):
        kern.attention(
            q=dev.poison(896 * 4),
            q_stride=896,
            kcache=dev.poison(100 * 128 * 2),
            vcache=dev.poison(100 * 128 * 2),
            opart=dev.poison(14 * 64 * 4),
            ml=dev.poison(14 * 8),
            pos=dev.put(np.array([0], np.int32)),
            out=dev.poison(896 * 4),
            out_stride=896,
            tickets=dev.put(np.zeros(64, np.uint32)),
            shape=AttnShape(1, 14, 2, 64, 1, 128),
            ctx=100,
            max_kv=101,
            scale=0.125,
        )
    with pytest.raises(LaunchRefused, match="qkv_rope_store"):
        kern.qkv_rope_store(
            q=x,
            k=x,
            v=x,
            bq=None,
            bk=None,
            bv=None,
            kcache=dev.poison(64 * 128 * 2),
            vcache=dev.poison(64 * 128 * 2),
            pos=dev.put(np.array([0], np.int32)),
            n_tokens=1,
            n_head=14,
            n_kv=2,
            head_dim=64,
            n_rot=64,
            q_stride=896,
            kv_stride=896,
            inv_freq=dev.poison(256),
            mscale=1.0,
            mode=2,
            ctx=64,
            max_pos=65,
        )
    # the context is still healthy afterwards
    kern.rmsnorm(x, None, x, 1, 896, 1e-6)
    kern.ctx.sync("after refused launches")


@pytest.mark.parametrize(
    "nh,nkv,hd,pos0,window,sinks,rope_key",
    [
        (14, 2, 64, 0, 0, False, "qwen2"),
        (14, 2, 64, 639, 0, False, "qwen2"),
        (64, 8, 64, 1000, 128, True, "gpt-oss-yarn"),
        (64, 8, 64, 1001, 0, True, "gpt-oss-yarn"),
        (32, 32, 96, 77, 0, False, "phi3-partial"),
    ],
)
def test_fused_decode_attention_equals_two_launches(
    kern: Any,
    dev: Any,
    nh: int,
    nkv: int,
    hd: int,
    pos0: int,
    window: int,
    sinks: bool,
    rope_key: str,
) -> None:
    """attn_decode_rope == qkv_rope_store then attn_split, on the same inputs."""
    from worker.backends.cuda.backend import rope_inv_freq
    from worker.gguf.hparams import HParams

    rope = ROPES[rope_key][0]
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
        n_ctx_train=4096,
        norm="rms",
        norm_eps=1e-6,
        rope=rope,
    )
    inv, mscale = rope_inv_freq(hp, None)
    ctx, n_split = 2048, 16
    rng = np.random.default_rng(pos0 + nh)
    width = (nh + 2 * nkv) * hd
    qkv = rng.standard_normal(width).astype(np.float32)
    cache_k = rng.standard_normal((ctx, nkv, hd)).astype(np.float16)
    cache_v = rng.standard_normal((ctx, nkv, hd)).astype(np.float16)
    sk = dev.put(rng.standard_normal(nh).astype(np.float32)) if sinks else None
    shape = AttnShape(1, nh, nkv, hd, n_split, -(-ctx // n_split))
    pos = dev.put(np.array([pos0], np.int32))
    b_inv = dev.put(inv)
    outs, caches = [], []
    for fused in (False, True):
        b_qkv = dev.put(qkv)
        kc, vc = dev.put(cache_k), dev.put(cache_v)
        out = dev.poison(nh * hd * 4)
        common = dict(
            kcache=kc,
            vcache=vc,
            opart=dev.poison(nh * n_split * hd * 4),
            ml=dev.poison(nh * n_split * 8),
            pos=pos,
            out=out,
            tickets=dev.put(np.zeros(nh, np.uint32)),
            shape=shape,
            ctx=ctx,
            scale=1.0 / np.sqrt(hd),
            window=window,
            sinks=sk,
        )
        if fused:
            kern.attention_decode_rope(
                qkv=b_qkv, inv_freq=b_inv, mscale=mscale, mode=2, n_rot=rope.n_dims, **common
            )
        else:
            ko, vo = nh * hd * 4, (nh + nkv) * hd * 4
            kern.qkv_rope_store(
                q=b_qkv,
                k=b_qkv.view(ko, b_qkv.nbytes - ko),
                v=b_qkv.view(vo, b_qkv.nbytes - vo),
                bq=None,
                bk=None,
                bv=None,
                kcache=kc,
                vcache=vc,
                pos=pos,
                n_tokens=1,
                n_head=nh,
                n_kv=nkv,
                head_dim=hd,
                n_rot=rope.n_dims,
                q_stride=width,
                kv_stride=width,
                inv_freq=b_inv,
                mscale=mscale,
                mode=2,
                ctx=ctx,
                max_pos=pos0 + 1,
            )
            kern.attention(q=b_qkv, q_stride=width, out_stride=nh * hd, max_kv=pos0 + 1, **common)
        outs.append(dev.get(out, (nh * hd,)))
        caches.append(
            (dev.get(kc, (ctx, nkv, hd), np.float16), dev.get(vc, (ctx, nkv, hd), np.float16))
        )
    assert rel_err(outs[1], outs[0]) < 1e-6
    assert np.array_equal(caches[0][0], caches[1][0])
    assert np.array_equal(caches[0][1], caches[1][1])
    print(f"\nfused decode attention bit-identical: {np.array_equal(outs[0], outs[1])}")
