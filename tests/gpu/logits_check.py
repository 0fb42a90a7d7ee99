"""Teacher-forced whole-model logits and their comparison (docs/design.md), shared by
test_model.py (Qwen2.5 full size, tiny layouts) and test_model_full.py (Phi-3, GPT-OSS)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


def token_sequence(
    vocab: int, n_prompt: int, n_more: int, seed: int
) -> tuple[list[int], list[int]]:
    rng = np.random.default_rng(seed)
    return (
        [int(t) for t in rng.integers(0, vocab, n_prompt)],
        [int(t) for t in rng.integers(0, vocab, n_more)],
    )


def teacher_forced(be: Any, prompt: list[int], more: list[int]) -> np.ndarray:
    """Logits at every position: the prompt in one prefill, then each further token alone."""
    be.reset()
    rows = [be.forward(prompt, all_logits=True)]
    rows += [be.forward([t])[None, :] for t in more]
    return np.concatenate(rows, axis=0)


@dataclass(frozen=True)
class LogitsDiff:
    rels: list[float]  # relative error of the logits vector, per position
    worst_abs: float
    checked: int  # positions where the top-1 choice was compared

    def summary(self, name: str, n_prompt: int) -> str:
        return (
            f"{name}: max rel {max(self.rels):.3e} (prefill {max(self.rels[:n_prompt]):.3e}, "
            f"decode {max(self.rels[n_prompt:], default=0.0):.3e}), max abs "
            f"{self.worst_abs:.3e}, top-1 checked at {self.checked}/{len(self.rels)}"
        )


def compare_logits(got: np.ndarray, ref: np.ndarray) -> LogitsDiff:
    """Per position: the relative error, and the top-1 choice, which must agree wherever the
    reference's top-2 gap exceeds twice that position's largest absolute error (beyond that,
    no error of that size can swap the two). Asserts the top-1 agreement."""
    assert got.shape == ref.shape, (got.shape, ref.shape)
    assert np.isfinite(got).all()
    rels, checked, worst = [], 0, 0.0
    for i in range(got.shape[0]):
        g, r = got[i].astype(np.float64), ref[i].astype(np.float64)
        rels.append(float(np.linalg.norm(g - r) / np.linalg.norm(r)))
        err = float(np.max(np.abs(g - r)))
        top2 = np.sort(r)[-2:]
        if top2[1] - top2[0] > 2 * err:
            checked += 1
            assert int(np.argmax(g)) == int(np.argmax(r)), f"top-1 differs at position {i}"
        worst = max(worst, err)
    return LogitsDiff(rels, worst, checked)
