"""phi3: fused attn_qkv, fused gate+up in ffn_up, MHA, NeoX RoPE, RMSNorm.

attn_qkv rows are [q (n_head*d); k (n_kv*d); v (n_kv*d)]; ffn_up rows are [gate; up], so
the FFN is down(silu(first half) * second half). With rope_factors_long/short tensors the
RoPE angles are divided by the factors (long when the context size exceeds the original
context length, as llama.cpp chooses: worker.models.recipe.rope_factor_tensor). Sliding
window: disabled, as in llama.cpp.
"""

from __future__ import annotations

from worker.models.base import DecoderModel, register
from worker.models.common import F32, linear, swiglu


@register
class Phi3Model(DecoderModel):
    arch = "phi3"

    def block_tensors(self, il: int) -> list[str]:
        p = f"blk.{il}"
        attn = [f"{p}.attn_qkv.weight"]
        if not self.w.has(f"{p}.attn_qkv.weight"):
            attn = [f"{p}.attn_q.weight", f"{p}.attn_k.weight", f"{p}.attn_v.weight"]
        return [
            f"{p}.attn_norm.weight",
            *attn,
            f"{p}.attn_output.weight",
            f"{p}.ffn_norm.weight",
            f"{p}.ffn_up.weight",
            f"{p}.ffn_down.weight",
        ]

    def qkv(self, il: int, h: F32) -> tuple[F32, F32, F32]:
        p = f"blk.{il}"
        if not self.w.has(f"{p}.attn_qkv.weight"):
            return super().qkv(il, h)
        qkv = self.proj(h, f"{p}.attn_qkv")
        nq, nk = self.hp.q_dim, self.hp.kv_dim
        return qkv[:, :nq], qkv[:, nq : nq + nk], qkv[:, nq + nk :]

    def ffn(self, il: int, h: F32) -> F32:
        p = f"blk.{il}"
        gu = linear(h, self.w.get(f"{p}.ffn_up.weight"))
        n = gu.shape[-1] // 2
        return linear(swiglu(gu[:, :n], gu[:, n:]), self.w.get(f"{p}.ffn_down.weight"))
