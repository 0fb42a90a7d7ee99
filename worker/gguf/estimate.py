"""VRAM estimate and quant-kind label of a GGUF model (`worker-orcd inspect`, docs/design.md).

estimate = weights + KV cache + scratch, where

- weights: every tensor as stored (quantized, never dequantized), each rounded up to the
  256-byte alignment of the device weights arena;
- KV cache: FP16 K and V for every layer at `n_ctx` positions:
  n_layer * n_ctx * n_head_kv * (head_dim_k + head_dim_v) * 2 bytes
  (= 2 * n_layer * n_ctx * n_head_kv * head_dim * 2 when K and V heads are the same size).
  gpt-oss's sliding-window layers are sized for the full context too: the cache is one
  arena of identical layers, so the figure is an upper bound for that architecture;
- scratch: float32 activations of one prefill chunk of `PREFILL_CHUNK` (512) tokens —
  residual stream, normed input and attention output (3 x n_embd), q/k/v, the FFN's gate,
  up and activation (3 x n_ff, or 3 x n_ff_exp x experts used for MoE, plus router logits)
  — the split-K attention partials of that chunk (`ATTN_SPLITS` splits of head_dim_v + 2
  floats per head), and one row of float32 logits plus as much again for sampling
  (the LM head runs on the last position of a prefill chunk only, as in llama.cpp).

It is an estimate for planning and for `inspect`; the CUDA backend reports what it really
allocated (`vram_bytes_used`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

from gguf import GGMLQuantizationType, LlamaFileType

from worker.gguf.hparams import HParams, load_hparams
from worker.gguf.reader import GGUFFile

ARENA_ALIGNMENT = 256
PREFILL_CHUNK = 512
ATTN_SPLITS = 16
KV_BYTES = 2  # FP16
ACT_BYTES = 4  # float32


def align_up(n: int, alignment: int = ARENA_ALIGNMENT) -> int:
    return -(-n // alignment) * alignment


@dataclass(frozen=True)
class VramEstimate:
    ctx_size: int
    weights_bytes: int
    kv_cache_bytes: int
    scratch_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.scratch_bytes

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total_bytes": self.total_bytes}


def weights_bytes(gf: GGUFFile) -> int:
    """Bytes of all tensors as stored, each 256-byte aligned in the weights arena."""
    return sum(align_up(t.nbytes) for t in gf.tensors.values())


def kv_cache_bytes(hp: HParams, n_ctx: int) -> int:
    """FP16 K and V cache for every layer at `n_ctx` positions (all layers full size)."""
    return hp.n_layer * n_ctx * hp.n_head_kv * (hp.head_dim + hp.head_dim_v) * KV_BYTES


def scratch_bytes(hp: HParams, n_ctx: int, chunk: int = PREFILL_CHUNK) -> int:
    """Activations of one prefill chunk (float32) plus logits and sampling buffers."""
    rows = max(1, min(chunk, n_ctx))
    if hp.n_expert > 0:
        ffn = 3 * hp.n_ff_exp * hp.n_expert_used + hp.n_expert
    else:
        ffn = 3 * hp.n_ff
    per_row = 3 * hp.n_embd + hp.q_dim + hp.kv_dim + hp.v_dim + ffn
    attn_partials = hp.n_head * ATTN_SPLITS * (hp.head_dim_v + 2)
    logits = 2 * hp.n_vocab
    return (rows * (per_row + attn_partials) + logits) * ACT_BYTES


def estimate_vram(
    gf: GGUFFile, ctx_size: int | None = None, *, hp: HParams | None = None
) -> VramEstimate:
    """Weights + KV + scratch for a context of `ctx_size` tokens (default: the model's)."""
    hp = hp if hp is not None else load_hparams(gf)
    n_ctx = hp.n_ctx_train if ctx_size is None else ctx_size
    if n_ctx <= 0:
        raise ValueError(f"context size must be positive, got {n_ctx}")
    return VramEstimate(
        ctx_size=n_ctx,
        weights_bytes=weights_bytes(gf),
        kv_cache_bytes=kv_cache_bytes(hp, n_ctx),
        scratch_bytes=scratch_bytes(hp, n_ctx),
    )


def bytes_by_type(gf: GGUFFile) -> dict[str, dict[str, int]]:
    """{type name: {"count": tensors, "bytes": stored bytes}}, largest first."""
    count: Counter[GGMLQuantizationType] = Counter()
    size: Counter[GGMLQuantizationType] = Counter()
    for t in gf.tensors.values():
        count[t.ggml_type] += 1
        size[t.ggml_type] += t.nbytes
    order = sorted(size, key=lambda k: (-size[k], k.name))
    return {k.name: {"count": count[k], "bytes": size[k]} for k in order}


def _file_type_label(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    try:
        ft = LlamaFileType(value)
    except ValueError:
        return None
    if ft == LlamaFileType.GUESSED:
        return None
    return ft.name.removeprefix("MOSTLY_").removeprefix("ALL_")


def quant_kind(gf: GGUFFile) -> str:
    """The label the worker reports: llama.cpp's file type from `general.file_type`
    ("Q4_K_M", "Q4_0", "MXFP4_MOE", "F16"...), else the type holding most weight bytes
    (tensors of two or more dimensions; all tensors when there are none)."""
    label = _file_type_label(gf.metadata.get("general.file_type"))
    if label is not None:
        return label
    weights = [t for t in gf.tensors.values() if len(t.shape) >= 2] or list(gf.tensors.values())
    if not weights:
        return "unknown"
    size: Counter[GGMLQuantizationType] = Counter()
    for t in weights:
        size[t.ggml_type] += t.nbytes
    return max(size, key=lambda k: (size[k], -int(k))).name
