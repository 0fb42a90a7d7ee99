"""cuda_src/i15.cu run on the CPU (tools.kernel_emu: the kernels compiled with g++, a block's
threads as OS threads, the warp's mma from the PTX fragment layout): the pre-pass and the
cores give the twin's bits (tools.i15), so the same rows give the same bits from gemm15p8 at
1 row and gemm15p at 33. tests/gpu/test_i15.py asks the GPU the same."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from tools.i15 import I15, MXFP4, Q4_0, Q4_K, Q5_0, Q5_K, Q6_K, Q8_0, product_twin, quant_x15
from tools.kernel_emu import aligned, load
from tools.synth_blocks import random_matrix


@pytest.fixture(scope="module")
def i15() -> I15:
    return I15(load("i15.cu"))


@pytest.fixture(scope="module")
def i15_q5() -> I15:
    return I15(load("i15.cu"), Q5_K)


def _buffers(m: int, k: int, n: int, splits: int) -> dict[str, Any]:
    rng = np.random.default_rng(99)  # garbage, as device memory would hold
    return {
        key: rng.integers(-100, 100, shape).astype(dt)
        for key, (shape, dt) in I15.shapes(m, k, n, splits).items()
    }


def _case(m: int, n: int, k: int, qtype: int = Q4_K) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(m * n + k)
    raw, _ = random_matrix(qtype, n, k, rng)
    x = rng.standard_normal((m, k), dtype=np.float32)
    x[0, 7] = 40.0  # an outlier sets its super-block's scale
    x[-1, 256:512] = 0.0  # an all-zero super-block
    return raw, x


@pytest.mark.parametrize("blk", [32, 256])
def test_pre_pass_is_the_twin(i15: I15, blk: int) -> None:
    m, k = 3, 768
    x = np.random.default_rng(5).standard_normal((m, k), dtype=np.float32)
    x[1, 300] = -25.0
    b = _buffers(m, k, 8, 1)
    d = np.zeros((m, k // blk), np.float32)
    i15.quant(
        x, np.int64(k), np.int32(m), np.int32(k), np.int32(blk), b["hi"], b["lo"], d, b["sq"],
        block=(256, 1, 1), grid=(k // 256, m),
    )  # fmt: skip
    hi, lo, dd, sq = quant_x15(x, blk)
    assert np.array_equal(b["hi"], hi) and np.array_equal(b["lo"], lo)
    assert d.tobytes() == dd.tobytes() and np.array_equal(b["sq"], sq)


@pytest.mark.parametrize(
    ("m", "n", "k", "splits", "core"),
    [
        (1, 100, 512, 1, "gemmp"),
        (7, 130, 768, 3, "gemmp"),
        (33, 72, 2048, 1, "gemmp"),  # 8 super-blocks: three chunks of up to 3
        (1, 100, 512, 1, "gemmp8"),  # one n8 tile a block
        (8, 130, 768, 3, "gemmp8"),
        (17, 72, 2048, 1, "gemmp8"),  # three tiles of rows, 8 super-blocks
    ],
)
def test_cores_are_the_twin_bit_for_bit(
    i15: I15, m: int, n: int, k: int, splits: int, core: str
) -> None:
    raw, x = _case(m, n, k)
    y = np.full((m, n), np.nan, np.float32)
    i15.run(raw, x, y, m, n, k, splits, _buffers(m, k, n, splits), core=core)
    twin = product_twin(raw, x, splits)
    assert y.tobytes() == twin.tobytes(), np.abs(y - twin).max()


@pytest.mark.parametrize(("m", "core"), [(3, "gemmp8"), (9, "gemmp")])
def test_q5_k_cores_are_the_twin_bit_for_bit(i15_q5: I15, m: int, core: str) -> None:
    n, k, splits = 72, 768, 2
    raw, x = _case(m, n, k, Q5_K)
    y = np.full((m, n), np.nan, np.float32)
    i15_q5.run(raw, x, y, m, n, k, splits, _buffers(m, k, n, splits), core=core)
    twin = product_twin(raw, x, splits, Q5_K)
    assert y.tobytes() == twin.tobytes(), np.abs(y - twin).max()


@pytest.fixture(scope="module")
def i15_q6() -> I15:
    return I15(load("i15.cu"), Q6_K)


@pytest.mark.parametrize(
    ("m", "n", "k", "splits", "core"),
    [
        (1, 70, 512, 1, "gemmp"),
        (9, 130, 768, 3, "gemmp"),
        (33, 66, 2048, 1, "gemmp"),  # 8 super-blocks: three chunks of up to 3
        (1, 70, 512, 1, "gemmp8"),
        (9, 130, 768, 3, "gemmp8"),
    ],
)
def test_q6_k_cores_are_the_twin_bit_for_bit(
    i15_q6: I15, m: int, n: int, k: int, splits: int, core: str
) -> None:
    """Q6_K's 210-byte blocks start at every even offset mod 16 along a row (odd n: rows
    too), which both cores' word shifts must follow."""
    raw, x = _case(m, n, k, Q6_K)
    w = aligned(raw)
    y = np.full((m, n), np.nan, np.float32)
    i15_q6.run(w, x, y, m, n, k, splits, _buffers(m, k, n, splits), core=core)
    twin = product_twin(raw, x, splits, Q6_K)
    assert y.tobytes() == twin.tobytes(), np.abs(y - twin).max()


