"""The model interface: a weights mapping plus `forward(ids, kv_cache, start_pos)`.

One recipe per architecture (qwen2.py, phi3.py, gpt_oss.py, llama.py, gpt2.py) as a
subclass of `DecoderModel`, which owns the parts they share: embedding, the residual
stream, RoPE, attention over the KV cache, final norm and LM head. Prefill and decode are
the same code: a chunk of T tokens at positions start_pos..start_pos+T-1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import numpy.typing as npt

from worker.errors import ModelLoadError
from worker.gguf.hparams import HParams
from worker.models.common import (
    F32,
    AttnOptions,
    KVStore,
    Weights,
    apply_rope,
    as_ids,
    attention,
    layernorm,
    linear,
    rmsnorm,
    rope_angles,
)


class DecoderModel:
    """A decoder-only transformer over `Weights`; subclasses give the block recipe."""

    arch: ClassVar[str] = ""

    def __init__(
        self,
        hp: HParams,
        weights: Weights,
        *,
        n_ctx: int | None = None,
        path: object = "<model>",
    ) -> None:
        self.path = path
        if hp.arch != self.arch:
            raise ModelLoadError(path, f"{type(self).__name__} cannot run {hp.arch!r}")
        self.hp = hp
        self.w = weights
        self.n_ctx = n_ctx if n_ctx is not None else min(hp.n_ctx_train, 4096)
        self.lm_head = "output.weight" if weights.has("output.weight") else "token_embd.weight"
        self.freq_factors = self._freq_factors()
        self.attn_scale = 1.0 / float(np.sqrt(hp.head_dim))
        self.check_tensors()

    # -------------------------------------------------------------- hooks

    def block_tensors(self, il: int) -> list[str]:
        """Tensors block `il` must have (validated at construction)."""
        return []

    def check_tensors(self) -> None:
        need = ["token_embd.weight", "output_norm.weight"]
        for il in range(self.hp.n_layer):
            need += self.block_tensors(il)
        for name in need:
            if not self.w.has(name):
                raise ModelLoadError(self.path, f"missing tensor {name!r} for {self.hp.arch}")

    def _freq_factors(self) -> F32 | None:
        """The RoPE frequency factors at this context (the choice lives in the recipe)."""
        from worker.models.recipe import rope_factor_tensor

        name = rope_factor_tensor(self.hp, _Names(self.w), self.n_ctx)
        return self.w.get(name) if name is not None else None

    def opt(self, name: str) -> F32 | None:
        return self.w.get(name) if self.w.has(name) else None

    def norm(self, x: F32, prefix: str) -> F32:
        if self.hp.norm == "rms":
            return rmsnorm(x, self.w.get(f"{prefix}.weight"), self.hp.norm_eps)
        return layernorm(
            x, self.w.get(f"{prefix}.weight"), self.opt(f"{prefix}.bias"), self.hp.norm_eps
        )

    def proj(self, x: F32, prefix: str) -> F32:
        return linear(x, self.w.get(f"{prefix}.weight"), self.opt(f"{prefix}.bias"))

    def embed(self, ids: npt.NDArray[np.int64], positions: npt.NDArray[np.int64]) -> F32:
        return self.w.rows("token_embd.weight", ids)

    def qkv(self, il: int, h: F32) -> tuple[F32, F32, F32]:
        p = f"blk.{il}"
        return self.proj(h, f"{p}.attn_q"), self.proj(h, f"{p}.attn_k"), self.proj(h, f"{p}.attn_v")

    def attn_options(self, il: int) -> AttnOptions:
        return AttnOptions(scale=self.attn_scale)

    def ffn(self, il: int, h: F32) -> F32:
        raise NotImplementedError

    def ffn_norm_name(self, il: int) -> str:
        return f"blk.{il}.ffn_norm"

    # -------------------------------------------------------------- forward

    def attn_block(
        self, il: int, x: F32, kv: KVStore, start_pos: int, rope: tuple[F32, F32] | None
    ) -> F32:
        hp = self.hp
        t = x.shape[0]
        h = self.norm(x, f"blk.{il}.attn_norm")
        q, k, v = self.qkv(il, h)
        q3 = q.reshape(t, hp.n_head, hp.head_dim)
        k3 = k.reshape(t, hp.n_head_kv, hp.head_dim)
        v3 = v.reshape(t, hp.n_head_kv, hp.head_dim_v)
        if rope is not None:
            q3 = apply_rope(q3, rope[0], rope[1], hp.rope)
            k3 = apply_rope(k3, rope[0], rope[1], hp.rope)
        o = attention(q3, kv, il, k3, v3, start_pos, self.attn_options(il))
        return self.proj(o, f"blk.{il}.attn_output")

    def forward(
        self,
        ids: Sequence[int] | npt.NDArray[np.integer],
        kv: KVStore,
        start_pos: int,
        *,
        all_logits: bool = False,
    ) -> F32:
        """Run tokens `ids` at positions start_pos.. and return logits.

        [len(ids), n_vocab] if all_logits else [n_vocab] (last position only).
        """
        tok = as_ids(ids)
        t = len(tok)
        if t == 0:
            raise ValueError("forward needs at least one token")
        if start_pos + t > kv.n_ctx:
            raise ValueError(f"positions up to {start_pos + t} exceed the KV cache ({kv.n_ctx})")
        if tok.min() < 0 or tok.max() >= self.hp.n_vocab:
            raise ValueError(f"token id out of range 0..{self.hp.n_vocab - 1}")
        positions = np.arange(start_pos, start_pos + t, dtype=np.int64)
        x: F32 = self.embed(tok, positions).astype(np.float32, copy=False)
        rope = None
        if self.hp.rope.type != "none":
            rope = rope_angles(self.hp.rope, positions, self.freq_factors)
        for il in range(self.hp.n_layer):
            x = x + self.attn_block(il, x, kv, start_pos, rope)
            x = x + self.ffn(il, self.norm(x, self.ffn_norm_name(il)))
        if not all_logits:
            x = x[-1:]
        x = self.norm(x, "output_norm")
        logits = linear(x, self.w.get(self.lm_head))
        return logits if all_logits else logits[0]


class _Names:
    """Tensor-name membership of a Weights (what the recipe asks)."""

    def __init__(self, w: Weights) -> None:
        self.w = w

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.w.has(name)


_REGISTRY: dict[str, type[DecoderModel]] = {}


def register(cls: type[DecoderModel]) -> type[DecoderModel]:
    _REGISTRY[cls.arch] = cls
    return cls


def model_class(arch: str, path: object = "<model>") -> type[DecoderModel]:
    """The adapter for `general.architecture` = arch; an unknown one is a load error."""
    import worker.models.gpt2
    import worker.models.gpt_oss
    import worker.models.llama
    import worker.models.phi3
    import worker.models.qwen2  # noqa: F401  (each registers itself)

    try:
        return _REGISTRY[arch]
    except KeyError:
        raise ModelLoadError(
            path, f"unsupported architecture {arch!r} (supported: {', '.join(sorted(_REGISTRY))})"
        ) from None


def build_model(
    hp: HParams, weights: Weights, *, n_ctx: int | None = None, path: object = "<model>"
) -> DecoderModel:
    """The architecture's adapter over `weights`; ModelLoadError (naming `path`) for an
    unknown architecture or a missing tensor."""
    return model_class(hp.arch, path)(hp, weights, n_ctx=n_ctx, path=path)
