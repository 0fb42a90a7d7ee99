"""Synthetic GGUF models: random weights in the exact tensor layout, tensor types and metadata
of the real models (docs/design.md), at full size or scaled down.

    spec = preset("qwen2", "tiny", mix="f32", seed=1)
    report = write_synthetic("/tmp/q.gguf", spec)

Layouts follow llama.cpp (tensor names from `gguf.constants`, shapes in ggml order, metadata
keys as `convert_hf_to_gguf.py` writes them). Tensors are written in the order the converter
produces them from a single sorted safetensors file (the order of the HF names), which for
qwen2 reproduces the real Qwen2.5 GGUF's tensor table exactly.

Quant mixes (`SynthSpec.mix`):

* ``q4_k_m`` - llama.cpp's Q4_K_M rules: `output.weight` (or `token_embd` when the output is
  tied) Q6_K; `attn_v` and `ffn_down` Q6_K on llama.cpp's "more bits" layers (the first and
  last eighth and every third in between, counted in file order) and Q4_K elsewhere; fused
  `attn_qkv` Q5_K; other matrices Q4_K; rows whose length is not a multiple of 256 fall back
  like llama.cpp (Q4_K->Q5_0, Q5_K->Q5_1, Q6_K->Q8_0). gpt-oss experts stay MXFP4.
* ``mxfp4`` (gpt-oss only) - the MXFP4 release's mix: expert matrices MXFP4, every other
  matrix Q8_0, router, norms, biases and sinks F32.
* ``q4_0`` and the other single types (``q4_1 q5_0 q5_1 q8_0 q4_k q5_k q6_k bf16 f16 f32``) -
  every weight matrix (experts included) in that type, with the same row-length fallbacks.

In every mix vectors (norms, biases, sinks, rope factors), the MoE router `ffn_gate_inp` and
gpt2's `position_embd` are F32, as llama.cpp's converter and quantizer leave them.
"""

from __future__ import annotations

import math
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from gguf import GGUFWriter
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType, RopeScalingType

from tools.synth_blocks import tensor_nbytes, write_random_tensor
from tools.synth_vocab import Vocab, min_normal_tokens, vocab_for

T = GGMLQuantizationType

ARCHS: tuple[str, ...] = ("qwen2", "phi3", "gpt-oss", "llama", "gpt2")
SIZES: tuple[str, ...] = ("full", "tiny")
SINGLE_TYPE_MIXES: dict[str, GGMLQuantizationType] = {
    "f32": T.F32,
    "f16": T.F16,
    "bf16": T.BF16,
    "q4_0": T.Q4_0,
    "q4_1": T.Q4_1,
    "q5_0": T.Q5_0,
    "q5_1": T.Q5_1,
    "q8_0": T.Q8_0,
    "q4_k": T.Q4_K,
    "q5_k": T.Q5_K,
    "q6_k": T.Q6_K,
}
MIXES: tuple[str, ...] = ("q4_k_m", "mxfp4", *SINGLE_TYPE_MIXES)

FILE_TYPES: dict[str, LlamaFileType] = {
    "q4_k_m": LlamaFileType.MOSTLY_Q4_K_M,
    "mxfp4": LlamaFileType.MOSTLY_MXFP4_MOE,
    "f32": LlamaFileType.ALL_F32,
    "f16": LlamaFileType.MOSTLY_F16,
    "bf16": LlamaFileType.MOSTLY_BF16,
    "q4_0": LlamaFileType.MOSTLY_Q4_0,
    "q4_1": LlamaFileType.MOSTLY_Q4_1,
    "q5_0": LlamaFileType.MOSTLY_Q5_0,
    "q5_1": LlamaFileType.MOSTLY_Q5_1,
    "q8_0": LlamaFileType.MOSTLY_Q8_0,
    "q4_k": LlamaFileType.MOSTLY_Q4_K_S,
    "q5_k": LlamaFileType.MOSTLY_Q5_K_S,
    "q6_k": LlamaFileType.MOSTLY_Q6_K,
}

