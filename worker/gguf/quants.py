"""NumPy dequantization of the twelve ggml tensor types the worker reads (docs/design.md).

Block layouts follow ggml (`ggml-common.h`): every quantized type stores its elements in
fixed-size blocks along the contiguous row (ne[0]); `BLOCK_SIZE[t]` elements take
`TYPE_SIZE[t]` bytes. All f16 fields are little-endian IEEE half floats.

| type  | elems | bytes | layout |
|-------|-------|-------|--------|
| Q4_0  | 32  | 18  | d:f16, qs[16]: x[j] = ((qs[j] & 15) - 8) d, x[j+16] = ((qs[j] >> 4) - 8) d |
| Q4_1  | 32  | 20  | d:f16, m:f16, qs[16]: x = q d + m, q unsigned 4-bit as Q4_0 |
| Q5_0  | 32  | 22  | d:f16, qh:u32, qs[16]: bit j of qh is bit 4 of x[j]; x = (q - 16) d |
| Q5_1  | 32  | 24  | d:f16, m:f16, qh:u32, qs[16]: x = q d + m |
| Q8_0  | 32  | 34  | d:f16, qs:i8[32]: x = qs d |
| Q4_K  | 256 | 144 | d, dmin:f16, scales[12] (8 x 6-bit scale/min), qs[128] |
| Q5_K  | 256 | 176 | d, dmin:f16, scales[12], qh[32], qs[128] |
| Q6_K  | 256 | 210 | ql[128], qh[64], scales:i8[16], d:f16 |
| MXFP4 | 32  | 17  | e:u8 (E8M0), qs[16]: x = E2M1(nibble) 2^(e-127) |

The float arithmetic follows ggml's reference C order (e.g. Q4_K computes `d*sc` then
`(d*sc)*q - dmin*m`, all float32), so results equal ggml's bit for bit except where a C
compiler contracts to FMA. Work is done in chunks of blocks so temporaries stay in cache.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import numpy.typing as npt
from gguf import GGMLQuantizationType as T

U8 = npt.NDArray[np.uint8]
F32 = npt.NDArray[np.float32]

SUPPORTED_TYPES: tuple[T, ...] = (
    T.F32,
    T.F16,
    T.BF16,
    T.Q4_0,
    T.Q4_1,
    T.Q5_0,
    T.Q5_1,
    T.Q8_0,
    T.Q4_K,
    T.Q5_K,
    T.Q6_K,
    T.MXFP4,
)

QK_K = 256

# Elements per block.
BLOCK_SIZE: dict[T, int] = {
    T.F32: 1,
    T.F16: 1,
    T.BF16: 1,
    T.Q4_0: 32,
    T.Q4_1: 32,
    T.Q5_0: 32,
    T.Q5_1: 32,
    T.Q8_0: 32,
    T.Q4_K: QK_K,
    T.Q5_K: QK_K,
    T.Q6_K: QK_K,
    T.MXFP4: 32,
}

# Bytes per block.
TYPE_SIZE: dict[T, int] = {
    T.F32: 4,
    T.F16: 2,
    T.BF16: 2,
    T.Q4_0: 2 + 16,
    T.Q4_1: 2 + 2 + 16,
    T.Q5_0: 2 + 4 + 16,
    T.Q5_1: 2 + 2 + 4 + 16,
    T.Q8_0: 2 + 32,
    T.Q4_K: 2 + 2 + 12 + QK_K // 2,
    T.Q5_K: 2 + 2 + 12 + QK_K // 8 + QK_K // 2,
    T.Q6_K: QK_K // 2 + QK_K // 4 + QK_K // 16 + 2,
    T.MXFP4: 1 + 16,
}

# E2M1 code points doubled (ggml's kvalues_mxfp4); the block scale is halved to match.
MXFP4_VALUES = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=np.float32)


def tensor_nbytes(ggml_type: T, n_elements: int) -> int:
    """Bytes taken by `n_elements` of `ggml_type` (a whole number of blocks)."""
    bs = BLOCK_SIZE[ggml_type]
    if n_elements % bs:
        raise ValueError(f"{n_elements} elements is not a multiple of the {ggml_type.name} block")
    return n_elements // bs * TYPE_SIZE[ggml_type]


def _f16(blocks: U8, start: int) -> F32:
    """The f16 field at byte `start` of every block, as a float32 column (nb, 1)."""
    return blocks[:, start : start + 2].view(np.float16).astype(np.float32)


def _e8m0_half(e: U8) -> F32:
    """ggml's GGML_E8M0_TO_FP32_HALF: 2^(e-128) as float32, exact (denormal for e < 2)."""
    e32 = e.astype(np.uint32)
    bits = np.where(e32 < 2, np.uint32(0x00200000) << e32, (e32 - 1) << 23).astype(np.uint32)
    return bits.view(np.float32)


