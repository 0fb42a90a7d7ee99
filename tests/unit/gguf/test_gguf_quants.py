"""NumPy dequantization of the twelve tensor types: against gguf-py's reference on random
blocks, and against blocks built by hand from ggml's block definitions (ggml-common.h) with
the expected floats written out independently, so a misreading shared with gguf-py fails."""

from __future__ import annotations

import struct

import gguf
import numpy as np
import pytest

from worker.gguf import quants
from worker.gguf.quants import BLOCK_SIZE, SUPPORTED_TYPES, TYPE_SIZE, dequantize

T = gguf.GGMLQuantizationType


def f16_bytes(x: float) -> bytes:
    return np.float16(x).tobytes()


def test_geometry_matches_ggml() -> None:
    assert len(SUPPORTED_TYPES) == 12
    assert set(SUPPORTED_TYPES) == set(BLOCK_SIZE) == set(TYPE_SIZE)
    for t in SUPPORTED_TYPES:
        assert (BLOCK_SIZE[t], TYPE_SIZE[t]) == gguf.GGML_QUANT_SIZES[t], t.name
    # spelled out from ggml-common.h
    assert TYPE_SIZE[T.Q4_K] == 144 and TYPE_SIZE[T.Q5_K] == 176 and TYPE_SIZE[T.Q6_K] == 210
    assert TYPE_SIZE[T.MXFP4] == 17 and TYPE_SIZE[T.Q5_0] == 22 and TYPE_SIZE[T.Q8_0] == 34


def random_blocks(t: T, nb: int, rng: np.random.Generator) -> np.ndarray:
    """nb random blocks of type t with finite, realistic scales (no NaN/inf scale fields)."""
    ts = TYPE_SIZE[t]
    if t == T.F32:
        return rng.standard_normal(nb).astype(np.float32).view(np.uint8)
    if t == T.F16:
        return rng.standard_normal(nb).astype(np.float16).view(np.uint8)
    if t == T.BF16:
        bits = rng.standard_normal(nb).astype(np.float32).view(np.uint32) >> 16
        return bits.astype(np.uint16).view(np.uint8)
    b = rng.integers(0, 256, size=(nb, ts), dtype=np.uint8)

    def scale(offset: int, signed: bool = True) -> None:
        v = rng.standard_normal(nb) * 0.02 if signed else rng.random(nb) * 0.02
        b[:, offset : offset + 2] = v.astype(np.float16).view(np.uint8).reshape(nb, 2)

    if t in (T.Q4_0, T.Q5_0, T.Q8_0):
        scale(0)
    elif t in (T.Q4_1, T.Q5_1):
        scale(0)
        scale(2)
    elif t in (T.Q4_K, T.Q5_K):
        scale(0, signed=False)
        scale(2, signed=False)
    elif t == T.Q6_K:
        scale(208)
    elif t == T.MXFP4:
        b[:, 0] = rng.integers(100, 140, size=nb)
    return b.reshape(-1)


@pytest.mark.parametrize("t", SUPPORTED_TYPES, ids=lambda t: t.name)
def test_random_blocks_match_gguf_py(t: T) -> None:
    rng = np.random.default_rng(int(t) + 1)
    nb = 3000 if BLOCK_SIZE[t] > 1 else 20000
    raw = random_blocks(t, nb, rng)
    ref = np.asarray(gguf.quants.dequantize(raw, t), dtype=np.float32).reshape(-1)
    got = dequantize(raw, t)
    assert got.dtype == np.float32 and got.shape == (nb * BLOCK_SIZE[t],)
    assert np.all(np.isfinite(got))
    if BLOCK_SIZE[t] == 1:
        np.testing.assert_array_equal(got, ref)
    else:
        # equal up to float32 rounding of the scale products
        tol = np.abs(ref).max() * 2.0**-22
        np.testing.assert_allclose(got, ref, rtol=2.0**-22, atol=tol)


@pytest.mark.parametrize("t", [T.Q4_0, T.Q6_K, T.MXFP4], ids=lambda t: t.name)
def test_large_tensor_threads_and_chunks(t: T) -> None:
    """Past the thread threshold and not a multiple of the chunk: same answer."""
    rng = np.random.default_rng(5)
    nb = quants._PARALLEL_ELEMENTS // BLOCK_SIZE[t] + 777
    raw = random_blocks(t, nb, rng)
    ref = np.asarray(gguf.quants.dequantize(raw, t), dtype=np.float32).reshape(-1)
    np.testing.assert_array_equal(dequantize(raw, t), ref)