# llama.cpp's fallback when a row is not a whole number of 256-element super-blocks.
_K_FALLBACK = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}


class SynthError(ValueError):
    """An impossible or unsupported synthetic-model request."""


@dataclass(frozen=True)
class SynthSpec:
    """What to generate. `preset()` fills in the real models' values; override scale fields
    with `dataclasses.replace` or `SynthSpec.scaled`."""

    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_vocab: int
    n_ctx: int
    mix: str = "q4_k_m"
    seed: int = 0
    n_tok_normal: int = 0  # normal tokens (BPE: bytes + merges; SPM: control+bytes+pieces)
    n_expert: int = 0
    n_expert_used: int = 0
    n_ff_exp: int = 0
    sliding_window: int = 0
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    rope_scaling_factor: float = 0.0  # gpt-oss YaRN / llama-3 rope_freqs factor
    rope_orig_ctx: int = 0
    tied_output: bool = False  # no output.weight (the LM head is token_embd)
    rope_factors: bool = False  # phi3 128k-style rope_factors_long/short tensors
    name: str = ""
    size_label: str = ""  # general.size_label of the real model (full size only)
    size: str = "custom"
    std: float = 0.02  # standard deviation of weight matrices after dequantization

    def scaled(self, **overrides: Any) -> SynthSpec:
        """A copy with scale overrides; the vocabulary's normal-token count follows n_vocab
        (the special tokens are kept) unless given, MHA architectures keep n_head_kv ==
        n_head, and gpt-oss's expert width follows n_embd."""
        spec = replace(self, **overrides)
        if spec.arch in ("gpt2", "phi3") and "n_head" in overrides and "n_head_kv" not in overrides:
            spec = replace(spec, n_head_kv=spec.n_head)  # multi-head attention
        if "n_vocab" in overrides and "n_tok_normal" not in overrides:
            spec = replace(spec, n_tok_normal=_default_normal(spec.arch, spec.n_vocab))
        if "n_embd" in overrides and "n_ff_exp" not in overrides and spec.n_expert:
            spec = replace(spec, n_ff_exp=spec.n_embd)
        if overrides.keys() - {"mix", "seed", "name", "std"}:
            spec = replace(spec, size="custom", size_label="")
        return spec

    @property
    def q_dim(self) -> int:
        return self.n_head * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_head_kv * self.head_dim

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise SynthError(f"{self.arch}: {msg}")

        need(self.arch in ARCHS, f"unknown architecture (supported: {', '.join(ARCHS)})")
        need(self.mix in MIXES, f"unknown mix {self.mix!r} (supported: {', '.join(MIXES)})")
        need(self.mix != "mxfp4" or self.arch == "gpt-oss", "mix mxfp4 is for gpt-oss only")
        for f in ("n_layer", "n_embd", "n_head", "n_head_kv", "head_dim", "n_vocab", "n_ctx"):
            need(getattr(self, f) > 0, f"{f} must be > 0")
        need(self.n_head % self.n_head_kv == 0, "n_head must be a multiple of n_head_kv")
        need(self.head_dim % 2 == 0, "head_dim must be even (RoPE pairs)")
        if self.arch == "gpt2":
            need(self.n_head == self.n_head_kv, "gpt2 is multi-head attention")
            need(self.q_dim == self.n_embd, "gpt2 needs n_head * head_dim == n_embd")
        if self.arch == "phi3":
            need(self.n_head == self.n_head_kv, "phi3 is multi-head attention")
        if self.arch == "gpt-oss":
            need(self.n_expert > 1, "gpt-oss needs experts")
            need(
                0 < self.n_expert_used < self.n_expert,
                "expert_used_count must be in 1..expert_count-1",
            )
            need(self.n_ff_exp > 0, "n_ff_exp must be > 0")
            need(self.sliding_window > 0, "gpt-oss needs a sliding window")
        else:
            need(self.n_ff > 0, "n_ff must be > 0")
            need(self.n_expert == 0, "experts are only supported for gpt-oss")
        lo = min_normal_tokens("llama" if self.arch == "phi3" else "gpt2")
        need(self.n_tok_normal >= lo, f"the vocabulary needs at least {lo} normal tokens")
        n_special = _SPECIAL_COUNTS[self.arch]
        need(
            self.n_tok_normal + n_special <= self.n_vocab,
            f"n_vocab {self.n_vocab} cannot hold {self.n_tok_normal} normal and "
            f"{n_special} special tokens (minimum n_vocab {lo + n_special})",
        )
        need(self.std > 0 and math.isfinite(self.std), "std must be a positive number")


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]  # ggml order (ne[0] = row length)
    qtype: GGMLQuantizationType
    role: str  # matrix, attn_v, ffn_down, attn_qkv, embd, output, experts, router,
    # pos_embd, norm, bias, sinks, rope
    layer: int = -1
    mean: float = 0.0
    std: float = 0.0

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.qtype, self.n_elements)


