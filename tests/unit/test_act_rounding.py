"""tools.act_rounding's roundings: what they claim about the codes and the error, so the
accuracy table in docs/kernels.md measures the formats it names."""

from __future__ import annotations

import numpy as np

from tools.act_rounding import BLOCK, i15, q8


def _blocks(x: np.ndarray) -> np.ndarray:
    return x.reshape(x.shape[0], -1, BLOCK)


def test_q8_and_i15_round_to_their_grids_within_half_a_step() -> None:
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((5, 8 * BLOCK)) * np.exp(rng.uniform(-8, 8, (5, 1)))).astype(
        np.float32
    )
    x[1, 3 * BLOCK : 4 * BLOCK] = 0.0  # an all-zero block stays zero
    x[2, 5] = 1e4 * np.abs(x[2]).max()  # one outlier sets its block's scale
    amax = np.abs(_blocks(x)).max(axis=2, keepdims=True)
    for fn, steps in ((q8, 127.0), (i15, 127.0 * 128.0)):
        y = fn(x)
        assert y.dtype == np.float32 and y.shape == x.shape
        d = amax / steps
        err = np.abs(_blocks(y) - _blocks(x))
        assert (err <= 0.5 * d * (1 + 1e-5) + 1e-30).all()
        codes = np.divide(_blocks(y), d, out=np.zeros_like(err), where=d > 0)
        assert np.allclose(codes, np.rint(codes), atol=1e-2)  # on the grid
        assert np.abs(codes).max() <= steps + 1e-2
        assert not y[1, 3 * BLOCK : 4 * BLOCK].any()


def test_i15_is_far_finer_than_q8() -> None:
    x = np.random.default_rng(1).standard_normal((16, 64 * BLOCK)).astype(np.float32)
    e8 = np.linalg.norm(q8(x) - x) / np.linalg.norm(x)
    e15 = np.linalg.norm(i15(x) - x) / np.linalg.norm(x)
    assert e15 < e8 / 100
