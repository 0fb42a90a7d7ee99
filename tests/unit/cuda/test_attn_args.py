"""Tensor-core prefill attention (attn_prefill_tc_d<D>, cuda_src/attention.cu) without a GPU.

* Every argument check of `check_attn_prefill_tc` refuses a bad launch, naming the kernel,
  and a good launch gets the right kernel, grid and shared memory.
* `emulate_tc` is a NumPy twin of the kernel's tiling: the same 64-row query tiles (longest
  first), the same key-tile range (skipping tiles past the causal limit and before the
  window), the same zero-filled rows outside [kv_lo, kv_hi), the same masks and the same
  online-softmax update order (running max with the -inf guard, rescale, FP16 P, the sum of
  the rounded P), the sink at the end. Against worker.models.common.attention (the model
  reference) it catches indexing and mask mistakes before any device time, and measures the
  error that FP16 Q and P cost, which the GPU test's bound is based on.
"""

from __future__ import annotations

import numpy as np
import pytest

from worker.backends.cuda.arena import DevBuf
from worker.backends.cuda.kernels import (
    LOG2E,
    MAX_DYN_SMEM,
    TC_BM,
    TC_BN,
    TC_HEAD_DIMS,
    LaunchRefused,
    attn_tc_smem_bytes,
    check_attn_prefill_tc,
)
from worker.gguf.hparams import HParams, RopeParams
from worker.models.common import AttnOptions, KVCache, attention

A = 1 << 20


def _args(**over: object) -> dict[str, object]:
    n, nh, nkv, hd, ctx = 37, 14, 2, 64, 100
    a: dict[str, object] = dict(
        q=DevBuf(A, n * nh * hd * 4, "q"),
        q_stride=nh * hd,
        kcache=DevBuf(2 * A, ctx * nkv * hd * 2, "kc"),
        vcache=DevBuf(3 * A, ctx * nkv * hd * 2, "vc"),
        pos=DevBuf(4 * A, 4, "pos"),
        out=DevBuf(5 * A, n * nh * hd * 4, "out"),
        out_stride=nh * hd,
        n_tokens=n,
        n_head=nh,
        n_kv=nkv,
        head_dim=hd,
        ctx=ctx,
        max_kv=n,
        window=0,
        sinks=None,
    )
    a.update(over)
    return a


def test_good_launch_plan() -> None:
    t = check_attn_prefill_tc(**_args())  # type: ignore[arg-type]
    assert t.kernel == "attn_prefill_tc_d64"
    assert t.grid == (1, 14)
    assert t.shared == 2 * 2 * 64 * 72 * 2
    big = dict(q=DevBuf(A, 65 * 896 * 4, "q"), out=DevBuf(5 * A, 65 * 896 * 4, "out"))
    t = check_attn_prefill_tc(**_args(n_tokens=65, max_kv=90, **big))  # type: ignore[arg-type]
    assert t.grid == (2, 14)
    with pytest.raises(LaunchRefused, match="out \\(out\\) needs"):
        check_attn_prefill_tc(**_args(n_tokens=65, max_kv=90, q=big["q"]))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "over,msg",
    [
        (dict(head_dim=48), "head_dim 48 has no kernel"),
        (dict(head_dim=256), "head_dim 256 has no kernel"),
        (dict(n_kv=3), "not a multiple"),
        (dict(n_tokens=0), "n_tokens must be a positive"),
        (dict(max_kv=101), "exceeds the cache"),
        (dict(max_kv=36), "shorter than"),
        (dict(window=-1), "window"),
        (dict(q_stride=895), "shorter than the rows"),
        (dict(q_stride=897), "even"),
        (dict(out_stride=899), "even"),
        (dict(q=DevBuf(A, 37 * 896 * 4 - 4, "q")), "q \\(q\\) needs"),
        (dict(q=DevBuf(A + 4, 37 * 896 * 4, "q")), "8-byte aligned"),
        (dict(out=DevBuf(5 * A, 36 * 896 * 4, "out")), "out \\(out\\) needs"),
        (dict(kcache=DevBuf(2 * A, 100 * 128 * 2 - 2, "kc")), "kcache"),
        (dict(vcache=DevBuf(3 * A + 8, 100 * 128 * 2, "vc")), "16-byte aligned"),
        (dict(pos=DevBuf(4 * A, 2, "pos")), "pos"),
        (dict(sinks=DevBuf(6 * A, 13 * 4, "sinks")), "sinks"),
    ],
)
def test_bad_launches_are_refused(over: dict[str, object], msg: str) -> None:
    with pytest.raises(LaunchRefused, match=f"attn_prefill_tc: launch refused: .*{msg}"):
        check_attn_prefill_tc(**_args(**over))  # type: ignore[arg-type]