def test_result_is_a_fresh_writable_array() -> None:
    raw = np.arange(8, dtype=np.float32).view(np.uint8)
    raw.flags.writeable = False
    out = dequantize(raw, T.F32)
    assert out.flags.writeable and not np.shares_memory(out, raw)
    np.testing.assert_array_equal(out, np.arange(8, dtype=np.float32))


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="whole number of Q8_0 blocks"):
        dequantize(np.zeros(35, np.uint8), T.Q8_0)
    with pytest.raises(ValueError, match="hold 32 elements, not 64"):
        dequantize(np.zeros(34, np.uint8), T.Q8_0, 64)
    with pytest.raises(ValueError, match="unsupported tensor type"):
        dequantize(np.zeros(84, np.uint8), T.Q2_K)


# --- hand-built blocks ----------------------------------------------------------------
# Each block is assembled field by field as ggml-common.h lays it out; the expected values
# follow the definition directly (value = scale * quant [+ min]) with small exact numbers.


def test_float_types_by_hand() -> None:
    f32 = struct.pack("<4f", 1.0, -2.5, 3.0e38, 1.0e-45)
    np.testing.assert_array_equal(
        dequantize(np.frombuffer(f32, np.uint8), T.F32),
        np.array([1.0, -2.5, 3.0e38, 1.0e-45], np.float32),
    )
    f16 = struct.pack("<5H", 0x3C00, 0xC100, 0x7BFF, 0x0001, 0x8000)
    got = dequantize(np.frombuffer(f16, np.uint8), T.F16)
    assert got.tolist() == [1.0, -2.5, 65504.0, 2.0**-24, -0.0]
    assert np.signbit(got[4])
    bf16 = struct.pack("<4H", 0x3F80, 0xC020, 0x7F7F, 0x0001)
    got = dequantize(np.frombuffer(bf16, np.uint8), T.BF16)
    assert got.tolist() == [1.0, -2.5, float.fromhex("0x1.fep127"), 2.0**-133]


def nibble_bytes() -> bytes:
    """qs[j] = j | (15 - j) << 4: element j has quant j, element j+16 has quant 15-j."""
    return bytes(j | ((15 - j) << 4) for j in range(16))


def test_q4_0_by_hand() -> None:
    block = f16_bytes(0.5) + nibble_bytes()
    expected = [(j - 8) * 0.5 for j in range(16)] + [(15 - j - 8) * 0.5 for j in range(16)]
    assert dequantize(np.frombuffer(block, np.uint8), T.Q4_0).tolist() == expected


def test_q4_1_by_hand() -> None:
    block = f16_bytes(0.25) + f16_bytes(-1.0) + nibble_bytes()
    expected = [j * 0.25 - 1 for j in range(16)] + [(15 - j) * 0.25 - 1 for j in range(16)]
    assert dequantize(np.frombuffer(block, np.uint8), T.Q4_1).tolist() == expected


# qh = 0xAAAA5555: bit k is the 5th bit of element k. Elements 0..15 get it when k is even,
# elements 16..31 (bits 16..31) when k - 16 is odd.
QH5 = struct.pack("<I", 0xAAAA5555)


def q5_quants() -> list[int]:
    lo = [j + (16 if j % 2 == 0 else 0) for j in range(16)]
    hi = [(15 - j) + (16 if j % 2 == 1 else 0) for j in range(16)]
    return lo + hi


def test_q5_0_by_hand() -> None:
    block = f16_bytes(1.0) + QH5 + nibble_bytes()
    expected = [q - 16 for q in q5_quants()]
    assert dequantize(np.frombuffer(block, np.uint8), T.Q5_0).tolist() == expected
    assert sum(q >= 16 for q in q5_quants()) == 16  # the 5th bit is used half the time


def test_q5_1_by_hand() -> None:
    block = f16_bytes(0.5) + f16_bytes(2.0) + QH5 + nibble_bytes()
    expected = [q * 0.5 + 2.0 for q in q5_quants()]
    assert dequantize(np.frombuffer(block, np.uint8), T.Q5_1).tolist() == expected


def test_q8_0_by_hand() -> None:
    qs = [j * 8 - 128 for j in range(32)]  # -128 .. 120
    block = f16_bytes(0.125) + struct.pack("<32b", *qs)
    assert dequantize(np.frombuffer(block, np.uint8), T.Q8_0).tolist() == [q / 8 for q in qs]


# 6-bit sub-block scales and mins of Q4_K/Q5_K, covering 0 and 63 in both halves.
SC = [1, 2, 3, 63, 10, 33, 5, 62]
MN = [0, 1, 2, 3, 63, 40, 7, 17]


def quants_pattern(levels: int) -> list[int]:
    """256 quants in 0..levels-1 with no structure a wrong layout could share."""
    q = np.random.default_rng(levels).integers(0, levels, size=256).tolist()
    q[:2] = [0, levels - 1]
    return [int(v) for v in q]


