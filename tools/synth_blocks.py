"""Random tensor data in ggml's block layouts, generated fast and streamed to a file.

Quantized tensors are not produced by quantizing floats (there is no NumPy quantizer for the
K-quants, and quantizing 12 GB of floats would take far too long). Instead each chunk of
blocks starts as raw random bytes from the bit generator (a few GB/s) and the fields that
control magnitude are then overwritten, vectorized over all blocks of the chunk:

* f16 scales `d` (and `dmin` / `m` where the format has them) are set so that the
  dequantized values have roughly the requested standard deviation and mean zero, with a
  +-25 % per-block jitter (taken from the random bytes already in place);
* K-quant 6-bit sub-block scales and mins are random in a narrow range and packed exactly as
  ggml packs them, Q6_K's int8 sub-block scales are random with random sign;
* MXFP4's E8M0 exponent byte is 2^-8 or 2^-9 (for the default std 0.02).

Quant nibbles / bytes stay uniformly random, which exercises every code point of every
format. All values are finite and no f16 scale is subnormal for the default std 0.02.
F32/F16/BF16 values are normal draws taken from a 65536-level quantile table by random 16-bit
indices (exactly reproducible, ~5x faster than `standard_normal`).
"""

from __future__ import annotations

import functools
from typing import BinaryIO

import numpy as np
import numpy.typing as npt
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

T = GGMLQuantizationType

CHUNK_BYTES = 64 << 20

# Standard deviation of the integer code of one element for uniform random bits.
_STD_UNIFORM_4 = float(np.sqrt((16**2 - 1) / 12))  # 4.61, codes 0..15
_STD_UNIFORM_5 = float(np.sqrt((32**2 - 1) / 12))  # 9.23, codes 0..31
_STD_UNIFORM_6 = float(np.sqrt((64**2 - 1) / 12))  # 18.5, codes 0..63
_STD_INT8 = float(np.sqrt((256**2 - 1) / 12))  # 73.9, int8 -128..127
# RMS of ggml's doubled E2M1 table {0,1,2,3,4,6,8,12} (both signs) used by MXFP4.
_RMS_MXFP4 = float(np.sqrt(np.mean(np.square([0, 1, 2, 3, 4, 6, 8, 12]))))

FLOAT_TYPES = (T.F32, T.F16, T.BF16)


def block_size(qtype: GGMLQuantizationType) -> int:
    """Elements per block (1 for float types)."""
    return GGML_QUANT_SIZES[qtype][0]


def type_size(qtype: GGMLQuantizationType) -> int:
    """Bytes per block."""
    return GGML_QUANT_SIZES[qtype][1]


def tensor_nbytes(qtype: GGMLQuantizationType, n_elements: int) -> int:
    bs, ts = GGML_QUANT_SIZES[qtype]
    if n_elements % bs:
        raise ValueError(f"{n_elements} elements is not a whole number of {qtype.name} blocks")
    return n_elements // bs * ts


def _raw(rng: np.random.Generator, nbytes: int) -> npt.NDArray[np.uint8]:
    n64 = (nbytes + 7) // 8
    words = rng.bit_generator.random_raw(n64)
    assert isinstance(words, np.ndarray)
    return words.view(np.uint8)[:nbytes]


