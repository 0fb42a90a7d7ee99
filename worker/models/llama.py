"""llama: the plain Llama block (RMSNorm, GQA, NORMAL RoPE, SwiGLU, no biases).

RoPE rotates adjacent pairs (2i, 2i+1): llama.cpp's converter permutes HF's q/k rows so
that this equals HF's rotate_half on the original weights. Optional rope_freqs tensor
(Llama 3.1 frequency factors) divides the angles; optional biases are honoured.
"""

from __future__ import annotations

from worker.models.base import register
from worker.models.qwen2 import Qwen2Model


@register
class LlamaModel(Qwen2Model):
    arch = "llama"
