"""On-device checks of the embedding lookup and the MoE (gpt-oss) expert matmuls.

Same reference and bounds as test_matmul.py: embedding rows equal the NumPy dequantization
to within one float32 rounding (rtol 2e-6); moe_gemv (FP32) within 2e-5 and moe_gemm (fp16
tensor-core operands) within 2e-3 relative to a float64 product; outputs poisoned with NaN
first; bit-identical repeated runs; an invalid id gives NaN (embedding, moe_gemv) and never
reads outside the table. Every moe_gemv variant (1/2/4 rows per warp) for every type; the
routing pre-pass's lists and tile table against NumPy. The routed gemm on the gemm2 core
(moe_gemm5_<type>_m64/_m128): every type at odd shapes with empty experts and invalid ids,
one expert taking every assignment, gpt-oss's shapes at 128 and 512 tokens, against float64
(2e-3) and the product of the fp16-rounded operands (1e-4, as the dense gemm2 tests), reruns
bit-identical, rows outside the assignments (and past them) untouched, the same bytes with
64- and 128-row tiles; moe_skinny gives moe_gemm5's bytes.
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
from worker.backends.cuda.plans.moe import moe5_tile_m, moe_workspace_bytes, plan_moe_route
from worker.backends.cuda.quant_layout import LAYOUTS

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
    with pytest.raises(LaunchRefused, match="embed_q5_0"):
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
    *,
    ids: np.ndarray | None = None,
    **kw: Any,
) -> tuple[float, bool]:
    """Relative error of moe against a float64 product, and whether two runs are identical.
    ids: [ntok][topk] routing (default: random distinct experts per token); kw: plan_moe's."""
    out, ref = moe_run(
        mm, gpu, qtype, n_expert, n, k, ntok, topk, per_slot, form, rng, ids=ids, **kw
    )
    return rel_err(out[0], ref), out[0].tobytes() == out[1].tobytes()


def moe_run(
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
    *,
    ids: np.ndarray | None = None,
    **kw: Any,
) -> tuple[list[np.ndarray], np.ndarray]:
    """Two runs' outputs (poisoned with NaN first) and the float64 reference (rows of invalid
    ids: NaN)."""
    raws, denses = zip(*(random_matrix(qtype, n, k, rng) for _ in range(n_expert)), strict=True)
    raw = np.concatenate(raws)
    bias = rng.standard_normal((n_expert, n), dtype=np.float32)
    if ids is None:
        ids = route(rng, ntok, n_expert, topk)
    x = rng.standard_normal((ntok, topk if per_slot else 1, k), dtype=np.float32)
    ref = np.empty((ntok * topk, n))
    for t in range(ntok):
        for s in range(topk):
            e = ids[t, s]
            if not 0 <= e < n_expert:
                ref[t * topk + s] = np.nan
                continue
            xs = x[t, s if per_slot else 0].astype(np.float64)
            ref[t * topk + s] = denses[e].astype(np.float64) @ xs + bias[e]
    w_dev = upload(raw)
    w = QWeight(int(w_dev.gpudata), qtype, n, k, raw.nbytes, experts=n_expert)
    ids_dev, x_dev, b_dev = upload(ids.reshape(-1)), upload(x), upload(bias)
    outs = []
    for _ in range(2):
        y = poisoned((ntok * topk, n))
        mm.moe(
            w, ids_dev, ntok, topk, x_dev, y, per_slot_input=per_slot, bias=b_dev, form=form, **kw
        )
        gpu.Context.synchronize()
        outs.append(y.get())
    return outs, ref


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
    with pytest.raises(LaunchRefused, match="moe_gemv_mxfp4"):
        mm.moe(w, ids_dev, 1, 5, x, y, per_slot_input=False, form="gemv")


GEMV_VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("r1", {"rows_per_warp": 1}),
    ("r2", {"rows_per_warp": 2}),
    ("r4", {"rows_per_warp": 4}),
]


