"""gpt2: learned absolute positions, LayerNorm (with bias), fused qkv with bias, MHA,
GELU (tanh approximation) MLP with biases, no RoPE."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from worker.errors import ModelLoadError
from worker.models.base import DecoderModel, register
from worker.models.common import F32, gelu_tanh


@register
class Gpt2Model(DecoderModel):
    arch = "gpt2"

    def block_tensors(self, il: int) -> list[str]:
        p = f"blk.{il}"
        return [
            f"{p}.attn_norm.weight",
            f"{p}.attn_qkv.weight",
            f"{p}.attn_output.weight",
            f"{p}.ffn_norm.weight",
            f"{p}.ffn_up.weight",
            f"{p}.ffn_down.weight",
        ]

    def check_tensors(self) -> None:
        super().check_tensors()
        if not self.w.has("position_embd.weight"):
            raise ModelLoadError(self.path, "missing tensor 'position_embd.weight' for gpt2")

    def embed(self, ids: npt.NDArray[np.int64], positions: npt.NDArray[np.int64]) -> F32:
        return self.w.rows("token_embd.weight", ids) + self.w.rows(
            "position_embd.weight", positions
        )

    def qkv(self, il: int, h: F32) -> tuple[F32, F32, F32]:
        qkv = self.proj(h, f"blk.{il}.attn_qkv")
        n = self.hp.q_dim
        return qkv[:, :n], qkv[:, n : 2 * n], qkv[:, 2 * n :]

    def ffn(self, il: int, h: F32) -> F32:
        p = f"blk.{il}"
        return self.proj(gelu_tanh(self.proj(h, f"{p}.ffn_up")), f"{p}.ffn_down")
