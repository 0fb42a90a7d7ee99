"""Kernels of cuda_src/ run on the CPU through tools.kernel_emu, launched the way the worker
launches them (its launch plans, its Kernels wrappers, MatmulKernels' launch sequences), so CI
runs them as well as compiling them: the embedding lookup of every format against
worker.gguf.quants, the split-K sum, gemm3's fp16 pre-pass; tests/gpu/test_kernels.py's
own tests of the norms, RoPE, activations, routing, gathering, decode and prefill attention;
skinny and both gemm versions giving the same bits; the decode gemv in each mode; and the
quicker MoE tests of tests/gpu/test_embed_moe.py. The GPU runs all of them on the device."""

from __future__ import annotations

import ctypes
import importlib.util
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tools import kernel_emu
from tools.kernel_emu import aligned
from tools.synth_blocks import random_matrix
from worker.backends.cuda.arena import DevBuf
from worker.backends.cuda.kernels import Kernels
from worker.backends.cuda.matmul import MatmulKernels
from worker.backends.cuda.plans.base import Launch, QWeight
from worker.backends.cuda.plans.dense import (
    plan_embed,
    plan_gemm_x16,
    plan_gemv,
    plan_splitk_reduce,
)
from worker.backends.cuda.quant_layout import LAYOUTS

TYPES = sorted(LAYOUTS)


def _buf(a: np.ndarray) -> DevBuf:
    return DevBuf(a.ctypes.data, a.nbytes)


@pytest.mark.parametrize("qtype", TYPES, ids=[LAYOUTS[t].name for t in TYPES])
def test_embedding_rows_every_format(qtype: int) -> None:
    rng = np.random.default_rng(qtype)
    rows, cols = 40, LAYOUTS[qtype].qk * 3
    raw, dense = random_matrix(qtype, rows, cols, rng)
    raw = aligned(raw)
    ids = np.array([0, rows - 1, 7, 7, 23, -1, rows], np.int32)  # ends, a repeat, two bad ids
    out = aligned(np.full((len(ids), cols), 123.0, np.float32), 16)
    w = QWeight(raw.ctypes.data, qtype, rows, cols, raw.nbytes)
    kernel_emu.run(plan_embed(w, _buf(ids), len(ids), _buf(out)))
    np.testing.assert_allclose(out[:5], dense[ids[:5]], rtol=2e-6, atol=1e-9)
    assert np.isnan(out[5:]).all()  # a bad id writes NaN and reads nothing


