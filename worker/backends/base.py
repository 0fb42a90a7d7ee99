"""The contract between the engine and a compute backend.

A backend owns one model's weights and one sequence's KV cache (the worker runs one job at a
time). Every method is called from the single backend thread (for CUDA: the thread that owns
the context); nothing here is thread-safe.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from worker.engine.params import SamplingParams


@dataclass(frozen=True, slots=True)
class BackendInfo:
    """What health reports about the device (cached; no device call on the reply path)."""

    device: str  # "cpu" | "cuda"
    resident: bool  # weights and KV verified in device memory
    gpu_device: int | None = None
    gpu_name: str | None = None
    sm: str | None = None  # e.g. "9.0"
    cuda_runtime_version: str | None = None
    vram_total_bytes: int = 0
    vram_bytes_used: int = 0  # by this process: weights arena + KV + scratch


@dataclass(frozen=True, slots=True)
class ResidencyReport:
    ok: bool
    checked: int
    failures: list[str] = field(default_factory=list)


class Backend(Protocol):
    info: BackendInfo
    vocab_size: int
    context_length: int  # KV capacity in tokens (after --ctx-size / VRAM capping)

    @property
    def n_past(self) -> int:
        """Tokens already in the current sequence's KV cache."""
        ...

    def reset(self) -> None:
        """Start a new, empty sequence (KV cache cleared logically; nothing reallocated)."""
        ...

    def forward(self, ids: Sequence[int], *, all_logits: bool = False) -> np.ndarray:
        """Append `ids` to the sequence and run the model over them.

        Returns float32 logits: shape [len(ids), vocab] if all_logits else [vocab] for the
        last position. Raises ContextLengthExceeded when n_past + len(ids) > context_length.
        """
        ...

    def forward_sample(
        self,
        ids: Sequence[int],
        params: SamplingParams,
        draw: float,
        generated: Sequence[int],
        next_draw: float | None = None,
    ) -> int:
        """`forward(ids)` then pick the next token from the last position's logits.

        `generated` are the ids sampled so far in this job (repetition-penalty history);
        `draw` is the uniform in [0, 1) for this step (worker.engine.rng.uniform). Must match
        worker.engine.sampling.sample() on the same logits; only the id leaves the device.
        `next_draw`: the draw the next call will carry, when the caller knows it (a hint: a
        backend may start the next step early with it; the result never depends on it).
        """
        ...

    def check_residency(self) -> ResidencyReport: ...

    def close(self) -> None: ...