def _nibbles32(qs: U8) -> U8:
    """16 packed bytes -> 32 values: low nibbles first, then high nibbles (Q4_0 order)."""
    nb = qs.shape[0]
    q = np.empty((nb, 32), dtype=np.uint8)
    np.bitwise_and(qs, 0x0F, out=q[:, :16])
    np.right_shift(qs, 4, out=q[:, 16:])
    return q


def _q4_0(blocks: U8, out: F32) -> None:
    d = _f16(blocks, 0)
    q = _nibbles32(blocks[:, 2:18]).view(np.int8)
    q -= 8
    np.multiply(q, d, out=out)


def _q4_1(blocks: U8, out: F32) -> None:
    d = _f16(blocks, 0)
    m = _f16(blocks, 2)
    q = _nibbles32(blocks[:, 4:20])
    np.multiply(q, d, out=out)
    out += m


def _bit_lut(set_value: int, clear_value: int) -> npt.NDArray[np.uint64]:
    """byte -> 8 bytes, byte k = set_value if bit k of the byte is set else clear_value,
    stored as one uint64 per byte value so a single gather expands a byte of bits."""
    bits = (np.arange(256)[:, None] >> np.arange(8)[None, :]) & 1
    table = np.where(bits == 1, set_value, clear_value).astype(np.int8)
    return table.view(np.uint64).reshape(256)


# Q5_0 folds the "- 16" into the 5th bit: 0 when set, -16 when clear.
_Q5_0_HIGH = _bit_lut(0, -16)
_Q5_1_HIGH = _bit_lut(16, 0)


def _q5_high(qh: U8, lut: npt.NDArray[np.uint64]) -> npt.NDArray[np.int8]:
    """qh (nb, 4) bytes of a little-endian u32 -> (nb, 32): element j from bit j."""
    return lut[qh].view(np.int8)


def _q5_0(blocks: U8, out: F32) -> None:
    d = _f16(blocks, 0)
    q = _nibbles32(blocks[:, 6:22]).view(np.int8)
    q += _q5_high(blocks[:, 2:6], _Q5_0_HIGH)
    np.multiply(q, d, out=out)


def _q5_1(blocks: U8, out: F32) -> None:
    d = _f16(blocks, 0)
    m = _f16(blocks, 2)
    q = _nibbles32(blocks[:, 8:24])
    q |= _q5_high(blocks[:, 4:8], _Q5_1_HIGH).view(np.uint8)
    np.multiply(q, d, out=out)
    out += m


def _q8_0(blocks: U8, out: F32) -> None:
    d = _f16(blocks, 0)
    np.multiply(blocks[:, 2:34].view(np.int8), d, out=out)


def _k_scales(s: U8) -> tuple[U8, U8]:
    """The 12 packed scale bytes of Q4_K/Q5_K -> (scale[8], min[8]), 6 bits each."""
    nb = s.shape[0]
    s0, s1, s2 = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.empty((nb, 8), dtype=np.uint8)
    mn = np.empty((nb, 8), dtype=np.uint8)
    np.bitwise_and(s0, 63, out=sc[:, :4])
    np.bitwise_and(s1, 63, out=mn[:, :4])
    sc[:, 4:] = (s2 & 0x0F) | ((s0 >> 6) << 4)
    mn[:, 4:] = (s2 >> 4) | ((s1 >> 6) << 4)
    return sc, mn


def _k_apply(q: U8, blocks: U8, out: F32) -> None:
    """out = (d*sc) * q - (dmin*m) per 32-element sub-block; q is (nb, 8, 32)."""
    d = _f16(blocks, 0)
    dmin = _f16(blocks, 2)
    sc, mn = _k_scales(blocks[:, 4:16])
    ds = (d * sc)[:, :, None]
    dm = (dmin * mn)[:, :, None]
    o = out.reshape(-1, 8, 32)
    np.multiply(q, ds, out=o)
    o -= dm


def _q4_k(blocks: U8, out: F32) -> None:
    nb = blocks.shape[0]
    qs = blocks[:, 16:144].reshape(nb, 4, 1, 32)
    q = np.empty((nb, 4, 2, 32), dtype=np.uint8)
    np.bitwise_and(qs, 0x0F, out=q[:, :, :1])
    np.right_shift(qs, 4, out=q[:, :, 1:])
    _k_apply(q.reshape(nb, 8, 32), blocks, out)


_SHIFT8 = np.arange(8, dtype=np.uint8)[None, :, None]


def _q5_k(blocks: U8, out: F32) -> None:
    nb = blocks.shape[0]
    qh = blocks[:, 16:48].reshape(nb, 1, 32)
    qs = blocks[:, 48:176].reshape(nb, 4, 1, 32)
    q = np.empty((nb, 4, 2, 32), dtype=np.uint8)
    np.bitwise_and(qs, 0x0F, out=q[:, :, :1])
    np.right_shift(qs, 4, out=q[:, :, 1:])
    q8 = q.reshape(nb, 8, 32)
    # Sub-block s takes bit 4 of each value from bit s of qh[l].
    hb = (qh >> _SHIFT8) & 1
    hb <<= 4
    q8 |= hb
    _k_apply(q8, blocks, out)