def test_split_sum_in_order_with_bias_and_residual() -> None:
    rng = np.random.default_rng(1)
    s, m, n = 3, 5, 300
    part = rng.standard_normal((s, m, n)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    y = rng.standard_normal((m, n + 4)).astype(np.float32)  # rows of n + 4: ldy
    want = y.copy()
    want[:, :n] = ((part[0] + part[1]) + part[2]) + bias + y[:, :n]
    kernel_emu.run(
        plan_splitk_reduce(
            _buf(part), s, m, n, _buf(y), bias=_buf(bias), residual=_buf(y), ldy=n + 4
        )
    )
    assert y.tobytes() == want.tobytes()


def test_fp16_pre_pass() -> None:
    x = aligned(np.random.default_rng(2).standard_normal((3, 72)).astype(np.float32) * 100, 16)
    xh = aligned(np.zeros((3, 64), np.float16), 16)
    kernel_emu.run(plan_gemm_x16(_buf(x), _buf(xh), 3, 64, ldx=72))
    assert xh.tobytes() == x[:, :64].astype(np.float16).tobytes()


# ---------------------------------------------------------------- the GPU kernel tests, on the CPU
# tests/gpu/test_kernels.py drives every non-matrix kernel through the worker's Kernels
# wrappers (their checks and argument packing) and its Dev helper. Here the same test
# functions run with a Kernels whose launches go to tools.kernel_emu and a Dev over host
# memory, for the kernels the emulator can run (no inline PTX, no grid-wide barrier).


class _HostCtx:
    """What the tests ask of Kernels.ctx: host memory is always in sync."""

    def sync(self, what: str = "") -> None:
        pass


class CpuKernels(Kernels):
    MODULES = ("norm", "rope", "attention", "activation", "elementwise")

    def __init__(self) -> None:  # no CUDA context: the wrappers' checks and packing only
        self.ctx = _HostCtx()
        self.stream = None
        self.sync_each = False

    def launch(
        self, name: str, grid: tuple[int, ...], block: tuple[int, ...], *args: Any, shared: int = 0
    ) -> None:
        for module in self.MODULES:
            mod = kernel_emu.load(f"{module}.cu")
            if name in mod.kernels:
                mod.get_function(name)(*args, grid=grid, block=block, shared=shared)
                return
        raise AssertionError(f"{name} is not in {self.MODULES}")


class HostDev:
    """tests/gpu/conftest.py's Dev over host memory: fresh outputs poisoned with NaN."""

    def __init__(self) -> None:
        self.keep: list[np.ndarray] = []

    def put(self, arr: np.ndarray, name: str = "buf") -> DevBuf:
        a = aligned(np.ascontiguousarray(arr), 256)
        self.keep.append(a)
        return DevBuf(a.ctypes.data, a.nbytes, name)

    def poison(self, nbytes: int, name: str = "out") -> DevBuf:
        return self.put(np.full(max(1, nbytes // 4), np.nan, np.float32), name)

    def get(self, b: DevBuf, shape: tuple[int, ...], dtype: Any = np.float32) -> np.ndarray:
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        raw = (ctypes.c_char * n).from_address(b.ptr)
        return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()


@pytest.fixture(scope="module")
def kern() -> CpuKernels:
    return CpuKernels()


@pytest.fixture
def dev() -> HostDev:
    return HostDev()


def _gpu_tests() -> Any:
    path = Path(__file__).resolve().parents[2] / "gpu" / "test_kernels.py"
    spec = importlib.util.spec_from_file_location("gpu_test_kernels", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_G = _gpu_tests()
test_rmsnorm = _G.test_rmsnorm
test_layernorm = _G.test_layernorm
test_qkv_rope_store = _G.test_qkv_rope_store
test_swiglu_variants = _G.test_swiglu_variants
test_gelu_and_add = _G.test_gelu_and_add
test_router_topk_softmax = _G.test_router_topk_softmax
test_gather_rows = _G.test_gather_rows


@pytest.mark.parametrize(
    "nh,nkv,hd,window,sinks",
    [
        (14, 2, 64, 0, False),  # qwen2
        (16, 2, 32, 16, True),  # the tiny presets (window, sinks)
        (4, 4, 32, 0, False),  # MHA (Phi-3, GPT-2) at a head size the CPU runs quickly
        (4, 2, 16, 0, True),  # 2 heads a KV head, sinks
    ],
)
def test_decode_attention_batch(
    kern: CpuKernels, dev: HostDev, nh: int, nkv: int, hd: int, window: int, sinks: bool
) -> None:
    """The GPU test's decode attention over 64 rows of their own lengths (1 .. 1500), at two of
    its shapes (the others take a minute or more each on the CPU)."""
    _G.test_decode_attention_batch(kern, dev, nh, nkv, hd, window, sinks)


@pytest.mark.parametrize(
    "n_tok,pos0,nh,nkv,hd,window,sinks",
    [
        (1, 0, 14, 2, 64, 0, False),  # one token (a 1-row tile)
        (37, 0, 14, 2, 64, 0, False),  # qwen2, odd length
        (77, 5, 7, 1, 80, 0, True),  # GQA 7, head_dim 80, a second chunk, sinks
        (130, 0, 16, 2, 32, 16, True),  # tiny presets: head_dim 32, window 16
        (129, 31, 8, 1, 64, 1, False),  # window 1: only the own key
    ],
)
def test_prefill_attention(
    kern: CpuKernels,
    dev: HostDev,
    n_tok: int,
    pos0: int,
    nh: int,
    nkv: int,
    hd: int,
    window: int,
    sinks: bool,
) -> None:
    """The tensor-core prefill attention (mma and ldmatrix emulated) at five of the GPU
    test's shapes, within its FP16 bound of the reference."""
    _G._prefill_case(kern, dev, n_tok, pos0, nh, nkv, hd, window, sinks)


def test_prefill_attention_is_chunking_invariant(kern: CpuKernels, dev: HostDev) -> None:
    """The GPU test's 300-token prompt as one chunk, three chunks and beside other sequences'
    chunks, bit for bit, at the qwen2 shape (the gpt-oss one takes a minute here)."""
    _G.test_prefill_attention_is_chunking_invariant(kern, dev, 14, 2, 64, 0, False)


test_attention_launches_are_refused = _G.test_attention_launches_are_refused


# ---------------------------------------------------------------- the matrix products, on the CPU
# MatmulKernels' own launch sequences (skinny; the gemm with its fp16 pre-pass, splits and
# in-order sum), launched to the emulator; the tensor-core mma is emulated from its fragment
# layout (its sums in k order: the GPU's bits are not promised, the same bits for the same
# inputs are).


class CpuMatmul(MatmulKernels):
    def __init__(self, sms: int = 132) -> None:  # the H200's multiprocessors
        self.arch = "cpu"
        self.invariant = True
        self._sms = sms
        self._x16 = self._splitk = self._moe_ws = None
        self._route_gen = 0
        self.keep: list[np.ndarray] = []

    def run(self, launch: Launch, stream: Any = None) -> None:
        kernel_emu.run(launch)

    def _workspace(self, nbytes: int) -> DevBuf:
        a = aligned(np.zeros(max(nbytes, 16), np.uint8), 256)
        self.keep.append(a)
        return DevBuf(a.ctypes.data, a.nbytes)

    def _splitk_workspace(self, nbytes: int) -> DevBuf:
        return self._workspace(nbytes)

    def _x16_workspace(self, nbytes: int) -> DevBuf:
        return self._workspace(nbytes)

    def _moe_workspace(self, nbytes: int) -> DevBuf:
        return self._workspace(nbytes)


@pytest.mark.parametrize("qtype", [2, 8, 12, 14, 39], ids=["q4_0", "q8_0", "q4_k", "q6_k", "mxfp4"])
def test_skinny_and_gemm_give_the_same_bits_on_the_cpu(qtype: int) -> None:
    """skinny (1-16 rows, one launch) and the gemm, version 2 (X converted in the kernel) and
    3 (the fp16 pre-pass, X by cp.async), with split-K and the in-order sum, give every row
    the same bits, with bias and an in-place residual; all are the float64 product within
    the fp16 rounding of X and W."""
    rng = np.random.default_rng(qtype)
    n, k, m = 136, 512, 5
    raw, dense = random_matrix(qtype, n, k, rng)
    raw = aligned(raw)
    w = QWeight(raw.ctypes.data, qtype, n, k, raw.nbytes)
    x = aligned(rng.standard_normal((m, k)).astype(np.float32), 16)
    bias = rng.standard_normal(n).astype(np.float32)
    res = rng.standard_normal((m, n)).astype(np.float32)
    mm = CpuMatmul()
    outs = []
    for form, kw in (("skinny", {}), ("gemm", {"version": 2}), ("gemm", {"version": 3})):
        y = aligned(res.copy(), 16)
        getattr(mm, form)(w, _buf(x), _buf(y), m, bias=_buf(bias), residual=_buf(y), **kw)
        outs.append(y)
    assert outs[0].tobytes() == outs[1].tobytes() == outs[2].tobytes()
    ref = x.astype(np.float64) @ dense.astype(np.float64).T + bias + res
    assert np.linalg.norm(outs[0] - ref) / np.linalg.norm(ref) < 2e-3


@pytest.mark.parametrize("qtype", [2, 8, 12, 14, 39], ids=["q4_0", "q8_0", "q4_k", "q6_k", "mxfp4"])
@pytest.mark.parametrize(
    ("ntok", "mode", "rw"),
    [(1, "plain", 1), (1, "xpf", 1), (1, "async", 2), (2, "plain", 4), (5, "plain", 2)],
)
def test_decode_gemv_on_the_cpu(qtype: int, ntok: int, mode: str, rw: int) -> None:
    """The decode gemv (batch invariance off) in its modes and rows per warp: the float64
    product within 2e-5 (FP32 accumulation), bias and in-place residual, an odd row count."""
    rng = np.random.default_rng(qtype * 10 + ntok)
    n, k = 37, 768
    raw, dense = random_matrix(qtype, n, k, rng)
    raw = aligned(raw)
    w = QWeight(raw.ctypes.data, qtype, n, k, raw.nbytes)
    x = aligned(rng.standard_normal((ntok, k)).astype(np.float32), 16)
    bias = rng.standard_normal(n).astype(np.float32)
    y = aligned(rng.standard_normal((ntok, n)).astype(np.float32), 16)
    ref = x.astype(np.float64) @ dense.astype(np.float64).T + bias + y
    kernel_emu.run(
        plan_gemv(
            w, _buf(x), _buf(y), ntok, bias=_buf(bias), residual=_buf(y), mode=mode,
            rows_per_warp=rw,
        )
    )  # fmt: skip
    assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < 2e-5


# ---------------------------------------------------------------- MoE (gpt-oss), on the CPU
# tests/gpu/test_embed_moe.py's own MoE tests with host arrays for its PyCUDA ones and
# CpuMatmul for MatmulKernels.


class HostArray:
    """What the tests ask of a pycuda GPUArray: its address (gpudata), size and get()."""

    def __init__(self, a: np.ndarray) -> None:
        self.a = aligned(np.ascontiguousarray(a), 256)
        self.gpudata = self.a.ctypes.data
        self.nbytes = self.a.nbytes

    def get(self) -> np.ndarray:
        return self.a.copy()

    def fill(self, v: Any) -> None:
        self.a.fill(v)


class _HostDriver:
    """The `gpu` fixture's pycuda.driver: host memory is always in sync."""

    class Context:
        @staticmethod
        def synchronize() -> None:
            pass


def _gpu_moe_tests() -> Any:
    gpu_dir = Path(__file__).resolve().parents[2] / "gpu"
    spec = importlib.util.spec_from_file_location(
        "gpu_test_embed_moe", gpu_dir / "test_embed_moe.py"
    )
    assert spec is not None and spec.loader is not None
    sys.path.insert(0, str(gpu_dir))  # its `from pycuda_arrays import ...`
    try:
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(gpu_dir))
    mod.upload = HostArray
    mod.poisoned = lambda shape: HostArray(np.full(shape, np.nan, np.float32))
    return mod


_M = _gpu_moe_tests()


@pytest.fixture
def mm() -> CpuMatmul:
    return CpuMatmul()


@pytest.fixture
def gpu() -> Any:
    return _HostDriver


test_moe_small = _M.test_moe_small
test_moe_gemv_bad_expert_id_gives_nan = _M.test_moe_gemv_bad_expert_id_gives_nan
test_moe_gemm_routed_tiles_give_the_same_bytes = _M.test_moe_gemm_routed_tiles_give_the_same_bytes
test_moe_gemm_invalid_ids_left_unwritten = _M.test_moe_gemm_invalid_ids_left_unwritten
# (its batch-invariance, skinny-equals-gemm and paired-launch tests pass here too, but take
# about a minute each on the 2-core box: CI leaves them to the GPU run)


class CpuMatmul15(CpuMatmul):
    """CpuMatmul with the experts on the routed integer cores (the default)."""

    def __init__(self) -> None:
        super().__init__()
        self.int15, self.int15_large, self.int15_experts = False, False, True
        self._i15_ws = None

    def _i15_workspace(self, nbytes: int) -> DevBuf:
        return self._workspace(nbytes)


@pytest.mark.parametrize("ntok", [1, 3])
def test_integer_moe_layer_ends_are_the_separate_launches(
    kern: CpuKernels, dev: HostDev, ntok: int
) -> None:
    """MatmulKernels.moe15_ffn (gpt-oss's expert FFN on the routed integer cores, each half
    ending in one launch: moe15_glu, moe15_combine) leaves the residual stream byte for byte
    as the launches it replaces: moe() for gate and up, swiglu_oai_f32, moe() for down and
    moe_combine_f32. MXFP4 experts with biases, 4 experts, 2 slots a token, gate and up K
    split 4 ways and down 3 (i15_split at these widths)."""
    from worker.backends.cuda.plans.i15 import i15_split

    E, ff, n_exp, topk = 1024, 768, 4, 2
    rng = np.random.default_rng(ntok)

    def experts(rows: int, cols: int) -> tuple[QWeight, DevBuf]:
        raw = np.concatenate([random_matrix(39, rows, cols, rng)[0] for _ in range(n_exp)])
        b = dev.put(raw)
        w = QWeight(b.ptr, 39, rows, cols, raw.nbytes, experts=n_exp)
        bias = dev.put((rng.standard_normal((n_exp, rows)) * 0.5).astype(np.float32))
        return w, bias

    (wg, bg), (wu, bu), (wd, bd) = experts(ff, E), experts(ff, E), experts(E, ff)
    mm = CpuMatmul15()
    assert (i15_split(wg, mm._sms), i15_split(wd, mm._sms)) == (4, 3)
    n_assign = ntok * topk
    ids = dev.put(
        np.stack([rng.choice(n_exp, topk, replace=False) for _ in range(ntok)]).astype(np.int32)
    )
    ew = dev.put(rng.random((ntok, topk)).astype(np.float32))
    xn = dev.put(rng.standard_normal((ntok, E)).astype(np.float32))
    x0 = rng.standard_normal((ntok, E)).astype(np.float32)
    # the separate launches
    x_a = dev.put(x0)
    yg, yu = dev.poison(n_assign * ff * 4), dev.poison(n_assign * ff * 4)
    yd = dev.poison(n_assign * E * 4)
    route = mm.moe_route(ids, ntok, topk, n_exp, qtype=39)
    assert route.form == "i15"
    mm.moe(wg, ids, ntok, topk, xn, yg, per_slot_input=False, route=route, bias=bg,
           pair=(wu, yu, bu))  # fmt: skip
    g, u = dev.get(yg, (n_assign, ff)), dev.get(yu, (n_assign, ff))
    kern.swiglu(yg, yu, yg, n_assign, ff, ff, ff, ff, oai=(1.702, 7.0))
    # (moe15_glu shares the SwiGLU's expression: held to gpt-oss's formula here)
    gc, uc = np.minimum(g, 7.0), np.clip(u, -7.0, 7.0)
    want = gc / (1.0 + np.exp(-1.702 * gc)) * (uc + 1.0)
    np.testing.assert_allclose(dev.get(yg, (n_assign, ff)), want, rtol=2e-6, atol=1e-6)
    mm.moe(wd, ids, ntok, topk, yg, yd, per_slot_input=True, route=route, bias=bd)
    kern.moe_combine(x_a, yd, ew, ntok, E, topk)
    # the fused ends
    x_b = dev.put(x0)
    route = mm.moe_route(ids, ntok, topk, n_exp, qtype=39)
    mm.moe15_ffn((wg, bg), (wu, bu), (wd, bd), ids, ew, ntok, topk, xn, x_b, route)
    a, b = dev.get(x_a, (ntok, E)), dev.get(x_b, (ntok, E))
    assert np.isfinite(a).all() and not np.array_equal(a, x0)
    assert a.tobytes() == b.tobytes()
