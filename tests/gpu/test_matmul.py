"""On-device checks of the decode gemv and prefill gemm kernels against the NumPy reference.

Reference: worker.gguf.quants dequantizes the same random blocks (tools.synth_blocks,
every code point of every format), the product is taken in float64.
Bounds, as ||y - ref|| / ||ref||:
* gemv: FP32 products and sums of float32 inputs -> 2e-5 (seen values are ~1e-7 to 1e-6);
* gemm (v1 and v2 alike): X and the dequantized W are rounded to fp16 for the tensor cores
  (relative rounding up to 2^-11 = 4.9e-4 per operand, about 2.8e-4 rms), products exact and
  sums in fp32, so a random-sign dot carries about 4e-4 relative error -> 2e-3.
Every output is poisoned with NaN first and must be fully written; every launch is run twice
and must give bit-identical results; an out-of-range launch must be refused before it runs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from pycuda_arrays import poisoned, rel_err, upload

from tools.synth_blocks import random_matrix
from worker.backends.cuda.arena import LaunchRefused
from worker.backends.cuda.matmul import MatmulKernels
from worker.backends.cuda.plans.base import QWeight
from worker.backends.cuda.plans.dense import gemm_split, gemm_version
from worker.backends.cuda.quant_layout import LAYOUTS

pytestmark = pytest.mark.gpu

GEMV_BOUND = 2e-5
GEMM_BOUND = 2e-3
# gemm against a reference whose X and W are rounded to fp16 first (what the tensor cores
# multiply): only the fp32 summation order and rare 1-ulp fp16 rounding differences remain.
GEMM_FP16_EXACT_BOUND = 1e-4
TYPES = sorted(LAYOUTS)
QK = {t: LAYOUTS[t].qk for t in TYPES}

# Real matrices (rows N, columns K, type) of the three target models.
REAL_SHAPES = [
    ("qwen.attn_q", 896, 896, 6),
    ("qwen.attn_k", 128, 896, 6),
    ("qwen.attn_v", 128, 896, 8),
    ("qwen.ffn_up", 4864, 896, 6),
    ("qwen.ffn_down.q4k", 896, 4864, 12),
    ("qwen.ffn_down.q6k", 896, 4864, 14),
    ("qwen.output", 151936, 896, 8),
    ("phi3.attn_qkv", 9216, 3072, 13),
    ("phi3.attn_output", 3072, 3072, 12),
    ("phi3.ffn_up", 16384, 3072, 12),
    ("phi3.ffn_down", 3072, 8192, 14),
    ("phi3.output", 32064, 3072, 14),
    ("gptoss.attn_q", 4096, 2880, 8),
    ("gptoss.attn_k", 512, 2880, 8),
    ("gptoss.attn_output", 2880, 4096, 8),
]


def qweight(raw_dev: Any, qtype: int, rows: int, cols: int) -> QWeight:
    return QWeight(int(raw_dev.gpudata), qtype, rows, cols, int(raw_dev.nbytes))


def reference(dense: np.ndarray, x: np.ndarray) -> np.ndarray:
    return x.astype(np.float64) @ dense.astype(np.float64).T


def run_linear(
    mm: MatmulKernels,
    gpu: Any,
    qtype: int,
    n: int,
    k: int,
    ntok: int,
    rng: np.random.Generator,
    *,
    with_bias: bool = False,
    with_residual: bool = False,
    form: str = "linear",
    launch_kw: dict[str, Any] | None = None,
    fp16_errs: list[float] | None = None,
) -> tuple[float, bool]:
    """(relative error against the float64 reference, bit-identical rerun); with fp16_errs,
    also appends the error against the reference on fp16-rounded X and W."""
    raw, dense = random_matrix(qtype, n, k, rng)
    x = rng.standard_normal((ntok, k), dtype=np.float32)
    ref = reference(dense, x)
    want16 = fp16_errs is not None  # only then: a second float64 product
    ref16 = reference(dense.astype(np.float16), x.astype(np.float16)) if want16 else ref
    w_dev, x_dev = upload(raw), upload(x)
    w = qweight(w_dev, qtype, n, k)
    kw: dict[str, Any] = dict(launch_kw or {})
    if with_bias:
        bias = rng.standard_normal(n, dtype=np.float32)
        ref, ref16 = ref + bias, ref16 + bias
        kw["bias"] = upload(bias)
    if with_residual:
        res = rng.standard_normal((ntok, n), dtype=np.float32)
        ref, ref16 = ref + res, ref16 + res
        kw["residual"] = upload(res)
    outs = []
    for _ in range(2):
        y = poisoned((ntok, n))
        getattr(mm, form)(w, x_dev, y, ntok, **kw)
        gpu.Context.synchronize()
        outs.append(y.get())
    same = outs[0].tobytes() == outs[1].tobytes()
    if fp16_errs is not None:
        fp16_errs.append(rel_err(outs[0], ref16))
    return rel_err(outs[0], ref), same


def small_shapes(qtype: int) -> list[tuple[int, int]]:
    qk = QK[qtype]
    return [(1, qk), (37, 3 * qk), (133, 896 if qk == 32 else 1280)]


@pytest.mark.parametrize("ntok", [1, 3, 8])
@pytest.mark.parametrize("qtype", TYPES, ids=[LAYOUTS[t].name for t in TYPES])
def test_gemv_matches_reference(mm: MatmulKernels, gpu: Any, qtype: int, ntok: int) -> None:
    rng = np.random.default_rng(1000 * qtype + ntok)
    for n, k in small_shapes(qtype):
        err, same = run_linear(
            mm,
            gpu,
            qtype,
            n,
            k,
            ntok,
            rng,
            with_bias=ntok == 3,
            with_residual=ntok == 8,
            form="gemv",
        )
        assert err < GEMV_BOUND, (LAYOUTS[qtype].name, n, k, ntok, err)
        assert same, "gemv is not bit-identical run to run"


# The gemv kernels the wrappers can launch: 1, 2 or 4 rows per warp, plain, xpf or async.
# max_blocks=2: each block walks several row tiles. xpf and async run one token only.
GEMV_VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("r1", {"mode": "plain", "rows_per_warp": 1}),
    ("r2", {"mode": "plain", "rows_per_warp": 2}),
    ("r4", {"mode": "plain", "rows_per_warp": 4}),
    ("r2_2blocks", {"mode": "plain", "rows_per_warp": 2, "max_blocks": 2}),
    ("xpf", {"mode": "xpf"}),
    ("async_r1", {"mode": "async", "rows_per_warp": 1}),
    ("async_r1_2blocks", {"mode": "async", "rows_per_warp": 1, "max_blocks": 2}),
    ("async_r2_2blocks", {"mode": "async", "rows_per_warp": 2, "max_blocks": 2}),
    ("async_r4_2blocks", {"mode": "async", "rows_per_warp": 4, "max_blocks": 2}),
]


@pytest.mark.parametrize("variant", GEMV_VARIANTS, ids=[v[0] for v in GEMV_VARIANTS])
@pytest.mark.parametrize("qtype", TYPES, ids=[LAYOUTS[t].name for t in TYPES])
def test_gemv_variants_match_reference(
    mm: MatmulKernels, gpu: Any, qtype: int, variant: tuple[str, dict[str, Any]]
) -> None:
    """Every gemv variant at shapes that leave a warp's last rows empty (N not a multiple of
    the rows per block), rows that are one chunk, and rows of several chunks (K of 160 or 40
    blocks: more than one chunk for every variant), for 1, 2 and 5 tokens (5: not for r4)."""
    name, kw = variant
    rng = np.random.default_rng(31 * qtype + len(name))
    qk = QK[qtype]
    one = kw.get("mode") in ("xpf", "async")
    cases = [(1, qk, 1), (37, 3 * qk, 1 if one else 2), (45, (160 if qk == 32 else 40) * qk, 1)]
    if not one and kw.get("rows_per_warp") != 4:
        cases.append((133, 896 if qk == 32 else 1280, 5))
    else:
        cases.append((133, 896 if qk == 32 else 1280, 1))
    for n, k, ntok in cases:
        err, same = run_linear(
            mm,
            gpu,
            qtype,
            n,
            k,
            ntok,
            rng,
            with_bias=ntok == 2,
            with_residual=ntok == 5,
            form="gemv",
            launch_kw=kw,
        )
        assert err < GEMV_BOUND, (LAYOUTS[qtype].name, name, n, k, ntok, err)
        assert same, "gemv is not bit-identical run to run"


@pytest.mark.parametrize("version", [2, 3])
@pytest.mark.parametrize("qtype", TYPES, ids=[LAYOUTS[t].name for t in TYPES])
def test_gemm_matches_reference(mm: MatmulKernels, gpu: Any, qtype: int, version: int) -> None:
    rng = np.random.default_rng(77 + qtype)
    for (n, k), m in zip(small_shapes(qtype), (9, 77, 200), strict=True):
        err, same = run_linear(
            mm,
            gpu,
            qtype,
            n,
            k,
            m,
            rng,
            with_bias=m == 77,
            with_residual=m == 200,
            form="gemm",
            launch_kw={"version": version},
        )
        assert err < GEMM_BOUND, (LAYOUTS[qtype].name, version, n, k, m, err)
        assert same, "gemm is not bit-identical run to run"


@pytest.mark.parametrize("version", [2, 3])
@pytest.mark.parametrize("tile_m", [64, 128])
@pytest.mark.parametrize("qtype", TYPES, ids=[LAYOUTS[t].name for t in TYPES])
def test_gemm2_tiles_and_chunks(
    mm: MatmulKernels, gpu: Any, qtype: int, tile_m: int, version: int
) -> None:
    """gemm v2/v3 (gemm2_/gemm3_<type>_m64/_m128) at shapes that end inside a token tile (M
    not a multiple of 64 or 128, one token), inside a 128-row tile (N), inside a raw chunk of
    max(QK, 128) elements (K = 13 blocks for the 32-element types), with one K step and with
    many chunks (every shared buffer reused); matrices whose byte size is not a multiple of
    16, so the last 16-byte piece is copied byte by byte. Besides the usual bound, the result
    must match the product of the fp16-rounded operands to GEMM_FP16_EXACT_BOUND (a wrong
    offset anywhere shows up far above it). A lone output element can sit near zero, so the
    one-row case has 9 tokens (relative errors of single dots are not bounded by 2e-3)."""
    rng = np.random.default_rng(500 + 7 * qtype + tile_m + version)
    qk = QK[qtype]
    cases = [(1, qk, 9), (37, qk, 1), (37, 3 * qk, 130), (200, 13 * qk, 77), (129, 5 * qk, 257)]
    if qk == 32:
        cases.append((131, 40 * qk, 129))  # 10 chunks of 128 elements
    for i, (n, k, m) in enumerate(cases):
        errs16: list[float] = []
        err, same = run_linear(
            mm,
            gpu,
            qtype,
            n,
            k,
            m,
            rng,
            with_bias=i % 2 == 1,
            with_residual=i % 3 == 2,
            form="gemm",
            launch_kw={"version": version, "tile_m": tile_m},
            fp16_errs=errs16,
        )
        what = (LAYOUTS[qtype].name, version, tile_m, n, k, m, err, errs16)
        assert err < GEMM_BOUND and errs16[0] < GEMM_FP16_EXACT_BOUND, what
        assert same, "gemm v2/v3 is not bit-identical run to run"


@pytest.mark.parametrize(("name", "n", "k", "qtype"), REAL_SHAPES, ids=[s[0] for s in REAL_SHAPES])
def test_real_model_shapes(
    mm: MatmulKernels, gpu: Any, name: str, n: int, k: int, qtype: int
) -> None:
    rng = np.random.default_rng(n + k)
    err, same = run_linear(mm, gpu, qtype, n, k, 1, rng, with_bias=True)
    assert err < GEMV_BOUND and same, (name, "gemv", err)
    err, same = run_linear(mm, gpu, qtype, n, k, 67, rng, with_residual=True, form="linear")
    assert err < GEMM_BOUND and same, (name, "gemm", err)


@pytest.mark.parametrize("version", [2, 3])
@pytest.mark.parametrize(("name", "n", "k", "qtype"), REAL_SHAPES, ids=[s[0] for s in REAL_SHAPES])
def test_gemm2_real_model_shapes(
    mm: MatmulKernels, gpu: Any, name: str, n: int, k: int, qtype: int, version: int
) -> None:
    """gemm v2/v3 on every real matrix at 300 tokens (the default tile) and, for the 64-token
    tile, at 64 tokens; results bit-identical to a rerun."""
    rng = np.random.default_rng(3 * n + k)
    for m, kw in ((300, {"version": version}), (64, {"version": version, "tile_m": 64})):
        err, same = run_linear(
            mm, gpu, qtype, n, k, m, rng, with_bias=m == 64, form="gemm", launch_kw=kw
        )
        assert err < GEMM_BOUND and same, (name, m, err, same)


def test_in_place_residual_add(mm: MatmulKernels, gpu: Any) -> None:
    rng = np.random.default_rng(5)
    n, k = 896, 4864
    raw, dense = random_matrix(14, n, k, rng)
    for ntok, kw in ((1, {}), (40, {"version": 2}), (40, {"version": 3})):
        x = rng.standard_normal((ntok, k), dtype=np.float32)
        res = rng.standard_normal((ntok, n), dtype=np.float32)
        y, w_dev, x_dev = upload(res), upload(raw), upload(x)  # keep every buffer alive
        mm.linear(qweight(w_dev, 14, n, k), x_dev, y, ntok, residual=y, **kw)
        gpu.Context.synchronize()
        bound = GEMV_BOUND if ntok <= 8 else GEMM_BOUND
        assert rel_err(y.get(), reference(dense, x) + res) < bound


def test_out_of_range_launch_is_refused_and_nothing_runs(mm: MatmulKernels, gpu: Any) -> None:
    rng = np.random.default_rng(9)
    n, k = 256, 512
    raw, _ = random_matrix(12, n, k, rng)
    w_dev = upload(raw)
    w = qweight(w_dev, 12, n, k)
    x = upload(rng.standard_normal((4, k), dtype=np.float32))
    y = poisoned((3, n))  # room for 3 tokens, asked for 4
    with pytest.raises(LaunchRefused, match=r"gemv_q4_k.*y buffer"):
        mm.gemv(w, x, y, 4)
    for version in (2, 3):  # v3: its fp16 conversion of x must not run either
        # (the split's in-order sum is the launch that writes y: its plan refuses it)
        pat = rf"(gemm{version}_q4_k_m64|gemm_splitk_reduce).*y buffer"
        with pytest.raises(LaunchRefused, match=pat):
            mm.gemm(w, x, y, 4, version=version)
    gpu.Context.synchronize()
    assert np.isnan(y.get()).all(), "a refused launch must not have run"


# ---------------------------------------------------------------------- batch invariance

INVARIANT_ROWS = [1, 2, 7, 16, 17, 64, 65, 130, 512]


@pytest.mark.parametrize("qtype", TYPES, ids=[LAYOUTS[t].name for t in TYPES])
def test_rows_are_batch_invariant(mm: MatmulKernels, gpu: Any, qtype: int) -> None:
    """In invariant mode every row count takes the tensor-core arithmetic (skinny up to 16
    rows, then either gemm version, 64- or 128-row tiles as the count decides): the first
    rows of X give bit-identical outputs in launches of 1 ... 512 rows, each row equal to the
    same row in any other launch, at the real widths (the version switches with the matrix size)."""
    rng = np.random.default_rng(qtype)
    for n, k in ((896, 896 if QK[qtype] == 32 else 1024), (4864, 1024)):
        raw, dense = random_matrix(qtype, n, k, rng)
        w_dev = upload(raw)  # kept referenced while kernels read it
        w = qweight(w_dev, qtype, n, k)
        x = rng.standard_normal((max(INVARIANT_ROWS), k), dtype=np.float32)
        bias = upload(rng.standard_normal(n, dtype=np.float32))
        mm.invariant = True
        try:
            outs = {}
            for m in INVARIANT_ROWS:
                y, xm = poisoned((m, n)), upload(x[:m])
                mm.linear(w, xm, y, m, bias=bias)
                gpu.Context.synchronize()
                outs[m] = y.get()
        finally:
            mm.invariant = False
        full = outs[max(INVARIANT_ROWS)]
        for m, y in outs.items():
            assert np.array_equal(y.view(np.uint32), full[:m].view(np.uint32)), (n, k, m)
        # and the rows are what they should be
        assert rel_err(full, reference(dense, x) + bias.get()) < GEMM_BOUND


# skinny: (rows N, columns K) per format, chosen so the splits (gemm_split on a 132-SM H200)
# cover every case.
def skinny_shapes(qtype: int) -> list[tuple[int, int]]:
    kc = max(QK[qtype], 128)  # elements of a raw chunk; a split is whole chunks
    return [
        (33000, 256),  # 258 row tiles: one split
        (896, 2048),  # 8 or 16 splits
        (896, 21 * kc),  # 11 splits of 2 chunks, the last of 1
        (100, 38 * kc),  # one 128-row tile: 38 splits, rows not a multiple of 8
        (1000, 864 if QK[qtype] == 32 else 1280),  # the last chunk not full (QK 32)
    ]


DEQUANT8H_SRC = r"""
#include "quant.cuh"
template <int T> __device__ void both(const uint8_t* raw, int n, uint4* fast, uint4* rounded) {
  constexpr int G = QTraits<T>::QK / 8;
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n * G) return;
  const uint8_t* blk = raw + (long long)(i / G) * QTraits<T>::BYTES;
  uint32_t h[4], r[4];
  dequant8h<T>(blk, i % G, h);
  dequant8h_rounded<T>(blk, i % G, r);
  fast[i] = make_uint4(h[0], h[1], h[2], h[3]);
  rounded[i] = make_uint4(r[0], r[1], r[2], r[3]);
}
#define BOTH(TY, NAME) extern "C" __global__ void dq_##NAME(const uint8_t* raw, int n, \
    uint4* fast, uint4* rounded) { both<TY>(raw, n, fast, rounded); }
