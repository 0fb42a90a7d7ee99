"""Sampling parameters shared by every backend (the job fields of docs/protocol.md)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Validated sampling settings for one job.

    Pipeline order (identical on every backend, see worker/engine/sampling.py):
    repetition penalty over the generated ids -> temperature (0 = greedy argmax) ->
    top-k -> softmax -> top-p -> min-p -> seeded draw.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    @property
    def greedy(self) -> bool:
        # the samplers divide by the float32 temperature: one that rounds to 0 there (below
        # ~7e-46) is greedy too, not a division by zero
        return float(np.float32(self.temperature)) == 0.0
