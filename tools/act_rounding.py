"""How much the rounding of a matrix product's inputs costs a whole model, on the CPU:
teacher-forced logits of a GGUF file through the NumPy reference with every product's
activations (and, for fp16, weights) rounded as a kernel design would round them, against
the exact float32 reference (docs/kernels.md, "Integer products").

    python -m tools.act_rounding --model GGUF [--modes fp16,q8,i15,i15@256] [--prompt 32]
        [--more 48]

Modes (blocks of 32 along K, each with a float32 scale; `MODE@B` for blocks of B):
- fp16: X and W rounded to fp16, what the tensor-core products compute today;
- q8:   X as int8 codes, scale max|x| / 127 (ggml's q8_1 activations): integer dot products
        against the weights' integer codes;
- i15:  X as 15-bit codes, scale max|x| / (127 * 128), split into two int8 planes
        (q = 128 hi + lo, |lo| <= 64): two integer products a weight, still exact integers.

Weight codes and their scales are exact in the integer modes (as in a kernel multiplying the
codes), so only X is rounded there. Prints, per mode, the largest relative error of a
position's logits vector and the top-1 agreement (as tests/gpu/logits_check.py judges).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

F32 = npt.NDArray[np.float32]
BLOCK = 32


def _blocks(x: F32, block: int) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """[t, k] as [t, ceil(k / block), block] (a ragged last block padded with zeros) and
    each block's max |x|."""
    t, k = x.shape
    pad = -k % block
    xp = np.pad(x, ((0, 0), (0, pad))) if pad else x
    xb = xp.reshape(t, (k + pad) // block, block).astype(np.float32)
    return xb, np.abs(xb).max(axis=2, keepdims=True)


def _unblock(y: npt.NDArray[np.floating[Any]], shape: tuple[int, ...]) -> F32:
    return y.reshape(shape[0], -1)[:, : shape[1]].astype(np.float32)


def _codes(xb: F32, amax: F32, top: float) -> tuple[F32, F32]:
    """Codes round(x / d), |code| <= top, with d = amax / top (0 for an all-zero block)."""
    d = (amax / np.float32(top)).astype(np.float32)
    inv = np.divide(1.0, d, out=np.zeros_like(d), where=d > 0)
    return np.clip(np.rint(xb * inv), -top, top), d


def q8(x: F32, block: int = BLOCK) -> F32:
    xb, amax = _blocks(x, block)
    q, d = _codes(xb, amax, 127.0)
    return _unblock(q * d, x.shape)


def i15(x: F32, block: int = BLOCK) -> F32:
    xb, amax = _blocks(x, block)
    q, d = _codes(xb, amax, 127.0 * 128.0)
    hi = np.rint(q / 128.0)
    lo = q - 128.0 * hi
    assert np.abs(hi).max(initial=0) <= 127 and np.abs(lo).max(initial=0) <= 64
    return _unblock((128.0 * hi + lo) * d, x.shape)


def rounded_linear(mode: str, exact: Callable[..., F32]) -> Callable[..., F32]:
    """`mode` is fp16, q8 or i15, the integer ones optionally `@B` (blocks of B along K; where
    K is not a multiple of B the last block is shorter)."""
    name, _, size = mode.partition("@")
    block = int(size) if size else BLOCK
    if name not in ("fp16", "q8", "i15") or block < 1 or (name == "fp16" and size):
        raise ValueError(f"unknown mode {mode!r}")

    def linear(x: F32, w: F32, b: F32 | None = None) -> F32:
        if name == "fp16":
            x = x.astype(np.float16).astype(np.float32)
            w = w.astype(np.float16).astype(np.float32)
        else:
            k = x.shape[-1]
            if k % BLOCK == 0:
                x2 = x.reshape(-1, k)
                x = (q8(x2, block) if name == "q8" else i15(x2, block)).reshape(x.shape)
        return exact(x, w, b)

    return linear


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--modes", default="fp16,q8,i15")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens (one prefill chunk)")
    p.add_argument("--more", type=int, default=48, help="tokens fed back one at a time")
    p.add_argument("--seed", type=int, default=3)
    args = p.parse_args()

    import worker.models  # noqa: F401  (registers the architectures)
    import worker.models.common as common
    from tests.gpu.logits_check import compare_logits, teacher_forced, token_sequence
    from worker.backends.numpy_ref import NumpyBackend

    exact = common.linear
    users = [m for n, m in sys.modules.items() if n.startswith("worker.models.")]
    users = [m for m in users if getattr(m, "linear", None) is exact]

    def logits(linear: Callable[..., F32]) -> tuple[npt.NDArray[np.float32], int]:
        for m in users:
            m.linear = linear  # type: ignore[attr-defined]
        be = NumpyBackend(args.model, ctx_size=args.prompt + args.more + 16, max_batch=1)
        prompt, more = token_sequence(be.vocab_size, args.prompt, args.more, args.seed)
        return teacher_forced(be, prompt, more), len(prompt)

    ref, n_prompt = logits(exact)
    for mode in args.modes.split(","):
        got, _ = logits(rounded_linear(mode, exact))
        d = compare_logits(got, ref)
        agree = float(np.mean(np.argmax(got, axis=1) == np.argmax(ref, axis=1)))
        print(f"{mode:8s} {d.summary('teacher-forced', n_prompt)}, argmax agrees {agree:.3f}")
    for m in users:
        m.linear = exact  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