@dataclass
class SynthReport:
    path: Path
    arch: str
    mix: str
    size: str
    n_tensors: int
    n_params: int
    tensor_bytes: int
    file_bytes: int
    bytes_by_type: dict[str, int]
    count_by_type: dict[str, int]
    n_vocab: int
    seconds: float
    tensors: list[PlannedTensor] = field(repr=False, default_factory=list)

    def summary(self) -> str:
        by = " ".join(
            f"{t}:{self.count_by_type[t]}/{_human(b)}"
            for t, b in sorted(self.bytes_by_type.items(), key=lambda kv: -kv[1])
        )
        return (
            f"{self.path}: {self.arch} {self.size} {self.mix} - {self.n_tensors} tensors, "
            f"{self.n_params / 1e6:.1f}M params, {_human(self.file_bytes)} "
            f"({by}), vocab {self.n_vocab}, {self.seconds:.1f} s"
        )

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        d["tensors"] = [
            {"name": t.name, "shape": list(t.shape), "type": t.qtype.name} for t in self.tensors
        ]
        return d


def _human(n: int) -> str:
    for unit, k in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= k:
            return f"{n / k:.2f} {unit}"
    return f"{n} B"


# ---------------------------------------------------------------------------------------------
# Presets

_SPECIAL_COUNTS = {"qwen2": 22, "llama": 11, "gpt-oss": 15, "gpt2": 1, "phi3": 11}