def test_a_row_alone_and_in_a_batch(i15: I15) -> None:
    n, k, splits = 80, 512, 2
    raw, x = _case(33, n, k)
    y33 = np.full((33, n), np.nan, np.float32)
    i15.run(raw, x, y33, 33, n, k, splits, _buffers(33, k, n, splits), core="gemmp")
    y1 = np.full((1, n), np.nan, np.float32)
    row = np.ascontiguousarray(x[20:21])
    i15.run(raw, row, y1, 1, n, k, splits, _buffers(1, k, n, splits), core="gemmp8")
    assert y33[20].tobytes() == y1[0].tobytes()


_LAUNCH_CASES = [
    (1, Q4_K),
    (7, Q5_K),
    (33, Q4_K),
    (33, Q5_K),
    (5, Q6_K),
    (33, Q6_K),
    (1, Q5_0),  # the legacy formats too (K = 896: not a multiple of 256)
    (8, Q8_0),
    (9, Q4_0),
    (33, Q5_0),
    (65, Q5_K),
    (3, MXFP4),
    (33, MXFP4),
]


# "one": one split, y written at once; "split": the core sums its own splits (tickets);
# "fold": one block a tile adds its splits itself (gemm15pf: only above 8 rows)
@pytest.mark.parametrize(
    ("m", "qtype", "form"),
    [
        (m, q, f)
        for m, q in _LAUNCH_CASES
        for f in ("split", "one", "fold")
        if f != "fold" or (m > 8 and q != Q6_K)  # gemm15pf: above 8 rows, no Q6_K form
    ],
)
def test_the_worker_launches_give_the_twin_with_bias_and_residual(
    m: int, qtype: int, form: str
) -> None:
    """MatmulKernels.i15's launches as the worker plans them (x with a row stride, bias,
    in-place residual into a strided y; the core sums its own splits, or folds them in one
    block; gemm15p8 up to 8 rows, gemm15p above), run on the CPU: the twin's product, then
    the bias, then the residual, bit for bit, and the tickets zero again afterwards."""
    one_split = form == "one"
    from tools import kernel_emu
    from worker.backends.cuda.arena import DevBuf
    from worker.backends.cuda.plans.base import QWeight
    from worker.backends.cuda.plans.i15 import (
        i15_block,
        i15_core,
        i15_gemmp_slot,
        i15_planes,
        i15_split,
        i15_tiles,
        plan_i15,
        plan_quant_x15,
    )
    from worker.backends.cuda.quant_layout import layout

    n, k = 200, 896 if qtype in (Q4_0, Q5_0, Q8_0, MXFP4) else 1280
    raw, x = _case(m, n, k, qtype)
    w_raw = aligned(raw)
    w = QWeight(w_raw.ctypes.data, qtype, n, k, w_raw.nbytes)
    assert (i15_core(m) == "gemm15p8") == (m <= 8)
    splits = 1 if one_split else i15_split(w, 132)
    assert one_split or splits > 1
    xs = aligned(np.pad(x, ((0, 0), (0, 8))), 16)  # rows of k + 8: ldx
    rng = np.random.default_rng(m)
    bias = rng.standard_normal(n).astype(np.float32)
    y = aligned(rng.standard_normal((m, n + 4)).astype(np.float32), 16)  # ldy = n + 4
    want = y.copy()
    want[:, :n] = (product_twin(raw, x, splits, qtype) + bias) + y[:, :n]
    blk = i15_block(qtype)
    planes = aligned(np.zeros(i15_planes(m, k, blk)[4], np.uint8), 16)
    part = aligned(np.zeros((splits, m, n), np.float32), 16)
    tickets = aligned(np.zeros(i15_tiles(w, m), np.int32), 16)

    def buf(a: np.ndarray) -> DevBuf:
        return DevBuf(a.ctypes.data, a.nbytes)

    kernel_emu.run(plan_quant_x15(buf(xs), buf(planes), m, k, ldx=k + 8, blk=blk))
    out = {"bias": buf(bias), "residual": buf(y), "ldy": n + 4, "tickets": buf(tickets)}
    launch = plan_i15(w, buf(planes), buf(part), m, splits, y=buf(y), fold=form == "fold", **out)
    assert (launch.grid[2] == 1) == (form != "split")
    # the staged ring: two slots for gemm15p8, three for gemm15p (at most a split's units)
    slot = i15_gemmp_slot(qtype, layout(qtype).block_bytes, 8 if m <= 8 else 32)
    assert launch.shared % slot == 0 and launch.shared // slot <= (2 if m <= 8 else 3)
    kernel_emu.run(launch)
    assert y.tobytes() == want.tobytes()
    assert not tickets.any()


