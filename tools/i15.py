"""Products on 15-bit activations against quantized weight codes (cuda_src/i15.cu;
docs/kernels.md, "Integer products"): Q4_K, Q5_K, Q6_K (a float step a super-block) and Q4_0,
Q5_0, Q8_0, MXFP4 (a float step a block of 32). The launches, and a NumPy float32 twin that
takes the kernels' rounded steps in the same order, so the two agree bit for bit
(tests/unit/test_i15_emu.py on the CPU, tests/gpu/test_i15.py on the GPU). Timing:
`python3 -m tools.skinny_sweep --i15 --shapes phi3.gate_up,qwen.gate_up --rows 1,8,64`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

STEPS = 16256  # 127 * 128: the codes' range
P8_ROWS = 8  # steps of up to this many rows take gemm15p8 (plans.i15.I15_P8_ROWS)
GEMM_ROWS = 64  # weight rows a block of 4 warps
GEMM_TOK = 32  # rows of X a gemm15p block


def gemmp_slot(qtype: int, tok: int = GEMM_TOK, rows: int = GEMM_ROWS) -> int:
    """Shared bytes of one super-block (legacy: chunk of 8 blocks) gemm15p (tok 32) or
    gemm15p8 (tok 8) stages for `rows` weight rows a block: the worker's layout
    (worker.backends.cuda.plans.i15.i15_gemmp_slot)."""
    from worker.backends.cuda.plans.i15 import i15_gemmp_slot

    return i15_gemmp_slot(qtype, BYTES.get(qtype, 0), tok, rows)


def gemmp_shared(
    qtype: int, k: int, splits: int, tok: int = GEMM_TOK, rows: int = GEMM_ROWS
) -> int:
    """gemm15p's (gemm15p8's with tok 8) dynamic shared memory: a slot for each super-block
    (legacy: chunk) of a split, at most as many as the worker's ring holds
    (plans.i15.i15_dense_slots)."""
    if qtype in LEGACY:
        per = legacy_split_blocks(k, splits) // CHUNK
    else:
        per = -(-(k // 256) // splits)
    from worker.backends.cuda.plans.i15 import i15_dense_slots

    return min(per, i15_dense_slots(tok)) * gemmp_slot(qtype, tok, rows)


def block_of(qtype: int) -> int:
    """Elements a scale of X covers for this weight format: its float-step block."""
    return 32 if qtype in LEGACY else 256


# ---------------------------------------------------------------- NumPy twin (float32 steps)


def quant_x15(
    x: np.ndarray, blk: int = 256
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(hi, lo, d, sq): int8 planes [m, k], d per block of `blk` [m, k / blk], sq per 32."""
    m, k = x.shape
    xb = x.reshape(m, k // blk, blk).astype(np.float32)
    d = (np.abs(xb).max(axis=2) / np.float32(STEPS)).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(d[..., None] > 0, np.rint(xb / d[..., None]), 0).astype(np.int64)
    q = np.clip(q, -STEPS, STEPS).reshape(m, k)
    hi = np.rint(q.astype(np.float32) * np.float32(1 / 128)).astype(np.int64)
    lo = q - 128 * hi
    return (
        hi.astype(np.int8),
        lo.astype(np.int8),
        d,
        q.reshape(m, k // 32, 32).sum(axis=2).astype(np.int32),
    )


Q4_K, Q5_K, Q6_K = 12, 13, 14
BYTES = {Q4_K: 144, Q5_K: 176, Q6_K: 210}  # a super-block of 256


def k_fields(
    raw: np.ndarray, k: int, qtype: int = Q4_K
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Q4_K / Q5_K rows as (d [n, nsb], dmin [n, nsb], sc [n, nsb, 8], m [n, nsb, 8],
    codes [n, nsb, 8, 32]): element l of sub-block s is d*sc*code - dmin*m."""
    n = raw.shape[0]
    blk = raw.reshape(n, k // 256, BYTES[qtype])
    d = blk[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    dmin = blk[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    s = blk[..., 4:16].astype(np.int64)
    sc = np.empty((n, k // 256, 8), np.int64)
    mn = np.empty_like(sc)
    for j in range(8):
        if j < 4:
            sc[..., j] = s[..., j] & 63
            mn[..., j] = s[..., j + 4] & 63
        else:
            sc[..., j] = (s[..., j + 4] & 0xF) | ((s[..., j - 4] >> 6) << 4)
            mn[..., j] = (s[..., j + 4] >> 4) | ((s[..., j] >> 6) << 4)
    qs = blk[..., BYTES[qtype] - 128 :].reshape(n, k // 256, 4, 32).astype(np.int64)
    codes = np.stack([qs & 0xF, qs >> 4], axis=3).reshape(n, k // 256, 8, 32)
    if qtype == Q5_K:  # bit s of qh[l] is the fifth bit of element l of sub-block s
        qh = blk[..., 16:48].astype(np.int64)
        codes = codes | (((qh[..., None, :] >> np.arange(8)[:, None]) & 1) << 4)
    return d, dmin, sc, mn, codes


def q6_k_fields(raw: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q6_K rows as (d [n, nsb], sc [n, nsb, 16] int8 scales, codes [n, nsb, 16, 16] signed
    q - 32): element l of sub-block s (16 wide) is d*sc*code."""
    n = raw.shape[0]
    blk = raw.reshape(n, k // 256, 210)
    ql = blk[..., 0:128].astype(np.int64).reshape(n, -1, 2, 2, 32)  # [half][ql +0/+32][l]
    qh = blk[..., 128:192].astype(np.int64).reshape(n, -1, 2, 32)  # [half][l]
    sc = blk[..., 192:208].copy().view(np.int8).astype(np.int64)
    d = blk[..., 208:210].copy().view(np.float16)[..., 0].astype(np.float32)
    q = np.empty((n, k // 256, 2, 4, 32), np.int64)  # [half][r][l]: element 128h + 32r + l
    for r in range(4):
        nib = (ql[:, :, :, r & 1, :] >> (4 * (r >> 1))) & 0xF
        q[:, :, :, r, :] = nib | (((qh >> (2 * r)) & 3) << 4)
    return d, sc, (q - 32).reshape(n, k // 256, 16, 16)


Q4_0, Q5_0, Q8_0, MXFP4 = 2, 6, 8, 39
LEGACY = (Q4_0, Q5_0, Q8_0, MXFP4)  # blocks of 32, one float step each, X scaled per 32 too
LEGACY_BYTES = {Q4_0: 18, Q5_0: 22, Q8_0: 34, MXFP4: 17}
LEGACY_OFF = {Q4_0: 8, Q5_0: 16, Q8_0: 0, MXFP4: 0}  # value = d * (q - off)
# MXFP4's E2M1 codes as ggml's doubled values (sign in bit 3)
E2M1 = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], np.int64)
CHUNK = 8  # blocks of 32 a chunk: the legacy splits are whole chunks


def legacy_fields(raw: np.ndarray, k: int, qtype: int) -> tuple[np.ndarray, np.ndarray]:
    """Q4_0 / Q5_0 / Q8_0 / MXFP4 rows as (d [n, k / 32], codes [n, k / 32, 32] signed
    q - off, or MXFP4's doubled E2M1 values): element l of block b is d * code."""
    n = raw.shape[0]
    blk = raw.reshape(n, k // 32, LEGACY_BYTES[qtype])
    if qtype == MXFP4:  # d = 2^(e - 128), exact in float32 (e < 2: a subnormal)
        e = blk[..., 0].astype(np.float64)
        d = np.ldexp(np.float64(1), (e - 128).astype(np.int64)).astype(np.float32)
        qs = blk[..., 1:17].astype(np.int64)
        return d, E2M1[np.concatenate([qs & 0xF, qs >> 4], axis=2)]
    d = blk[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if qtype == Q8_0:
        return d, blk[..., 2:34].copy().view(np.int8).astype(np.int64)
    qs = blk[..., -16:].astype(np.int64)
    q = np.concatenate([qs & 0xF, qs >> 4], axis=2)  # elements 0-15 low nibbles, 16-31 high
    if qtype == Q5_0:  # bit l of the little-endian qh is element l's fifth bit
        qh = blk[..., 2:6].copy().view("<u4")[..., 0].astype(np.int64)
        q = q | (((qh[..., None] >> np.arange(32)) & 1) << 4)
    return d, q - LEGACY_OFF[qtype]


def legacy_split_blocks(k: int, splits: int) -> int:
    """Blocks of 32 a split of the legacy cores: whole chunks of 8, as even as they go."""
    chunks = -(-(k // 32) // CHUNK)
    return CHUNK * -(-chunks // splits)


def legacy_twin(raw: np.ndarray, x: np.ndarray, splits: int, qtype: int) -> np.ndarray:
    """y [m, n] as the legacy cores compute it: V = 128·S_hi + S_lo exact per block, then
    y += dx·(d·float(V)) block by block in K order within a split, splits added in order."""
    m, k = x.shape
    nb = k // 32
    hi, lo, dx, _ = quant_x15(x, 32)
    d, c = legacy_fields(raw, k, qtype)
    q = (128 * hi.astype(np.int64) + lo).reshape(m, nb, 32)
    v = np.einsum("nbi,tbi->tnb", c, q)
    assert np.abs(v).max(initial=0) < 2**31  # the kernels' int32
    f32 = np.float32
    wv = d[None] * v.astype(f32)  # [t, n, b]
    per = legacy_split_blocks(k, splits)
    out = None
    for z in range(splits):
        y = np.zeros((m, raw.shape[0]), f32)
        for b in range(z * per, min(nb, (z + 1) * per)):
            y = y + dx[:, b, None] * wv[:, :, b]
        out = y if out is None else out + y
    assert out is not None
    return out


def product_twin(raw: np.ndarray, x: np.ndarray, splits: int, qtype: int = Q4_K) -> np.ndarray:
    """y [m, n] as every core computes it: exact integer sums, then the float32 steps
    (Q6_K: no minimum, so dmin = 0 and U = 0, and the step is d·(128·T_hi + T_lo); the
    legacy formats: `legacy_twin`)."""
    if qtype in LEGACY:
        return legacy_twin(raw, x, splits, qtype)
    m, k = x.shape
    n = raw.shape[0]
    nsb = k // 256
    hi, lo, dx, sq = quant_x15(x, 256)
    if qtype == Q6_K:
        d, sc, c = q6_k_fields(raw, k)
        dmin, sb = np.zeros_like(d), 16
        u = np.zeros((m, n, nsb), np.int64)
    else:
        d, dmin, sc, mn, c = k_fields(raw, k, qtype)
        sb = 8
        u = np.einsum("njs,tjs->tnj", mn, sq.reshape(m, nsb, 8).astype(np.int64))
    hb = hi.reshape(m, nsb, sb, 256 // sb).astype(np.int64)
    lb = lo.reshape(m, nsb, sb, 256 // sb).astype(np.int64)
    th = np.einsum("njs,njsi,tjsi->tnj", sc, c, hb)  # sum over sub-blocks of sc * S_hi
    tl = np.einsum("njs,njsi,tjsi->tnj", sc, c, lb)
    for a in (th, tl, u):
        assert np.abs(a).max(initial=0) < 2**31  # the kernels' int32
    f32 = np.float32
    v = (f32(128) * th.astype(f32)) + tl.astype(f32)
    wv = (d[None] * v) - (dmin[None] * u.astype(f32))
    per = -(-nsb // splits)
    out = None
    for z in range(splits):
        y = np.zeros((m, n), f32)
        for j in range(z * per, min(nsb, (z + 1) * per)):
            y = y + dx[:, j, None] * wv[:, :, j]
        out = y if out is None else out + y
    assert out is not None
    return out


# ---------------------------------------------------------------- launches


class I15:
    """The launches: pre-pass, one of the two cores, split sum. `mod` is the compiled i15
    module (PyCUDA's, or tools.kernel_emu's with NumPy arrays for buffers)."""

    def __init__(self, mod: Any, qtype: int = Q4_K) -> None:
        name = {Q4_K: "q4_k", Q5_K: "q5_k", Q6_K: "q6_k", Q4_0: "q4_0", Q5_0: "q5_0"}.get(
            qtype, "mxfp4" if qtype == MXFP4 else "q8_0"
        )
        self.qtype = qtype
        self.quant = mod.get_function("quant_x15")
        self.gemmp = mod.get_function(f"gemm15p_{name}")
        self.gemmp8 = mod.get_function(f"gemm15p8_{name}")  # one n8 tile: 8 rows a block
        # gemm15p, its splits folded (no Q6_K form: i15_fold never picks it)
        self.gemmpf = None if qtype == Q6_K else mod.get_function(f"gemm15pf_{name}")
        self.blk = block_of(qtype)
        self.reduce = mod.get_function("i15_reduce")
        if hasattr(self.gemmp, "set_attribute"):  # PyCUDA's, as MatmulKernels sets its own:
            # the largest shared-memory carveout (the context prefers L1, which leaves room for
            # fewer blocks an SM) and gemm15p's dynamic shared memory above 48 KB
            from worker.backends.cuda.matmul import allow_dynamic_shared, prefer_shared

            for fn in (self.quant, self.gemmp, self.gemmp8, self.gemmpf, self.reduce):
                if fn is not None:
                    prefer_shared(fn)
            allow_dynamic_shared(self.gemmp, "gemm15p", 3 * gemmp_slot(qtype))
            if self.gemmpf is not None:
                allow_dynamic_shared(self.gemmpf, "gemm15pf", 3 * gemmp_slot(qtype))
            allow_dynamic_shared(self.gemmp8, "gemm15p8", 3 * gemmp_slot(qtype, 8))

    @staticmethod
    def shapes(
        m: int, k: int, n: int, splits: int, blk: int = 256
    ) -> dict[str, tuple[tuple[int, ...], Any]]:
        return {
            "hi": ((m, k), np.int8),
            "lo": ((m, k), np.int8),
            "d": ((m, k // blk), np.float32),
            "sq": ((m, k // 32), np.int32),
            "part": ((splits, m, n), np.float32),
            # a ticket per output tile (at most one a 32 weight rows x 8 rows of X): zeros
            # between launches
            "tickets": ((-(-n // 32) * -(-m // 8),), np.int32),
        }

    def buffers(self, m: int, k: int, n: int, splits: int) -> dict[str, Any]:
        import pycuda.gpuarray as ga

        shapes = self.shapes(m, k, n, splits, self.blk)
        return {key: (ga.zeros if key == "tickets" else ga.empty)(*v) for key, v in shapes.items()}

    def run(
        self,
        w: Any,
        x: Any,
        y: Any,
        m: int,
        n: int,
        k: int,
        splits: int,
        b: dict[str, Any],
        stream: Any = None,
        core: str = "auto",
        fused: bool = False,
    ) -> None:
        """y = x w^T by the staged tensor-core core ("gemmp": 32 rows of X a block; "gemmp8":
        one n8 tile, 8 rows a block; "gemmpf": gemmp with one block a tile folding its
        splits; "auto": gemmp8 up to 8 rows, as the worker picks). The splits' partials are
        summed by i15_reduce, or with `fused` by the core itself (its last block of a tile;
        b["tickets"] must be zeros), as the worker runs it."""
        i32 = np.int32
        if core == "auto":
            core = "gemmp8" if m <= P8_ROWS else "gemmp"
        assert core in ("gemmp", "gemmp8", "gemmpf"), core
        assert core != "gemmpf" or self.gemmpf is not None, "no folded Q6_K core"
        fold = core == "gemmpf"
        self.quant(
            x, np.int64(k), i32(m), i32(k), i32(self.blk), b["hi"], b["lo"], b["d"], b["sq"],
            block=(256, 1, 1), grid=(-(-k // 256), m), stream=stream,
        )  # fmt: skip
        null = np.intp(0)
        out = (
            (y, null, null, np.int64(n), b["tickets"])
            if fused
            else (null, null, null, np.int64(0), null)
        )
        args = (w, i32(n), i32(k), b["hi"], b["lo"], b["d"], b["sq"], i32(m), i32(splits))
        tok = 8 if core == "gemmp8" else GEMM_TOK
        fn = {"gemmp8": self.gemmp8, "gemmpf": self.gemmpf}.get(core, self.gemmp)
        fn(
            *args, b["part"], *out, block=(128, 1, 1),
            grid=((n + GEMM_ROWS - 1) // GEMM_ROWS, (m + tok - 1) // tok, 1 if fold else splits),
            shared=gemmp_shared(self.qtype, k, 1 if fold else splits, tok), stream=stream,
        )  # fmt: skip
        if not fused:
            self.reduce(
                b["part"], i32(n), i32(m), i32(1 if fold else splits), y,
                block=(256, 1, 1), grid=((n + 255) // 256, m), stream=stream,
            )  # fmt: skip
