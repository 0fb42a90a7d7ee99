"""Shared machinery of the parity tests: synthetic GGUF models (tools.synth, the real
tensor layouts), our NumPy forward (prefill + decode through the KV cache) and the
transformers side (scripts/parity_hf.py), and the teacher-forced comparison of docs/design.md.

Error measure: for each position, ||ours - ref||_2 / ||ref||_2 over the vocabulary vector
(float64). Why 1e-4 is the F32 bound: our side computes in float32 (unit roundoff
u = 6e-8); a dot product of length n accumulates relative error <= n*u in the worst case
but ~sqrt(n)*u typically, and the widest reductions here are n <= 10^3 (n_embd, n_ff,
n_head*head_dim), so one matmul contributes ~1e-6 to 6e-5 worst case; the errors of the
few layers of a tiny model add roughly in quadrature and are damped by the norms, so the
measured values sit near 1e-6. 1e-4 leaves room for unlucky cancellation without being
loose enough to hide a real mistake: a wrong RoPE pair, mask, bias, clamp or expert
weighting shows up as 1e-2 .. 1.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt

from worker.gguf.hparams import load_hparams
from worker.gguf.reader import open_gguf
from worker.models.base import build_model
from worker.models.common import KVCache

REPO = Path(__file__).resolve().parents[2]
PROMPT_LEN = 16
DECODE_STEPS = 8


def parity_hf() -> ModuleType:
    """scripts/parity_hf.py as a module (scripts/ is not a package)."""
    name = "parity_hf"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / "parity_hf.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def rel_err(ours: npt.NDArray[Any], ref: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
    """Per-row relative L2 error of logits (rows = positions)."""
    o = np.atleast_2d(ours).astype(np.float64)
    r = np.atleast_2d(ref).astype(np.float64)
    return np.linalg.norm(o - r, axis=-1) / np.linalg.norm(r, axis=-1)


def top1_disagreements(ours: npt.NDArray[Any], ref: npt.NDArray[Any], bound: float) -> list[int]:
    """Positions where top-1 differs although the reference's top-2 gap exceeds the error
    allowed by `bound` (docs/design.md): bound * ||ref|| is the largest logit error permitted."""
    bad: list[int] = []
    for p, (o, r) in enumerate(zip(np.atleast_2d(ours), np.atleast_2d(ref), strict=True)):
        top2 = np.sort(r)[-2:]
        if top2[1] - top2[0] > 2 * bound * np.linalg.norm(r) and np.argmax(o) != np.argmax(r):
            bad.append(p)
    return bad


@dataclass
class ParityResult:
    prefill_err: npt.NDArray[np.float64]
    decode_err: npt.NDArray[np.float64]
    top1_bad: list[int]
    ours: npt.NDArray[np.float32]
    ref: npt.NDArray[np.float64]

    @property
    def max_err(self) -> float:
        return float(max(self.prefill_err.max(), self.decode_err.max()))


def ours_logits(
    path: Path, ids: list[int], prompt_len: int = PROMPT_LEN
) -> npt.NDArray[np.float32]:
    """Our logits at every position: prompt as one chunk, then one token at a time."""
    from worker.backends.numpy_ref import GGUFWeights

    with open_gguf(path) as gf:
        hp = load_hparams(gf)
        model = build_model(hp, GGUFWeights(gf), n_ctx=64)
        kv = KVCache(hp, max(64, len(ids)))
        rows = [model.forward(ids[:prompt_len], kv, 0, all_logits=True)]
        for i in range(prompt_len, len(ids)):
            rows.append(model.forward(ids[i : i + 1], kv, i, all_logits=True))
        return np.concatenate(rows, axis=0)


def run_parity(
    path: Path, ids: list[int], bound: float, prompt_len: int = PROMPT_LEN
) -> ParityResult:
    ref = parity_hf().hf_logits_for_file(path, ids, "float64")
    ours = ours_logits(path, ids, prompt_len)
    err = rel_err(ours, ref)
    return ParityResult(
        prefill_err=err[:prompt_len],
        decode_err=err[prompt_len:],
        top1_bad=top1_disagreements(ours, ref, bound),
        ours=ours,
        ref=ref,
    )