FOR_EACH_QTYPE(BOTH)
"""


@pytest.mark.parametrize("qtype", TYPES, ids=[LAYOUTS[t].name for t in TYPES])
def test_dequant8h_is_dequant8_rounded_to_fp16(gpu: Any, qtype: int) -> None:
    """The tensor-core operand (dequant8h: byte permutes and fp16 FMAs for Q4_0, Q5_0, Q8_0
    and MXFP4) is bit for bit dequant8's floats rounded to fp16, on random model-like blocks
    and on blocks of random bytes (every scale and code: fp16 subnormal, inf and NaN scales;
    every MXFP4 exponent, in and out of the fp16 range). NaNs need only both be NaN."""
    from pycuda.compiler import SourceModule

    from worker.backends.cuda.compile import CUDA_SRC, NVCC_OPTIONS

    lay = LAYOUTS[qtype]
    mod = SourceModule(
        DEQUANT8H_SRC,
        options=list(NVCC_OPTIONS),
        no_extern_c=True,
        include_dirs=[str(CUDA_SRC)],
    )
    fn = mod.get_function(f"dq_{lay.name}")
    rng = np.random.default_rng(100 + qtype)
    model, _ = random_matrix(qtype, 64, 64 * lay.qk, rng)
    noise = rng.integers(0, 256, 8192 * lay.block_bytes, dtype=np.uint8)
    raw = np.concatenate([np.asarray(model, np.uint8).ravel(), noise])
    n = raw.size // lay.block_bytes
    groups = n * lay.qk // 8
    fast, rounded = poisoned((groups, 4)), poisoned((groups, 4))
    fn(
        upload(raw),
        np.int32(n),
        fast.gpudata,
        rounded.gpudata,
        block=(256, 1, 1),
        grid=(-(-groups // 256), 1, 1),
    )
    gpu.Context.synchronize()
    f = fast.get().view(np.uint16).ravel()
    r = rounded.get().view(np.uint16).ravel()

    def nan(b: np.ndarray) -> np.ndarray:
        return ((b & 0x7C00) == 0x7C00) & ((b & 0x03FF) != 0)

    bad = (f != r) & ~(nan(f) & nan(r))
    assert not bad.any(), (lay.name, np.flatnonzero(bad)[:8], f[bad][:8], r[bad][:8])


@pytest.mark.parametrize("qtype", TYPES, ids=[LAYOUTS[t].name for t in TYPES])
def test_skinny_equals_the_gemm_bit_for_bit(mm: MatmulKernels, gpu: Any, qtype: int) -> None:
    """skinny (1..16 rows) gives exactly the bits of the gemm (version 2 and 3, with its split
    and in-order sum) for every row, with bias and in-place residual, and is close to the
    reference; out-of-place and in-place residual agree."""
    rng = np.random.default_rng(7 + qtype)
    for n, k in skinny_shapes(qtype):
        raw, dense = random_matrix(qtype, n, k, rng)
        w_dev = upload(raw)
        w = qweight(w_dev, qtype, n, k)
        assert gemm_version(w) >= 2
        x = rng.standard_normal((16, k), dtype=np.float32)
        bias = rng.standard_normal(n, dtype=np.float32)
        res = rng.standard_normal((16, n), dtype=np.float32)
        x_dev, b_dev = upload(x), upload(bias)
        splits = gemm_split(w, mm._sms)[0]
        for m in (1, 2, 7, 16):
            want = {}
            for version in (2, 3):
                y = upload(res[:m])
                mm.gemm(w, x_dev, y, m, version=version, bias=b_dev, residual=y)
                gpu.Context.synchronize()
                want[version] = y.get()
            y = upload(res[:m])
            mm.skinny(w, x_dev, y, m, bias=b_dev, residual=y)
            gpu.Context.synchronize()
            got = y.get()
            y2, r_dev = poisoned((m, n)), upload(res[:m])
            mm.skinny(w, x_dev, y2, m, bias=b_dev, residual=r_dev)
            gpu.Context.synchronize()
            ctx = (LAYOUTS[qtype].name, n, k, m, splits)
            for version in (2, 3):
                assert np.array_equal(got.view(np.uint32), want[version].view(np.uint32)), ctx
            assert np.array_equal(y2.get().view(np.uint32), got.view(np.uint32)), ctx
            assert rel_err(got - res[:m], reference(dense, x[:m]) + bias) < GEMM_BOUND, ctx


def test_skinny_refuses_what_it_cannot_do(mm: MatmulKernels, gpu: Any) -> None:
    rng = np.random.default_rng(11)
    raw, _ = random_matrix(12, 256, 512, rng)
    w_dev = upload(raw)
    w = qweight(w_dev, 12, 256, 512)
    x = upload(rng.standard_normal((17, 512), dtype=np.float32))
    y = poisoned((17, 256))
    with pytest.raises(LaunchRefused, match=r"skinny_q4_k.*17 rows"):
        mm.skinny(w, x, y, 17)
    with pytest.raises(LaunchRefused, match=r"skinny_q4_k.*y buffer"):
        mm.skinny(w, x, poisoned((3, 256)), 4)
    gpu.Context.synchronize()
    assert np.isnan(y.get()).all()