@pytest.mark.parametrize("variant", GEMV_VARIANTS, ids=[v[0] for v in GEMV_VARIANTS])
@pytest.mark.parametrize("qtype", TYPES, ids=[LAYOUTS[t].name for t in TYPES])
def test_moe_gemv_variants_every_type(
    mm: MatmulKernels, gpu: Any, qtype: int, variant: tuple[str, dict[str, Any]]
) -> None:
    """133 rows (partial row tiles), experts starting at any byte offset (K = 2 blocks), and a
    2880-column shape (several chunks per row for 4 rows per warp); 1 and 2 tokens, shared
    and per-slot inputs."""
    rng = np.random.default_rng(qtype * 7 + len(variant[0]))
    qk = LAYOUTS[qtype].qk
    shapes = (
        (133, 2 * qk, 1, False),
        (133, 2 * qk, 2, True),
        (70, 2880 if qk == 32 else 3072, 2, True),
    )
    for n, k, ntok, per_slot in shapes:
        err, same = moe_case(mm, gpu, qtype, 6, n, k, ntok, 3, per_slot, "gemv", rng, **variant[1])
        assert err < 2e-5 and same, (variant[0], n, k, ntok, err)


@pytest.mark.parametrize("rw", [1, 2, 4])
def test_moe_gemv_bad_id_rows_are_nan(mm: MatmulKernels, gpu: Any, rw: int) -> None:
    rng = np.random.default_rng(rw)
    ids = np.array([[2, -1, 6, 1]], np.int32)  # -1 and 6 (== n_expert) are invalid
    kw: dict[str, Any] = {"rows_per_warp": rw}
    out, ref = moe_run(mm, gpu, 39, 6, 133, 64, 1, 4, False, "gemv", rng, ids=ids, **kw)
    got = out[0]
    assert np.isnan(got[1]).all() and np.isnan(got[2]).all()
    assert rel_err(got[[0, 3]], ref[[0, 3]]) < 2e-5