@pytest.mark.parametrize("qtype", [Q4_K, Q5_K, Q8_0])
def test_a_fold_of_splits_of_several_units_is_the_twin(qtype: int) -> None:
    """gemm15pf over 5 units (super-blocks; legacy: chunks of 8 blocks) in 3 splits of 2, 2
    and 1: its split sums cross units and the last is short. Without y its one partial is
    the twin's in-order sum of the 3 splits, bit for bit."""
    from tools import kernel_emu
    from worker.backends.cuda.arena import DevBuf
    from worker.backends.cuda.plans.base import QWeight
    from worker.backends.cuda.plans.i15 import i15_block, i15_planes, plan_i15, plan_quant_x15

    m, n, k, splits = 17, 70, 1280, 3
    raw, x = _case(m, n, k, qtype)
    w_raw = aligned(raw)
    w = QWeight(w_raw.ctypes.data, qtype, n, k, w_raw.nbytes)
    blk = i15_block(qtype)
    xs = aligned(x, 16)
    planes = aligned(np.zeros(i15_planes(m, k, blk)[4], np.uint8), 16)
    part = aligned(np.full((1, m, n), np.nan, np.float32), 16)

    def buf(a: np.ndarray) -> DevBuf:
        return DevBuf(a.ctypes.data, a.nbytes)

    kernel_emu.run(plan_quant_x15(buf(xs), buf(planes), m, k, blk=blk))
    kernel_emu.run(plan_i15(w, buf(planes), buf(part), m, splits, fold=True))
    assert part[0].tobytes() == product_twin(raw, x, splits, qtype).tobytes()


@pytest.fixture(scope="module")
def emu_i15() -> Any:
    return load("i15.cu")


@pytest.mark.parametrize("qtype", [Q4_0, Q5_0, Q8_0, MXFP4])
@pytest.mark.parametrize(
    ("m", "n", "k", "splits", "core"),
    [
        (1, 70, 896, 1, "gemmp"),
        (3, 37, 896, 2, "gemmp8"),  # odd n: rows start at every even offset mod 16
        (8, 66, 2048, 3, "gemmp8"),  # 64 blocks, 8 chunks: splits of 3, 3, 2 chunks
        (9, 130, 896, 4, "gemmp"),  # splits of 8, 8, 8, 4 blocks
        (33, 66, 2048, 1, "gemmp"),  # 8 chunks: three rounds of up to 3 slots
        (40, 37, 160, 1, "gemmp"),  # K under a chunk: one chunk of 5 blocks
        (1, 70, 896, 1, "gemmp8"),
        (8, 130, 896, 4, "gemmp8"),
        (11, 37, 2048, 3, "gemmp8"),
    ],
)
def test_legacy_cores_are_the_twin_bit_for_bit(
    emu_i15: Any, qtype: int, m: int, n: int, k: int, splits: int, core: str
) -> None:
    """Q4_0 / Q5_0 / Q8_0 / MXFP4 (blocks of 32, X scaled per 32): the staged tensor-core cores
    (signed codes) give the twin's bits, with K not a multiple of 256, the 18-, 22- and 34-byte
    blocks at every even offset and MXFP4's 17-byte ones at every offset (its exponents 0, 1 and 2
    too: subnormal and smallest steps)."""
    i15 = I15(emu_i15, qtype)
    raw, x = _case(m, n, k, qtype)
    if qtype == MXFP4:
        raw = raw.copy()
        raw.reshape(n, -1, 17)[:3, :3, 0] = [[0, 1, 2], [2, 1, 0], [1, 0, 2]]
    y = np.full((m, n), np.nan, np.float32)
    buffers = {
        key: np.random.default_rng(99).integers(-100, 100, shape).astype(dt)
        for key, (shape, dt) in I15.shapes(m, k, n, splits, 32).items()
    }
    i15.run(aligned(raw), x, y, m, n, k, splits, buffers, core=core)
    twin = product_twin(raw, x, splits, qtype)
    assert y.tobytes() == twin.tobytes(), np.abs(y - twin).max()


