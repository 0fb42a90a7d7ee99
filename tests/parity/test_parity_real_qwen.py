"""The real Qwen2.5-Coder-0.5B-Instruct Q4_K_M file against transformers (docs/design.md).

Teacher-forced: the NumPy backend and Qwen2ForCausalLM (real config, the file's weights
dequantized to float32 by our reader, float32 eager attention) see the same 31 tokens and
their logits are compared at every position.

Bound 1e-3 (relative L2 per position). Both sides are float32 with different summation
orders (OpenBLAS sgemm vs torch's kernels), over 24 layers, reductions up to 4864 wide and
Qwen's outlier channels (activations ~1e3 on a few dims of the first token), which amplify
rounding: measured max 3.2e-5, median 7e-7 on this machine. 1e-3 leaves 30x headroom for
other CPUs' BLAS kernels, while any real error (rope theta, a missing bias, a mask off by
one, a wrong quant block) moves logits by 1e-2 or more.

The prompt is the chat-rendered "Write a haiku about GPU computing" (user turn + assistant
header, no system turn) as token ids; the continuation is the backend's greedy output,
pinned. It is checked teacher-forced with a margin: wherever the reference's top-2 gap
exceeds the margin the argmax must equal the pinned id, so a near-tie on another CPU cannot
make the test flaky (docs/design.md), and free-running greedy decoding must reproduce it exactly
on two runs (same-machine determinism).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from parity_harness import parity_hf, rel_err, top1_disagreements

from worker.backends.numpy_ref import NumpyBackend
from worker.engine.params import SamplingParams
from worker.engine.single import SingleSequence

pytestmark = [pytest.mark.parity, pytest.mark.slow]

# <|im_start|>user\nWrite a haiku about GPU computing<|im_end|>\n<|im_start|>assistant\n
PROMPT = [
    151644,
    872,
    198,
    7985,
    264,
    6386,
    38242,
    911,
    22670,
    24231,
    151645,
    198,
    151644,
    77091,
    198,
]
# "GPU Computing  \nComputes in the cloud  \nPowerful, efficient<|im_end|>\n<|endoftext|>"
GREEDY16 = [
    49891, 45779, 2303, 58022, 288, 304, 279, 9437,
    2303, 14986, 1262, 11, 11050, 151645, 198, 151643,
]  # fmt: skip
BOUND = 1e-3
MARGIN = 0.05  # absolute logit gap below which a top-1 choice is a near-tie


def test_real_qwen_teacher_forced_vs_transformers(real_qwen: Path) -> None:
    ids = PROMPT + GREEDY16
    backend = NumpyBackend(real_qwen)
    try:
        seq = SingleSequence(backend)
        ours = seq.forward(ids, all_logits=True)
        assert ours.shape == (len(ids), 151936) and ours.dtype == np.float32
        # Free-running greedy decode, twice: identical, and equal to the pinned ids.
        runs = []
        for _ in range(2):
            seq.reset()
            out: list[int] = []
            nxt = seq.forward_sample(PROMPT, SamplingParams(temperature=0.0), 0.0, out)
            while len(out) < 8:
                out.append(nxt)
                nxt = seq.forward_sample([nxt], SamplingParams(temperature=0.0), 0.0, out)
            runs.append(out)
        assert runs[0] == runs[1]
        assert runs[0] == GREEDY16[:8]
    finally:
        backend.close()

    ref = parity_hf().hf_logits_for_file(real_qwen, ids, "float32")
    err = rel_err(ours, ref)
    print(f"real qwen: rel err max {err.max():.2e} median {np.median(err):.2e}")
    assert err.max() <= BOUND, err
    assert top1_disagreements(ours, ref, BOUND) == []

    # Pinned greedy ids, teacher-forced, wherever the choice is not a near-tie.
    checked = 0
    for k, want in enumerate(GREEDY16):
        row = ref[len(PROMPT) - 1 + k]
        top2 = np.sort(row)[-2:]
        if top2[1] - top2[0] > MARGIN:
            checked += 1
            assert int(np.argmax(row)) == want, (k, want)
            assert int(np.argmax(ours[len(PROMPT) - 1 + k])) == want, (k, want)
    assert checked >= 12  # the pin is not vacuous