def _default_normal(arch: str, n_vocab: int) -> int:
    """Normal tokens for a vocabulary of n_vocab: all but the special tokens and ~3 % of
    padding/reserved entries (none for gpt2, whose vocabulary has no padding)."""
    specials = _SPECIAL_COUNTS[arch]
    pad = 0 if arch == "gpt2" else max(0, n_vocab // 32)
    return n_vocab - specials - pad


_FULL: dict[str, dict[str, Any]] = {
    # Qwen2.5-0.5B(-Coder)-Instruct; the real Q4_K_M file has an untied output.weight.
    "qwen2": dict(
        n_layer=24, n_embd=896, n_head=14, n_head_kv=2, head_dim=64, n_ff=4864,
        n_vocab=151936, n_tok_normal=151643, n_ctx=32768, rope_theta=1e6, norm_eps=1e-6,
        name="Qwen2.5 0.5B Instruct (synthetic)", size_label="0.5B",
    ),
    # Phi-3-mini-4k-instruct
    "phi3": dict(
        n_layer=32, n_embd=3072, n_head=32, n_head_kv=32, head_dim=96, n_ff=8192,
        n_vocab=32064, n_tok_normal=32000, n_ctx=4096, rope_theta=10000.0, norm_eps=1e-5,
        sliding_window=2047, rope_orig_ctx=4096, name="Phi 3 Mini 4k Instruct (synthetic)",
        size_label="3.8B",
    ),
    # gpt-oss-20b
    "gpt-oss": dict(
        n_layer=24, n_embd=2880, n_head=64, n_head_kv=8, head_dim=64, n_ff=2880,
        n_vocab=201088, n_tok_normal=199998, n_ctx=131072, rope_theta=150000.0,
        norm_eps=1e-5, n_expert=32, n_expert_used=4, n_ff_exp=2880, sliding_window=128,
        rope_scaling_factor=32.0, rope_orig_ctx=4096, mix="mxfp4",
        name="Gpt Oss 20b (synthetic)", size_label="20B",
    ),
    # Llama-3.2-1B-Instruct: tied embeddings, llama3 rope scaling as rope_freqs.weight
    "llama": dict(
        n_layer=16, n_embd=2048, n_head=32, n_head_kv=8, head_dim=64, n_ff=8192,
        n_vocab=128256, n_tok_normal=128000, n_ctx=131072, rope_theta=500000.0,
        norm_eps=1e-5, rope_scaling_factor=32.0, rope_orig_ctx=8192, tied_output=True,
        name="Llama 3.2 1B Instruct (synthetic)", size_label="1B",
    ),
    # GPT-2 (124M)
    "gpt2": dict(
        n_layer=12, n_embd=768, n_head=12, n_head_kv=12, head_dim=64, n_ff=3072,
        n_vocab=50257, n_tok_normal=50256, n_ctx=1024, norm_eps=1e-5,
        name="GPT-2 124M (synthetic)", size_label="124M",
    ),
}  # fmt: skip

# Tiny: 2 layers, every structural feature kept (GQA ratio, biases, fused tensors, experts,
# sliding window, sinks, tied/untied output, rope factors). Widths are chosen so that each
# layout exercises the same kinds of K-quant fallback as the full model (qwen2 and gpt-oss
# rows are not multiples of 256; phi3, llama and gpt2 rows are).
_TINY: dict[str, dict[str, Any]] = {
    "qwen2": dict(n_layer=2, n_embd=448, n_head=14, n_head_kv=2, head_dim=32, n_ff=512,
                  n_vocab=640, n_tok_normal=600),
    "phi3": dict(n_layer=2, n_embd=256, n_head=8, n_head_kv=8, head_dim=32, n_ff=512,
                 n_vocab=512, n_tok_normal=460),
    "gpt-oss": dict(n_layer=2, n_embd=288, n_head=16, n_head_kv=2, head_dim=32, n_ff=288,
                    n_expert=4, n_expert_used=2, n_ff_exp=288, sliding_window=16,
                    n_vocab=512, n_tok_normal=480),
    "llama": dict(n_layer=2, n_embd=256, n_head=8, n_head_kv=2, head_dim=32, n_ff=512,
                  n_vocab=512, n_tok_normal=480),
    "gpt2": dict(n_layer=2, n_embd=256, n_head=4, n_head_kv=4, head_dim=64, n_ff=1024,
                 n_vocab=512, n_tok_normal=511),
}  # fmt: skip


def preset(arch: str, size: str = "full", *, mix: str | None = None, seed: int = 0) -> SynthSpec:
    """The real model's shape (`full`) or a 2-layer miniature of it (`tiny`)."""
    if arch not in _FULL:
        raise SynthError(f"unknown architecture {arch!r} (supported: {', '.join(ARCHS)})")
    if size not in SIZES:
        raise SynthError(f"unknown size {size!r} (supported: {', '.join(SIZES)})")
    fields: dict[str, Any] = dict(_FULL[arch])
    if size == "tiny":
        fields.update(_TINY[arch])
        fields["name"] = fields["name"].replace("(synthetic)", "tiny (synthetic)")
        fields["size_label"] = ""
    spec = SynthSpec(arch=arch, size=size, seed=seed, **fields)
    if mix is not None:
        spec = replace(spec, mix=mix)
    spec.validate()
    return spec


# ---------------------------------------------------------------------------------------------
# Layout


@dataclass(frozen=True)
class _T:
    hf: str  # sort key: the HF checkpoint name the converter reads it from
    name: str
    shape: tuple[int, ...]
    role: str
    layer: int = -1


def _layout(spec: SynthSpec) -> list[_T]:
    """Every tensor of the architecture (ggml shapes), in the converter's order."""
    a, E, V = spec.arch, spec.n_embd, spec.n_vocab
    out: list[_T] = []

    def add(hf: str, name: str, shape: tuple[int, ...], role: str, layer: int = -1) -> None:
        out.append(_T(hf, name, shape, role, layer))

    if a == "gpt2":
        add("wte.weight", "token_embd.weight", (E, V), "embd")
        add("wte.weight~", "output.weight", (E, V), "output")  # the converter copies wte
        add("wpe.weight", "position_embd.weight", (E, spec.n_ctx), "pos_embd")
        add("ln_f.weight", "output_norm.weight", (E,), "norm")
        add("ln_f.bias", "output_norm.bias", (E,), "bias")
    else:
        add("model.embed_tokens.weight", "token_embd.weight", (E, V), "embd")
        if not spec.tied_output:
            add("lm_head.weight", "output.weight", (E, V), "output")
        add("model.norm.weight", "output_norm.weight", (E,), "norm")
    if a == "llama" and spec.rope_scaling_factor > 0:
        add("", "rope_freqs.weight", (spec.head_dim // 2,), "rope")  # generated first
    if a == "phi3" and spec.rope_factors:
        add("", "rope_factors_long.weight", (spec.head_dim // 2,), "rope")
        add("", "rope_factors_short.weight", (spec.head_dim // 2,), "rope")

    qd, kvd, F = spec.q_dim, spec.kv_dim, spec.n_ff
    for i in range(spec.n_layer):
        b = f"blk.{i}."
        if a == "gpt2":
            h = f"h.{i}."
            add(h + "ln_1.weight", b + "attn_norm.weight", (E,), "norm", i)
            add(h + "ln_1.bias", b + "attn_norm.bias", (E,), "bias", i)
            add(h + "attn.c_attn.weight", b + "attn_qkv.weight", (E, 3 * E), "attn_qkv", i)
            add(h + "attn.c_attn.bias", b + "attn_qkv.bias", (3 * E,), "bias", i)
            add(h + "attn.c_proj.weight", b + "attn_output.weight", (E, E), "matrix", i)
            add(h + "attn.c_proj.bias", b + "attn_output.bias", (E,), "bias", i)
            add(h + "ln_2.weight", b + "ffn_norm.weight", (E,), "norm", i)
            add(h + "ln_2.bias", b + "ffn_norm.bias", (E,), "bias", i)
            add(h + "mlp.c_fc.weight", b + "ffn_up.weight", (E, F), "matrix", i)
            add(h + "mlp.c_fc.bias", b + "ffn_up.bias", (F,), "bias", i)
            add(h + "mlp.c_proj.weight", b + "ffn_down.weight", (F, E), "ffn_down", i)
            add(h + "mlp.c_proj.bias", b + "ffn_down.bias", (E,), "bias", i)
            continue
        h = f"model.layers.{i}."
        add(h + "input_layernorm.weight", b + "attn_norm.weight", (E,), "norm", i)
        if a == "phi3":
            qkv = qd + 2 * kvd
            add(h + "self_attn.qkv_proj.weight", b + "attn_qkv.weight", (E, qkv), "attn_qkv", i)
            add(h + "self_attn.o_proj.weight", b + "attn_output.weight", (qd, E), "matrix", i)
            add(h + "post_attention_layernorm.weight", b + "ffn_norm.weight", (E,), "norm", i)
            add(h + "mlp.gate_up_proj.weight", b + "ffn_up.weight", (E, 2 * F), "matrix", i)
            add(h + "mlp.down_proj.weight", b + "ffn_down.weight", (F, E), "ffn_down", i)
            continue
        bias = a in ("qwen2", "gpt-oss")
        for p, dim, role in (("q", qd, "matrix"), ("k", kvd, "matrix"), ("v", kvd, "attn_v")):
            add(h + f"self_attn.{p}_proj.weight", b + f"attn_{p}.weight", (E, dim), role, i)
            if bias:
                add(h + f"self_attn.{p}_proj.bias", b + f"attn_{p}.bias", (dim,), "bias", i)
        add(h + "self_attn.o_proj.weight", b + "attn_output.weight", (qd, E), "matrix", i)
        if a == "gpt-oss":
            X, Fe = spec.n_expert, spec.n_ff_exp
            add(h + "self_attn.o_proj.bias", b + "attn_output.bias", (E,), "bias", i)
            add(h + "self_attn.sinks", b + "attn_sinks.weight", (spec.n_head,), "sinks", i)
            add(h + "post_attention_layernorm.weight", b + "post_attention_norm.weight",
                (E,), "norm", i)  # fmt: skip
            add(h + "mlp.router.weight", b + "ffn_gate_inp.weight", (E, X), "router", i)
            add(h + "mlp.router.bias", b + "ffn_gate_inp.bias", (X,), "bias", i)
            for hf, nm, shape, bshape in (
                ("gate_up_proj.0", "ffn_gate_exps", (E, Fe, X), (Fe, X)),
                ("gate_up_proj.1", "ffn_up_exps", (E, Fe, X), (Fe, X)),
                ("down_proj", "ffn_down_exps", (Fe, E, X), (E, X)),
            ):
                add(h + f"mlp.experts.{hf}", b + f"{nm}.weight", shape, "experts", i)
                add(h + f"mlp.experts.{hf}_bias", b + f"{nm}.bias", bshape, "bias", i)
        else:
            add(h + "post_attention_layernorm.weight", b + "ffn_norm.weight", (E,), "norm", i)
            add(h + "mlp.gate_proj.weight", b + "ffn_gate.weight", (E, F), "matrix", i)
            add(h + "mlp.up_proj.weight", b + "ffn_up.weight", (E, F), "matrix", i)
            add(h + "mlp.down_proj.weight", b + "ffn_down.weight", (F, E), "ffn_down", i)
    # generated tensors (hf "") first, then the checkpoint's sorted names
    return sorted(out, key=lambda t: (t.hf != "", t.hf))


def _use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's Q4_K_M/Q5_K_M rule for which attn_v / ffn_down get Q6_K."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _row_fallback(qtype: GGMLQuantizationType, row: int) -> GGMLQuantizationType:
    """llama.cpp's type fallback for rows that are not a whole number of blocks."""
    if row % GGML_QUANT_SIZES[qtype][0] == 0:
        return qtype
    qtype = _K_FALLBACK.get(qtype, qtype)
    if row % GGML_QUANT_SIZES[qtype][0] == 0:
        return qtype
    return T.F16


def _matrix_type(
    spec: SynthSpec, role: str, counter: int, n_counted: int, has_output: bool
) -> GGMLQuantizationType:
    mix = spec.mix
    if mix in SINGLE_TYPE_MIXES:
        return SINGLE_TYPE_MIXES[mix]
    if role == "experts":
        return T.MXFP4
    if mix == "mxfp4":
        return T.Q8_0
    assert mix == "q4_k_m"
    if role == "output" or (role == "embd" and not has_output):
        return T.Q6_K
    if role in ("attn_v", "ffn_down"):
        return T.Q6_K if _use_more_bits(counter, n_counted) else T.Q4_K
    if role == "attn_qkv":
        return T.Q5_K
    return T.Q4_K


# Always F32: vectors (incl. gpt-oss's 2-D expert biases), the MoE router, gpt2 positions.
_F32_ROLES = ("norm", "bias", "sinks", "rope", "router", "pos_embd")
_STD = {"norm": 0.02, "bias": 0.01, "sinks": 0.5, "router": 0.02, "pos_embd": 0.02}


def plan(spec: SynthSpec) -> list[PlannedTensor]:
    """The tensor table `write_synthetic(path, spec)` produces: names, ggml shapes, types."""
    spec.validate()
    layout = _layout(spec)
    has_output = any(t.name == "output.weight" for t in layout)
    n_counted = {r: sum(t.role == r for t in layout) for r in ("attn_v", "ffn_down")}
    seen = {"attn_v": 0, "ffn_down": 0}
    result: list[PlannedTensor] = []
    for t in layout:
        mean, std = 0.0, spec.std
        if len(t.shape) == 1 or t.role in _F32_ROLES:
            qtype = T.F32
            mean = 1.0 if t.role == "norm" else 0.0
            std = _STD.get(t.role, spec.std)
        else:
            counter = seen.get(t.role, 0)
            qtype = _matrix_type(spec, t.role, counter, n_counted.get(t.role, 0), has_output)
            qtype = _row_fallback(qtype, t.shape[0])
        if t.role in seen:
            seen[t.role] += 1
        result.append(PlannedTensor(t.name, t.shape, qtype, t.role, t.layer, mean, std))
    return result


# ---------------------------------------------------------------------------------------------
# Metadata


def _llama3_rope_freqs(spec: SynthSpec) -> npt.NDArray[np.float32]:
    """Llama-3 rope scaling as llama.cpp's per-dimension frequency divisors."""
    factor, low, high, orig = spec.rope_scaling_factor, 1.0, 4.0, float(spec.rope_orig_ctx)
    dims = np.arange(0, spec.head_dim, 2, dtype=np.float64) / spec.head_dim
    wavelen = 2 * math.pi * spec.rope_theta**dims
    smooth = np.clip((orig / wavelen - low) / (high - low), 0.0, 1.0)
    div = np.where(
        wavelen < orig / high,
        1.0,
        np.where(wavelen > orig / low, factor, 1.0 / ((1 - smooth) / factor + smooth)),
    )
    return div.astype(np.float32)


def _phi3_rope_factors(spec: SynthSpec, long: bool) -> npt.NDArray[np.float32]:
    x = np.linspace(0.0, 1.0, spec.head_dim // 2)
    top = 40.0 if long else 2.0
    return (1.0 + (top - 1.0) * x**3).astype(np.float32)


def _add_metadata(w: GGUFWriter, spec: SynthSpec, vocab: Vocab) -> None:
    a = spec.arch
    w.add_type("model")
    w.add_name(spec.name or f"{a} (synthetic)")
    if spec.size_label:
        w.add_size_label(spec.size_label)
    w.add_description(
        f"worker-orcd synthetic model: random weights, seed {spec.seed}, size {spec.size}, "
        f"mix {spec.mix}"
    )
    w.add_block_count(spec.n_layer)
    w.add_context_length(spec.n_ctx)
    w.add_embedding_length(spec.n_embd)
    w.add_feed_forward_length(spec.n_ff)
    w.add_head_count(spec.n_head)
    if a != "gpt2":
        w.add_head_count_kv(spec.n_head_kv)
    if a == "gpt2":
        w.add_layer_norm_eps(spec.norm_eps)
    else:
        w.add_rope_freq_base(spec.rope_theta)
        w.add_layer_norm_rms_eps(spec.norm_eps)
    if a in ("gpt-oss", "llama") or spec.head_dim * spec.n_head != spec.n_embd:
        w.add_key_length(spec.head_dim)
        w.add_value_length(spec.head_dim)
    if a == "llama":
        w.add_vocab_size(spec.n_vocab)
        w.add_rope_dimension_count(spec.head_dim)
    if a == "phi3":
        w.add_rope_dimension_count(spec.head_dim)
        w.add_rope_scaling_orig_ctx_len(spec.rope_orig_ctx)
        w.add_sliding_window(spec.sliding_window)
    if a == "gpt-oss":
        w.add_expert_count(spec.n_expert)
        w.add_expert_used_count(spec.n_expert_used)
        w.add_sliding_window(spec.sliding_window)
        w.add_expert_feed_forward_length(spec.n_ff_exp)
        w.add_rope_scaling_type(RopeScalingType.YARN)
        w.add_rope_scaling_factor(spec.rope_scaling_factor)
        w.add_rope_scaling_orig_ctx_len(spec.rope_orig_ctx)
    w.add_file_type(int(FILE_TYPES[spec.mix]))
    # tokenizer
    w.add_tokenizer_model(vocab.model)
    if vocab.pre is not None:
        w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    if vocab.scores is not None:
        w.add_token_scores(vocab.scores)
    w.add_token_types(vocab.token_types)
    if vocab.merges:
        w.add_token_merges(vocab.merges)
    if vocab.bos_id is not None:
        w.add_bos_token_id(vocab.bos_id)
    if vocab.eos_id is not None:
        w.add_eos_token_id(vocab.eos_id)
    if vocab.unk_id is not None:
        w.add_unk_token_id(vocab.unk_id)
    if vocab.pad_id is not None:
        w.add_pad_token_id(vocab.pad_id)
    if vocab.add_bos is not None:
        w.add_add_bos_token(vocab.add_bos)
    if vocab.add_eos is not None:
        w.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template is not None:
        w.add_chat_template(vocab.chat_template)
    w.add_quantization_version(2)


def make_vocab(spec: SynthSpec) -> Vocab:
    """The tokenizer metadata `write_synthetic` stores for `spec`."""
    return vocab_for(spec.arch, spec.n_vocab, spec.n_tok_normal)


# ---------------------------------------------------------------------------------------------
# Writing


def _rng(seed: int, name: str) -> np.random.Generator:
    ss = np.random.SeedSequence([seed & 0xFFFFFFFF, seed >> 32, zlib.crc32(name.encode())])
    return np.random.Generator(np.random.SFC64(ss))


def write_synthetic(
    path: str | Path,
    spec: SynthSpec,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> SynthReport:
    """Write the synthetic model to `path` (streamed tensor by tensor, never held in RAM).
    `progress(done_bytes, total_bytes)` is called after each tensor. Same spec and seed give
    a byte-identical file."""
    t0 = time.perf_counter()
    path = Path(path)
    tensors = plan(spec)
    vocab = make_vocab(spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    w = GGUFWriter(tmp, spec.arch, use_temp_file=False)
    try:
        _add_metadata(w, spec, vocab)
        for t in tensors:
            w.add_tensor_info(
                t.name, tuple(reversed(t.shape)), np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype
            )
        w.write_header_to_file(tmp)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        assert w.fout is not None
        fout = w.fout[0]
        align = w.data_alignment
        total = sum(t.nbytes for t in tensors)
        done = 0
        for t in tensors:
            pad = -fout.tell() % align
            if pad:
                fout.write(b"\0" * pad)
            values = None
            if t.name == "rope_freqs.weight":
                values = _llama3_rope_freqs(spec)
            elif t.name.startswith("rope_factors_"):
                values = _phi3_rope_factors(spec, long="long" in t.name)
            n = write_random_tensor(
                fout, t.qtype, t.n_elements, _rng(spec.seed, t.name), t.std, t.mean, values
            )
            if n != t.nbytes:
                raise AssertionError(f"{t.name}: wrote {n} bytes, planned {t.nbytes}")
            done += n
            if progress is not None:
                progress(done, total)
        pad = -fout.tell() % align
        if pad:
            fout.write(b"\0" * pad)
        w.close()
        tmp.replace(path)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    bytes_by_type: dict[str, int] = {}
    count_by_type: dict[str, int] = {}
    for t in tensors:
        bytes_by_type[t.qtype.name] = bytes_by_type.get(t.qtype.name, 0) + t.nbytes
        count_by_type[t.qtype.name] = count_by_type.get(t.qtype.name, 0) + 1
    return SynthReport(
        path=path,
        arch=spec.arch,
        mix=spec.mix,
        size=spec.size,
        n_tensors=len(tensors),
        n_params=sum(t.n_elements for t in tensors),
        tensor_bytes=sum(t.nbytes for t in tensors),
        file_bytes=path.stat().st_size,
        bytes_by_type=bytes_by_type,
        count_by_type=count_by_type,
        n_vocab=len(vocab),
        seconds=time.perf_counter() - t0,
        tensors=tensors,
    )
