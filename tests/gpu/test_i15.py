"""cuda_src/i15.cu (15-bit activations against K-quant codes; docs/kernels.md "Integer products"):
both cores (gemm15p, gemm15p8) against the NumPy float32 twin that takes the same rounded steps in
the same order (bit for bit), hence against each other at any row count (batch invariance), and
against the float64 product (the 15-bit rounding of X only). The same checks run on the CPU through
tools.kernel_emu (tests/unit/test_i15_emu.py); this file asks the GPU. Timing: `python3 -m
tools.skinny_sweep --i15 --shapes phi3.gate_up,phi3.o --rows 1,8,64`."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from pycuda_arrays import poisoned, upload

from tools.i15 import (
    I15,
    MXFP4,
    Q4_0,
    Q5_0,
    Q5_K,
    Q6_K,
    Q8_0,
    product_twin,
    quant_x15,
)
from tools.synth_blocks import random_matrix

pytestmark = pytest.mark.gpu

Q4_K = 12


@pytest.fixture(scope="module")
def i15(gpu: Any) -> I15:
    from worker.backends.cuda.compile import load_module

    major, minor = gpu.Context.get_device().compute_capability()
    return I15(load_module("i15", f"sm_{major}{minor}"))


def _case(m: int, n: int, k: int, qtype: int = Q4_K) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(m * n + k)
    raw, dense = random_matrix(qtype, n, k, rng)
    x = rng.standard_normal((m, k), dtype=np.float32)
    x[0, 7] = 40.0  # an outlier sets its super-block's scale
    x[-1, 256:512] = 0.0  # an all-zero block
    return raw, dense, x


@pytest.mark.parametrize(
    ("m", "n", "k", "splits"),
    [
        (1, 300, 256, 1),
        (2, 513, 1024, 2),
        (7, 1000, 3072, 3),
        (8, 64, 8192, 4),
        (33, 200, 3072, 5),
        (64, 3072, 3072, 2),
    ],
)
def test_both_cores_are_the_twin_bit_for_bit(
    gpu: Any, i15: I15, m: int, n: int, k: int, splits: int
) -> None:
    raw, dense, x = _case(m, n, k)
    b = i15.buffers(m, k, n, splits)
    x_dev, w_dev = upload(x), upload(raw)
    twin = product_twin(raw, x, splits)
    for core in ("gemmp", "gemmp8"):
        outs = []
        for fused in (False, False, True, True):  # the worker's launch sums its own splits
            y = poisoned((m, n))
            i15.run(w_dev, x_dev, y, m, n, k, splits, b, core=core, fused=fused)
            gpu.Context.synchronize()
            outs.append(y.get())
        assert not b["tickets"].get().any()  # the tiles' tickets are zero again
        for out in outs[1:]:
            assert out.tobytes() == outs[0].tobytes(), core
        assert outs[0].tobytes() == twin.tobytes(), (core, np.abs(outs[0] - twin).max())
    hi, lo, d, sq = quant_x15(x, 256)
    assert (b["hi"].get() == hi).all() and (b["lo"].get() == lo).all()
    assert b["d"].get().tobytes() == d.tobytes() and (b["sq"].get() == sq).all()
    # against the float64 product of the 15-bit X itself: only the float32 steps differ (a
    # rounding per super-block and split, about 1e-7 measured; 1e-6 leaves room for
    # cancellation). How far the 15-bit X is from x is tests/unit/test_i15_twin.py's.
    xq = (128 * hi.astype(np.float64) + lo).reshape(m, k // 256, 256) * d[..., None]
    ref = xq.reshape(m, k) @ dense.astype(np.float64).T
    rel = np.linalg.norm(twin - ref) / np.linalg.norm(ref)
    assert rel < 1e-6, rel


@pytest.mark.parametrize(
    ("m", "n", "k", "splits"),
    [(1, 301, 3072, 4), (8, 77, 8192, 16), (33, 3072, 3072, 2), (64, 1001, 2048, 1)],
)
def test_q6_k_cores_are_the_twin_bit_for_bit(gpu: Any, m: int, n: int, k: int, splits: int) -> None:
    """Q6_K's blocks (210 bytes) start at every even offset mod 16: both cores against the
    twin (the staged core's 1-3 chunks at 64 rows, 8 super-blocks in one split)."""
    from worker.backends.cuda.compile import load_module

    major, minor = gpu.Context.get_device().compute_capability()
    i15 = I15(load_module("i15", f"sm_{major}{minor}"), Q6_K)
    raw, _, x = _case(m, n, k, Q6_K)
    b = i15.buffers(m, k, n, splits)
    x_dev, w_dev = upload(x), upload(raw)
    twin = product_twin(raw, x, splits, Q6_K)
    for core in ("gemmp", "gemmp8"):
        for fused in (False, True):
            y = poisoned((m, n))
            i15.run(w_dev, x_dev, y, m, n, k, splits, b, core=core, fused=fused)
            gpu.Context.synchronize()
            assert y.get().tobytes() == twin.tobytes(), (core, fused)


@pytest.mark.parametrize("qtype", [Q4_0, Q5_0, Q8_0, MXFP4])
@pytest.mark.parametrize(
    ("m", "n", "k", "splits"),
    [(1, 4864, 896, 1), (2, 1153, 896, 4), (7, 301, 2880, 3), (64, 9728, 896, 2), (33, 77, 160, 1)],
)
def test_legacy_cores_are_the_twin_bit_for_bit(
    gpu: Any, qtype: int, m: int, n: int, k: int, splits: int
) -> None:
    """Q4_0 / Q5_0 / Q8_0 (blocks of 32 at every even offset, X scaled per 32, K not a
    multiple of 256): both cores against the twin, and the twin against the float64 product
    of the 15-bit X."""
    from worker.backends.cuda.compile import load_module

    major, minor = gpu.Context.get_device().compute_capability()
    i15 = I15(load_module("i15", f"sm_{major}{minor}"), qtype)
    raw, dense, x = _case(m, n, k, qtype)
    b = i15.buffers(m, k, n, splits)
    x_dev, w_dev = upload(x), upload(raw)
    twin = product_twin(raw, x, splits, qtype)
    for core in ("gemmp", "gemmp8"):
        for fused in (False, True):
            y = poisoned((m, n))
            i15.run(w_dev, x_dev, y, m, n, k, splits, b, core=core, fused=fused)
            gpu.Context.synchronize()
            assert y.get().tobytes() == twin.tobytes(), (core, fused, np.abs(y.get() - twin).max())
    hi, lo, d, _ = quant_x15(x, 32)
    xq = (128 * hi.astype(np.float64) + lo).reshape(m, k // 32, 32) * d[..., None]
    ref = xq.reshape(m, k) @ dense.astype(np.float64).T
    rel = np.linalg.norm(twin - ref) / np.linalg.norm(ref)
    assert rel < 1e-6, rel  # a float step a block of 32: still about 1e-7


@pytest.mark.parametrize("qtype", [Q4_K, Q5_K, Q4_0, Q5_0, Q8_0, MXFP4])  # (no Q6_K form)
@pytest.mark.parametrize("m", [9, 33, 64, 200])
def test_the_folded_core_is_the_split_core_bit_for_bit(gpu: Any, m: int, qtype: int) -> None:
    """gemm15pf (one block a tile adding its 3 splits of 3, 3 and 2 units in order, y written
    at once) gives gemm15p's bits with the splits summed by the reduce, and the twin's."""
    from worker.backends.cuda.compile import load_module

    major, minor = gpu.Context.get_device().compute_capability()
    core = I15(load_module("i15", f"sm_{major}{minor}"), qtype)
    n, k, splits = 640, 2048, 3
    raw, _, x = _case(m, n, k, qtype)
    w_dev, x_dev = upload(raw), upload(x)
    got = {}
    for form in ("gemmp", "gemmpf"):
        y = poisoned((m, n))
        core.run(w_dev, x_dev, y, m, n, k, splits, core.buffers(m, k, n, splits), core=form,
                 fused=form == "gemmpf")  # fmt: skip
        gpu.Context.synchronize()
        got[form] = y.get()
    assert got["gemmpf"].tobytes() == got["gemmp"].tobytes()
    assert got["gemmpf"].tobytes() == product_twin(raw, x, splits, qtype).tobytes()


def test_a_row_alone_and_in_a_batch_of_64(gpu: Any, i15: I15) -> None:
    """Row 5 of a 64-row product (gemm15p) equals the same row alone (gemm15p8)."""
    n, k, splits = 640, 2048, 2
    raw, _, x = _case(64, n, k)
    w_dev = upload(raw)
    y64 = poisoned((64, n))
    i15.run(w_dev, upload(x), y64, 64, n, k, splits, i15.buffers(64, k, n, splits))
    y1 = poisoned((1, n))
    i15.run(w_dev, upload(x[5:6]), y1, 1, n, k, splits, i15.buffers(1, k, n, splits))
    gpu.Context.synchronize()
    assert y64.get()[5].tobytes() == y1.get()[0].tobytes()


@pytest.mark.parametrize("qtype", [Q4_K, Q5_K, Q6_K, Q4_0, Q5_0, Q8_0, MXFP4])
@pytest.mark.parametrize("m", [1, 2, 7, 8, 9, 33, 64])
def test_worker_linear_takes_the_integer_cores(gpu: Any, m: int, qtype: int) -> None:
    """MatmulKernels.linear with the dense products on the integer cores
    (WORKER_ORCD_INT15=all): a product with bias and an in-place residual is the twin's, then
    the bias, then the residual, bit for bit, at every row count (gemm15p8 up to 8 rows,
    gemm15p above)."""
    from worker.backends.cuda.arena import DevBuf
    from worker.backends.cuda.matmul import MatmulKernels
    from worker.backends.cuda.plans.base import QWeight
    from worker.backends.cuda.plans.i15 import i15_split

    mm = MatmulKernels()
    mm.invariant = True
    mm.int15 = True
    n, k = (3072, 3072) if qtype in (Q4_K, Q5_K, Q6_K) else (1152, 896)
    raw, _, x = _case(m, n, k, qtype)
    rng = np.random.default_rng(m)
    bias = rng.standard_normal(n).astype(np.float32)
    y0 = rng.standard_normal((m, n)).astype(np.float32)
    w_dev, x_dev, b_dev, y_dev = upload(raw), upload(x), upload(bias), upload(y0)
    w = QWeight(int(w_dev.gpudata), qtype, n, k, raw.nbytes)
    mm.linear(w, x_dev, y_dev, m, bias=DevBuf(int(b_dev.gpudata), bias.nbytes), residual=y_dev)
    gpu.Context.synchronize()
    want = (product_twin(raw, x, i15_split(w, mm._sms), qtype) + bias) + y0
    assert y_dev.get().tobytes() == want.tobytes()


@pytest.mark.parametrize("qtype", [MXFP4, Q8_0])
@pytest.mark.parametrize(
    ("ntok", "per_slot"),
    [(1, False), (2, True), (7, True), (32, False), (33, True), (64, False), (100, True)],
)
def test_worker_moe_takes_the_routed_integer_cores(
    gpu: Any, qtype: int, ntok: int, per_slot: bool
) -> None:
    """MatmulKernels.moe with the experts on the integer cores (the default) routes for the
    integer form (tiles of 8 up to 32 tokens, 16 up to 64, 64 above) and gives every assignment
    the twin's product of its expert's matrix and its row of X, plus the expert's bias, bit for
    bit; with a pair, both matrices."""
    from worker.backends.cuda.arena import DevBuf
    from worker.backends.cuda.matmul import MatmulKernels
    from worker.backends.cuda.plans.base import QWeight
    from worker.backends.cuda.plans.i15 import i15_split

    mm = MatmulKernels()
    mm.invariant = True
    mm.int15_experts = True
    n, k, n_experts, topk = 640, 2880, 32, 4
    rng = np.random.default_rng(ntok)
    raws = [random_matrix(qtype, n_experts * n, k, rng)[0] for _ in range(2)]
    ids = np.stack([rng.permutation(n_experts)[:topk] for _ in range(ntok)]).astype(np.int32)
    x_rows = ntok * topk if per_slot else ntok
    x = rng.standard_normal((x_rows, k)).astype(np.float32)
    biases = [rng.standard_normal((n_experts, n)).astype(np.float32) for _ in range(2)]
    w_devs = [upload(r) for r in raws]
    ws = [
        QWeight(int(d.gpudata), qtype, n, k, r.nbytes, experts=n_experts)
        for d, r in zip(w_devs, raws, strict=True)
    ]
    ids_dev, x_dev = upload(ids.reshape(-1)), upload(x)
    b_devs = [upload(b) for b in biases]
    ys = [poisoned((ntok * topk, n)) for _ in range(2)]
    route = mm.moe_route(ids_dev, ntok, topk, n_experts, qtype=qtype)
    assert route.form == "i15" and route.tile_m == (8 if ntok <= 32 else 16 if ntok <= 64 else 64)

    def buf(a: Any) -> DevBuf:
        return DevBuf(int(a.gpudata), a.nbytes)

    mm.moe(
        ws[0], ids_dev, ntok, topk, x_dev, ys[0], per_slot_input=per_slot, route=route,
        bias=buf(b_devs[0]), pair=(ws[1], ys[1], buf(b_devs[1])),
    )  # fmt: skip
    gpu.Context.synchronize()
    splits = i15_split(ws[0], mm._sms)
    flat = ids.reshape(-1)
    for raw, bias, y in zip(raws, biases, ys, strict=True):
        got = y.get()
        experts = raw.reshape(n_experts, n, -1)
        for a in range(ntok * topk):
            e, row = flat[a], a if per_slot else a // topk
            want = product_twin(experts[e], x[row : row + 1], splits, qtype)[0] + bias[e]
            assert got[a].tobytes() == want.tobytes(), a


@pytest.mark.parametrize("qtype", [MXFP4, Q8_0])
@pytest.mark.parametrize("ntok", [1, 2, 7, 33, 64, 100])
def test_integer_moe_layer_ends_are_the_separate_launches(gpu: Any, qtype: int, ntok: int) -> None:
    """MatmulKernels.moe15_ffn (each half of the integer MoE layer ending in one launch:
    moe15_glu, moe15_combine) leaves the residual stream bit for bit as the launches it
    replaces (moe() for gate and up, swiglu_oai_f32, moe() for down, moe_combine_f32), at
    gpt-oss's widths, 32 experts, 4 slots a token, with biases."""
    from worker.backends.cuda.arena import DevBuf
    from worker.backends.cuda.compile import load_module
    from worker.backends.cuda.matmul import MatmulKernels
    from worker.backends.cuda.plans.base import QWeight

    mm = MatmulKernels()
    mm.invariant, mm.int15_experts = True, True
    major, minor = gpu.Context.get_device().compute_capability()
    E, ff, n_exp, topk = 2880, 2880, 32, 4
    rng = np.random.default_rng(ntok)

    def buf(a: Any) -> DevBuf:
        return DevBuf(int(a.gpudata), a.nbytes)

    keep = []

    def experts(rows: int, cols: int) -> tuple[QWeight, DevBuf]:
        raw = random_matrix(qtype, n_exp * rows, cols, rng)[0]
        d = upload(raw)
        b = upload((rng.standard_normal((n_exp, rows)) * 0.5).astype(np.float32))
        keep.extend((d, b))
        return QWeight(int(d.gpudata), qtype, rows, cols, raw.nbytes, experts=n_exp), buf(b)

    gate, up, down = experts(ff, E), experts(ff, E), experts(E, ff)
    ids = upload(np.stack([rng.permutation(n_exp)[:topk] for _ in range(ntok)]).astype(np.int32))
    ew = upload(rng.random((ntok, topk)).astype(np.float32))
    xn = upload(rng.standard_normal((ntok, E)).astype(np.float32))
    x0 = rng.standard_normal((ntok, E)).astype(np.float32)
    n_assign = ntok * topk
    # the separate launches (the SwiGLU and the weighted sum as the worker launches them)
    x_a = upload(x0)
    yg, yu, yd = (poisoned((n_assign, w)) for w in (ff, ff, E))
    route = mm.moe_route(buf(ids), ntok, topk, n_exp, qtype=qtype)
    mm.moe(gate[0], buf(ids), ntok, topk, buf(xn), buf(yg), per_slot_input=False, route=route,
           bias=gate[1], pair=(up[0], buf(yu), up[1]))  # fmt: skip
    act = load_module("activation", f"sm_{major}{minor}").get_function("swiglu_oai_f32")
    act(yg.gpudata, yu.gpudata, yg.gpudata, np.int32(ff), np.int32(ff), np.int32(ff),
        np.int32(ff), np.float32(1.702), np.float32(7.0), block=(256, 1, 1),
        grid=(-(-ff // 256), n_assign))  # fmt: skip
    mm.moe(down[0], buf(ids), ntok, topk, buf(yg), buf(yd), per_slot_input=True, route=route,
           bias=down[1])  # fmt: skip
    comb = load_module("elementwise", f"sm_{major}{minor}").get_function("moe_combine_f32")
    comb(x_a.gpudata, yd.gpudata, ew.gpudata, np.int32(E), np.int32(topk), block=(256, 1, 1),
         grid=(-(-E // 256), ntok))  # fmt: skip
    # the fused ends
    x_b = upload(x0)
    route = mm.moe_route(buf(ids), ntok, topk, n_exp, qtype=qtype)
    mm.moe15_ffn(gate, up, down, buf(ids), buf(ew), ntok, topk, buf(xn), buf(x_b), route)
    gpu.Context.synchronize()
    a, b = x_a.get(), x_b.get()
    assert np.isfinite(a).all() and not np.array_equal(a, x0)
    assert a.tobytes() == b.tobytes()
