"""On-device checks of the embedding lookup and the MoE (gpt-oss) expert matmuls.

Same reference and bounds as test_matmul.py: embedding rows equal the NumPy dequantization
to within one float32 rounding (rtol 2e-6); moe_gemv (FP32) within 2e-5 and moe_gemm (fp16
tensor-core operands) within 2e-3 relative to a float64 product; outputs poisoned with NaN
first; bit-identical repeated runs; an invalid id gives NaN (embedding, moe_gemv) and never
reads outside the table.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from pycuda_arrays import poisoned, rel_err, upload

from worker.backends.cuda.matmul import KernelArgumentError, MatmulKernels, QWeight
from worker.backends.cuda.quant_layout import LAYOUTS, random_matrix

pytestmark = pytest.mark.gpu

TYPES = sorted(LAYOUTS)


@pytest.mark.parametrize("qtype", TYPES, ids=[LAYOUTS[t].name for t in TYPES])
def test_embedding_rows(mm: MatmulKernels, gpu: Any, qtype: int) -> None:
    rng = np.random.default_rng(qtype)
    for rows, cols in (
        (1000, LAYOUTS[qtype].qk * 3),
        (300, 896 if LAYOUTS[qtype].qk == 32 else 3072),
    ):
        raw, dense = random_matrix(qtype, rows, cols, rng)
        ids = rng.integers(0, rows, 37).astype(np.int32)
        ids[:3] = (0, rows - 1, ids[5])  # both ends and a repeat
        w_dev, ids_dev = upload(raw), upload(ids)  # referenced until the kernels are done
        w = QWeight(int(w_dev.gpudata), qtype, rows, cols, raw.nbytes)
        outs = []
        for _ in range(2):
            out = poisoned((len(ids), cols))
            mm.embed(w, ids_dev, len(ids), out)
            gpu.Context.synchronize()
            outs.append(out.get())
        assert np.isfinite(outs[0]).all()
        np.testing.assert_allclose(outs[0], dense[ids], rtol=2e-6, atol=1e-9)
        assert outs[0].tobytes() == outs[1].tobytes()


def test_embedding_bad_id_gives_nan_rows(mm: MatmulKernels, gpu: Any) -> None:
    rng = np.random.default_rng(3)
    raw, dense = random_matrix(6, 50, 896, rng)
    w_dev = upload(raw)
    w = QWeight(int(w_dev.gpudata), 6, 50, 896, raw.nbytes)
    ids_dev = upload(np.array([3, -1, 50, 49], dtype=np.int32))
    out = poisoned((4, 896))
    out.fill(np.float32(0))
    mm.embed(w, ids_dev, 4, out)
    gpu.Context.synchronize()
    got = out.get()
    assert np.isnan(got[1]).all() and np.isnan(got[2]).all()
    np.testing.assert_allclose(got[[0, 3]], dense[[3, 49]], rtol=2e-6, atol=1e-9)
    with pytest.raises(KernelArgumentError, match="embed_q5_0"):
        mm.embed(w, ids_dev, 5, out)  # ids buffer and out hold 4 rows, not 5


def route(rng: np.random.Generator, ntok: int, n_expert: int, topk: int) -> np.ndarray:
    return np.stack([rng.choice(n_expert, topk, replace=False) for _ in range(ntok)]).astype(
        np.int32
    )


def moe_case(
    mm: MatmulKernels,
    gpu: Any,
    qtype: int,
    n_expert: int,
    n: int,
    k: int,
    ntok: int,
    topk: int,
    per_slot: bool,
    form: str,
    rng: np.random.Generator,
) -> tuple[float, bool]:
    raws, denses = zip(*(random_matrix(qtype, n, k, rng) for _ in range(n_expert)), strict=True)
    raw = np.concatenate(raws)
    bias = rng.standard_normal((n_expert, n), dtype=np.float32)
    ids = route(rng, ntok, n_expert, topk)
    x = rng.standard_normal((ntok, topk if per_slot else 1, k), dtype=np.float32)
    ref = np.empty((ntok * topk, n))
    for t in range(ntok):
        for s in range(topk):
            e = ids[t, s]
            xs = x[t, s if per_slot else 0].astype(np.float64)
            ref[t * topk + s] = denses[e].astype(np.float64) @ xs + bias[e]
    w_dev = upload(raw)
    w = QWeight(int(w_dev.gpudata), qtype, n, k, raw.nbytes, experts=n_expert)
    ids_dev, x_dev, b_dev = upload(ids.reshape(-1)), upload(x), upload(bias)
    outs = []
    for _ in range(2):
        y = poisoned((ntok * topk, n))
        mm.moe(w, ids_dev, ntok, topk, x_dev, y, per_slot_input=per_slot, bias=b_dev, form=form)
        gpu.Context.synchronize()
        outs.append(y.get())
    return rel_err(outs[0], ref), outs[0].tobytes() == outs[1].tobytes()


@pytest.mark.parametrize("qtype", [39, 8, 12], ids=["mxfp4", "q8_0", "q4_k"])
@pytest.mark.parametrize("per_slot", [False, True], ids=["shared_x", "per_slot_x"])
def test_moe_small(mm: MatmulKernels, gpu: Any, qtype: int, per_slot: bool) -> None:
    rng = np.random.default_rng(qtype + per_slot)
    k = 2 * LAYOUTS[qtype].qk
    for form, ntok, bound in (("gemv", 1, 2e-5), ("gemv", 2, 2e-5), ("gemm", 70, 2e-3)):
        err, same = moe_case(mm, gpu, qtype, 8, 133, k, ntok, 4, per_slot, form, rng)
        assert err < bound and same, (form, ntok, err)


def test_moe_gptoss_shapes(mm: MatmulKernels, gpu: Any) -> None:
    """32 MXFP4 experts of 2880x2880, top-4: decode (gemv) and a 96-token prefill (gemm)."""
    rng = np.random.default_rng(2880)
    for form, ntok, bound, per_slot in (("gemv", 1, 2e-5, False), ("gemm", 96, 2e-3, True)):
        err, same = moe_case(mm, gpu, 39, 32, 2880, 2880, ntok, 4, per_slot, form, rng)
        assert err < bound and same, (form, err)


def test_moe_gemv_bad_expert_id_gives_nan(mm: MatmulKernels, gpu: Any) -> None:
    rng = np.random.default_rng(11)
    raw = np.concatenate([random_matrix(39, 64, 64, rng)[0] for _ in range(4)])
    w_dev = upload(raw)  # every device buffer stays referenced until the kernel is done
    w = QWeight(int(w_dev.gpudata), 39, 64, 64, raw.nbytes, experts=4)
    x = upload(rng.standard_normal(64, dtype=np.float32))
    ids_dev = upload(np.array([1, 7], dtype=np.int32))
    y = poisoned((2, 64))
    y.fill(np.float32(0))
    mm.moe(w, ids_dev, 1, 2, x, y, per_slot_input=False, form="gemv")
    gpu.Context.synchronize()
    got = y.get()
    assert np.isfinite(got[0]).all() and np.isnan(got[1]).all()
    with pytest.raises(KernelArgumentError, match="moe_gemv_mxfp4"):
        mm.moe(w, ids_dev, 1, 5, x, y, per_slot_input=False, form="gemv")
