"""Typed hyperparameters for the five supported architectures (docs/design.md).

`load_hparams(gguf_file_or_metadata)` reads llama.cpp's metadata keys and fills in
llama.cpp's defaults where a key is optional; a missing required key is a `ModelLoadError`
naming the key. The result is a frozen `HParams` (one class, with the fields that only some
architectures use defaulting to "absent": n_expert=0, sliding_window=0, ...), so every
backend reads the same object.

Semantics chosen to match llama.cpp (the format's reference implementation):
- rope type: NEOX (rotate halves) for qwen2, phi3, gpt-oss; NORMAL (rotate adjacent pairs)
  for llama (llama.cpp's converter permutes the q/k rows of HF checkpoints to make this
  equivalent to HF's rotate_half); none for gpt2 (learned absolute positions).
- gpt-oss: sliding-window pattern 2 (layer il uses the window when il % 2 == 0), window of
  `sliding_window` tokens including the current one, attention sinks, softmax over the
  chosen top-k router logits; YaRN with llama.cpp's truncated (floor/ceil) correction dims.
- phi3: llama.cpp disables Phi-3's sliding window (all layers full attention); the rope
  factors (long/short) are used when the file has them, long when the context size exceeds
  the original context length.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from worker.errors import ModelLoadError

SUPPORTED_ARCHS: tuple[str, ...] = ("qwen2", "phi3", "gpt-oss", "llama", "gpt2")

RopeType = Literal["neox", "normal", "none"]
RopeScaling = Literal["none", "linear", "yarn"]
NormType = Literal["rms", "layer"]

_ROPE_TYPE: dict[str, RopeType] = {
    "qwen2": "neox",
    "phi3": "neox",
    "gpt-oss": "neox",
    "llama": "normal",
    "gpt2": "none",
}


class _HasMetadata(Protocol):
    @property
    def metadata(self) -> Mapping[str, Any]: ...

    @property
    def tensors(self) -> Mapping[str, Any]: ...


@dataclass(frozen=True, slots=True)
class RopeParams:
    """Rotary position embedding settings (llama.cpp `ggml_rope_ext` arguments)."""

    type: RopeType
    theta: float = 10000.0  # {arch}.rope.freq_base
    n_dims: int = 0  # {arch}.rope.dimension_count (rotated dims per head; default head_dim)
    scaling: RopeScaling = "none"
    factor: float = 1.0  # {arch}.rope.scaling.factor (1/freq_scale)
    orig_ctx: int = 0  # {arch}.rope.scaling.original_context_length (default n_ctx_train)
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_ext_factor: float = 0.0  # 1.0 when scaling == "yarn" (llama.cpp's default)
    yarn_attn_factor: float = 1.0  # {arch}.rope.scaling.attn_factor (cos/sin magnitude)
    yarn_log_mul: float = 0.0  # {arch}.rope.scaling.yarn_log_multiplier (0 = absent)
    yarn_truncate: bool = True  # llama.cpp floors/ceils the correction dims
    has_factors: bool = False  # phi3 rope_factors_long/short or llama rope_freqs tensors

    @property
    def freq_scale(self) -> float:
        return 1.0 / self.factor if self.scaling in ("linear", "yarn") else 1.0

    @property
    def yarn_mscale(self) -> float:
        """Magnitude applied to cos/sin under YaRN (llama.cpp's net attn factor).

        Without a log multiplier: attn_factor * (1 + 0.1 ln(factor)) (HF's default
        attention_factor); with one (DeepSeek style): the ratio of the two mscales.
        """
        if self.scaling != "yarn" or self.factor <= 1.0:
            return self.yarn_attn_factor
        base = 1.0 + 0.1 * math.log(self.factor)
        if self.yarn_log_mul != 0.0:
            return (
                self.yarn_attn_factor
                * base
                / (1.0 + 0.1 * self.yarn_log_mul * math.log(self.factor))
            )
        return self.yarn_attn_factor * base


@dataclass(frozen=True, slots=True)
class HParams:
    """Everything the forward pass needs, for any of the five architectures."""

    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int  # attention.key_length (q/k head size)
    head_dim_v: int  # attention.value_length
    n_ff: int  # feed_forward_length (0 for gpt-oss, which has expert_feed_forward_length)
    n_vocab: int
    n_ctx_train: int
    norm: NormType
    norm_eps: float
    rope: RopeParams
    name: str = ""
    # Mixture of experts (gpt-oss)
    n_expert: int = 0
    n_expert_used: int = 0
    n_ff_exp: int = 0
    # Sliding-window attention: window in tokens (0 = none) and which layers use it.
    sliding_window: int = 0
    swa_layers: tuple[bool, ...] = ()
    has_sinks: bool = False  # gpt-oss attn_sinks (one learned logit per head)
    tied_embeddings: bool = False  # no output.weight: the LM head is token_embd
    learned_pos: bool = False  # gpt2 position_embd
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv

    @property
    def q_dim(self) -> int:
        return self.n_head * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_head_kv * self.head_dim

    @property
    def v_dim(self) -> int:
        return self.n_head_kv * self.head_dim_v

    def is_swa(self, layer: int) -> bool:
        return bool(self.swa_layers) and self.swa_layers[layer]


def required_keys(arch: str) -> list[str]:
    """Metadata keys without which `arch` cannot run (the loader validates these)."""
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(f"unsupported architecture {arch!r}")
    keys = [
        "general.architecture",
        f"{arch}.context_length",
        f"{arch}.embedding_length",
        f"{arch}.block_count",
        f"{arch}.attention.head_count",
    ]
    if arch == "gpt2":
        keys += [f"{arch}.feed_forward_length", f"{arch}.attention.layer_norm_epsilon"]
    elif arch == "gpt-oss":
        keys += [
            f"{arch}.attention.layer_norm_rms_epsilon",
            f"{arch}.expert_feed_forward_length",
            f"{arch}.expert_count",
            f"{arch}.expert_used_count",
            f"{arch}.attention.sliding_window",
        ]
    else:
        keys += [f"{arch}.feed_forward_length", f"{arch}.attention.layer_norm_rms_epsilon"]
    return keys


def _scalar(value: Any) -> Any:
    # A per-layer array (llama.cpp allows some keys as arrays): all our archs are uniform.
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError("empty array")
        return value[0]
    return value


def load_hparams(
    source: _HasMetadata | Mapping[str, Any],
    *,
    tensor_names: Sequence[str] | None = None,
    path: object = "<metadata>",
) -> HParams:
    """Build the hyperparameters from a GGUFFile (anything with .metadata and .tensors) or
    a metadata mapping of plain Python values. `tensor_names` (implied by a GGUFFile) lets
    the tied-embedding, learned-position, sink and rope-factor flags be read from the
    tensor table; from a bare mapping they are inferred as absent unless given."""
    if isinstance(source, Mapping):
        md: Mapping[str, Any] = source
        names = set(tensor_names or ())
    else:
        md = source.metadata
        names = set(tensor_names) if tensor_names is not None else set(source.tensors)
        path = getattr(source, "path", path)

    arch = md.get("general.architecture")
    if arch is None:
        raise ModelLoadError(path, "missing required metadata key 'general.architecture'")
    arch = str(arch)
    if arch not in SUPPORTED_ARCHS:
        raise ModelLoadError(
            path,
            f"unsupported architecture {arch!r} (supported: {', '.join(SUPPORTED_ARCHS)})",
        )
    for key in required_keys(arch):
        if key not in md:
            raise ModelLoadError(path, f"missing required metadata key {key!r}")

    def get(key: str, default: Any = None) -> Any:
        full = f"{arch}.{key}"
        if full not in md:
            return default
        try:
            return _scalar(md[full])
        except ValueError as exc:
            raise ModelLoadError(path, f"metadata key {full!r}: {exc}") from exc

    def as_int(key: str, default: int | None = None) -> int:
        v = get(key, default)
        try:
            return int(v)
        except (TypeError, ValueError) as exc:
            raise ModelLoadError(path, f"metadata key '{arch}.{key}' is not an integer") from exc

    def as_float(key: str, default: float) -> float:
        v = get(key, default)
        try:
            return float(v)
        except (TypeError, ValueError) as exc:
            raise ModelLoadError(path, f"metadata key '{arch}.{key}' is not a number") from exc

    n_layer = as_int("block_count")
    n_embd = as_int("embedding_length")
    n_head = as_int("attention.head_count")
    n_head_kv = as_int("attention.head_count_kv", n_head)
    if n_layer <= 0 or n_embd <= 0 or n_head <= 0 or n_head_kv <= 0:
        raise ModelLoadError(path, "block_count, embedding_length and head counts must be > 0")
    if n_head % n_head_kv != 0:
        raise ModelLoadError(
            path, f"head_count {n_head} not a multiple of head_count_kv {n_head_kv}"
        )
    head_dim = as_int("attention.key_length", n_embd // n_head)
    head_dim_v = as_int("attention.value_length", head_dim)
    n_ff = as_int("feed_forward_length", 0)
    n_ctx_train = as_int("context_length")

    # Vocabulary size: {arch}.vocab_size, else the tokenizer's token list, else token_embd.
    n_vocab = 0
    if f"{arch}.vocab_size" in md:
        n_vocab = as_int("vocab_size")
    elif isinstance(md.get("tokenizer.ggml.tokens"), (list, tuple)):
        n_vocab = len(md["tokenizer.ggml.tokens"])
    elif not isinstance(source, Mapping) and "token_embd.weight" in source.tensors:
        info = source.tensors["token_embd.weight"]
        n_vocab = int(info.shape[1])
    if n_vocab <= 0:
        raise ModelLoadError(
            path, f"missing required metadata key '{arch}.vocab_size' (or tokenizer.ggml.tokens)"
        )

    if arch == "gpt2":
        norm: NormType = "layer"
        norm_eps = as_float("attention.layer_norm_epsilon", 1e-5)
    else:
        norm = "rms"
        norm_eps = as_float("attention.layer_norm_rms_epsilon", 1e-6)

    # RoPE (llama.cpp: freq_base default 10000, n_rot default head_dim).
    scaling_name = str(get("rope.scaling.type", "none") or "none")
    factor = as_float("rope.scaling.factor", 0.0)
    if scaling_name == "none" and f"{arch}.rope.scale_linear" in md:
        scaling_name, factor = "linear", as_float("rope.scale_linear", 1.0)
    if scaling_name not in ("none", "linear", "yarn", "longrope"):
        raise ModelLoadError(path, f"unsupported rope scaling type {scaling_name!r}")
    if scaling_name == "longrope":  # phi3 long context: expressed by the factor tensors
        scaling_name = "none"
    if factor <= 0.0:
        factor = 1.0
    scaling: RopeScaling = scaling_name  # type: ignore[assignment]
    # llama.cpp multiplies cos/sin by rope.scaling.attn_factor (phi3 longrope writes it);
    # under YaRN it recomputes the YaRN part from the factor (see RopeParams.yarn_mscale).
    attn_factor = as_float("rope.scaling.attn_factor", 1.0)
    has_factors = bool(
        {"rope_factors_long.weight", "rope_factors_short.weight", "rope_freqs.weight"} & names
    )
    rope = RopeParams(
        type=_ROPE_TYPE[arch],
        theta=as_float("rope.freq_base", 10000.0),
        n_dims=as_int("rope.dimension_count", head_dim) if arch != "gpt2" else 0,
        scaling=scaling,
        factor=factor,
        orig_ctx=as_int("rope.scaling.original_context_length", n_ctx_train),
        yarn_beta_fast=as_float("rope.scaling.yarn_beta_fast", 32.0),
        yarn_beta_slow=as_float("rope.scaling.yarn_beta_slow", 1.0),
        yarn_ext_factor=as_float("rope.scaling.yarn_ext_factor", 1.0 if scaling == "yarn" else 0.0),
        yarn_attn_factor=attn_factor,
        yarn_log_mul=as_float("rope.scaling.yarn_log_multiplier", 0.0),
        has_factors=has_factors,
    )

    n_expert = as_int("expert_count", 0)
    n_expert_used = as_int("expert_used_count", 0)
    n_ff_exp = as_int("expert_feed_forward_length", 0)
    sliding_window = 0
    swa_layers: tuple[bool, ...] = ()
    if arch == "gpt-oss":
        if n_expert <= 0 or not 0 < n_expert_used <= n_expert:
            raise ModelLoadError(path, f"bad expert counts {n_expert_used}/{n_expert}")
        sliding_window = as_int("attention.sliding_window")
        swa_layers = tuple(il % 2 == 0 for il in range(n_layer))
    if rope.type != "none" and not 0 < rope.n_dims <= head_dim:
        raise ModelLoadError(path, f"rope dimension_count {rope.n_dims} not in 1..{head_dim}")

    return HParams(
        arch=arch,
        name=str(md.get("general.name", "")),
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim=head_dim,
        head_dim_v=head_dim_v,
        n_ff=n_ff,
        n_vocab=n_vocab,
        n_ctx_train=n_ctx_train,
        norm=norm,
        norm_eps=norm_eps,
        rope=rope,
        n_expert=n_expert,
        n_expert_used=n_expert_used,
        n_ff_exp=n_ff_exp,
        sliding_window=sliding_window,
        swa_layers=swa_layers,
        has_sinks=(
            any(n.endswith(".attn_sinks.weight") for n in names) if names else arch == "gpt-oss"
        ),
        tied_embeddings=bool(names) and "output.weight" not in names,
        learned_pos=arch == "gpt2",
    )