_SHIFT_Q6 = np.array([0, 2, 4, 6], dtype=np.uint8)[None, None, :, None]


def _q6_k(blocks: U8, out: F32) -> None:
    nb = blocks.shape[0]
    ql = blocks[:, 0:128].reshape(nb, 2, 2, 32)  # [half][first/second 32 bytes][l]
    qh = blocks[:, 128:192].reshape(nb, 2, 1, 32)
    sc = blocks[:, 192:208].view(np.int8)
    d = _f16(blocks, 208)
    # Per half of 128: values 0..31 and 32..63 from low nibbles of ql[0:32], ql[32:64];
    # values 64..95 and 96..127 from their high nibbles; 2 high bits each from qh[l].
    q = np.empty((nb, 2, 4, 32), dtype=np.uint8)
    np.bitwise_and(ql, 0x0F, out=q[:, :, 0:2])
    np.right_shift(ql, 4, out=q[:, :, 2:4])
    hb = (qh >> _SHIFT_Q6) & 3
    hb <<= 4
    q |= hb
    qi = q.view(np.int8)
    qi -= 32
    ds = (d * sc)[:, :, None]  # one scale per 16 values
    np.multiply(qi.reshape(nb, 16, 16), ds, out=out.reshape(nb, 16, 16))


def _mxfp4(blocks: U8, out: F32) -> None:
    d = _e8m0_half(blocks[:, 0:1])
    q = _nibbles32(blocks[:, 1:17])
    np.multiply(MXFP4_VALUES[q], d, out=out)


_BLOCK_FUNCS: dict[T, Callable[[U8, F32], None]] = {
    T.Q4_0: _q4_0,
    T.Q4_1: _q4_1,
    T.Q5_0: _q5_0,
    T.Q5_1: _q5_1,
    T.Q8_0: _q8_0,
    T.Q4_K: _q4_k,
    T.Q5_K: _q5_k,
    T.Q6_K: _q6_k,
    T.MXFP4: _mxfp4,
}

# Elements per chunk of work: big enough to amortise NumPy call overhead, small enough that
# the uint8/float32 temporaries stay in the L2 cache.
_CHUNK_ELEMENTS = 1 << 15
# Tensors this large are split over a few threads (NumPy releases the GIL in its loops).
_PARALLEL_ELEMENTS = 1 << 21
_MAX_THREADS = 4
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _threads() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        n = os.cpu_count() or 1
    return max(1, min(_MAX_THREADS, n))


def _get_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(_threads(), thread_name_prefix="dequant")
        return _pool


def _forget_pool_in_child() -> None:
    # A forked child inherits the pool object but not its threads: start a fresh one.
    global _pool
    _pool = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_in_child)


def _run_blocks(func: Callable[[U8, F32], None], blocks: U8, out: F32, step: int) -> None:
    for start in range(0, blocks.shape[0], step):
        stop = start + step
        func(blocks[start:stop], out[start:stop])


def dequantize(
    raw: npt.NDArray[np.uint8], ggml_type: T, n_elements: int | None = None
) -> npt.NDArray[np.float32]:
    """Dequantize the bytes `raw` of a `ggml_type` tensor to a new flat float32 array.

    `raw` is a uint8 array (any shape, contiguous, e.g. a read-only memory-mapped view);
    `n_elements`, when given, must match its size. The result never aliases `raw`.
    """
    if ggml_type not in BLOCK_SIZE:
        raise ValueError(f"unsupported tensor type {ggml_type!r}")
    data = np.ascontiguousarray(raw).reshape(-1)
    if data.dtype != np.uint8:
        data = data.view(np.uint8)
    bs, ts = BLOCK_SIZE[ggml_type], TYPE_SIZE[ggml_type]
    if data.size % ts:
        raise ValueError(f"{data.size} bytes is not a whole number of {ggml_type.name} blocks")
    nb = data.size // ts
    if n_elements is not None and n_elements != nb * bs:
        raise ValueError(
            f"{data.size} bytes of {ggml_type.name} hold {nb * bs} elements, not {n_elements}"
        )
    if ggml_type == T.F32:
        return data.view(np.float32).copy()
    if ggml_type == T.F16:
        return data.view(np.float16).astype(np.float32)
    if ggml_type == T.BF16:
        return (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    func = _BLOCK_FUNCS[ggml_type]
    blocks = data.reshape(nb, ts)
    out = np.empty((nb, bs), dtype=np.float32)
    step = max(1, _CHUNK_ELEMENTS // bs)
    n_threads = _threads() if nb * bs >= _PARALLEL_ELEMENTS else 1
    if n_threads == 1:
        _run_blocks(func, blocks, out, step)
    else:
        per = -(-nb // n_threads)
        futures = [
            _get_pool().submit(_run_blocks, func, blocks[i : i + per], out[i : i + per], step)
            for i in range(0, nb, per)
        ]
        for fut in futures:
            fut.result()
    return out.reshape(-1)
