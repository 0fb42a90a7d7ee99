"""gpt-oss: MoE (top-k router, softmax over the chosen k), clamped SwiGLU (α=1.702,
limit 7, +1 on up), attention sinks, sliding window on even layers, YaRN NeoX RoPE,
biases on q/k/v/o, router and experts.

Expert e of a token: down_e(swiglu_oai(gate_e·h + bg_e, up_e·h + bu_e)) + bd_e, weighted by
the router softmax and summed over the token's k experts.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from worker.models.base import DecoderModel, register
from worker.models.common import F32, AttnOptions, linear, moe_route, swiglu_oai

# route_hook(layer, router logits [n, n_expert]) -> (expert ids [n, k], weights [n, k]):
# replaces moe_route when set (a test feeds another backend's routing through it).
RouteHook = Callable[[int, F32], tuple[npt.NDArray[np.int64], F32]]


@register
class GptOssModel(DecoderModel):
    arch = "gpt-oss"
    route_hook: RouteHook | None = None

    def block_tensors(self, il: int) -> list[str]:
        p = f"blk.{il}"
        return [
            f"{p}.attn_norm.weight",
            f"{p}.attn_q.weight",
            f"{p}.attn_k.weight",
            f"{p}.attn_v.weight",
            f"{p}.attn_output.weight",
            f"{p}.attn_sinks.weight",
            f"{p}.post_attention_norm.weight",
            f"{p}.ffn_gate_inp.weight",
            f"{p}.ffn_gate_exps.weight",
            f"{p}.ffn_up_exps.weight",
            f"{p}.ffn_down_exps.weight",
        ]

    def ffn_norm_name(self, il: int) -> str:
        return f"blk.{il}.post_attention_norm"

    def attn_options(self, il: int) -> AttnOptions:
        window = self.hp.sliding_window if self.hp.is_swa(il) else 0
        return AttnOptions(
            scale=self.attn_scale, window=window, sinks=self.w.get(f"blk.{il}.attn_sinks.weight")
        )

    def ffn(self, il: int, h: F32) -> F32:
        p = f"blk.{il}"
        router = self.proj(h, f"{p}.ffn_gate_inp")
        if self.route_hook is not None:
            idx, weight = self.route_hook(il, router)
        else:
            idx, weight = moe_route(router, self.hp.n_expert_used)
        out = np.zeros_like(h)
        for e in np.unique(idx):
            tok, slot = np.nonzero(idx == e)
            x = h[tok]
            e_i = int(e)
            g = linear(
                x, self.w.expert(f"{p}.ffn_gate_exps.weight", e_i), self._bias(p, "gate", e_i)
            )
            u = linear(x, self.w.expert(f"{p}.ffn_up_exps.weight", e_i), self._bias(p, "up", e_i))
            y = linear(
                swiglu_oai(g, u),
                self.w.expert(f"{p}.ffn_down_exps.weight", e_i),
                self._bias(p, "down", e_i),
            )
            out[tok] += y * weight[tok, slot][:, None]
        return out

    def _bias(self, p: str, which: str, e: int) -> F32 | None:
        name = f"{p}.ffn_{which}_exps.bias"
        return self.w.get(name)[e] if self.w.has(name) else None
