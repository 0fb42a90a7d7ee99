"""Random block generation: every format dequantizes (through gguf.quants, an independent
implementation) to finite, zero-mean values of the requested magnitude; the K-quant scale
packing matches ggml's layout on hand-built blocks; generation is deterministic."""

from __future__ import annotations

import io

import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType as T
from gguf.quants import dequantize

from tools.synth_blocks import (
    _pack_k_scales,
    random_blocks,
    random_floats,
    write_random_tensor,
)

QUANT_TYPES = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K, T.MXFP4]
SIZES = {  # (elements per block, bytes per block) from ggml-common.h, written out here
    T.Q4_0: (32, 18),
    T.Q4_1: (32, 20),
    T.Q5_0: (32, 22),
    T.Q5_1: (32, 24),
    T.Q8_0: (32, 34),
    T.Q4_K: (256, 144),
    T.Q5_K: (256, 176),
    T.Q6_K: (256, 210),
    T.MXFP4: (32, 17),
}


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.Generator(np.random.SFC64(seed))


@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("std", [0.02, 0.1])
def test_random_blocks_have_sane_values(qtype: T, std: float) -> None:
    bs, ts = SIZES[qtype]
    blocks = random_blocks(qtype, 4096, rng(), std)
    assert blocks.shape == (4096, ts) and blocks.dtype == np.uint8
    x = dequantize(blocks, qtype)
    assert x.size == 4096 * bs
    assert np.isfinite(x).all()
    assert abs(float(x.mean())) < 0.05 * std
    assert 0.7 * std < float(x.std()) < 1.3 * std
    assert float(np.abs(x).max()) < 8 * std
    # values are not degenerate: many distinct levels (MXFP4 has 15 per exponent)
    assert np.unique(x[:4096]).size > 12


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q5_K])
def test_f16_scales_are_normal_numbers(qtype: T) -> None:
    blocks = random_blocks(qtype, 2048, rng(1), 0.02)
    d = blocks[:, 0:2].copy().view(np.float16).ravel()
    assert np.isfinite(d).all()
    assert (np.abs(d) >= np.finfo(np.float16).tiny).all()  # no subnormal or zero scale


def test_q6k_scales_signed_and_d_at_the_end() -> None:
    blocks = random_blocks(T.Q6_K, 2048, rng(2), 0.02)
    scales = blocks[:, 192:208].view(np.int8)
    assert (scales < 0).any() and (scales > 0).any()
    assert (np.abs(scales.astype(np.int16)) >= 4).all()
    d = blocks[:, 208:210].copy().view(np.float16).ravel()
    assert (d > 0).all() and np.isfinite(d).all()


def test_mxfp4_exponents() -> None:
    blocks = random_blocks(T.MXFP4, 1024, rng(3), 0.02)
    assert set(np.unique(blocks[:, 0]).tolist()) <= {119, 120}


def test_k_scale_packing_matches_ggml_layout() -> None:
    # Hand-built Q4_K block: d = 1, dmin = 1, every quant = 1 (nibbles 0x11), sub-block j
    # has scale sc[j] and min m[j]: value = d*sc*q - dmin*m = sc[j] - m[j] for all 32 values
    # of sub-block j. Exercises the high-bit packing of sub-blocks 4..7.
    sc = np.array([[1, 2, 3, 63, 17, 40, 55, 62]], dtype=np.uint8)
    m = np.array([[0, 1, 0, 7, 16, 33, 63, 5]], dtype=np.uint8)
    block = np.zeros((1, 144), dtype=np.uint8)
    block[0, 0:2] = np.array([1.0], dtype=np.float16).view(np.uint8)
    block[0, 2:4] = np.array([1.0], dtype=np.float16).view(np.uint8)
    block[0, 4:16] = _pack_k_scales(sc, m)[0]
    block[0, 16:144] = 0x11
    x = dequantize(block, T.Q4_K).reshape(8, 32)
    expected = (sc[0].astype(np.float32) - m[0].astype(np.float32))[:, None]
    np.testing.assert_array_equal(x, np.broadcast_to(expected, (8, 32)))


def test_generated_k_blocks_unpack_to_planned_ranges() -> None:
    # Decode the packed 6-bit fields back independently and check the design ranges:
    # scales 8..39 and mins = scale +- 1, both fields' top bit set somewhere.
    blocks = random_blocks(T.Q4_K, 512, rng(4), 0.02)
    q = blocks[:, 4:16].astype(np.int32)
    sc = np.empty((512, 8), np.int32)
    mn = np.empty((512, 8), np.int32)
    sc[:, :4], mn[:, :4] = q[:, 0:4] & 63, q[:, 4:8] & 63
    sc[:, 4:] = (q[:, 8:12] & 0xF) | ((q[:, 0:4] >> 6) << 4)
    mn[:, 4:] = (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)
    assert sc.min() >= 8 and sc.max() <= 39
    assert (np.abs(mn - sc) <= 1).all()
    assert (sc >= 32).any() and (mn >= 32).any() and (sc < 32).any()


@pytest.mark.parametrize("qtype", [T.F32, T.F16, T.BF16])
def test_random_floats(qtype: T) -> None:
    raw = random_floats(qtype, 100_000, rng(5), 0.02, mean=1.0)
    x = dequantize(raw.view(np.uint8), qtype).astype(np.float32)
    assert np.isfinite(x).all()
    assert abs(float(x.mean()) - 1.0) < 1e-3
    assert 0.019 < float(x.std()) < 0.021


def test_bf16_rounding_is_nearest() -> None:
    from tools.synth_blocks import to_bf16_bits

    x = np.array([1.0, 1.0 + 2**-8, 1.0 + 3 * 2**-9, -2.5, 3.0e-3], dtype=np.float32)
    back = (to_bf16_bits(x).astype(np.uint32) << 16).view(np.float32)
    # bf16 keeps 8 significant bits: error at most half an ulp
    ulp = 2.0 ** (np.floor(np.log2(np.abs(x))) - 7)
    assert (np.abs(back - x) <= ulp / 2).all()
    assert back[0] == 1.0 and back[3] == -2.5


@pytest.mark.parametrize("qtype", [T.Q4_K, T.MXFP4, T.F16])
def test_write_random_tensor_streams_deterministically(
    qtype: T, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tools.synth_blocks as sb

    n = 256 * 600
    whole = io.BytesIO()
    assert write_random_tensor(whole, qtype, n, rng(7), 0.02) == len(whole.getvalue())
    again = io.BytesIO()
    write_random_tensor(again, qtype, n, rng(7), 0.02)
    assert again.getvalue() == whole.getvalue()
    # the same tensor written in many small chunks has the same size
    monkeypatch.setattr(sb, "CHUNK_BYTES", 1000)
    chunked = io.BytesIO()
    write_random_tensor(chunked, qtype, n, rng(7), 0.02)
    other = io.BytesIO()
    write_random_tensor(other, qtype, n, rng(8), 0.02)
    if qtype == T.F16:
        # floats are drawn per chunk from the same stream: identical either way
        assert whole.getvalue() == chunked.getvalue()
    assert len(chunked.getvalue()) == len(whole.getvalue())
    assert other.getvalue() != whole.getvalue()


def test_partial_block_is_rejected() -> None:
    with pytest.raises(ValueError, match="whole number"):
        write_random_tensor(io.BytesIO(), T.Q4_0, 33, rng(), 0.02)
