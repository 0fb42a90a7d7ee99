"""One sequence driven by hand over a batched backend: teacher-forced logits for tests and
tools, step by step (`forward`, `forward_sample`), without a scheduler.

It takes its own blocks from the backend's pool (a private BlockManager over all of it), so
use it on a backend that nothing else is running on.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from worker.engine.batch import BatchBackend, Chunk, SampleSpec
from worker.engine.block_manager import BlockManager
from worker.engine.params import SamplingParams
from worker.errors import ContextLengthExceeded

__all__ = ["SingleSequence"]


class SingleSequence:
    def __init__(self, backend: BatchBackend, *, slot: int = 0) -> None:
        self.backend = backend
        self.slot = slot
        self.context_length = backend.context_length
        self.blocks = BlockManager(backend.n_blocks, backend.block_size, prefix_cache=False)
        alloc = self.blocks.admit([0], self.context_length)
        assert alloc is not None, "the pool holds fewer positions than the context"
        self.alloc = alloc
        self.n_past = 0

    def reset(self) -> None:
        """Start again from position 0 (the blocks are reused)."""
        self.n_past = 0
        self.backend.release_slot(self.slot)

    def _chunk(
        self, ids: Sequence[int], prefill: bool | None, sample: SampleSpec | None, logits: bool
    ) -> Chunk:
        n = len(ids)
        if n == 0:
            raise ValueError("forward needs at least one token")
        if self.n_past + n > self.context_length:
            raise ContextLengthExceeded(
                f"{self.n_past} tokens in context + {n} new > context length {self.context_length}"
            )
        self.blocks.grow(self.alloc, self.n_past + n)
        return Chunk(
            slot=self.slot,
            tokens=list(ids),
            start=self.n_past,
            blocks=self.alloc.table,
            prefill=n > 1 if prefill is None else prefill,
            sample=sample,
            logits=logits,
        )

    def forward(
        self, ids: Sequence[int], *, all_logits: bool = False, prefill: bool | None = None
    ) -> np.ndarray:
        """Append `ids` and return float32 logits: [len(ids), vocab] if all_logits, else
        [vocab] of the last position. `prefill` (default: more than one token) says which
        path the backend takes: prompt tokens or a generated token fed back."""
        out = self.backend.step([self._chunk(ids, prefill, None, True)])
        self.n_past += len(ids)
        logits = out.logits[0]
        assert logits is not None
        return logits if all_logits else logits[-1]

    def forward_sample(
        self,
        ids: Sequence[int],
        params: SamplingParams,
        draw: float,
        generated: Sequence[int],
        next_draw: float | None = None,
        *,
        prefill: bool | None = None,
    ) -> int:
        """Append `ids` and return the token drawn from the last position's logits."""
        spec = SampleSpec(params=params, draw=draw, history=list(generated), next_draw=next_draw)
        out = self.backend.step([self._chunk(ids, prefill, spec, False)])
        self.n_past += len(ids)
        return out.ids[0]
