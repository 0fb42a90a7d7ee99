"""The shared layer recipes against hand-computed values and defining properties."""

from __future__ import annotations

import math

import numpy as np
import pytest

from worker.gguf.hparams import HParams, RopeParams
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
    swiglu_oai,
)


def _rope(kind: str = "neox", **kw: object) -> RopeParams:
    return RopeParams(type=kind, theta=10000.0, n_dims=8, **kw)  # type: ignore[arg-type]


def test_rmsnorm_and_layernorm_hand_values() -> None:
    x = np.array([[3.0, 4.0]], np.float32)
    np.testing.assert_allclose(
        rmsnorm(x, np.array([1.0, 2.0], np.float32), 0.0),
        [[3 / math.sqrt(12.5), 8 / math.sqrt(12.5)]],
        rtol=1e-6,
    )
    y = layernorm(x, np.array([1.0, 1.0], np.float32), np.array([0.5, 0.5], np.float32), 0.0)
    np.testing.assert_allclose(y, [[-0.5, 1.5]], rtol=1e-6)


def test_gelu_tanh_and_clamped_swiglu() -> None:
    np.testing.assert_allclose(
        gelu_tanh(np.array([0.0, 1.0], np.float32)), [0.0, 0.841192], rtol=1e-5
    )
    gate = np.array([1.0, 10.0, -3.0], np.float32)
    up = np.array([2.0, 9.0, -8.0], np.float32)
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    want = [
        1.0 * sig(1.702) * 3.0,  # no clamp
        7.0 * sig(1.702 * 7.0) * 8.0,  # gate clamped to 7, up clamped to 7 (+1)
        -3.0 * sig(-1.702 * 3.0) * -6.0,  # gate not clamped below; up clamped to -7 (+1)
    ]
    np.testing.assert_allclose(swiglu_oai(gate, up), want, rtol=1e-6)


def test_rope_position_zero_is_identity_and_norm_preserving() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 2, 10)).astype(np.float32)  # head_dim 10, n_dims 8
    for kind in ("neox", "normal"):
        r = _rope(kind)
        cos, sin = rope_angles(r, np.array([0, 5, 1000]))
        y = apply_rope(x, cos, sin, r)
        np.testing.assert_allclose(y[0], x[0], rtol=1e-6)
        np.testing.assert_allclose(
            np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5
        )
        np.testing.assert_array_equal(y[..., 8:], x[..., 8:])  # dims past n_dims untouched


def test_normal_rope_is_neox_on_permuted_dims() -> None:
    """llama.cpp's converter permutation turns rotate_half (neox) into adjacent pairs."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 1, 8)).astype(np.float32)
    cos, sin = rope_angles(_rope(), np.arange(4))
    perm = np.array([0, 4, 1, 5, 2, 6, 3, 7])  # adjacent pair i = (i, i + 4)
    neox = apply_rope(x, cos, sin, _rope("neox"))
    normal = apply_rope(x[..., perm], cos, sin, _rope("normal"))
    np.testing.assert_allclose(normal, neox[..., perm], rtol=1e-6)


def test_rope_angles_hand_value_and_linear_and_yarn() -> None:
    cos, sin = rope_angles(_rope(), np.array([3]))
    theta = 3 * 10000.0 ** (-2 * np.arange(4) / 8)
    np.testing.assert_allclose(cos[0], np.cos(theta), rtol=1e-6)
    np.testing.assert_allclose(sin[0], np.sin(theta), rtol=1e-6)
    lin = RopeParams(type="neox", theta=10000.0, n_dims=8, scaling="linear", factor=4.0)
    cos_l, _ = rope_angles(lin, np.array([12]))
    np.testing.assert_allclose(
        cos_l[0], np.cos(12 / 4 * 10000.0 ** (-2 * np.arange(4) / 8)), rtol=1e-6
    )
    # YaRN: fast-rotating pairs (below the correction range) extrapolate, slow ones
    # interpolate by 1/factor, and cos/sin carry mscale = 1 + 0.1 ln(factor).
    y = RopeParams(
        type="neox", theta=10000.0, n_dims=64, scaling="yarn", factor=16.0, orig_ctx=64,
        yarn_ext_factor=1.0,
    )  # fmt: skip
    cos_y, sin_y = rope_angles(y, np.array([7]))
    ms = 1 + 0.1 * math.log(16.0)
    inv = 10000.0 ** (-2 * np.arange(32) / 64)
    assert abs(cos_y[0, 0] - ms * math.cos(7 * inv[0])) < 1e-6  # extrapolated
    assert abs(sin_y[0, 31] - ms * math.sin(7 * inv[31] / 16)) < 1e-6  # interpolated


def _hp(n_head: int, n_kv: int, d: int) -> HParams:
    return HParams(
        arch="llama", n_layer=1, n_embd=n_head * d, n_head=n_head, n_head_kv=n_kv, head_dim=d,
        head_dim_v=d, n_ff=4, n_vocab=4, n_ctx_train=64, norm="rms", norm_eps=1e-5,
        rope=RopeParams(type="normal", n_dims=d),
    )  # fmt: skip


def _naive_attention(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, window: int, sinks: np.ndarray | None
) -> np.ndarray:
    t, h, d = q.shape
    g = h // k.shape[1]
    out = np.zeros((t, h, d))
    for i in range(t):
        for hh in range(h):
            js = [j for j in range(i + 1) if window == 0 or i - j < window]
            s = np.array([q[i, hh] @ k[j, hh // g] / math.sqrt(d) for j in js])
            extra = [] if sinks is None else [sinks[hh]]
            m = max([*s, *extra])
            e = np.exp(s - m)
            z = e.sum() + sum(math.exp(x - m) for x in extra)
            out[i, hh] = sum(e[n] / z * v[j, hh // g] for n, j in enumerate(js))
    return out.reshape(t, h * d)


@pytest.mark.parametrize("window", [0, 3])
@pytest.mark.parametrize("with_sinks", [False, True])
def test_attention_matches_naive_loop_in_chunks(window: int, with_sinks: bool) -> None:
    rng = np.random.default_rng(2)
    t, h, kvh, d = 9, 4, 2, 8
    q = rng.standard_normal((t, h, d)).astype(np.float32)
    k = rng.standard_normal((t, kvh, d)).astype(np.float32)
    v = rng.standard_normal((t, kvh, d)).astype(np.float32)
    sinks = rng.standard_normal(h).astype(np.float32) if with_sinks else None
    want = _naive_attention(q, k, v, window, sinks)
    opts = AttnOptions(scale=1 / math.sqrt(d), window=window, sinks=sinks)
    kv = KVCache(_hp(h, kvh, d), 16)
    # prefill 5 then decode one at a time: must equal the all-at-once reference
    got = [attention(q[:5], kv, 0, k[:5], v[:5], 0, opts)]
    for i in range(5, t):
        got.append(attention(q[i : i + 1], kv, 0, k[i : i + 1], v[i : i + 1], i, opts))
    np.testing.assert_allclose(np.concatenate(got), want, rtol=1e-5, atol=1e-6)


def test_moe_route_top_k_then_softmax_over_chosen() -> None:
    logits = np.array([[0.1, 3.0, -1.0, 2.0, 2.5, 0.0]], np.float32)
    idx, w = moe_route(logits, 3)
    assert idx.tolist() == [[1, 4, 3]]
    e = np.exp(np.array([3.0, 2.5, 2.0]) - 3.0)
    np.testing.assert_allclose(w[0], e / e.sum(), rtol=1e-6)