def read_route(
    mm: MatmulKernels, gpu: Any, ids: np.ndarray, n_expert: int, tile_m: int
) -> tuple[int, np.ndarray, np.ndarray]:
    """Run moe_route on ids; return (ntiles, tiles [ntiles][4], list [n_assign])."""
    import pycuda.gpuarray as ga

    n = len(ids)
    nbytes = moe_workspace_bytes(n, n_expert, tile_m)
    ws = ga.empty(nbytes // 4, np.int32)
    ws.fill(np.int32(-7))
    ids_dev = upload(ids.astype(np.int32))
    mm.run(plan_moe_route(ids_dev, n, n_expert, ws, tile_m=tile_m))
    gpu.Context.synchronize()
    h = ws.get()
    ntiles = int(h[0])
    bound = (nbytes - 16 - 4 * n) // 16
    tiles = h[4 : 4 + 4 * bound].reshape(bound, 4)[:ntiles]
    return ntiles, tiles, h[4 + 4 * bound :]


def check_route(ids: np.ndarray, n_expert: int, tile_m: int, got: tuple[int, Any, Any]) -> None:
    ntiles, tiles, lst = got
    valid = (ids >= 0) & (ids < n_expert)
    order = np.argsort(np.where(valid, ids, n_expert), kind="stable")[: int(valid.sum())]
    assert (lst[: len(order)] == order).all()  # grouped by expert, ascending within one
    want = []
    off = 0
    for e in range(n_expert):
        c = int((ids == e).sum())
        want += [(e, off + j, min(tile_m, c - j), 0) for j in range(0, c, tile_m)]
        off += c
    assert ntiles == len(want)
    assert [tuple(int(v) for v in t) for t in tiles] == want


@pytest.mark.parametrize("tile_m", [16, 64, 128])
def test_moe_route_lists_and_tiles(mm: MatmulKernels, gpu: Any, tile_m: int) -> None:
    rng = np.random.default_rng(tile_m)
    cases = [
        route(rng, 96, 32, 4).reshape(-1),  # gpt-oss-like, 384 assignments
        np.full(300, 7, np.int32),  # every assignment on one expert (several tiles)
        rng.choice([3, 9], 130).astype(np.int32),  # two experts used, the rest empty
        np.array([5], np.int32),  # a single assignment
        rng.integers(0, 128, 5000).astype(np.int32),  # more assignments than threads
        np.concatenate([route(rng, 40, 16, 4).reshape(-1), [-1, 16, 2, -5]]).astype(np.int32),
    ]
    for ids, n_expert in zip(cases, (32, 8, 16, 6, 128, 16), strict=True):
        first = read_route(mm, gpu, ids, n_expert, tile_m)
        check_route(ids, n_expert, tile_m, first)
        again = read_route(mm, gpu, ids, n_expert, tile_m)
        assert first[0] == again[0] and (first[2] == again[2]).all()


def test_moe_gemm_routed_tiles_give_the_same_bytes(mm: MatmulKernels, gpu: Any) -> None:
    """The routed gemm with 64- and 128-row token tiles: within 2e-3, and the same bytes (a
    row's sum does not depend on its tile); every token on the same 4 experts (several tiles
    an expert), 70 tokens (partial tiles)."""
    for qtype, n, k in ((39, 133, 128), (12, 96, 512), (8, 200, 128)):
        for ids_kind in ("random", "concentrated"):
            outs = {}
            for name, kw in (("64", {"tile_m": 64}), ("128", {"tile_m": 128})):
                rng = np.random.default_rng(qtype)  # same weights, inputs, routing per variant
                ids = route(rng, 70, 8, 4) if ids_kind == "random" else None
                if ids is None:
                    ids = np.tile(np.array([5, 0, 7, 2], np.int32), (70, 1))
                out, ref = moe_run(mm, gpu, qtype, 8, n, k, 70, 4, True, "gemm", rng, ids=ids, **kw)
                assert rel_err(out[0], ref) < 2e-3, (qtype, ids_kind, name)
                assert out[0].tobytes() == out[1].tobytes()
                outs[name] = out[0]
            assert outs["64"].tobytes() == outs["128"].tobytes(), (qtype, ids_kind)


def test_moe_gemm_invalid_ids_left_unwritten(mm: MatmulKernels, gpu: Any) -> None:
    rng = np.random.default_rng(5)
    ids = route(rng, 20, 8, 2)
    ids[3, 1], ids[11, 0] = -1, 8
    out, ref = moe_run(mm, gpu, 8, 8, 64, 64, 20, 2, False, "gemm", rng, ids=ids)
    bad = np.isnan(ref[:, 0])
    assert bad.sum() == 2 and np.isnan(out[0][bad]).all()
    assert rel_err(out[0][~bad], ref[~bad]) < 2e-3


# ---- routed gemm on the gemm2 core (version 5; docs/kernels.md, MoE) ------------------------
GEMM_BOUND = 2e-3  # float64 reference (test_matmul.py's gemm bound)
GEMM_FP16_EXACT_BOUND = 1e-4  # reference of the fp16-rounded operands (test_matmul.py's)
POISON = np.float32(np.nan).view(np.uint32)


class Experts:
    """n_expert random matrices of one type on the device, their float64 dequantization and
    its fp16-rounded twin, and a bias per expert."""

    def __init__(self, qtype: int, n_expert: int, n: int, k: int, rng: np.random.Generator):
        raws, denses = zip(*(random_matrix(qtype, n, k, rng) for _ in range(n_expert)), strict=True)
        raw = np.concatenate(raws)
        self.dense = list(denses)
        self.bias = rng.standard_normal((n_expert, n), dtype=np.float32)
        self.w_dev, self.b_dev = upload(raw), upload(self.bias)
        self.w = QWeight(int(self.w_dev.gpudata), qtype, n, k, raw.nbytes, experts=n_expert)
        self.n_expert, self.n, self.k = n_expert, n, k

    def reference(self, ids: np.ndarray, xa: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(float64, fp16-operand) products of assignment a's expert and input xa[a] (+ bias),
        one matmul per expert; rows of invalid ids NaN."""
        flat = ids.reshape(-1)
        ref = np.full((len(flat), self.n), np.nan)
        ref16 = ref.copy()
        x16 = xa.astype(np.float16).astype(np.float64)
        for e in range(self.n_expert):
            sel = flat == e
            if not sel.any():
                continue
            d = self.dense[e].astype(np.float64)
            ref[sel] = xa[sel].astype(np.float64) @ d.T + self.bias[e]
            d16 = self.dense[e].astype(np.float16).astype(np.float64)
            ref16[sel] = x16[sel] @ d16.T + self.bias[e]
        return ref, ref16


def routed5(
    mm: MatmulKernels,
    gpu: Any,
    ex: Experts,
    ids: np.ndarray,
    per_slot: bool,
    rng: np.random.Generator,
    **kw: Any,
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
    """Two runs of the routed gemm (form="skinny": the decode form with its arithmetic) into
    outputs of
    n_assign + 3 rows poisoned with NaN; returns (outputs, ref, ref16, valid rows)."""
    ntok, topk = ids.shape
    n_assign = ntok * topk
    x = rng.standard_normal((ntok, topk if per_slot else 1, ex.k), dtype=np.float32)
    a = np.arange(n_assign)
    xa = x[a // topk, a % topk if per_slot else 0]
    ref, ref16 = ex.reference(ids, xa)
    ids_dev, x_dev = upload(ids.reshape(-1)), upload(x)
    form = kw.pop("form", "gemm")
    outs = []
    for _ in range(2):
        y = poisoned((n_assign + 3, ex.n))
        mm.moe(
            ex.w,
            ids_dev,
            ntok,
            topk,
            x_dev,
            y,
            per_slot_input=per_slot,
            bias=ex.b_dev,
            form=form,
            **kw,
        )
        gpu.Context.synchronize()
        outs.append(y.get())
    flat = ids.reshape(-1)
    return outs, ref, ref16, (flat >= 0) & (flat < ex.n_expert)


def check5(
    outs: list[np.ndarray], ref: np.ndarray, ref16: np.ndarray, valid: np.ndarray, what: object
) -> None:
    got = outs[0]
    n_assign = len(valid)
    assert outs[0].tobytes() == outs[1].tobytes(), ("rerun differs", what)
    untouched = np.concatenate([np.flatnonzero(~valid), np.arange(n_assign, n_assign + 3)])
    assert (got[untouched].view(np.uint32) == POISON).all(), ("row written", what)
    err = rel_err(got[:n_assign][valid], ref[valid])
    err16 = rel_err(got[:n_assign][valid], ref16[valid])
    assert err < GEMM_BOUND and err16 < GEMM_FP16_EXACT_BOUND, (what, err, err16)


@pytest.mark.parametrize("tile_m", [64, 128])
@pytest.mark.parametrize("qtype", TYPES, ids=[LAYOUTS[t].name for t in TYPES])
def test_moe_gemm5_every_type(mm: MatmulKernels, gpu: Any, qtype: int, tile_m: int) -> None:
    """Odd shapes: 133 and 200 weight rows (a partial 128-row tile), K of 3 blocks (experts at
    odd byte offsets, a partial raw chunk) and 1280/2560 columns (several chunks); 37 tokens x
    top-3 = 111 assignments (no multiple of the tile), expert 4 of 6 empty, two invalid ids."""
    rng = np.random.default_rng(qtype * 3 + tile_m)
    qk = LAYOUTS[qtype].qk
    for n, k, per_slot in ((133, 3 * qk, True), (200, 1280 if qk == 32 else 2560, False)):
        ex = Experts(qtype, 6, n, k, rng)
        ids = np.stack([rng.choice([0, 1, 2, 3, 5], 3, replace=False) for _ in range(37)])
        ids = ids.astype(np.int32)
        ids[5, 1], ids[20, 2] = -1, 6
        outs, ref, ref16, valid = routed5(mm, gpu, ex, ids, per_slot, rng, tile_m=tile_m)
        check5(outs, ref, ref16, valid, (n, k))


def test_moe_gemm5_gptoss_shapes(mm: MatmulKernels, gpu: Any) -> None:
    """gpt-oss-20b's experts: 32 MXFP4 matrices of 2880x2880, top-4 random routing; 512 tokens
    with a shared input (gate/up) and 128 with per-slot inputs (down), both tiles."""
    rng = np.random.default_rng(2048)
    ex = Experts(39, 32, 2880, 2880, rng)
    for ntok, per_slot in ((512, False), (128, True)):
        ids = route(rng, ntok, 32, 4)
        for tile_m in (64, 128):
            outs, ref, ref16, valid = routed5(mm, gpu, ex, ids, per_slot, rng, tile_m=tile_m)
            check5(outs, ref, ref16, valid, (ntok, tile_m))
        assert moe5_tile_m(ntok * 4, 32) == (128 if ntok == 512 else 64)


@pytest.mark.parametrize("qtype", [39, 12, 8, 14], ids=["mxfp4", "q4_k", "q8_0", "q6_k"])
def test_moe_gemm5_tiles_agree_byte_for_byte(mm: MatmulKernels, gpu: Any, qtype: int) -> None:
    """64- and 128-row token tiles: each within the reference's bound and the two byte-equal
    (same fp16 operands, same k16 order of mma.sync, same fp32 epilogue, so a wrong row,
    column or offset of either cannot hide in the error bound); routing concentrated (all 300
    assignments on expert 5 of 8: 3 tiles of 128 or 5 of 64, the last partial, the other
    experts empty) and spread (random top-4 with one invalid id)."""
    rng = np.random.default_rng(qtype + 300)
    ex = Experts(qtype, 8, 133, 2 * max(LAYOUTS[qtype].qk, 128), rng)
    spread = route(rng, 70, 8, 4)
    spread[3, 2] = -1
    for what, ids in (("one expert", np.full((150, 2), 5, np.int32)), ("spread", spread)):
        got = []
        for tile_m in (64, 128):
            outs, ref, ref16, valid = routed5(
                mm, gpu, ex, ids, True, np.random.default_rng(9), tile_m=tile_m
            )
            check5(outs, ref, ref16, valid, (what, tile_m))
            got.append(outs[0])
        assert got[0].tobytes() == got[1].tobytes(), what


@pytest.mark.parametrize("per_slot", [False, True], ids=["shared_x", "per_slot_x"])
def test_moe_rows_are_batch_invariant(mm: MatmulKernels, gpu: Any, per_slot: bool) -> None:
    """In invariant mode the routed tensor-core product serves every token count: token t's
    expert rows are bit-identical when it is routed alone, among 2, 7, 16, 17 or 64 tokens (other
    tokens share its experts' tiles or not), with MXFP4 experts at gpt-oss's width."""
    rng = np.random.default_rng(64 + per_slot)
    n_exp, topk, n, k = 32, 4, 384, 2880
    raws = [random_matrix(39, n, k, rng)[0] for _ in range(n_exp)]
    raw = np.concatenate(raws)
    w_dev = upload(raw)
    w = QWeight(int(w_dev.gpudata), 39, n, k, raw.nbytes, experts=n_exp)
    b_dev = upload(rng.standard_normal((n_exp, n), dtype=np.float32))
    ids = route(rng, 64, n_exp, topk)
    x = rng.standard_normal((64, topk if per_slot else 1, k), dtype=np.float32)
    outs = {}
    mm.invariant = True
    try:
        for m in (1, 2, 7, 16, 17, 64):
            y = poisoned((m * topk, n))
            ids_m, x_m = upload(ids[:m].reshape(-1)), upload(x[:m])  # referenced until synced
            mm.moe(w, ids_m, m, topk, x_m, y, per_slot_input=per_slot, bias=b_dev)
            gpu.Context.synchronize()
            outs[m] = y.get()
    finally:
        mm.invariant = False
    for m, y in outs.items():
        assert np.array_equal(y.view(np.uint32), outs[64][: m * topk].view(np.uint32)), m


@pytest.mark.parametrize("qtype", TYPES, ids=[LAYOUTS[t].name for t in TYPES])
def test_moe_skinny_equals_the_routed_gemm(mm: MatmulKernels, gpu: Any, qtype: int) -> None:
    """The decode form (tiles of at most 16 rows, a warp per 8 weight rows) gives moe_gemm5's
    bytes for 1, 3 and 16 tokens (an expert with up to 16 rows, one tile each) and 40 tokens
    on 3 experts (several tiles an expert); odd shapes as in the every-type gemm5 test
    (experts at odd byte offsets, partial raw chunks, rows not a multiple of 8); invalid ids
    left unwritten."""
    rng = np.random.default_rng(qtype * 5 + 1)
    qk = LAYOUTS[qtype].qk
    for n, k, per_slot in ((133, 3 * qk, True), (200, 1280 if qk == 32 else 2560, False)):
        ex = Experts(qtype, 6, n, k, rng)
        cases = [route(rng, m, 6, 3) for m in (1, 3, 16)]
        cases.append(rng.choice([0, 2, 5], (40, 1)).astype(np.int32))
        cases[2][5, 1], cases[2][9, 2] = -1, 6
        for ids in cases:
            got = {}
            for form in ("gemm", "skinny"):
                outs, ref, ref16, valid = routed5(
                    mm, gpu, ex, ids, per_slot, np.random.default_rng(3), form=form
                )
                check5(outs, ref, ref16, valid, (form, n, k, ids.shape))
                got[form] = outs[0]
            assert got["skinny"].tobytes() == got["gemm"].tobytes(), (n, k, ids.shape)


@pytest.mark.parametrize("qtype", [2, 8, 12, 39], ids=["q4_0", "q8_0", "q4_k", "mxfp4"])
def test_moe_pair_and_shared_route_give_the_single_launch_bytes(
    mm: MatmulKernels, gpu: Any, qtype: int
) -> None:
    """gpt-oss's layer: one routing pre-pass for gate, up and down, gate and up in one paired
    launch (the skinny form; the gemm form launches them one after the other). Each output
    has the bytes of its own launch with its own pre-pass, at 1, 7 and 64 tokens (skinny),
    70 (gemm) and, invariance off, 1 (the gemv, no pre-pass); rows of invalid ids and rows
    past the assignments stay unwritten by the routed forms."""
    rng = np.random.default_rng(qtype + 77)
    qk = LAYOUTS[qtype].qk
    n, k = 200, 1280 if qk == 32 else 2560
    gate, up = Experts(qtype, 6, n, k, rng), Experts(qtype, 6, n, k, rng)
    for ntok, invariant in ((1, True), (7, True), (64, True), (70, True), (1, False)):
        ids = route(rng, ntok, 6, 3)
        ids[0, 1] = -1
        x_dev = upload(rng.standard_normal((ntok, k), dtype=np.float32))
        ids_dev = upload(ids.reshape(-1))
        n_assign = ntok * 3
        mm.invariant = invariant
        try:
            alone = []
            for ex in (gate, up):
                y = poisoned((n_assign + 3, n))
                mm.moe(ex.w, ids_dev, ntok, 3, x_dev, y, per_slot_input=False, bias=ex.b_dev)
                alone.append(y)
            r = mm.moe_route(ids_dev, ntok, 3, 6)
            assert r.form == ("gemv" if not invariant else "skinny" if ntok <= 64 else "gemm")
            yg, yu = poisoned((n_assign + 3, n)), poisoned((n_assign + 3, n))
            mm.moe(
                gate.w,
                ids_dev,
                ntok,
                3,
                x_dev,
                yg,
                per_slot_input=False,
                bias=gate.b_dev,
                route=r,
                pair=(up.w, yu, up.b_dev),
            )
            gpu.Context.synchronize()
            for got, want in ((yg, alone[0]), (yu, alone[1])):
                assert got.get().tobytes() == want.get().tobytes(), ntok
            if invariant:  # (the gemv writes NaN rows for invalid ids)
                assert (yg.get()[[1, n_assign, n_assign + 2]].view(np.uint32) == POISON).all()
            # a later pre-pass overwrites the workspace: the older routing is refused
            mm.moe_route(ids_dev, ntok, 3, 6)
            with pytest.raises(LaunchRefused):
                mm.moe(gate.w, ids_dev, ntok, 3, x_dev, yg, per_slot_input=False, route=r)
        finally:
            mm.invariant = False
