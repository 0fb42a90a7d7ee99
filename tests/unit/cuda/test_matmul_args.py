"""Matrix-kernel checks that need no GPU (tests/gpu/ has the on-device ones).

* Every argument check of worker/backends/cuda/matmul.py refuses a bad launch before anything
  is queued, with the kernel's name, and accepts the good one.
* dequant8 of cuda_src/quant.cuh (the one dequantization routine every matrix kernel uses),
  compiled for the host by nvcc, equals worker.gguf.quants' NumPy dequantization for all
  twelve types on random blocks.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tools.synth_blocks import random_matrix
from worker.backends.cuda.arena import DevBuf, LaunchRefused
from worker.backends.cuda.matmul import MatmulKernels
from worker.backends.cuda.plans.base import Launch, QWeight
from worker.backends.cuda.plans.dense import (
    SKINNY_ITEM_BYTES,
    gemm2_smem_bytes,
    gemm_split,
    gemm_version,
    plan_embed,
    plan_gemm,
    plan_gemm_x16,
    plan_gemv,
    plan_skinny,
    skinny_shape,
    skinny_warp_bytes,
)
from worker.backends.cuda.plans.moe import (
    MOE5_MIN_AVG_128,
    moe5_tile_m,
    moe_split,
    moe_tile_bound,
    moe_workspace_bytes,
    plan_moe,
    plan_moe_route,
)
from worker.backends.cuda.quant_layout import LAYOUTS, layout
from worker.errors import CudaError, ErrorCode

CUDA_SRC = Path(__file__).resolve().parents[3] / "cuda_src"
A = 1 << 20  # a 256-byte-aligned fake device address


def weight(qtype: int = 12, rows: int = 64, cols: int = 512, experts: int = 1) -> QWeight:
    nbytes = experts * rows * layout(qtype).row_bytes(cols)
    return QWeight(A, qtype, rows, cols, nbytes, experts)


def bufs(w: QWeight, ntok: int) -> tuple[DevBuf, DevBuf]:
    x = DevBuf(1 << 30, ntok * w.cols * 4)
    y = DevBuf(1 << 31, ntok * w.rows * 4)
    return x, y


def test_good_gemv_plan_has_grid_and_args() -> None:
    w = weight()
    x, y = bufs(w, 3)
    launch = plan_gemv(w, x, y, 3, bias=DevBuf(1 << 32, w.rows * 4))
    assert launch.kernel == "gemv_q4_k_nb4"
    assert launch.grid == (16, 1, 1) and launch.block == (128, 1, 1)
    assert launch.args == (A, 2 * 144, 64, 512, x.ptr, 512, 3, 1 << 32, 0, y.ptr, 64)
    assert len(launch.args) == len(launch.arg_format)


def test_gemm_tile_choice() -> None:
    w = weight(12, rows=16384, cols=3072)
    x, y = bufs(w, 512)
    big = plan_gemm(w, x, y, 512, version=2)
    assert big.kernel == "gemm2_q4_k_m128" and big.grid == (4, 128, 1)
    assert big.block == (256, 1, 1)
    small = plan_gemm(w, x, y, 512, tile_m=64, version=2)
    assert small.kernel == "gemm2_q4_k_m64" and small.grid == (8, 128, 1)
    assert plan_gemm(w, x, y, 64, version=2).kernel == "gemm2_q4_k_m64"  # 128 would be zeros
    refused(plan_gemm, w, x, y, 512, tile_m=32)
    refused(plan_gemm, w, x, y, 512, version=1)  # the 64-row-tile gemm is gone


def test_good_gemm_embed_moe_plans() -> None:
    w = weight(8, rows=130, cols=96)
    x, y = bufs(w, 77)
    g = plan_gemm(w, x, y, 77)
    assert g.kernel == "gemm2_q8_0_m64" and g.grid == (2, 2, 1)
    e = plan_embed(w, DevBuf(1 << 33, 4 * 5), 5, DevBuf(1 << 34, 5 * 96 * 4))
    assert e.kernel == "embed_q8_0" and e.grid == (1, 5, 1)
    we = weight(39, rows=2880, cols=2880, experts=32)
    ids = DevBuf(1 << 33, 4 * 4)
    xm, ym = DevBuf(1 << 30, 2880 * 4 * 4), DevBuf(1 << 31, 4 * 2880 * 4)
    m = plan_moe(we, ids, 1, 4, xm, ym, per_slot_input=True)
    assert m.kernel == "moe_gemv_mxfp4_r2" and m.grid == (360, 4, 1)
    assert m.args[1] == 2880 * 90 * 17 and m.args[10] == 2880  # expert bytes, slot stride
    ids2, x2, y2 = DevBuf(1 << 33, 4 * 8), DevBuf(1 << 30, 2 * 2880 * 4), DevBuf(1 << 31, 8 * 11520)
    m2 = plan_moe(we, ids2, 2, 4, x2, y2, per_slot_input=False)  # two tokens: 4 rows a warp
    assert m2.kernel == "moe_gemv_mxfp4_r4" and m2.grid == (180, 8, 1)
    ws = DevBuf(1 << 32, moe_workspace_bytes(400, 32, 64))
    mg = plan_moe(
        we,
        DevBuf(1 << 33, 4 * 400),
        100,
        4,
        DevBuf(1 << 30, 100 * 2880 * 4),
        DevBuf(1 << 31, 400 * 2880 * 4),
        per_slot_input=False,
        workspace=ws,
        tile_m=64,
    )
    # tiles: at most ceil(400/64) + 32 (one partial tile per used expert)
    assert mg.kernel == "moe_gemm5_mxfp4_m64" and mg.grid == (39, 23, 1)
    assert mg.block == (256, 1, 1)
    assert mg.args[5:8] == (ws.ptr, ws.ptr + 16, ws.ptr + 16 + 16 * 39)
    for launch in (g, e, m, mg):
        assert len(launch.args) == len(launch.arg_format)


def refused(fn: object, *args: object, **kw: object) -> LaunchRefused:
    with pytest.raises(LaunchRefused) as ei:
        fn(*args, **kw)  # type: ignore[operator]
    err = ei.value
    assert isinstance(err, CudaError)
    assert err.code == ErrorCode.CUDA_ERROR
    return err


def test_out_of_range_requests_are_refused_with_the_kernel_name() -> None:
    w = weight()
    x, y = bufs(w, 2)
    # y too small for two tokens: the write would run past the buffer
    err = refused(plan_gemv, w, x, DevBuf(y.ptr, y.nbytes - 4), 2)
    assert "gemv_q4_k_nb2" in str(err) and "y buffer" in str(err)
    refused(plan_gemv, w, DevBuf(x.ptr, x.nbytes - 4), y, 2)  # x short
    refused(plan_gemv, w, x, y, 9)  # too many tokens for the gemv
    refused(plan_gemv, w, x, y, 0)
    refused(plan_gemv, QWeight(A, 12, 64, 512, 64 * 288 - 1), x, y, 1)  # weights short
    refused(plan_gemv, QWeight(A + 16, 12, 64, 512, 64 * 288), x, y, 1)  # misaligned weights
    refused(plan_gemv, QWeight(A, 12, 64, 500, 10**6), x, y, 1)  # K not a multiple of 256
    refused(plan_gemv, QWeight(A, 10, 64, 512, 10**6), x, y, 1)  # Q2_K: no kernel
    refused(plan_gemv, w, DevBuf(x.ptr + 4, x.nbytes), y, 1)  # x not 16-byte aligned
    refused(plan_gemv, w, x, y, 2, ldx=510)  # stride shorter than the row
    refused(plan_gemv, w, x, y, 1, bias=DevBuf(1 << 32, 4 * 63))  # bias short
    refused(plan_gemv, w, x, DevBuf(x.ptr + 64, y.nbytes), 1)  # y overlaps x
    refused(plan_gemv, w, x, y, 1, residual=DevBuf(y.ptr + 4, y.nbytes))  # partial alias
    plan_gemv(w, x, y, 1, residual=y)  # in-place residual is fine
    refused(plan_gemm, w, x, DevBuf(y.ptr, 63 * 4 * 10), 10)
    refused(plan_gemm, weight(experts=2), x, y, 10)  # expert tensor through plain gemm


def test_embed_and_moe_refusals() -> None:
    w = weight(6, rows=1000, cols=64)
    out = DevBuf(1 << 34, 3 * 64 * 4)
    refused(plan_embed, w, DevBuf(1 << 33, 8), 3, out)  # ids buffer holds 2, not 3
    refused(plan_embed, w, DevBuf(1 << 33, 12), 3, DevBuf(out.ptr, out.nbytes - 4))
    refused(plan_embed, w, DevBuf(1 << 33, 12), 3, out, ldo=62)
    we = weight(39, rows=64, cols=64, experts=8)
    xm, ym, ids = DevBuf(1 << 30, 4 * 64 * 4), DevBuf(1 << 31, 4 * 64 * 4), DevBuf(1 << 33, 16)
    plan_moe(we, ids, 1, 4, xm, ym, per_slot_input=True)
    refused(plan_moe, we, ids, 1, 9, xm, ym, per_slot_input=True)  # topk > experts
    refused(plan_moe, we, DevBuf(1 << 33, 12), 1, 4, xm, ym, per_slot_input=True)
    refused(plan_moe, we, ids, 1, 4, DevBuf(xm.ptr, 64 * 4 * 3), ym, per_slot_input=True)
    refused(plan_moe, we, ids, 1, 4, xm, ym, per_slot_input=True, bias=DevBuf(1 << 32, 64 * 4))
    refused(plan_moe, we, ids, 1, 4, xm, ym, per_slot_input=True, form="dense")


def test_moe_variants_route_and_workspace_checks() -> None:
    we = weight(39, rows=133, cols=64, experts=8)
    ids = DevBuf(1 << 33, 4 * 4 * 70)
    x1, y1 = DevBuf(1 << 30, 4 * 64 * 4), DevBuf(1 << 31, 4 * 133 * 4)
    for rw, grid0 in ((1, 34), (2, 17), (4, 9)):  # ceil(133 / (4 warps * rw))
        la = plan_moe(we, ids, 1, 4, x1, y1, per_slot_input=True, rows_per_warp=rw)
        assert la.kernel == "moe_gemv_mxfp4" + ("" if rw == 1 else f"_r{rw}")
        assert la.grid == (grid0, 4, 1) and la.block == (128, 1, 1)
    refused(plan_moe, we, ids, 1, 4, x1, y1, per_slot_input=True, rows_per_warp=3)
    xg, yg = DevBuf(1 << 30, 70 * 64 * 4), DevBuf(1 << 31, 280 * 133 * 4)
    need = moe_workspace_bytes(280, 8, 64)
    assert need == 16 + 16 * (5 + 8) + 4 * 280
    ws = DevBuf(1 << 32, need)
    g = plan_moe(we, ids, 70, 4, xg, yg, per_slot_input=False, workspace=ws, tile_m=64)
    assert g.kernel == "moe_gemm5_mxfp4_m64" and g.grid == (13, 2, 1)
    ws128 = DevBuf(1 << 32, moe_workspace_bytes(280, 8, 128))
    g128 = plan_moe(we, ids, 70, 4, xg, yg, per_slot_input=False, workspace=ws128, tile_m=128)
    assert g128.kernel == "moe_gemm5_mxfp4_m128" and g128.grid == (11, 2, 1)
    assert g128.block == (256, 1, 1)
    for launch in (g, g128):
        assert len(launch.args) == len(launch.arg_format)
    refused(plan_moe, we, ids, 70, 4, xg, yg, per_slot_input=False)  # no workspace
    short = DevBuf(ws.ptr, need - 4)
    refused(plan_moe, we, ids, 70, 4, xg, yg, per_slot_input=False, workspace=short)
    refused(plan_moe, we, ids, 70, 4, xg, yg, per_slot_input=False, workspace=ws, tile_m=32)
    on_y = DevBuf(yg.ptr + 64, need)
    refused(plan_moe, we, ids, 70, 4, xg, yg, per_slot_input=False, workspace=on_y)
    odd = DevBuf(ws.ptr + 4, need)
    refused(plan_moe, we, ids, 70, 4, xg, yg, per_slot_input=False, workspace=odd)
    many = weight(39, rows=64, cols=64, experts=2048)
    refused(
        plan_moe,
        many,
        ids,
        70,
        4,
        xg,
        DevBuf(yg.ptr, 280 * 64 * 4),
        per_slot_input=False,
        workspace=DevBuf(1 << 32, 1 << 20),
    )  # more experts than moe_route's tables
    r = plan_moe_route(ids, 280, 8, ws)
    assert r.kernel == "moe_route" and r.grid == (1, 1, 1) and r.block == (1024, 1, 1)
    assert r.args == (ids.ptr, 280, 8, 64, ws.ptr, ws.ptr + 16, ws.ptr + 16 + 16 * 13)
    assert len(r.args) == len(r.arg_format)
    refused(plan_moe_route, ids, 280, 8, short)
    refused(plan_moe_route, DevBuf(ids.ptr, 4 * 279), 280, 8, ws)  # ids short
    refused(plan_moe_route, ids, 280, 2000, DevBuf(1 << 32, 1 << 20))  # experts > 1024
    refused(plan_moe_route, ids, 0, 8, ws)
    refused(plan_moe_route, DevBuf(ws.ptr, 4 * 280), 280, 8, ws)  # ids inside the workspace


def test_moe_tile_bound_covers_every_routing() -> None:
    """moe_tile_bound >= the tiles moe_route makes (sum of ceil(count / tile)) for random,
    skewed and one-expert routings; the grid has exactly that many tile slots."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        n_exp = int(rng.integers(1, 200))
        n = int(rng.integers(1, 3000))
        tile = int(rng.choice([64, 128]))
        p = rng.dirichlet(np.full(n_exp, float(rng.choice([0.05, 1.0, 50.0]))))
        counts = np.bincount(rng.choice(n_exp, n, p=p), minlength=n_exp)
        tiles = int(sum(-(-int(c) // tile) for c in counts))
        assert tiles <= moe_tile_bound(n, n_exp, tile)
    assert moe_tile_bound(300, 8, 64) == 5 + 8 and moe_tile_bound(3, 32, 64) == 1 + 3


HARNESS = r"""
#include <cstdio>
#include <cstdlib>
#include <vector>
#include "quant.cuh"
template <int T> void run(const std::vector<uint8_t>& raw, int nblk, std::vector<float>& out) {
  constexpr int QK = QTraits<T>::QK, BYTES = QTraits<T>::BYTES;
  out.resize((size_t)nblk * QK);
  for (int b = 0; b < nblk; ++b)
    for (int g = 0; g < QK / 8; ++g)
      dequant8<T>(&raw[(size_t)b * BYTES], g, &out[(size_t)b * QK + 8 * g]);
}
int main(int argc, char** argv) {
  int type = atoi(argv[1]), nblk = atoi(argv[2]);
  FILE* f = fopen(argv[3], "rb");
  std::vector<uint8_t> raw;
  int c;
  while ((c = fgetc(f)) != EOF) raw.push_back((uint8_t)c);
  fclose(f);
  std::vector<float> out;
  switch (type) {
#define CASE(TY, NAME) case TY: run<TY>(raw, nblk, out); break;
    FOR_EACH_QTYPE(CASE)
    default: return 2;
  }
  FILE* o = fopen(argv[4], "wb");
  fwrite(out.data(), 4, out.size(), o);
  fclose(o);
  return 0;
}
"""


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is required (CI has it)")
def test_dequant8_matches_numpy_reference_for_every_type(tmp_path: Path) -> None:
    src = tmp_path / "harness.cu"
    src.write_text(HARNESS)
    exe = tmp_path / "harness"
    subprocess.run(
        ["nvcc", "-std=c++17", "-O1", f"-I{CUDA_SRC}", str(src), "-o", str(exe)],
        check=True,
        capture_output=True,
    )
    rng = np.random.default_rng(7)
    for qtype, lay in LAYOUTS.items():
        rows, cols = 5, lay.qk * 3
        raw, ref = random_matrix(qtype, rows, cols, rng)
        inp, outp = tmp_path / f"{lay.name}.bin", tmp_path / f"{lay.name}.out"
        inp.write_bytes(raw.tobytes())
        nblk = rows * cols // lay.qk
        subprocess.run([str(exe), str(qtype), str(nblk), str(inp), str(outp)], check=True)
        got = np.fromfile(outp, dtype=np.float32).reshape(rows, cols)
        # Same float32 formula as ggml up to FMA contraction: at most a rounding apart.
        np.testing.assert_allclose(got, ref, rtol=2e-6, atol=1e-9, err_msg=lay.name)


def test_gemv_default_modes_grids_and_refusals() -> None:
    """The v4 gemv picks its mode and rows per warp by matrix size (docs/kernels.md, gemv);
    only the async walk with 2-4 rows per warp is capped at the resident blocks."""

    def plan(n: int, k: int, qtype: int, ntok: int = 1, **kw: object) -> Launch:
        w = weight(qtype, rows=n, cols=k)
        return plan_gemv(w, *bufs(w, ntok), ntok, **kw)  # type: ignore[arg-type]

    head = plan(151936, 896, 8)
    assert head.kernel == "gemv_q8_0_nb1_a_r2" and head.grid == (18992, 1, 1)
    assert head.cap_resident
    up = plan(16384, 3072, 12)
    assert up.kernel == "gemv_q4_k_nb1_a" and up.grid == (4096, 1, 1) and not up.cap_resident
    assert plan(4864, 896, 6).kernel == "gemv_q5_0_nb1_r2"
    assert plan(3072, 8192, 12).kernel == "gemv_q4_k_nb1"
    small = plan(896, 4864, 14)
    assert small.kernel == "gemv_q6_k_nb1_x" and small.grid == (224, 1, 1)
    assert plan(151936, 896, 8, 2).kernel == "gemv_q8_0_nb2_r4"
    assert plan(16384, 3072, 12, 8).kernel == "gemv_q4_k_nb8_r2"
    assert plan(64, 512, 12, 1, rows_per_warp=2).kernel == "gemv_q4_k_nb1_r2"
    assert plan(100, 512, 12, 1, mode="async", max_blocks=3).grid == (3, 1, 1)
    w = weight(12, rows=64, cols=512)
    x, y = bufs(w, 4)
    refused(plan_gemv, w, x, y, 2, mode="xpf")  # xpf: one token
    refused(plan_gemv, w, x, y, 2, mode="async")  # async: one token
    refused(plan_gemv, w, x, y, 1, mode="xpf", rows_per_warp=2)
    refused(plan_gemv, w, x, y, 4, rows_per_warp=4)  # r4: at most 2 tokens
    refused(plan_gemv, w, x, y, 1, rows_per_warp=3)
    refused(plan_gemv, w, x, y, 1, mode="fast")
    refused(plan_gemv, w, x, y, 1, max_blocks=0)


SMEM_HARNESS = r"""
#define GEMM_CORE_ONLY
#include "gemm.cu"
#include <cstdio>
#define SMEM_ROW(TY, NAME)                                                                  \
  printf("%d %d %d %d %d %d %d\n", (int)TY, g2::Smem<TY, 64>::bytes,                       \
         g2::Smem<TY, 128>::bytes, g2::Smem3<TY, 64>::bytes, g2::Smem3<TY, 128>::bytes,       \
         sk::Smem<TY>::warp, sk::Smem<TY>::item);
int main() {
  FOR_EACH_QTYPE(SMEM_ROW)
  return 0;
}
"""


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is required (CI has it)")
def test_gemm2_shared_memory_formula_matches_the_kernel(tmp_path: Path) -> None:
    """plan_gemm passes gemm2_smem_bytes as the dynamic shared memory of gemm v2 (plan_skinny
    skinny_warp_bytes per warp and SKINNY_ITEM_BYTES per item); they must be the kernels' own
    g2::Smem and sk::Smem (the kernels trap when launched with less), for every type."""
    src = tmp_path / "smem.cu"
    src.write_text(SMEM_HARNESS)
    exe = tmp_path / "smem"
    cmd = ["nvcc", "-std=c++17", "-O1", f"-I{CUDA_SRC}", str(src), "-o", str(exe)]
    subprocess.run(cmd, check=True, capture_output=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    seen = set()
    for line in out.split("\n"):
        if not line.strip():
            continue
        qtype, b64, b128, c64, c128, skw, ski = (int(v) for v in line.split())
        lay = LAYOUTS[qtype]
        assert (gemm2_smem_bytes(lay, 64), gemm2_smem_bytes(lay, 128)) == (b64, b128), lay.name
        got3 = (gemm2_smem_bytes(lay, 64, x_stages=3), gemm2_smem_bytes(lay, 128, x_stages=3))
        assert got3 == (c64, c128), lay.name
        assert (skinny_warp_bytes(lay), SKINNY_ITEM_BYTES) == (skw, ski), lay.name
        assert max(b128, c128) <= 227 * 1024  # the per-block limit of sm_90
        seen.add(qtype)
    assert seen == set(LAYOUTS)


def test_gemm2_plans_tiles_and_refusals() -> None:
    """gemm v2: 128 weight rows per block, 256 threads, the 128-token tile when it gives at
    least 64 blocks, else 64 tokens; dynamic shared memory attached."""

    def plan(n: int, k: int, qtype: int, m: int, **kw: object) -> Launch:
        w = weight(qtype, rows=n, cols=k)
        return plan_gemm(w, *bufs(w, m), m, version=2, **kw)  # type: ignore[arg-type]

    up = plan(16384, 3072, 12, 512)
    assert up.kernel == "gemm2_q4_k_m128" and up.grid == (4, 128, 1) and up.block == (256, 1, 1)
    assert up.shared == gemm2_smem_bytes(layout(12), 128) and up.args[6] == 512
    down = plan(896, 4864, 14, 512)  # 4 x 7 blocks of 128 tokens: too few, 64-token tiles
    assert down.kernel == "gemm2_q6_k_m64" and down.grid == (8, 7, 1)
    assert down.shared == gemm2_smem_bytes(layout(14), 64)
    head = plan(151936, 896, 8, 300)
    assert head.kernel == "gemm2_q8_0_m128" and head.grid == (3, 1187, 1)
    assert plan(130, 96, 8, 77, tile_m=128).grid == (1, 2, 1)
    assert plan(3072, 3072, 12, 512).kernel == "gemm2_q4_k_m128"  # 4 x 24 = 96 blocks
    w = weight(12, rows=64, cols=512)
    x, y = bufs(w, 10)
    refused(plan_gemm, w, x, y, 10, version=3)
    refused(plan_gemm, w, x, y, 10, version=2, tile_m=32)
    err = refused(plan_gemm, w, x, DevBuf(y.ptr, 63 * 4 * 10), 10, version=2)
    assert "gemm2_q4_k_m64" in str(err)


def test_skinny_plans_the_gemm_split_in_one_launch() -> None:
    """skinny: one warp per (8 weight rows, split), about 8-16 such items a block; the split
    is the gemm's (same checks); shared memory for the warps' chunks and the items' partials;
    1..16 rows only."""
    down = weight(14, rows=896, cols=4864)  # Qwen ffn_down: 19 splits of one 256-chunk
    split = gemm_split(down, 132)
    assert split == (19, 8)
    g = plan_skinny(down, *bufs(down, 8), 8, split=split)
    assert skinny_shape(19) == (1, 10)  # two rounds of 10 warps
    assert g.kernel == "skinny_q6_k" and g.grid == (112, 1, 1) and g.block == (320, 1, 1)
    assert g.args[6] == 8 and g.args[-3:] == (19, 8, 1) and len(g.args) == len(g.arg_format)
    assert g.shared == 10 * skinny_warp_bytes(layout(14)) + 19 * SKINNY_ITEM_BYTES
    head = weight(8, rows=151936, cols=896)  # one split: 8 row tiles a block
    assert gemm_split(head, 132) == (1, 0) and skinny_shape(1) == (8, 8)
    h = plan_skinny(head, *bufs(head, 1), 1, split=(1, 0))
    assert h.grid == (2374, 1, 1) and h.block == (256, 1, 1) and h.args[-3:] == (1, 0, 8)
    refused(plan_skinny, head, *bufs(head, 17), 17, split=(1, 0))  # 17 rows
    refused(plan_skinny, down, *bufs(down, 4), 4, split=(19, 7))  # not whole chunks
    refused(plan_skinny, down, *bufs(down, 4), 4, split=(18, 8))  # does not cover K
    refused(plan_skinny, down, *bufs(down, 4), 4, split=(1, 8))
    x, y = bufs(down, 4)
    refused(plan_skinny, down, x, DevBuf(y.ptr, y.nbytes - 4), 4, split=split)
    experts = weight(12, rows=256, cols=512, experts=4)
    refused(plan_skinny, experts, *bufs(experts, 1), 1, split=(1, 0))


def test_gemm3_plans_the_fp16_prepass_and_refusals() -> None:
    """gemm v3 reads X as fp16 from a workspace that plan_gemm_x16's launch fills: the gemm's
    X argument is the workspace with row stride K; both launches are checked."""
    w = weight(12, rows=16384, cols=3072)
    x, y = bufs(w, 512)
    xh = DevBuf(1 << 33, 512 * 3072 * 2)
    g = plan_gemm(w, x, y, 512, version=3, xh=xh)
    assert g.kernel == "gemm3_q4_k_m128" and g.grid == (4, 128, 1) and g.block == (256, 1, 1)
    assert g.args[4] == xh.ptr and g.args[5] == 3072 and g.args[6] == 512
    assert g.shared == gemm2_smem_bytes(layout(12), 128, x_stages=3)
    c = plan_gemm_x16(x, xh, 512, 3072)
    assert c.kernel == "gemm_x16" and c.grid == (512, 3, 1) and c.block == (128, 1, 1)
    assert c.args == (x.ptr, 3072, 512, 3072, xh.ptr, 3072)
    assert len(c.args) == len(c.arg_format) and len(g.args) == len(g.arg_format)
    refused(plan_gemm, w, x, y, 512, version=3)  # no workspace
    refused(plan_gemm, w, x, y, 512, version=3, xh=DevBuf(xh.ptr, xh.nbytes - 2))  # short
    refused(plan_gemm, w, x, y, 512, version=3, xh=DevBuf(xh.ptr + 8, xh.nbytes))  # alignment
    refused(plan_gemm, w, x, y, 512, version=3, xh=DevBuf(y.ptr, xh.nbytes))  # overlaps y
    refused(plan_gemm_x16, x, DevBuf(x.ptr + 16, xh.nbytes), 512, 3072)  # overlaps x
    refused(plan_gemm_x16, x, xh, 512, 3068)  # K not a multiple of 8
    refused(plan_gemm_x16, DevBuf(x.ptr, x.nbytes - 4), xh, 512, 3072)  # x short


def test_gemm_default_version_by_matrix_size() -> None:
    """v3 (fp16 X pre-pass) for matrices of >= 8 Mi weights,
    v2 below (measured: the pre-pass's extra launch costs more than it saves on Qwen's small
    matrices in a launch-bound prefill); plan_gemm's default follows it."""
    assert gemm_version(weight(12, rows=3072, cols=3072)) == 3  # Phi-3 attn_output: 9.4 Mi
    assert gemm_version(weight(12, rows=16384, cols=3072)) == 3
    assert gemm_version(weight(6, rows=4864, cols=896)) == 2  # Qwen ffn_up: 4.2 Mi
    assert gemm_version(weight(12, rows=896, cols=4864)) == 2
    w = weight(6, rows=896, cols=896)
    assert plan_gemm(w, *bufs(w, 512), 512).kernel == "gemm2_q5_0_m64"
    big = weight(12, rows=3072, cols=3072)
    refused(plan_gemm, big, *bufs(big, 512), 512)  # v3 by default: needs the workspace


def test_moe_skinny_plans() -> None:
    """The decode form: moe_skinny_<type> over routed tiles of at most 16 rows, 8 warps a
    block (64 weight rows), the skinny core's shared memory; routed-gemm workspace checks."""
    we = weight(39, rows=5760, cols=2880, experts=32)
    ntok, topk = 8, 4
    ws = DevBuf(1 << 32, moe_workspace_bytes(ntok * topk, 32, 16))
    ids = DevBuf(1 << 33, 4 * ntok * topk)
    x, y = DevBuf(1 << 30, ntok * 2880 * 4), DevBuf(1 << 31, ntok * topk * 5760 * 4)
    g = plan_moe(we, ids, ntok, topk, x, y, per_slot_input=False, workspace=ws, form="skinny")
    assert g.kernel == "moe_skinny_mxfp4" and g.block == (256, 1, 1)
    assert g.grid == (moe_tile_bound(32, 32, 16), 90, 1) == (34, 90, 1)
    assert g.shared == 8 * (skinny_warp_bytes(layout(39)) + SKINNY_ITEM_BYTES)
    assert len(g.args) == len(g.arg_format)
    refused(plan_moe, we, ids, ntok, topk, x, y, per_slot_input=False, form="skinny")
    kw = {"per_slot_input": False, "workspace": ws, "form": "skinny"}
    refused(plan_moe, we, ids, ntok, topk, x, y, tile_m=64, **kw)
    short = DevBuf(ws.ptr, moe_workspace_bytes(ntok * topk, 32, 16) - 4)
    refused(plan_moe, we, ids, ntok, topk, x, y, **{**kw, "workspace": short})
    assert plan_moe_route(ids, 32, 32, ws, tile_m=16).args[3] == 16
    # split K (moe_split: a function of the shape): 2880 = 23 raw chunks of 128, 4 splits of
    # 6 chunks (24 K steps); skinny_shape gives 2 row tiles a block, 8 warps
    split = moe_split(we)
    assert split == (4, 24)
    s = plan_moe(we, ids, ntok, topk, x, y, split=split, **kw)
    assert s.grid == (34, 360, 1) and s.block == (256, 1, 1)
    assert s.args[-4:] == (4, 24, ntok * topk * 5760, 2)
    assert s.shared == 8 * skinny_warp_bytes(layout(39)) + 2 * 4 * SKINNY_ITEM_BYTES
    # gpt-oss's up beside its gate: one launch, grid y doubled, the second tensor's
    # pointer, bias and output last
    wu = weight(39, rows=5760, cols=2880, experts=32)
    wu = QWeight(wu.ptr + (1 << 36), 39, 5760, 2880, wu.nbytes, experts=32)
    yu = DevBuf(1 << 37, ntok * topk * 5760 * 4)
    p = plan_moe(we, ids, ntok, topk, x, y, split=split, pair=(wu, yu, None), **kw)
    assert p.kernel == "moe_skinny_mxfp4_pair" and p.grid == (34, 720, 1)
    assert p.args[:-3] == s.args and p.args[-3:] == (wu.ptr, 0, yu.ptr)
    assert len(p.args) == len(p.arg_format) and len(s.args) == len(s.arg_format)
    other = QWeight(wu.ptr, 39, 2880, 2880, wu.nbytes, experts=32)
    refused(plan_moe, we, ids, ntok, topk, x, y, split=split, pair=(other, yu, None), **kw)
    refused(plan_moe, we, ids, ntok, topk, x, y, split=split, pair=(wu, y, None), **kw)
    bias = DevBuf(1 << 38, 32 * 5760 * 4)
    refused(plan_moe, we, ids, ntok, topk, x, y, split=split, pair=(wu, yu, bias), **kw)
    refused(plan_moe, we, ids, ntok, topk, x, y, split=(4, 20), **kw)  # not whole chunks
    refused(plan_moe, we, ids, ntok, topk, x, y, split=(2, 24), **kw)  # does not cover K
    # the gemm form writes every split's partials: y must hold them all
    ws5 = DevBuf(1 << 32, moe_workspace_bytes(ntok * topk, 32, 64))
    g5 = {"per_slot_input": False, "workspace": ws5, "form": "gemm", "tile_m": 64}
    refused(plan_moe, we, ids, ntok, topk, x, y, split=split, **g5)
    parts = DevBuf(1 << 31, 4 * ntok * topk * 5760 * 4)
    p5 = plan_moe(we, ids, ntok, topk, x, parts, split=split, **g5)
    assert p5.grid[2] == 4 and p5.args[-4:-1] == (4, 24, ntok * topk * 5760)


def test_moe_gemm5_plans() -> None:
    """The routed gemm on the gemm2 core: moe_gemm5_<type>_m<tile>, 256 threads, grid (tile
    bound, ceil(N / 128)), gemm2's dynamic shared memory; tile 128 from an average of
    MOE5_MIN_AVG_128 assignments per expert; workspace checks."""
    we = weight(39, rows=2880, cols=2880, experts=32)
    for ntok, tile, tiles in ((512, 128, 16 + 32), (128, 64, 8 + 32), (96, 64, 6 + 32)):
        n_assign = ntok * 4
        assert moe5_tile_m(n_assign, 32) == tile
        ws = DevBuf(1 << 32, moe_workspace_bytes(n_assign, 32, tile))
        ids = DevBuf(1 << 33, 4 * n_assign)
        x, y = DevBuf(1 << 30, ntok * 2880 * 4), DevBuf(1 << 31, n_assign * 2880 * 4)
        g = plan_moe(we, ids, ntok, 4, x, y, per_slot_input=False, workspace=ws)
        assert g.kernel == f"moe_gemm5_mxfp4_m{tile}" and g.block == (256, 1, 1)
        assert g.grid == (tiles, 23, 1) and g.shared == gemm2_smem_bytes(layout(39), tile)
        assert g.args[5:8] == (ws.ptr, ws.ptr + 16, ws.ptr + 16 + 16 * tiles)
        assert len(g.args) == len(g.arg_format)
    edge = MOE5_MIN_AVG_128 * 32
    assert moe5_tile_m(edge, 32) == 128 and moe5_tile_m(edge - 1, 32) == 64
    we8 = weight(12, rows=133, cols=512, experts=8)
    ids = DevBuf(1 << 33, 4 * 280)
    xg, yg = DevBuf(1 << 30, 280 * 512 * 4), DevBuf(1 << 31, 280 * 133 * 4)
    ws = DevBuf(1 << 32, moe_workspace_bytes(280, 8, 128))
    ws64 = DevBuf(1 << 32, moe_workspace_bytes(280, 8, 64))
    g = plan_moe(we8, ids, 70, 4, xg, yg, per_slot_input=True, workspace=ws64)
    # 280 assignments on 8 experts (avg 35): 64-token tiles; 133 rows: 2 row tiles of 128
    assert g.kernel == "moe_gemm5_q4_k_m64" and g.grid == (5 + 8, 2, 1)
    g = plan_moe(we8, ids, 70, 4, xg, yg, per_slot_input=True, workspace=ws, tile_m=128)
    assert g.kernel == "moe_gemm5_q4_k_m128" and g.grid == (3 + 8, 2, 1)
    assert g.shared == gemm2_smem_bytes(layout(12), 128)
    refused(plan_moe, we8, ids, 70, 4, xg, yg, per_slot_input=True)  # no workspace
    short = DevBuf(ws.ptr, moe_workspace_bytes(280, 8, 128) - 4)
    refused(
        plan_moe,
        we8,
        ids,
        70,
        4,
        xg,
        yg,
        per_slot_input=True,
        workspace=short,
        tile_m=128,
    )
    refused(plan_moe, we8, ids, 70, 4, xg, yg, per_slot_input=True, workspace=ws, tile_m=96)
    refused(plan_moe, we8, ids, 70, 4, xg, yg, per_slot_input=True, workspace=ws, form="x")


def test_split_k_depends_on_the_shape_only() -> None:
    """The tensor-core product splits K in whole raw chunks as a function of the weight shape
    and the GPU alone (batch invariance): none where one column of 128-row tiles fills the
    GPU; else between the splits that fill it with the gemm's blocks and twice that, the one
    whose skinny launch fills the resident warps in whole waves."""
    from worker.backends.cuda.plans.dense import gemm_split, plan_gemm, plan_splitk_reduce

    q4k, q50, q80, q5k, q6k = 12, 6, 8, 13, 14
    down = QWeight(A, q4k, 896, 4864, 896 * 4864 // 256 * 144)
    assert gemm_split(down, 132) == (19, 8)  # 19 chunks of 256 -> one chunk a split
    qkv = QWeight(A, q50, 1152, 896, 1152 * 896 // 32 * 22)
    assert gemm_split(qkv, 132) == (7, 4)
    head = QWeight(A, q80, 151936, 896, 151936 * 896 // 32 * 34)
    assert gemm_split(head, 132) == (1, 0)  # 1187 row tiles already fill the GPU
    # Phi-3-mini: qkv, gate_up, o, down: 12 or 32 chunks of 256 (the gemm fills the GPU from
    # 2, 2, 6 and 6 splits)
    phi3 = [(q5k, 9216, 3072), (q4k, 16384, 3072), (q4k, 3072, 3072), (q6k, 3072, 8192)]
    assert [gemm_split(QWeight(A, t, n, k, 1), 132) for t, n, k in phi3] == [
        (4, 24),  # 576 skinny blocks of 8 warps, 3 waves of 3 chunks (2 splits: 2 of 6)
        (2, 48),
        (6, 16),
        (8, 32),  # 384 blocks of 8 warps, 2 waves of 4 chunks (6 splits: 2 of 6)
    ]
    n_split, kps = gemm_split(down, 132)
    for m in (1, 7, 64, 512):
        part = DevBuf(512 * A, n_split * m * 896 * 4)
        x = DevBuf(64 * A, m * 4864 * 4)
        launch = plan_gemm(down, x, part, m, split=(n_split, kps), version=2)
        assert launch.grid[2] == n_split and launch.args[-2:] == (kps, m * 896)
        red = plan_splitk_reduce(part, n_split, m, 896, DevBuf(1024 * A, m * 896 * 4))
        assert red.grid == (4, m, 1) and red.args[1] == n_split
    with pytest.raises(LaunchRefused, match="split workspace too small"):
        plan_gemm(down, x, DevBuf(512 * A, 512 * 896 * 4), 512, split=(n_split, kps), version=2)
    with pytest.raises(LaunchRefused, match="bad split"):
        plan_gemm(down, x, part, 512, split=(2, kps), version=2)
    with pytest.raises(LaunchRefused, match="bias"):
        plan_gemm(down, x, part, 512, split=(n_split, kps), version=2, bias=DevBuf(2048 * A, 4096))


class _PlanOnly(MatmulKernels):
    """MatmulKernels without a device: launches are recorded, workspaces are fake buffers
    that grow as the real ones do (a larger request gets a new buffer)."""

    def __init__(  # no super()
        self, invariant: bool = True, int15: bool = False, large: bool = False
    ) -> None:
        self.invariant, self.int15, self.int15_experts = invariant, int15, int15
        self.int15_large = large
        self._sms = 132
        self._route_gen = 0
        self.queued: list[Launch] = []
        self._bufs: dict[str, DevBuf] = {}

    def _grow(self, kind: str, base: int, nbytes: int) -> DevBuf:
        old = self._bufs.get(kind)
        if old is None or old.nbytes < nbytes:
            self._bufs[kind] = DevBuf(base + (0 if old is None else 1 << 24), nbytes)
        return self._bufs[kind]

    def _moe_workspace(self, nbytes: int) -> DevBuf:
        return self._grow("moe", 1 << 34, nbytes)

    def _splitk_workspace(self, nbytes: int) -> DevBuf:
        return self._grow("splitk", 1 << 35, nbytes)

    def _i15_workspace(self, nbytes: int) -> DevBuf:
        return self._grow("i15", 1 << 37, nbytes)

    def run(self, launch: Launch, stream: Any = None) -> None:
        self.queued.append(launch)


def test_moe_shares_one_routing_and_pairs_gate_and_up() -> None:
    """gpt-oss's layer as the executor queues it: one moe_route, gate and up in one paired
    skinny launch, the down product on the same routing; each product reads the workspace
    its pre-pass wrote; a routing is refused once a later pre-pass overwrote the workspace.
    The gemm form (over 64 tokens) runs the pair one after the other, each with its reduce."""
    gate = QWeight(A, 39, 2880, 2880, 32 * 2880 * layout(39).row_bytes(2880), experts=32)
    up = QWeight(A + (1 << 32), 39, 2880, 2880, gate.nbytes, experts=32)
    down = QWeight(A + (2 << 32), 39, 2880, 2880, gate.nbytes, experts=32)
    for ntok, form in ((1, "skinny"), (64, "skinny"), (70, "gemm")):
        n_assign = ntok * 4
        ids = DevBuf(1 << 33, 4 * n_assign)
        x = DevBuf(1 << 30, ntok * 2880 * 4)
        yg, yu, yd = (DevBuf((k + 3) << 36, n_assign * 2880 * 4) for k in range(3))
        mm = _PlanOnly()
        r = mm.moe_route(ids, ntok, 4, 32)
        assert r.form == form and [q.kernel for q in mm.queued] == ["moe_route"]
        ws = mm.queued[0].args[4]  # the routing's ntiles pointer: the workspace start
        mm.moe(gate, ids, ntok, 4, x, yg, per_slot_input=False, route=r, pair=(up, yu, None))
        mm.moe(down, ids, ntok, 4, yg, yd, per_slot_input=True, route=r)
        kernels = [q.kernel for q in mm.queued[1:]]
        if form == "skinny":
            assert kernels == ["moe_skinny_mxfp4_pair", "moe_skinny_mxfp4"]
            assert mm.queued[1].args[-3:] == (up.ptr, 0, yu.ptr)
        else:
            gemm, reduce = "moe_gemm5_mxfp4_m64", "gemm_splitk_reduce"
            assert kernels == [gemm, reduce, gemm, reduce, gemm, reduce]
        for q in mm.queued[1:]:
            if q.kernel != "gemm_splitk_reduce":
                assert q.args[5] == ws  # ntiles of the routing's workspace
        # a later, larger pre-pass moves the workspace: the old routing may not be used
        mm.moe_route(DevBuf(1 << 33, 4 * 4 * 512), 512, 4, 32)
        with pytest.raises(LaunchRefused):
            mm.moe(down, ids, ntok, 4, yg, yd, per_slot_input=True, route=r)
    # the integer form (the default for these experts): routed for it by their format, one
    # pre-pass of x for gate and up (token rows) and one for down (assignment rows), each
    # matrix its routed core and its reduce with the experts' biases
    for ntok, tile in ((1, 8), (32, 8), (33, 16), (64, 16), (70, 64)):
        n_assign = ntok * 4
        ids = DevBuf(1 << 33, 4 * n_assign)
        x = DevBuf(1 << 30, ntok * 2880 * 4)
        yg, yu, yd = (DevBuf((k + 3) << 36, n_assign * 2880 * 4) for k in range(3))
        mm = _PlanOnly(int15=True)
        r = mm.moe_route(ids, ntok, 4, 32, qtype=39)
        assert (r.form, r.tile_m) == ("i15", tile)
        mm.moe(gate, ids, ntok, 4, x, yg, per_slot_input=False, route=r, pair=(up, yu, None))
        mm.moe(down, ids, ntok, 4, yg, yd, per_slot_input=True, route=r)
        core, reduce = f"moe15p{tile}_mxfp4", "gemm_splitk_reduce"
        assert [q.kernel for q in mm.queued] == [
            "moe_route", "quant_x15", core, reduce, core, reduce, "quant_x15", core, reduce,
        ]  # fmt: skip
        assert mm.queued[1].args[2] == ntok and mm.queued[6].args[2] == n_assign  # X rows
        # the norm wrote xn's codes: gate and up queue no pre-pass and read them
        codes = DevBuf(1 << 38, 1 << 24)
        r = mm.moe_route(ids, ntok, 4, 32, qtype=39)
        mm.queued.clear()
        mm.moe(gate, ids, ntok, 4, x, yg, per_slot_input=False, route=r, pair=(up, yu, None),
               planes=codes)  # fmt: skip
        assert [q.kernel for q in mm.queued] == [core, reduce, core, reduce]
        assert mm.queued[0].args[3] == codes.ptr  # the planes' hi
        r = mm.moe_route(ids, ntok, 4, 32)
        assert r.form != "i15"  # the format decides
        with pytest.raises(LaunchRefused, match="planes"):
            mm.moe(gate, ids, ntok, 4, x, yg, per_slot_input=False, route=r, planes=codes)
    # invariance off at one token: the gemv, no pre-pass, gate and up one after the other
    mm = _PlanOnly(invariant=False)
    ids1, x1 = DevBuf(1 << 33, 16), DevBuf(1 << 30, 2880 * 4)
    y1, y2 = DevBuf(3 << 36, 4 * 2880 * 4), DevBuf(4 << 36, 4 * 2880 * 4)
    r = mm.moe_route(ids1, 1, 4, 32)
    assert r.form == "gemv" and r.workspace is None and not mm.queued
    mm.moe(gate, ids1, 1, 4, x1, y1, per_slot_input=False, route=r, pair=(up, y2, None))
    assert [q.kernel for q in mm.queued] == ["moe_gemv_mxfp4_r2", "moe_gemv_mxfp4_r2"]
    assert mm.queued[1].args[0] == up.ptr and mm.queued[1].args[12] == y2.ptr
    # invariance off, experts on the integer cores: the gemv up to 2 tokens, the routed
    # integer cores above (not the fp16 forms: they are slower at every token count)
    mm = _PlanOnly(invariant=False, int15=True)
    assert mm.moe_route(ids1, 1, 4, 32, qtype=39).form == "gemv"
    assert mm.moe_form(2) == "gemv"
    r = mm.moe_route(DevBuf(1 << 33, 4 * 32), 8, 4, 32, qtype=39)
    assert (r.form, r.tile_m) == ("i15", 8)
    assert mm.moe_route(DevBuf(1 << 33, 4 * 32), 8, 4, 32).form == "skinny"  # other formats


def test_integer_moe_ffn_ends_each_half_in_one_launch() -> None:
    """MatmulKernels.moe15_ffn queues gpt-oss's expert FFN on the routed integer cores: the
    token pre-pass (none when the norm wrote the codes), gate and up into the two halves of
    the split workspace, moe15_glu writing down's codes, down, moe15_combine into the
    residual stream; it refuses a routing that is not the latest or not for the integer form."""
    gate = QWeight(A, 39, 2880, 2880, 32 * 2880 * layout(39).row_bytes(2880), experts=32)
    up = QWeight(A + (1 << 32), 39, 2880, 2880, gate.nbytes, experts=32)
    down = QWeight(A + (2 << 32), 39, 2880, 2880, gate.nbytes, experts=32)
    bias = DevBuf(1 << 39, 32 * 2880 * 4)
    for ntok in (1, 33):
        n_assign = ntok * 4
        ids, ew = DevBuf(1 << 33, 4 * n_assign), DevBuf(3 << 33, 4 * n_assign)
        xn, x = DevBuf(1 << 30, ntok * 2880 * 4), DevBuf(3 << 30, ntok * 2880 * 4)
        mm = _PlanOnly(int15=True)
        r = mm.moe_route(ids, ntok, 4, 32, qtype=39)
        mats = ((gate, bias), (up, bias), (down, None))
        mm.moe15_ffn(*mats, ids, ew, ntok, 4, xn, x, r)
        core = f"moe15p{r.tile_m}_mxfp4"
        assert [q.kernel for q in mm.queued] == [
            "moe_route", "quant_x15", core, core, "moe15_glu", core, "moe15_combine",
        ]  # fmt: skip
        g, u, glu, d, comb = mm.queued[2:]
        assert u.args[9] > g.args[9]  # up's partials after gate's
        assert glu.args[:2] == (g.args[9], u.args[9]) and glu.args[12] == d.args[3]  # codes
        assert comb.args[0] == x.ptr and comb.args[1] == d.args[9]
        codes = DevBuf(1 << 38, 1 << 24)  # the norm wrote xn's codes
        r = mm.moe_route(ids, ntok, 4, 32, qtype=39)
        mm.queued.clear()
        mm.moe15_ffn(*mats, ids, ew, ntok, 4, xn, x, r, planes=codes)
        assert [q.kernel for q in mm.queued] == [core, core, "moe15_glu", core, "moe15_combine"]
        assert mm.queued[0].args[3] == codes.ptr
        with pytest.raises(LaunchRefused, match="latest"):  # a later pre-pass moved on
            mm.moe_route(ids, ntok, 4, 32, qtype=39)
            mm.moe15_ffn(*mats, ids, ew, ntok, 4, xn, x, r)
    mm = _PlanOnly(int15=False)
    r = mm.moe_route(ids, 1, 4, 32)
    with pytest.raises(LaunchRefused, match="form"):
        mm.moe15_ffn(*mats, ids, ew, 1, 4, xn, x, r)


def test_integer_cores_fold_their_splits_where_the_tiles_fill_the_gpu() -> None:
    """i15_fold on Phi-3's products and an H100's 132 multiprocessors: never at 1-8 rows
    (gemm15p8) nor for Q6_K (its folded core spills: slower at every row count), always
    where the output tiles fill the multiprocessors (qkv and gate_up above 8 rows), and where
    they fill half of them if each split is one super-block (o, 12 splits of 12, at 33-64
    rows: 96 tiles), but not Q4_K down's splits of two (96 tiles at 64 rows)."""
    from worker.backends.cuda.plans.i15 import i15_fold, i15_split

    def folds(n: int, k: int, t: int) -> list[int]:
        w = QWeight(A, t, n, k, n * layout(t).row_bytes(k))
        return [
            m for m in (1, 8, 9, 16, 32, 33, 64, 65, 128) if i15_fold(w, m, i15_split(w, 132), 132)
        ]

    assert folds(9216, 3072, 13) == [9, 16, 32, 33, 64, 65, 128]  # qkv, 6 splits
    assert folds(16384, 3072, 12) == [9, 16, 32, 33, 64, 65, 128]  # gate_up, 4
    assert folds(3072, 3072, 12) == [33, 64, 65, 128]  # o, 12 splits of one super-block
    assert folds(3072, 8192, 12) == [65, 128]  # Q4_K down, 16 splits of two: 144 tiles at 65
    assert folds(3072, 8192, 14) == folds(32064, 3072, 14) == []  # Q6_K down, the head
    w = QWeight(A, 12, 3072, 3072, 3072 * layout(12).row_bytes(3072))
    assert not i15_fold(w, 64, 1, 132)  # nothing to fold
    from worker.backends.cuda.plans.i15 import plan_i15

    q6 = QWeight(A, 14, 3072, 8192, 3072 * layout(14).row_bytes(8192))
    planes, part = DevBuf(A << 8, 1 << 28), DevBuf(A << 9, 1 << 28)
    assert "no folded form" in str(refused(plan_i15, q6, planes, part, 64, 16, fold=True))
    assert plan_i15(q6, planes, part, 64, 16).kernel == "gemm15p_q6_k"


def test_int15_setting_puts_experts_and_large_k_quant_products_on_the_integer_cores() -> None:
    """WORKER_ORCD_INT15: `auto` (the default) the routed experts and the dense K-quant
    products of 8 Mi weights or more, `experts` the experts only, `all` every dense product
    too, `0` none. The choice is per weight: Phi-3's products all take the integer cores,
    none of Qwen2.5-0.5B's (K-quant ones of 4.4 M weights, a Q8_0 head) or gpt-oss's
    dense ones (Q8_0); never with batch invariance off."""
    from worker.backends.cuda.plans.i15 import INT15_LARGE, int15_choice

    assert int15_choice("auto") == (True, False, True) and INT15_LARGE  # the default
    assert int15_choice("experts") == (True, False, False)
    assert int15_choice("all") == int15_choice("1") == (True, True, False)
    assert int15_choice("0") == (False, False, False)
    mm = _PlanOnly(large=True)
    phi3 = [(9216, 3072, 13), (3072, 3072, 12), (16384, 3072, 12), (3072, 8192, 14)]
    phi3 += [(32064, 3072, 14)]  # qkv, o, gate_up, down (Q6_K half), the head
    qwen = [(896, 4864, 12), (896, 4864, 14), (9728, 896, 6), (151936, 896, 8)]
    gptoss = [(5120, 2880, 8), (2880, 4096, 8), (201088, 2880, 8)]

    def w(n: int, k: int, t: int) -> QWeight:
        return QWeight(A, t, n, k, n * layout(t).row_bytes(k))

    assert all(mm.takes_i15(w(*s)) for s in phi3)
    assert not any(mm.takes_i15(w(*s)) for s in qwen + gptoss)
    assert all(_PlanOnly(int15=True).takes_i15(w(*s)) for s in phi3 + qwen + gptoss)
    assert not any(_PlanOnly(invariant=False, large=True).takes_i15(w(*s)) for s in phi3)
    assert not any(_PlanOnly().takes_i15(w(*s)) for s in phi3)  # `experts`
    # what the load log and bench record of it
    ex = QWeight(A, 39, 2880, 2880, 32 * 2880 * layout(39).row_bytes(2880), experts=32)
    got = mm.arithmetic([w(*s) for s in phi3] + [w(*s) for s in qwen])
    assert (got["dense_integer"], got["dense_fp16"], got["experts"]) == (5, 4, "none")
    assert got["batch_invariant"] is True and got["int15"] == "auto"
    got = _PlanOnly(int15=True).arithmetic([w(*s) for s in gptoss] + [ex])
    assert (got["dense_integer"], got["dense_fp16"], got["experts"]) == (3, 0, "integer")
    assert got["int15"] == "all"
    got = _PlanOnly(invariant=False).arithmetic([ex, w(*gptoss[0])])
    assert (got["dense_integer"], got["dense_fp16"], got["experts"]) == (0, 1, "fp16")