def _route_workspace(ids: np.ndarray, n_experts: int, tile_m: int) -> np.ndarray:
    """moe_route's workspace as the kernel writes it (tile count; tiles (expert, first list
    entry, rows, 0) of at most tile_m assignments, experts ascending; the assignments of each
    expert ascending), built here so the routed core is checked on its own."""
    from worker.backends.cuda.plans.moe import moe_tile_bound, moe_workspace_bytes

    n_assign = ids.size
    ws = np.zeros(moe_workspace_bytes(n_assign, n_experts, tile_m), np.uint8)
    bound = moe_tile_bound(n_assign, n_experts, tile_m)
    tiles = ws[16 : 16 + 16 * bound].view(np.int32).reshape(bound, 4)
    lst = ws[16 + 16 * bound :].view(np.int32)
    pos = nt = 0
    for e in range(n_experts):
        mine = np.flatnonzero(ids == e)
        lst[pos : pos + mine.size] = mine
        for j in range(0, mine.size, tile_m):
            tiles[nt] = (e, pos + j, min(tile_m, mine.size - j), 0)
            nt += 1
        pos += mine.size
    ws[:4].view(np.int32)[0] = nt
    return aligned(ws, 16)


@pytest.mark.parametrize("qtype", [MXFP4, Q8_0])
@pytest.mark.parametrize(
    ("ntok", "topk", "n_experts", "tile_m", "per_slot"),
    [
        (1, 4, 8, 8, False),  # one token, four experts (gate / up: the token's row)
        (5, 2, 4, 8, True),  # down: a row an assignment
        (11, 3, 4, 8, False),  # 33 assignments on 4 experts: one has more than one tile
        (1, 4, 8, 16, False),
        (5, 2, 4, 16, True),
        (23, 3, 4, 16, False),  # 69 on 4: an expert with more than one tile
        (40, 2, 3, 64, True),  # prefill tiles of 64
    ],
)
def test_routed_core_is_the_dense_core_per_assignment(
    qtype: int, ntok: int, topk: int, n_experts: int, tile_m: int, per_slot: bool
) -> None:
    """moe15p<8|16|64>_<fmt> over a routing table, the split partials summed with each
    assignment's expert bias (the worker's launches): every assignment's row is the twin's
    product of its expert's matrix and its row of X, then the bias, bit for bit."""
    from tools import kernel_emu
    from tools.i15 import LEGACY_BYTES
    from worker.backends.cuda.arena import DevBuf
    from worker.backends.cuda.plans.base import QWeight
    from worker.backends.cuda.plans.dense import plan_splitk_reduce
    from worker.backends.cuda.plans.i15 import i15_planes, i15_split, plan_moe_i15, plan_quant_x15
    from worker.backends.cuda.plans.moe import MoeRoute

    n, k = 70, 896
    n_assign = ntok * topk
    rng = np.random.default_rng(ntok * 100 + n_experts)
    raw, _ = random_matrix(qtype, n_experts * n, k, rng)  # experts one after another
    wr = aligned(raw)
    w = QWeight(wr.ctypes.data, qtype, n, k, wr.nbytes, experts=n_experts)
    assert w.expert_bytes == n * k // 32 * LEGACY_BYTES[qtype]
    ids = np.stack([rng.permutation(n_experts)[:topk] for _ in range(ntok)]).astype(np.int32)
    ids = aligned(ids.reshape(-1), 16)
    x_rows = n_assign if per_slot else ntok
    x = aligned(rng.standard_normal((x_rows, k)).astype(np.float32), 16)
    bias = aligned(rng.standard_normal((n_experts, n)).astype(np.float32), 16)
    ws = _route_workspace(ids, n_experts, tile_m)
    route = MoeRoute(
        ids.ctypes.data, ntok, topk, n_experts, "i15", tile_m, 1, DevBuf(ws.ctypes.data, ws.nbytes)
    )
    splits = i15_split(w, 132)
    planes = aligned(np.zeros(i15_planes(x_rows, k, 32)[4], np.uint8), 16)
    part = aligned(np.zeros((splits, n_assign, n), np.float32), 16)
    y = aligned(np.full((n_assign, n), np.nan, np.float32), 16)

    def buf(a: np.ndarray) -> DevBuf:
        return DevBuf(a.ctypes.data, a.nbytes)

    kernel_emu.run(plan_quant_x15(buf(x), buf(planes), x_rows, k, blk=32))
    opts = {"x_rows": x_rows, "per_slot_input": per_slot}
    kernel_emu.run(plan_moe_i15(w, buf(planes), buf(part), n_assign, splits, route, **opts))
    kernel_emu.run(
        plan_splitk_reduce(
            buf(part), splits, n_assign, n, buf(y), bias=buf(bias), experts=(buf(ids), n_experts)
        )
    )
    experts = raw.reshape(n_experts, n, -1)
    for a in range(n_assign):
        e, row = ids[a], a if per_slot else a // topk
        want = product_twin(experts[e], x[row : row + 1], splits, qtype)[0] + bias[e]
        assert y[a].tobytes() == want.tobytes(), (a, np.abs(y[a] - want).max())
