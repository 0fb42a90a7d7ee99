"""qwen2: GQA with q/k/v biases, NeoX RoPE, RMSNorm, SwiGLU (docs/design.md).

Block: x += Wo·attn(rope(Wq·n(x)+bq), rope(Wk·n(x)+bk), Wv·n(x)+bv);
x += Wdown·(silu(Wgate·n'(x)) * Wup·n'(x)). Tied LM head when output.weight is absent.
"""

from __future__ import annotations

from worker.models.base import DecoderModel, register
from worker.models.common import F32, linear, swiglu


@register
class Qwen2Model(DecoderModel):
    arch = "qwen2"

    def block_tensors(self, il: int) -> list[str]:
        p = f"blk.{il}"
        return [
            f"{p}.attn_norm.weight",
            f"{p}.attn_q.weight",
            f"{p}.attn_k.weight",
            f"{p}.attn_v.weight",
            f"{p}.attn_output.weight",
            f"{p}.ffn_norm.weight",
            f"{p}.ffn_gate.weight",
            f"{p}.ffn_up.weight",
            f"{p}.ffn_down.weight",
        ]

    def ffn(self, il: int, h: F32) -> F32:
        p = f"blk.{il}"
        g = linear(h, self.w.get(f"{p}.ffn_gate.weight"))
        u = linear(h, self.w.get(f"{p}.ffn_up.weight"))
        return linear(swiglu(g, u), self.w.get(f"{p}.ffn_down.weight"))