def pack_k_scales(sc: list[int], mn: list[int]) -> bytes:
    """ggml's 12-byte packing: bytes 0-3 scale[0..3] (+ top 2 bits of scale[4..7]), bytes
    4-7 min[0..3] (+ top 2 bits of min[4..7]), bytes 8-11 low 4 bits of scale/min[4..7]."""
    s = [0] * 12
    for j in range(4):
        s[j] = sc[j] | ((sc[j + 4] >> 4) << 6)
        s[j + 4] = mn[j] | ((mn[j + 4] >> 4) << 6)
        s[j + 8] = (sc[j + 4] & 15) | ((mn[j + 4] & 15) << 4)
    return bytes(s)


def pack_k_nibbles(q: list[int]) -> bytes:
    """256 4-bit quants: in each 64-element group, byte l holds element l (low nibble) and
    element 32 + l (high nibble)."""
    out = bytearray(128)
    for g in range(4):
        for l in range(32):
            out[32 * g + l] = (q[64 * g + l] & 15) | ((q[64 * g + 32 + l] & 15) << 4)
    return bytes(out)


def test_q4_k_by_hand() -> None:
    q = quants_pattern(16)
    block = f16_bytes(2.0) + f16_bytes(0.5) + pack_k_scales(SC, MN) + pack_k_nibbles(q)
    assert len(block) == 144
    expected = [2.0 * SC[e // 32] * q[e] - 0.5 * MN[e // 32] for e in range(256)]
    assert dequantize(np.frombuffer(block, np.uint8), T.Q4_K).tolist() == expected


def test_q5_k_by_hand() -> None:
    q = quants_pattern(32)
    qh = bytearray(32)
    for e in range(256):  # bit (sub-block index) of qh[l] is the 5th bit of element e
        qh[e % 32] |= ((q[e] >> 4) & 1) << (e // 32)
    block = f16_bytes(2.0) + f16_bytes(0.5) + pack_k_scales(SC, MN) + bytes(qh)
    block += pack_k_nibbles(q)
    assert len(block) == 176
    expected = [2.0 * SC[e // 32] * q[e] - 0.5 * MN[e // 32] for e in range(256)]
    assert dequantize(np.frombuffer(block, np.uint8), T.Q5_K).tolist() == expected


def test_q6_k_by_hand() -> None:
    q = [v - 32 for v in quants_pattern(64)]  # signed 6-bit quants
    sc = [-128, -1, 0, 1, 127, 5, -7, 9, 11, -13, 17, 19, -23, 29, 31, -37]
    ql, qh = bytearray(128), bytearray(64)
    for e in range(256):
        half, r = divmod(e, 128)
        quarter, l = divmod(r, 32)  # quarters 0,1: low nibbles; 2,3: high nibbles
        u = q[e] + 32
        byte = 64 * half + 32 * (quarter % 2) + l
        ql[byte] |= (u & 15) << (4 * (quarter // 2))
        qh[32 * half + l] |= (u >> 4) << (2 * quarter)
    block = bytes(ql) + bytes(qh) + struct.pack("<16b", *sc) + f16_bytes(0.25)
    assert len(block) == 210
    expected = [0.25 * sc[e // 16] * q[e] for e in range(256)]
    assert dequantize(np.frombuffer(block, np.uint8), T.Q6_K).tolist() == expected


E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]  # OCP MX FP4 code points (sign in bit 3)


@pytest.mark.parametrize("e", [0, 1, 120, 127, 130, 250])
def test_mxfp4_by_hand(e: int) -> None:
    """OCP MX: value = 2^(E8M0 - 127) * E2M1(code); codes in qs as Q4_0 (low nibble =
    element j, high nibble = element j + 16)."""
    block = bytes([e]) + nibble_bytes()
    codes = list(range(16)) + [15 - j for j in range(16)]
    expected = [(-1.0 if c & 8 else 1.0) * E2M1[c & 7] * 2.0 ** (e - 127) for c in codes]
    got = dequantize(np.frombuffer(block, np.uint8), T.MXFP4)
    assert got.tolist() == expected


def test_several_blocks_keep_their_own_scales() -> None:
    blocks = b"".join(f16_bytes(d) + bytes(range(0, 32, 2)) for d in (1.0, -2.0, 0.0))
    got = dequantize(np.frombuffer(blocks, np.uint8), T.Q4_0).reshape(3, 32)
    lo = [(b & 15) - 8 for b in range(0, 32, 2)]
    hi = [(b >> 4) - 8 for b in range(0, 32, 2)]
    for row, d in zip(got, (1.0, -2.0, 0.0), strict=True):
        assert row.tolist() == [d * v for v in lo + hi]


def test_threaded_dequantize_works_in_a_forked_child() -> None:
    """The thread pool is per process: a child forked after the parent used it still gets
    its big tensors dequantized (instead of waiting forever on the parent's threads)."""
    import multiprocessing

    t = T.Q8_0
    raw = random_blocks(t, quants._PARALLEL_ELEMENTS // 32 + 5, np.random.default_rng(9))
    expected = dequantize(raw, t)  # starts the pool here
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        got = pool.apply_async(dequantize, (raw, t)).get(timeout=30)
    np.testing.assert_array_equal(got, expected)
