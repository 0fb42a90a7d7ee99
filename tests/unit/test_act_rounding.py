"""tools.act_rounding's roundings: what they claim about the codes and the error, so the
accuracy table in docs/kernels.md measures the formats it names."""

from __future__ import annotations

import numpy as np
import pytest

from tools.act_rounding import BLOCK, i15, q8, rounded_linear


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


def test_blocks_of_any_size_end_in_a_shorter_block() -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 896)).astype(np.float32)
    x[0, 800] = 50.0  # sets the scale of the last (128-wide) block of 256 only
    y = i15(x, 256)
    assert y.shape == x.shape and y.dtype == np.float32
    for lo_, hi_ in ((0, 256), (256, 512), (512, 768), (768, 896)):
        d = np.abs(x[:, lo_:hi_]).max(axis=1, keepdims=True) / (127.0 * 128.0)
        ulp = np.spacing(np.abs(x[:, lo_:hi_]))  # y is rounded to float32 at the end
        assert (np.abs(y[:, lo_:hi_] - x[:, lo_:hi_]) <= 0.5 * d * (1 + 1e-5) + ulp).all()
    # a coarser block can only widen the step: the outlier's block loses resolution
    e32 = np.abs(i15(x, 32) - x)[0, 768:].max()
    assert np.abs(y - x)[0, 768:].max() > e32


def test_modes_parse_and_refuse() -> None:
    w = np.eye(64, dtype=np.float32)
    x = np.random.default_rng(3).standard_normal((2, 64)).astype(np.float32)
    exact = lambda x, w, b=None: x @ w.T  # noqa: E731
    assert np.array_equal(rounded_linear("i15@64", exact)(x, w), i15(x, 64))
    assert np.array_equal(rounded_linear("q8", exact)(x, w), q8(x, 32))
    for bad in ("fp16@32", "i16", "q8@0"):
        with pytest.raises(ValueError):
            rounded_linear(bad, exact)