def _jitter(b: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    """Per-block factor in [0.75, 1.25) from one random byte per block."""
    return np.float32(0.75) + b.astype(np.float32) * np.float32(0.5 / 256)


_BYTES = np.arange(256, dtype=np.uint8)


def _f16_bits(values: npt.NDArray[np.float32]) -> npt.NDArray[np.uint16]:
    """float32 values -> their f16 bit patterns."""
    return values.astype("<f2").view(np.uint16)


def _set_f16(blocks: npt.NDArray[np.uint8], at: int, bits: npt.NDArray[np.uint16]) -> None:
    """Store one f16 per block at byte offset `at` (even; every block size used is even)."""
    blocks.view("<u2")[:, at // 2] = bits


def _pack_k_scales(sc: npt.NDArray[np.uint8], m: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """Pack 8 six-bit scales and 8 six-bit mins per block into ggml's 12-byte layout."""
    out = np.empty((sc.shape[0], 12), dtype=np.uint8)
    lo_sc, hi_sc = sc[:, :4], sc[:, 4:]
    lo_m, hi_m = m[:, :4], m[:, 4:]
    out[:, 0:4] = lo_sc | ((hi_sc >> 4) << 6)
    out[:, 4:8] = lo_m | ((hi_m >> 4) << 6)
    out[:, 8:12] = (hi_sc & 0x0F) | ((hi_m & 0x0F) << 4)
    return out


def _k_scales(
    blocks: npt.NDArray[np.uint8], at: int
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
    """Random 6-bit scales in [8, 39] and mins = scale +- 1, from the bytes in place (every
    bit of both six-bit fields takes both values, so a kernel's unpacking of them is tested)."""
    src = blocks[:, at : at + 12]
    sc = (8 + src[:, :8] % 32).astype(np.uint8)
    noise = (src[:, 8:12] % 3).astype(np.int16) - 1
    m = (sc[:, :4].astype(np.int16) + noise).astype(np.uint8)
    m = np.concatenate([m, (sc[:, 4:].astype(np.int16) - noise).astype(np.uint8)], axis=1)
    return sc, m


def random_blocks(
    qtype: GGMLQuantizationType,
    n_blocks: int,
    rng: np.random.Generator,
    std: float,
) -> npt.NDArray[np.uint8]:
    """`n_blocks` random blocks of a quantized type as a (n_blocks, type_size) uint8 array
    whose dequantized values have mean ~0 and standard deviation ~`std`."""
    ts = type_size(qtype)
    blocks = _raw(rng, n_blocks * ts).reshape(n_blocks, ts)
    # Scales are functions of one or two random bytes already in the block, so they are
    # computed once per byte value and gathered (much faster than per-block float math).
    if qtype == T.Q8_0:  # f16 d, int8 qs[32]
        d = std / _STD_INT8 * _jitter(_BYTES)
        _set_f16(blocks, 0, _f16_bits(d)[blocks[:, 0]])
    elif qtype in (T.Q4_0, T.Q5_0):  # f16 d, (qh[4]), qs[16]: (q - 8|16) * d
        # The codes are offset by -1/2 on average; a random sign of d (ggml's own d is
        # signed for these formats) keeps the tensor mean at zero.
        q_std = _STD_UNIFORM_4 if qtype == T.Q4_0 else _STD_UNIFORM_5
        d = std / q_std * _jitter(_BYTES)
        table = _f16_bits(np.concatenate([d, -d]))  # index: jitter byte + 256 * sign bit
        idx = blocks[:, 0].astype(np.intp) + ((blocks[:, 1] & 1).astype(np.intp) << 8)
        _set_f16(blocks, 0, table[idx])
    elif qtype in (T.Q4_1, T.Q5_1):  # f16 d, f16 m, ...: q * d + m
        q_std, q_mean = (_STD_UNIFORM_4, 7.5) if qtype == T.Q4_1 else (_STD_UNIFORM_5, 15.5)
        d = std / q_std * _jitter(_BYTES)
        m = -q_mean * d[:, None] * (np.float32(0.9) + np.float32(0.2 / 256) * _BYTES[None, :])
        d_tab, m_tab = _f16_bits(d), _f16_bits(m.astype(np.float32).ravel())
        b0, b2 = blocks[:, 0].astype(np.intp), blocks[:, 2].astype(np.intp)
        _set_f16(blocks, 2, m_tab[(b0 << 8) + b2])
        _set_f16(blocks, 0, d_tab[b0])
    elif qtype in (T.Q4_K, T.Q5_K):  # f16 d, f16 dmin, scales[12], (qh[32]), qs[128]
        q_std, q_mean = (_STD_UNIFORM_4, 7.5) if qtype == T.Q4_K else (_STD_UNIFORM_5, 15.5)
        sc, m = _k_scales(blocks, 4)
        d = std / (q_std * 23.5) * _jitter(_BYTES)
        # value = d*sc*q - dmin*m with m ~ sc: dmin = d*mean(q) centres every sub-block.
        dmin = d * np.float32(q_mean)
        jit = blocks[:, 0].copy()
        _set_f16(blocks, 0, _f16_bits(d)[jit])
        _set_f16(blocks, 2, _f16_bits(dmin)[jit])
        blocks[:, 4:16] = _pack_k_scales(sc, m)
    elif qtype == T.Q6_K:  # ql[128], qh[64], int8 scales[16], f16 d: d*sc*(q - 32)
        raw_sc = blocks[:, 192:208]
        mag = (4 + raw_sc % 12).astype(np.int8)
        sign = np.where(raw_sc & 0x80, -1, 1).astype(np.int8)
        blocks[:, 192:208] = (mag * sign).view(np.uint8)
        d = std / (_STD_UNIFORM_6 * 9.5) * _jitter(_BYTES)
        _set_f16(blocks, 208, _f16_bits(d)[blocks[:, 208]])
    elif qtype == T.MXFP4:  # e8m0 e, qs[16]: kvalue * 2^(e - 128)
        # exponent = centre or centre - 1 (RMS factor ~0.79 of the centre's)
        center = round(float(np.log2(std / _RMS_MXFP4))) + 128
        blocks[:, 0] = (center - (blocks[:, 0] & 1)).astype(np.uint8)
    else:
        raise ValueError(f"no random block generator for {qtype.name}")
    return blocks


def to_bf16_bits(x: npt.NDArray[np.float32]) -> npt.NDArray[np.uint16]:
    """float32 -> bfloat16 bit patterns, rounding to nearest even (finite inputs)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    return (rounded >> np.uint32(16)).astype(np.uint16)


@functools.cache
def _normal_levels() -> npt.NDArray[np.float64]:
    """65536 sorted standard-normal levels (an empirical quantile table, exactly mean 0 and
    std 1). A random 16-bit index into it is a normal draw at a fraction of the cost of
    `standard_normal`, which matters for multi-GB F16/F32 files."""
    x = np.sort(np.random.Generator(np.random.SFC64(0x5EED)).standard_normal(1 << 16))
    return (x - x.mean()) / x.std()


def random_floats(
    qtype: GGMLQuantizationType,
    n: int,
    rng: np.random.Generator,
    std: float,
    mean: float = 0.0,
) -> npt.NDArray[np.generic]:
    """`n` normal values N(mean, std) stored as F32, F16 or BF16 (BF16 as uint16 bits)."""
    levels = (_normal_levels() * std + mean).astype(np.float32)
    table: npt.NDArray[np.generic]
    if qtype == T.F32:
        table = levels
    elif qtype == T.F16:
        table = levels.astype(np.float16)
    elif qtype == T.BF16:
        table = to_bf16_bits(levels)
    else:
        raise ValueError(f"{qtype.name} is not a float type")
    idx = _raw(rng, 2 * n).view("<u2")
    return table[idx]


def write_random_tensor(
    fout: BinaryIO,
    qtype: GGMLQuantizationType,
    n_elements: int,
    rng: np.random.Generator,
    std: float,
    mean: float = 0.0,
    values: npt.NDArray[np.float32] | None = None,
) -> int:
    """Stream one tensor's data to `fout` in chunks of about CHUNK_BYTES; return bytes written.

    `values`, when given, are written instead of random data (float types only)."""
    if values is not None:
        if qtype not in FLOAT_TYPES:
            raise ValueError("explicit values need a float type")
        v = values.astype(np.float32).ravel()
        if v.size != n_elements:
            raise ValueError("explicit values have the wrong size")
        data: npt.NDArray[np.generic] = v
        if qtype == T.F16:
            data = v.astype(np.float16)
        elif qtype == T.BF16:
            data = to_bf16_bits(v)
        fout.write(data.tobytes())
        return int(data.nbytes)
    written = 0
    if qtype in FLOAT_TYPES:
        per_chunk = max(4, CHUNK_BYTES // 16 * 4)  # whole 64-bit words of 16-bit indices
        left = n_elements
        while left:
            n = min(per_chunk, left)
            chunk = random_floats(qtype, n, rng, std, mean)
            fout.write(chunk.data)
            written += chunk.nbytes
            left -= n
        return written
    if mean:
        raise ValueError("quantized random tensors are zero-mean")
    bs, ts = GGML_QUANT_SIZES[qtype]
    if n_elements % bs:
        raise ValueError(f"{n_elements} elements is not a whole number of {qtype.name} blocks")
    n_blocks = n_elements // bs
    per_chunk = max(1, CHUNK_BYTES // ts)
    while n_blocks:
        n = min(per_chunk, n_blocks)
        blocks = random_blocks(qtype, n, rng, std)
        fout.write(blocks.data)
        written += blocks.nbytes
        n_blocks -= n
    return written


def random_matrix(
    qtype: int, rows: int, cols: int, rng: np.random.Generator, *, std: float = 0.02
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32]]:
    """Random weights for kernel tests and benchmarks: (raw bytes [rows, row_bytes] in the
    ggml layout, their NumPy dequantization [rows, cols] from worker.gguf.quants)."""
    from gguf import GGMLQuantizationType

    from worker.backends.cuda.quant_layout import layout
    from worker.gguf.quants import dequantize

    lay = layout(qtype)
    qt = GGMLQuantizationType(lay.type_id)
    rb = lay.row_bytes(cols)
    if qt in FLOAT_TYPES:
        raw = random_floats(qt, rows * cols, rng, std).view(np.uint8).reshape(rows, rb)
    else:
        raw = random_blocks(qt, rows * cols // lay.qk, rng, std).reshape(rows, rb)
    dense = dequantize(raw, qt).reshape(rows, cols)
    return np.ascontiguousarray(raw), dense
