"""Greedy steps queued ahead of the host's read-back (CudaBackend.spec_decode) change no
token: the same sequence with it off and on (twice), through a sampled step, a caller that
passes a token other than the one returned, a forward() behind a queued step and a reset.
(Was scripts/device/spec_check.py; now part of the GPU suite.)"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from worker.engine.params import SamplingParams

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda_be(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from tools.synth import preset, write_synthetic
    from worker.backends.cuda import CudaBackend

    d = os.environ.get("WORKER_ORCD_SYNTH_DIR")
    base = Path(d) if d else tmp_path_factory.mktemp("synth")
    path = base / "qwen2-full-q4_k_m.gguf"
    if not path.exists():
        write_synthetic(path, preset("qwen2", "full", mix="q4_k_m", seed=1))
    be = CudaBackend(path, ctx_size=4096)
    yield be
    be.close()


def _run(be: Any, spec: bool, prompt: list[int]) -> list[int]:
    be.spec_decode = spec
    greedy = SamplingParams(temperature=0.0)
    sampled = SamplingParams(temperature=0.8, top_p=0.9, top_k=40)
    out: list[int] = []
    be.reset()
    tok = be.forward_sample(prompt, greedy, 0.0, [])
    for i in range(96):
        if i == 30:
            tok = be.forward_sample([tok], sampled, 0.37, out)
        elif i == 50:  # not the token just returned: the queued step is redone
            tok = be.forward_sample([(tok + 17) % be.vocab_size], greedy, 0.0, [])
        elif i == 70:  # logits behind a queued step
            _ = be.forward([tok])
            tok = be.forward_sample([tok], greedy, 0.0, [])
        else:
            tok = be.forward_sample([tok], greedy, 0.0, [])
        out.append(tok)
    be.reset()
    tok = be.forward_sample(prompt[:7], greedy, 0.0, [])
    for _ in range(20):
        tok = be.forward_sample([tok], greedy, 0.0, [])
        out.append(tok)
    return out


def test_speculative_greedy_steps_change_no_token(cuda_be: Any) -> None:
    rng = np.random.default_rng(3)
    prompt = [int(t) for t in rng.integers(0, cuda_be.vocab_size, 100)]
    default = cuda_be.spec_decode
    try:
        off = _run(cuda_be, False, prompt)
        on = _run(cuda_be, True, prompt)
        again = _run(cuda_be, True, prompt)
    finally:
        cuda_be.spec_decode = default
    assert off == on == again
    assert len(set(off)) > 5  # a real sequence, not one id repeated
