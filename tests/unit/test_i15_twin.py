"""The NumPy twin of cuda_src/i15.cu (tools.i15), on the CPU: its Q4_K fields decode to what
worker.gguf.quants dequantizes, its activation codes are the 15-bit grid, and its product is
the float64 product within the 15-bit rounding of X."""

from __future__ import annotations

import numpy as np
import pytest

from tools.i15 import Q4_K, Q5_K, Q6_K, STEPS, k_fields, product_twin, q6_k_fields, quant_x15
from tools.synth_blocks import random_matrix


@pytest.mark.parametrize("qtype", [Q4_K, Q5_K])
def test_fields_are_the_dequantization(qtype: int) -> None:
    raw, dense = random_matrix(qtype, 40, 1024, np.random.default_rng(0))
    d, dmin, sc, mn, c = k_fields(raw, 1024, qtype)
    w = (d[..., None, None] * sc[..., None]) * c - (dmin[..., None, None] * mn[..., None])
    assert np.allclose(w.reshape(40, 1024), dense, rtol=1e-6, atol=1e-7)


def test_q6_k_fields_are_the_dequantization() -> None:
    raw, dense = random_matrix(Q6_K, 40, 1024, np.random.default_rng(0))
    d, sc, c = q6_k_fields(raw, 1024)
    assert c.min() >= -32 and c.max() <= 31 and sc.min() < 0 < sc.max()
    w = (d[..., None, None] * sc[..., None]) * c
    assert np.allclose(w.reshape(40, 1024), dense, rtol=1e-6, atol=1e-7)


def test_activation_planes() -> None:
    x = np.random.default_rng(1).standard_normal((3, 512), dtype=np.float32)
    x[1, :256] = 0
    for blk in (32, 256):
        hi, lo, d, sq = quant_x15(x, blk)
        q = 128 * hi.astype(np.int64) + lo
        assert np.abs(lo).max() <= 64 and np.abs(q).max() <= STEPS
        assert (q.reshape(3, 16, 32).sum(axis=2) == sq).all()  # sq is per 32 either way
        err = np.abs(q.reshape(3, -1, blk) * d[..., None] - x.reshape(3, -1, blk))
        assert (err <= 0.5001 * d[..., None]).all()
        assert d.shape == (3, 512 // blk)
        assert d[1, 0] == 0 and not q[1, :blk].any()
        assert np.abs(q).max() == STEPS  # each row's largest |x| takes the top code


@pytest.mark.parametrize("qtype", [Q4_K, Q5_K, Q6_K])
def test_twin_product_is_the_float64_product(qtype: int) -> None:
    rng = np.random.default_rng(2)
    raw, dense = random_matrix(qtype, 64, 3072, rng)
    x = rng.standard_normal((5, 3072), dtype=np.float32)
    ref = x.astype(np.float64) @ dense.astype(np.float64).T
    for splits in (1, 3, 12):
        y = product_twin(raw, x, splits, qtype)
        assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < 1e-4


def test_a_row_of_the_twin_does_not_depend_on_its_batch() -> None:
    rng = np.random.default_rng(4)
    raw, _ = random_matrix(12, 48, 1024, rng)
    x = rng.standard_normal((9, 1024), dtype=np.float32)
    all_rows = product_twin(raw, x, 2)
    for t in (0, 4, 8):
        assert all_rows[t].tobytes() == product_twin(raw, x[t : t + 1], 2)[0].tobytes()


@pytest.mark.parametrize("qtype", [2, 6, 8, 39])  # Q4_0, Q5_0, Q8_0, MXFP4
def test_legacy_fields_and_twin(qtype: int) -> None:
    """Blocks of 32: the fields decode to worker.gguf.quants' dequantization exactly, and the
    twin (X scaled per 32, a float step a block) is the float64 product within the 15-bit
    rounding of X (~4e-5 measured on unit normals)."""
    from tools.i15 import legacy_fields

    rng = np.random.default_rng(qtype)
    raw, dense = random_matrix(qtype, 48, 896, rng)
    d, c = legacy_fields(raw, 896, qtype)
    assert np.array_equal((d[..., None] * c).reshape(48, 896), dense)
    x = rng.standard_normal((5, 896), dtype=np.float32)
    ref = x.astype(np.float64) @ dense.astype(np.float64).T
    for splits in (1, 2, 4):
        y = product_twin(raw, x, splits, qtype)
        assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < 1e-4
