"""Layers shared by the five architectures, in float32 NumPy (the reference recipes).

Conventions (the CUDA backend mirrors them):
- A weight matrix is used in NumPy shape [n_out, n_in] (GGUF ne = [n_in, n_out]); a
  projection is `y = x @ W.T (+ b)` with x of shape [tokens, n_in].
- Activations are float32 throughout; every reduction (norms, softmax, matmul) accumulates
  in float32 (BLAS sgemm), softmax subtracts the row max first.
- Q/K/V per token are laid out head-major: q[t, h*head_dim + i].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from worker.gguf.hparams import HParams, RopeParams

F32 = npt.NDArray[np.floating[Any]]  # float32 in practice

GELU_COEF = math.sqrt(2.0 / math.pi)
OAI_SWIGLU_ALPHA = 1.702
OAI_SWIGLU_LIMIT = 7.0


class Weights(Protocol):
    """Read access to a model's weights as float32 (dequantized as needed)."""

    def has(self, name: str) -> bool: ...

    def get(self, name: str) -> F32:
        """The whole tensor, float32, NumPy shape (reversed ggml ne)."""
        ...

    def rows(self, name: str, idx: npt.NDArray[np.int64]) -> F32:
        """Selected rows of a 2-D tensor (embedding lookup), float32 [len(idx), ne0]."""
        ...

    def expert(self, name: str, e: int) -> F32:
        """Matrix `e` of a 3-D expert tensor, float32 [ne1, ne0]."""
        ...


class KVStore(Protocol):
    """One sequence's keys and values, position-indexed, as the attention reads them."""

    n_ctx: int  # positions it can hold

    def write(self, layer: int, start: int, k: F32, v: F32) -> None:
        """Store k/v [T, n_kv, d] at positions start..start+T-1."""
        ...

    def read(self, layer: int, lo: int, end: int) -> tuple[F32, F32]:
        """Keys and values [end - lo, n_kv, d] of positions lo..end-1."""
        ...


class KVCache:
    """Per-layer K and V for one sequence: [n_ctx, n_head_kv, head_dim] float32 each."""

    def __init__(self, hp: HParams, n_ctx: int, dtype: npt.DTypeLike = np.float32) -> None:
        self.n_ctx = n_ctx
        self.k = [np.zeros((n_ctx, hp.n_head_kv, hp.head_dim), dtype) for _ in range(hp.n_layer)]
        self.v = [np.zeros((n_ctx, hp.n_head_kv, hp.head_dim_v), dtype) for _ in range(hp.n_layer)]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.k) + sum(a.nbytes for a in self.v)

    def write(self, layer: int, start: int, k: F32, v: F32) -> None:
        self.k[layer][start : start + len(k)] = k
        self.v[layer][start : start + len(v)] = v

    def read(self, layer: int, lo: int, end: int) -> tuple[F32, F32]:
        return self.k[layer][lo:end], self.v[layer][lo:end]


class PagedKV:
    """Pool of KV blocks shared by many sequences: per layer [n_blocks * block_size, n_kv, d]
    (block b holds pool rows b*block_size ..). `view(table)` is one sequence's KVStore."""

    def __init__(
        self, hp: HParams, n_blocks: int, block_size: int, dtype: npt.DTypeLike = np.float32
    ) -> None:
        self.n_blocks, self.block_size = n_blocks, block_size
        rows = n_blocks * block_size
        self.k = [np.zeros((rows, hp.n_head_kv, hp.head_dim), dtype) for _ in range(hp.n_layer)]
        self.v = [np.zeros((rows, hp.n_head_kv, hp.head_dim_v), dtype) for _ in range(hp.n_layer)]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.k) + sum(a.nbytes for a in self.v)

    def copy_block(self, src: int, dst: int) -> None:
        bs = self.block_size
        for a in (*self.k, *self.v):
            a[dst * bs : (dst + 1) * bs] = a[src * bs : (src + 1) * bs]

    def view(self, table: Sequence[int]) -> PagedView:
        return PagedView(self, table)


