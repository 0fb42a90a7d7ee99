"""Device check of the speculative greedy decode (CudaBackend.spec_decode): the same token
sequences with it on and off, including a sampled step in the middle, a caller that passes a
token other than the one returned, and a reset mid-sequence.

    python3 scripts/device/spec_check.py MODEL.gguf
"""

from __future__ import annotations

import sys

import numpy as np

from worker.backends.cuda import CudaBackend
from worker.engine.params import SamplingParams


def run(be: CudaBackend, spec: bool, prompt: list[int]) -> list[int]:
    be.spec_decode = spec
    greedy = SamplingParams(temperature=0.0)
    sampled = SamplingParams(temperature=0.8, top_p=0.9, top_k=40)
    out: list[int] = []
    be.reset()
    tok = be.forward_sample(prompt, greedy, 0.0, [])
    for i in range(96):
        if i == 30:
            tok = be.forward_sample([tok], sampled, 0.37, out)
        elif i == 50:
            tok = be.forward_sample([(tok + 17) % be.vocab_size], greedy, 0.0, [])
        elif i == 70:
            _ = be.forward([tok])  # logits path behind a queued step
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


def main() -> int:
    be = CudaBackend(sys.argv[1], ctx_size=4096)
    rng = np.random.default_rng(3)
    prompt = [int(t) for t in rng.integers(0, be.vocab_size, 100)]
    a = run(be, False, prompt)
    b = run(be, True, prompt)
    c = run(be, True, prompt)
    be.close()
    ok = a == b == c
    print(f"spec_check: {'OK' if ok else 'MISMATCH'} ({len(a)} tokens, {len(set(a))} distinct)")
    if not ok:
        print("off:", a)
        print("on: ", b)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