def test_every_model_head_dim_has_a_kernel_and_fits() -> None:
    from worker.gguf.synth import preset

    for arch in ("qwen2", "phi3", "gpt-oss", "llama", "gpt2"):
        for size in ("full", "tiny"):
            assert preset(arch, size).head_dim in TC_HEAD_DIMS, (arch, size)
    for d in TC_HEAD_DIMS:
        assert d % 16 == 0  # mma k-steps of 16 and ldmatrix pairs of 8-wide tiles
        # at most 227 KB a block on sm_90 / 163 KB on sm_80; > 48 KB is opted into at load
        assert attn_tc_smem_bytes(d) <= 100 * 1024
    assert attn_tc_smem_bytes(64) <= MAX_DYN_SMEM  # the common case needs no opt-in


# ---------------------------------------------------------------------------- emulation


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(np.float32)


def emulate_tc(
    q: np.ndarray,
    kc: np.ndarray,
    vc: np.ndarray,
    pos0: int,
    n_head: int,
    n_kv: int,
    scale: float,
    window: int,
    sinks: np.ndarray | None,
) -> np.ndarray:
    """The kernel's arithmetic, block by block. q [n, n_head*D] f32, kc/vc [ctx, n_kv, D]
    f16 (rows past pos0 + n may be NaN: never read). Returns [n, n_head*D]."""
    n = q.shape[0]
    d = kc.shape[2]
    gqa = n_head // n_kv
    scale_log2 = np.float32(scale * LOG2E)
    out = np.full((n, n_head * d), np.nan, np.float32)
    n_qt = -(-n // TC_BM)
    for h in range(n_head):
        kh = h // gqa
        for bx in range(n_qt):
            qt = n_qt - 1 - bx
            t_first = qt * TC_BM
            t_last = min(t_first + TC_BM, n) - 1
            kv_hi = pos0 + t_last + 1
            kv_lo = max(0, pos0 + t_first - window + 1) if window > 0 else 0
            tile0, tile1 = kv_lo // TC_BN, -(-kv_hi // TC_BN)
            t = t_first + np.arange(TC_BM)
            tq = np.minimum(t, n - 1)
            qp = pos0 + tq
            qa = _f16(q[tq, h * d : (h + 1) * d] * scale_log2)  # [BM, D]
            o = np.zeros((TC_BM, d), np.float32)
            m = np.full(TC_BM, -np.inf, np.float32)
            lsum = np.zeros(TC_BM, np.float32)
            qmin, qmax = pos0 + t_first, pos0 + t_last
            for it in range(tile0, tile1):
                j0 = it * TC_BN
                j = j0 + np.arange(TC_BN)
                ok_row = (j >= kv_lo) & (j < kv_hi)
                jj = np.where(ok_row, j, kv_lo)
                kt = np.where(ok_row[:, None], kc[jj, kh].astype(np.float32), 0.0)
                vt = np.where(ok_row[:, None], vc[jj, kh].astype(np.float32), 0.0)
                s = (qa @ kt.T).astype(np.float32)  # [BM, BN]
                full = j0 + TC_BN - 1 <= qmin and (window <= 0 or qmax - j0 < window)
                if not full:
                    ok = j[None, :] <= qp[:, None]
                    if window > 0:
                        ok &= (qp[:, None] - j[None, :]) < window
                    s = np.where(ok, s, np.float32(-np.inf))
                mx = np.maximum(m, s.max(axis=1))
                base = np.where(mx == -np.inf, np.float32(0.0), mx)
                c = np.exp2(m - base).astype(np.float32)
                m = mx
                lsum *= c
                o *= c[:, None]
                p = _f16(np.exp2(s - base[:, None]))
                lsum += p.sum(axis=1, dtype=np.float32)
                o += p @ vt
            if sinks is not None:
                sk = np.float32(sinks[h] * LOG2E)
                big = np.maximum(m, sk)
                e = np.exp2(m - big)
                f = (e / (lsum * e + np.exp2(sk - big))).astype(np.float32)
            else:
                f = (1.0 / lsum).astype(np.float32)
            keep = t < n
            out[t[keep], h * d : (h + 1) * d] = (o * f[:, None])[keep]
    return out


def _reference(
    q: np.ndarray,
    kc: np.ndarray,
    vc: np.ndarray,
    pos0: int,
    n_head: int,
    n_kv: int,
    scale: float,
    window: int,
    sinks: np.ndarray | None,
) -> np.ndarray:
    n, d = q.shape[0], kc.shape[2]
    ctx = kc.shape[0]
    hp = HParams(
        arch="qwen2",
        n_layer=1,
        n_embd=n_head * d,
        n_head=n_head,
        n_head_kv=n_kv,
        head_dim=d,
        head_dim_v=d,
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
        q.reshape(n, n_head, d),
        cache,
        0,
        cache.k[0][pos0 : pos0 + n].copy(),
        cache.v[0][pos0 : pos0 + n].copy(),
        pos0,
        AttnOptions(scale=scale, window=window, sinks=sinks),
    )


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    assert not np.isnan(got).any()
    g, r = got.astype(np.float64), ref.astype(np.float64)
    return float(np.linalg.norm(g - r) / np.linalg.norm(r))


# FP16 Q (scaled) and P: each rounding is at most 2^-11 relative; scores move by about
# |q||k| 2^-11 (log2 units) and p by that times ln 2, while O = sum p v / sum p sees the same
# rounded p in both sums. Measured here with the cases below: <= ~4e-4; the GPU bound is 2e-3.
TC_BOUND = 2e-3


@pytest.mark.parametrize(
    "n,pos0,nh,nkv,hd,window,sinks",
    [
        (1, 0, 4, 4, 64, 0, False),  # one token
        (37, 0, 14, 2, 64, 0, False),  # qwen, odd length, one partial tile
        (130, 0, 8, 1, 32, 0, False),  # GQA 8, three query tiles, head_dim 32
        (65, 100, 4, 4, 96, 0, False),  # phi3 head_dim, chunked (pos0 > 0, not tile-aligned)
        (200, 0, 8, 1, 64, 128, True),  # gpt-oss: window + sinks, GQA 8
        (70, 300, 14, 2, 64, 128, True),  # window + sinks, second chunk
        (77, 5, 7, 1, 80, 0, True),  # GQA 7, head_dim 80, sinks
        (64, 64, 4, 2, 128, 16, False),  # tile-aligned chunk, tiny window, head_dim 128
        (3, 600, 2, 1, 128, 0, False),  # short chunk far into the cache
    ],
)
def test_emulated_tiling_matches_reference(
    n: int, pos0: int, nh: int, nkv: int, hd: int, window: int, sinks: bool
) -> None:
    rng = np.random.default_rng(n * 31 + pos0)
    kv = pos0 + n
    ctx = kv + 70
    kc = (rng.standard_normal((ctx, nkv, hd)) * 0.5).astype(np.float16)
    vc = rng.standard_normal((ctx, nkv, hd)).astype(np.float16)
    kc[kv:] = np.nan  # past the keys: the kernel must never use them
    vc[kv:] = np.nan
    q = rng.standard_normal((n, nh * hd)).astype(np.float32)
    sk = (rng.standard_normal(nh) * 2).astype(np.float32) if sinks else None
    scale = 1.0 / float(np.sqrt(hd))
    got = emulate_tc(q, kc, vc, pos0, nh, nkv, scale, window, sk)
    kc_ref, vc_ref = kc.copy(), vc.copy()
    kc_ref[kv:] = 0
    vc_ref[kv:] = 0
    ref = _reference(q, kc_ref, vc_ref, pos0, nh, nkv, scale, window, sk)
    err = rel_err(got, ref)
    print(f"emulated tc vs reference: {err:.2e}")
    assert err < TC_BOUND / 4, err
