"""Parity of the NumPy reference models with Hugging Face transformers.

For every architecture, a 2-layer synthetic model in the real tensor layout
(tools.synth) is written as GGUF; the same dequantized weights are loaded into the
transformers model (scripts/parity_hf.py, float64, eager attention) and the logits of a
16-token prompt (one prefill chunk) and of 8 decode steps (one token at a time through our
KV cache) are compared position by position. Bound: relative L2 error <= 1e-4 (see
tests/parity/parity_harness.py for why), and no top-1 disagreement where the reference's top-2
gap exceeds the error bound.

Quantized mixes dequantize the GGUF weights on both sides, so the same bound applies: the
comparison checks the forward pass, not the quantization.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from parity_harness import DECODE_STEPS, PROMPT_LEN, run_parity

from tools.synth import preset, write_synthetic

pytestmark = pytest.mark.parity

BOUND = 1e-4

# (arch, mix, extra spec overrides). std 0.15 gives activations of order 1 so the
# nonlinearities (gpt-oss clamps at +-7, GELU, softmax) are exercised, not linearised.
CASES = [
    ("qwen2", "f32", {}),
    ("qwen2", "q4_k_m", {}),
    ("phi3", "f32", {}),
    ("phi3", "q4_k_m", {"rope_factors": True}),  # short factors (context <= original)
    ("phi3", "f16", {"rope_factors": True, "rope_orig_ctx": 16}),  # long factors
    ("gpt-oss", "f32", {}),
    ("gpt-oss", "mxfp4", {}),
    ("llama", "f32", {}),
    ("llama", "q4_0", {}),
    ("gpt2", "f32", {}),
    ("gpt2", "q4_k_m", {"tied_output": True}),
]


@pytest.mark.parametrize(
    ("arch", "mix", "extra"), CASES, ids=[f"{a}-{m}-{i}" for i, (a, m, _) in enumerate(CASES)]
)
def test_logits_match_transformers(
    arch: str, mix: str, extra: dict[str, Any], tmp_path: Path
) -> None:
    spec = replace(preset(arch, "tiny", mix=mix, seed=7), std=0.15, n_ctx=4096, **extra)
    path = tmp_path / f"{arch}-{mix}.gguf"
    write_synthetic(path, spec)
    rng = np.random.default_rng(11)
    ids = rng.integers(0, spec.n_vocab, PROMPT_LEN + DECODE_STEPS).tolist()
    res = run_parity(path, ids, BOUND)
    print(
        f"{arch} {mix}: max rel err prefill {res.prefill_err.max():.2e}, "
        f"decode {res.decode_err.max():.2e}"
    )
    assert res.prefill_err.shape == (PROMPT_LEN,) and res.decode_err.shape == (DECODE_STEPS,)
    assert res.max_err <= BOUND, (res.prefill_err, res.decode_err)
    assert res.top1_bad == []
    # The logits carry signal (a broken model producing ~0 would pass a relative test
    # against a reference that is also ~0 only if both were degenerate).
    assert np.std(res.ref) > 1e-3


def test_gpt_oss_window_inside_a_long_prefill(tmp_path: Path) -> None:
    """A 40-token prompt (the 16-token window of the even layers slides inside the prefill
    chunk) and 8 decode steps."""
    spec = replace(preset("gpt-oss", "tiny", mix="mxfp4", seed=5), std=0.15, n_ctx=4096)
    path = tmp_path / "gpt-oss-long.gguf"
    write_synthetic(path, spec)
    assert spec.sliding_window == 16
    ids = np.random.default_rng(12).integers(0, spec.n_vocab, 48).tolist()
    res = run_parity(path, ids, BOUND, prompt_len=40)
    print(f"gpt-oss long: max rel err {res.max_err:.2e}")
    assert res.prefill_err.shape == (40,)
    assert res.max_err <= BOUND
    assert res.top1_bad == []