class PagedView:
    """A KVStore over the blocks `table` of a PagedKV (position p -> block table[p // bs])."""

    def __init__(self, pool: PagedKV, table: Sequence[int]) -> None:
        self.pool = pool
        self.table = np.asarray(table, dtype=np.int64)
        self.n_ctx = len(table) * pool.block_size

    def _rows(self, lo: int, end: int) -> npt.NDArray[np.int64]:
        pos = np.arange(lo, end, dtype=np.int64)
        bs = self.pool.block_size
        return self.table[pos // bs] * bs + pos % bs

    def write(self, layer: int, start: int, k: F32, v: F32) -> None:
        rows = self._rows(start, start + len(k))
        self.pool.k[layer][rows] = k
        self.pool.v[layer][rows] = v

    def read(self, layer: int, lo: int, end: int) -> tuple[F32, F32]:
        rows = self._rows(lo, end)
        return self.pool.k[layer][rows], self.pool.v[layer][rows]


# ---------------------------------------------------------------- norms and activations


def rmsnorm(x: F32, w: F32, eps: float) -> F32:
    """x / sqrt(mean(x^2) + eps) * w, per row."""
    ms = np.mean(np.square(x), axis=-1, keepdims=True, dtype=np.float32)
    return (x / np.sqrt(ms + np.float32(eps))) * w


def layernorm(x: F32, w: F32, b: F32 | None, eps: float) -> F32:
    """(x - mean) / sqrt(var + eps) * w + b, per row (biased variance, as torch)."""
    mu = np.mean(x, axis=-1, keepdims=True, dtype=np.float32)
    d = x - mu
    var = np.mean(np.square(d), axis=-1, keepdims=True, dtype=np.float32)
    y = d / np.sqrt(var + np.float32(eps)) * w
    return y + b if b is not None else y


def silu(x: F32) -> F32:
    return x / (np.float32(1.0) + np.exp(-x))


def sigmoid(x: F32) -> F32:
    return np.float32(1.0) / (np.float32(1.0) + np.exp(-x))


def gelu_tanh(x: F32) -> F32:
    """GELU, tanh approximation (GPT-2's `gelu_new`)."""
    inner = np.float32(GELU_COEF) * (x + np.float32(0.044715) * x * x * x)
    return np.float32(0.5) * x * (np.float32(1.0) + np.tanh(inner))


def swiglu(gate: F32, up: F32) -> F32:
    return silu(gate) * up


def swiglu_oai(gate: F32, up: F32) -> F32:
    """gpt-oss: gate clamped above at 7, up clamped to [-7, 7], gate*sigmoid(1.702 gate)*(up+1)."""
    g = np.minimum(gate, np.float32(OAI_SWIGLU_LIMIT))
    u = np.clip(up, np.float32(-OAI_SWIGLU_LIMIT), np.float32(OAI_SWIGLU_LIMIT))
    return g * sigmoid(np.float32(OAI_SWIGLU_ALPHA) * g) * (u + np.float32(1.0))


def softmax(x: F32, axis: int = -1) -> F32:
    m = np.max(x, axis=axis, keepdims=True)
    e = np.exp(x - m)
    return e / np.sum(e, axis=axis, keepdims=True, dtype=np.float32)


def linear(x: F32, w: F32, b: F32 | None = None) -> F32:
    y = x @ w.T
    return y + b if b is not None else y


# ---------------------------------------------------------------- rotary embeddings


def rope_angles(
    rope: RopeParams, positions: npt.NDArray[np.int64], freq_factors: F32 | None = None
) -> tuple[F32, F32]:
    """cos and sin, each [len(positions), n_dims/2], for pair i of each head: the angle
    p * inv_freq[i] (worker.models.recipe.rope_inv_freq folds base, factors and linear / YaRN
    scaling into inv_freq), times the cos/sin magnitude. Computed in float64 then rounded to
    float32 (the angles reach 1e5 rad at long context)."""
    from worker.models.recipe import rope_inv_freq

    inv, mscale = rope_inv_freq(rope, freq_factors)
    theta = positions.astype(np.float64)[:, None] * inv[None, :]
    return (
        (np.cos(theta) * mscale).astype(np.float32),
        (np.sin(theta) * mscale).astype(np.float32),
    )


def apply_rope(x: F32, cos: F32, sin: F32, rope: RopeParams) -> F32:
    """Rotate x [T, n_heads, head_dim] in place-free fashion; dims past n_dims pass through.

    neox: pairs (i, i + n_dims/2); normal: pairs (2i, 2i+1).
    """
    nd = rope.n_dims
    half = nd // 2
    c = cos[:, None, :]
    s = sin[:, None, :]
    out = x.copy()
    if rope.type == "neox":
        x0 = x[..., :half]
        x1 = x[..., half:nd]
        out[..., :half] = x0 * c - x1 * s
        out[..., half:nd] = x0 * s + x1 * c
    elif rope.type == "normal":
        x0 = x[..., 0:nd:2]
        x1 = x[..., 1:nd:2]
        out[..., 0:nd:2] = x0 * c - x1 * s
        out[..., 1:nd:2] = x0 * s + x1 * c
    else:
        raise ValueError(f"rope type {rope.type!r} does not rotate")
    return out


# ---------------------------------------------------------------- attention


@dataclass(frozen=True, slots=True)
class AttnOptions:
    scale: float
    window: int = 0  # sliding window in tokens (0 = full causal attention)
    sinks: F32 | None = None  # one logit per q head, joins the softmax and is dropped


def attention(
    q: F32,
    kv: KVStore,
    layer: int,
    k_new: F32,
    v_new: F32,
    start_pos: int,
    opts: AttnOptions,
) -> F32:
    """Causal (optionally windowed, optionally with sinks) GQA attention over the cache.

    q [T, n_head, d], k_new/v_new [T, n_kv, d] for positions start_pos..start_pos+T-1 are
    written into the cache first; query t (position p = start_pos + t) sees key j when
    j <= p and, with a window W, p - j < W. Returns [T, n_head * d_v].
    """
    t_len, n_head, d = q.shape
    n_kv = k_new.shape[1]
    end = start_pos + t_len
    kv.write(layer, start_pos, k_new, v_new)
    lo = 0
    if opts.window > 0:
        lo = max(0, start_pos - opts.window + 1)
    keys, vals = kv.read(layer, lo, end)
    keys = keys.astype(np.float32, copy=False)  # [S, n_kv, d]
    vals = vals.astype(np.float32, copy=False)
    s_len = end - lo
    g = n_head // n_kv
    # [n_kv, g*T, d] @ [n_kv, d, S] -> [n_kv, g*T, S]
    qh = q.reshape(t_len, n_kv, g, d).transpose(1, 2, 0, 3).reshape(n_kv, g * t_len, d)
    kh = keys.transpose(1, 2, 0)
    scores = (qh @ kh) * np.float32(opts.scale)
    scores = scores.reshape(n_kv, g, t_len, s_len)
    qpos = np.arange(start_pos, end)[:, None]
    kpos = np.arange(lo, end)[None, :]
    allowed = kpos <= qpos
    if opts.window > 0:
        allowed &= (qpos - kpos) < opts.window
    scores = np.where(allowed[None, None], scores, np.float32(-np.inf))
    m = np.max(scores, axis=-1, keepdims=True)
    if opts.sinks is not None:
        sink = opts.sinks.astype(np.float32).reshape(n_kv, g, 1, 1)
        m = np.maximum(m, sink)
        e = np.exp(scores - m)
        denom = np.sum(e, axis=-1, keepdims=True, dtype=np.float32) + np.exp(sink - m)
    else:
        e = np.exp(scores - m)
        denom = np.sum(e, axis=-1, keepdims=True, dtype=np.float32)
    p = (e / denom).reshape(n_kv, g * t_len, s_len)
    vh = vals.transpose(1, 0, 2)  # [n_kv, S, dv]
    o = p @ vh  # [n_kv, g*T, dv]
    dv = vals.shape[-1]
    return o.reshape(n_kv, g, t_len, dv).transpose(2, 0, 1, 3).reshape(t_len, n_head * dv)


# ---------------------------------------------------------------- mixture of experts


def moe_route(logits: F32, k: int) -> tuple[npt.NDArray[np.int64], F32]:
    """Top-k experts per token by router logit, then softmax over the chosen k."""
    idx = np.argsort(-logits, axis=-1, kind="stable")[:, :k]
    chosen = np.take_along_axis(logits, idx, axis=-1)
    return idx.astype(np.int64), softmax(chosen, axis=-1)


def as_ids(ids: Sequence[int] | npt.NDArray[np.integer]) -> npt.NDArray[np.int64]:
    return np.asarray(ids, dtype=np.int64).reshape(-1)
