"""One description per architecture: what every layer computes, read by both backends.

`build_recipe(hp, names, n_ctx)` turns a model's hyperparameters and tensor names into a
`ModelRecipe`: the norm kind, each layer's projections (separate or fused q/k/v, gated /
GELU / mixture-of-experts FFN, biases where the file has them), sliding windows, attention
sinks, the RoPE table (the per-pair angle rate with base, frequency factors, linear or YaRN
scaling folded in, and the cos/sin magnitude) and the LM head. The NumPy reference takes its
RoPE angles from here (worker.models.base); the CUDA executor runs the whole recipe
(worker/backends/cuda/executor.py) and holds no architecture names of its own.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Container
from dataclasses import dataclass
from typing import Literal

import numpy as np

from worker.gguf.hparams import HParams, RopeParams

RopeMode = Literal[0, 1, 2]  # none, normal (pairs 2i, 2i+1), NeoX (pairs i, i + n/2)
ROPE_MODE: dict[str, RopeMode] = {"none": 0, "normal": 1, "neox": 2}
FfnKind = Literal["gated", "gelu", "moe_oai"]


@dataclass(frozen=True)
class RopeTable:
    mode: RopeMode
    n_rot: int  # rotated dims per head (0 when mode is 0)
    inv_freq: np.ndarray  # float64 [n_rot / 2]: angle(pos, i) = pos * inv_freq[i]
    mscale: float  # multiplies cos and sin


@dataclass(frozen=True)
class LayerRecipe:
    attn_norm: str  # tensor prefix (".weight", ".bias" appended)
    qkv: tuple[str, ...]  # projections whose outputs, side by side, are [q | k | v]
    attn_output: str
    window: int  # sliding window in tokens (0: full causal attention)
    sinks: str | None  # tensor of one logit per head joining the softmax (gpt-oss)
    ffn_norm: str
    ffn: FfnKind
    # gated: (gate, up) or (fused ffn_up = [gate; up]); gelu: (up,);
    # moe_oai: (router, gate experts, up experts)
    ffn_in: tuple[str, ...]
    ffn_out: str  # down projection (experts for moe_oai)


@dataclass(frozen=True)
class ModelRecipe:
    norm: Literal["rms", "layer"]
    norm_eps: float
    layers: tuple[LayerRecipe, ...]
    rope: RopeTable
    learned_pos: str | None  # position embedding table (gpt2)
    output_norm: str
    head: str  # LM head weight (tied: the token embedding)
    attn_scale: float
    n_expert_used: int


def yarn_corr_dim(n_dims: int, n_ctx_orig: int, n_rot: float, base: float) -> float:
    return n_dims * math.log(n_ctx_orig / (n_rot * 2.0 * math.pi)) / (2.0 * math.log(base))


def rope_inv_freq(rope: RopeParams, factors: np.ndarray | None) -> tuple[np.ndarray, float]:
    """Per-pair angle rate (float64) with base, frequency factors and linear / YaRN scaling
    folded in (every one of them is linear in the position), and the cos/sin magnitude.

    theta_i(p) = p * base^(-2i/n_dims) / factor_i, then: linear: * freq_scale; YaRN: the
    interpolated (* freq_scale) and extrapolated angles blended by llama.cpp's ramp over the
    correction dims, cos/sin scaled by the YaRN mscale."""
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
            lo = yarn_corr_dim(rope.n_dims, rope.orig_ctx, rope.yarn_beta_fast, rope.theta)
            hi = yarn_corr_dim(rope.n_dims, rope.orig_ctx, rope.yarn_beta_slow, rope.theta)
            if rope.yarn_truncate:
                lo, hi = math.floor(lo), math.ceil(hi)
            lo, hi = max(0.0, lo), min(rope.n_dims - 1.0, hi)
            y = (i - lo) / max(0.001, hi - lo)
            mix = (1.0 - np.clip(y, 0.0, 1.0)) * rope.yarn_ext_factor
            inv = inv * (fs * (1.0 - mix) + mix)
        else:
            inv = inv * fs
        mscale = rope.yarn_mscale
    return inv, float(mscale)


def rope_factor_tensor(hp: HParams, names: Container[str], n_ctx: int) -> str | None:
    """The frequency-factor tensor the model uses at context n_ctx, if any: Phi-3's long
    factors past the original context (or when there are no short ones), else its short
    ones; Llama 3.1's rope_freqs."""
    long_, short = "rope_factors_long.weight", "rope_factors_short.weight"
    if long_ in names and (n_ctx > hp.rope.orig_ctx or short not in names):
        return long_
    if short in names:
        return short
    if "rope_freqs.weight" in names:
        return "rope_freqs.weight"
    return None


def build_recipe(
    hp: HParams,
    names: Container[str],
    n_ctx: int,
    load: Callable[[str], np.ndarray],
) -> ModelRecipe:
    """The recipe of a model with these hyperparameters and tensors; `load(name)` gives a
    small tensor as float32 (the RoPE factors)."""
    layers = []
    for il in range(hp.n_layer):
        p = f"blk.{il}"
        fused_qkv = f"{p}.attn_qkv.weight" in names
        qkv = (f"{p}.attn_qkv",) if fused_qkv else (f"{p}.attn_q", f"{p}.attn_k", f"{p}.attn_v")
        ffn: FfnKind
        if hp.n_expert > 0:
            ffn = "moe_oai"
            ffn_in: tuple[str, ...] = (
                f"{p}.ffn_gate_inp",
                f"{p}.ffn_gate_exps",
                f"{p}.ffn_up_exps",
            )
            ffn_out = f"{p}.ffn_down_exps"
        elif f"{p}.ffn_gate.weight" in names:
            ffn, ffn_in, ffn_out = "gated", (f"{p}.ffn_gate", f"{p}.ffn_up"), f"{p}.ffn_down"
        elif hp.learned_pos:  # gpt2: up -> GELU -> down
            ffn, ffn_in, ffn_out = "gelu", (f"{p}.ffn_up",), f"{p}.ffn_down"
        else:  # phi3: ffn_up holds [gate; up]
            ffn, ffn_in, ffn_out = "gated", (f"{p}.ffn_up",), f"{p}.ffn_down"
        post = f"{p}.post_attention_norm"
        layers.append(
            LayerRecipe(
                attn_norm=f"{p}.attn_norm",
                qkv=qkv,
                attn_output=f"{p}.attn_output",
                window=hp.sliding_window if hp.is_swa(il) else 0,
                sinks=f"{p}.attn_sinks.weight" if hp.has_sinks else None,
                ffn_norm=post if f"{post}.weight" in names else f"{p}.ffn_norm",
                ffn=ffn,
                ffn_in=ffn_in,
                ffn_out=ffn_out,
            )
        )
    mode = ROPE_MODE[hp.rope.type]
    if mode:
        fname = rope_factor_tensor(hp, names, n_ctx)
        factors = load(fname).reshape(-1) if fname is not None else None
        inv, mscale = rope_inv_freq(hp.rope, factors)
        rope = RopeTable(mode, hp.rope.n_dims, inv, mscale)
    else:
        rope = RopeTable(0, 0, np.zeros(0, np.float64), 1.0)
    return ModelRecipe(
        norm=hp.norm,
        norm_eps=hp.norm_eps,
        layers=tuple(layers),
        rope=rope,
        learned_pos="position_embd.weight" if hp.learned_pos else None,
        output_norm="output_norm",
        head="output.weight" if "output.weight" in names else "token_embd.weight",
        attn_scale=1.0 / math.sqrt(hp.head_dim),
        n_expert_used=hp.n_expert_used,
    )
