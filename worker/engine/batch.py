"""What the scheduler hands a backend for one step, and what comes back.

A step is a list of `Chunk`s, one per sequence that runs in it: either one decode token (the
token the sequence sampled last step) or a run of prompt tokens (a prefill chunk). A decode
chunk may be `pending`: its token is the one its sequence draws in the step launched just
before this one, not yet back on the host (the scheduler launches a step before it collects
the one before it, so the device never waits for the host); the backend takes that id from
the previous step's sampler output on its own side. Every chunk carries the sequence's whole
block table, so the backend needs no state of its own about sequences beyond what a `slot`
lets it cache (e.g. a device copy of the repetition-penalty history). A chunk with `sample`
set asks for one token drawn from the logits of its last position.

Batch invariance: a backend must compute every chunk's rows exactly as it would if that
chunk ran alone, whatever else is in the step and in whichever order (no reduction order may
depend on the batch). Backends whose results depend on how a prompt is cut into chunks say
so with `chunk_align` (the scheduler then cuts prompts only at multiples of it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from worker.backends.base import BackendInfo, ResidencyReport
from worker.engine.params import SamplingParams

__all__ = ["BatchBackend", "Chunk", "SampleSpec", "StepOutput"]


@dataclass(slots=True)
class SampleSpec:
    """Draw one token from the chunk's last logits (worker.engine.sampling's pipeline)."""

    params: SamplingParams
    draw: float  # uniform(seed, i) for generated token i
    history: Sequence[int]  # ids generated so far (repetition-penalty set)
    next_draw: float | None = None  # the draw of the sequence's next step, when it has one


@dataclass(slots=True)
class Chunk:
    slot: int  # the sequence's slot, 0 <= slot < max_batch (stable while it runs)
    tokens: Sequence[int]
    start: int  # position of tokens[0]
    blocks: Sequence[int]  # block table: position p lives in blocks[p // block_size]
    prefill: bool  # prompt tokens (True) or one generated token fed back (False)
    sample: SampleSpec | None = None
    logits: bool = False  # return the logits of every position of this chunk (tests, tools)
    # a decode chunk whose token is the one its sequence draws in the step launched just
    # before this one (tokens holds a placeholder; sample.history lacks that id)
    pending: bool = False


@dataclass(slots=True)
class StepOutput:
    ids: list[int]  # per chunk: the sampled id, or -1 where the chunk did not sample
    logits: list[np.ndarray | None] = field(default_factory=list)  # per chunk, [len, vocab]


class BatchBackend(Protocol):
    """A compute backend that runs steps of several sequences over a paged KV cache.

    Every method is called from the one thread that owns the backend (for CUDA, the thread
    of the context)."""

    info: BackendInfo
    vocab_size: int
    context_length: int  # most positions one sequence may hold
    block_size: int  # positions per KV block
    n_blocks: int  # KV blocks in the pool
    max_batch: int  # most chunks in one step
    max_step_tokens: int  # most tokens (all chunks together) in one step
    chunk_align: int  # 1, or the prompt-chunk size results depend on

    def launch(self, chunks: Sequence[Chunk]) -> Any:
        """Start one step (see the module docstring); the handle goes to `collect`. At most
        two steps are launched and not yet collected, and they are collected in order; a
        `pending` chunk's sequence has a sampled chunk in the step launched just before."""
        ...

    def collect(self, handle: Any) -> StepOutput:
        """Wait for a launched step and return what it produced."""
        ...

    def step(self, chunks: Sequence[Chunk]) -> StepOutput:
        """launch + collect."""
        ...

    def copy_blocks(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Copy every layer's K and V of block src into block dst, for each (src, dst)."""
        ...

    def release_slot(self, slot: int) -> None:
        """The sequence in `slot` is gone: drop whatever the backend cached for it."""
        ...

    def check_residency(self) -> ResidencyReport: ...

    def close(self) -> None: ...
