#!/usr/bin/env python3
"""Time the matrix kernels on the GPU for every matrix shape of the three target models.

    python3 scripts/gpu_matmul_bench.py [--json OUT.json] [--quick] [--no-gemm] [--gemm-only]

Prints, per shape: weight bytes, gemv time (one token) of the default kernel (v4), GB/s and
the fraction of the device-to-device copy bandwidth measured in the same run (the ceiling),
the same for the previous kernel (v3) and for each v4 rows-per-warp variant (r1, r2, r4),
gemm (512 tokens) time and TFLOP/s; then the sum over one decoded token's matrices per model
(a matmul-only decode ceiling in tokens/s, v4 and v3) and a few multi-token gemv and MoE
figures. --gemm-only: the prefill gemm alone, v1 (64 and 128-token tiles) against v2 and v3
(64, 128, the default pick; v3's default once more for the spread; v3 includes its fp16
conversion of X) at 512 tokens, all in one process, then the sum per model (a matmul-only
pp512 figure).

Timing: CUDA events around R back-to-back launches, queued behind a ~10 ms spin kernel so
that the host's launch cost (several µs per PyCUDA launch) is not in the numbers, median of
5 such batches. Each launch reads a different copy of the weights (copies adding up to
>= 256 MB, five times the 50 MB L2), as in a real decode step where no matrix is reused.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.synth_blocks import random_matrix
from worker.backends.cuda.matmul import (
    MatmulKernels,
    QWeight,
    gemm_version,
    plan_gemm,
    plan_gemv,
)
from worker.backends.cuda.quant_layout import layout

# (model, matrix, rows N, cols K, ggml type, matrices of this kind per decoded token)
SHAPES: list[tuple[str, str, int, int, int, int]] = [
    ("qwen2.5-0.5b", "attn_q", 896, 896, 6, 24),
    ("qwen2.5-0.5b", "attn_k", 128, 896, 6, 24),
    ("qwen2.5-0.5b", "attn_v q5_0", 128, 896, 6, 12),
    ("qwen2.5-0.5b", "attn_v q8_0", 128, 896, 8, 12),
    ("qwen2.5-0.5b", "attn_output", 896, 896, 6, 24),
    ("qwen2.5-0.5b", "ffn_gate", 4864, 896, 6, 24),
    ("qwen2.5-0.5b", "ffn_up", 4864, 896, 6, 24),
    ("qwen2.5-0.5b", "ffn_down q4_k", 896, 4864, 12, 12),
    ("qwen2.5-0.5b", "ffn_down q6_k", 896, 4864, 14, 12),
    ("qwen2.5-0.5b", "output", 151936, 896, 8, 1),
    ("phi3-mini", "attn_qkv", 9216, 3072, 13, 32),
    ("phi3-mini", "attn_output", 3072, 3072, 12, 32),
    ("phi3-mini", "ffn_up (gate+up)", 16384, 3072, 12, 32),
    ("phi3-mini", "ffn_down q4_k", 3072, 8192, 12, 16),
    ("phi3-mini", "ffn_down q6_k", 3072, 8192, 14, 16),
    ("phi3-mini", "output", 32064, 3072, 14, 1),
    ("gpt-oss-20b", "attn_q", 4096, 2880, 8, 24),
    ("gpt-oss-20b", "attn_k", 512, 2880, 8, 24),
    ("gpt-oss-20b", "attn_v", 512, 2880, 8, 24),
    ("gpt-oss-20b", "attn_output", 2880, 4096, 8, 24),
    ("gpt-oss-20b", "output", 201088, 2880, 8, 1),
]
ROTATE_BYTES = 256 << 20

SPIN_SRC = """
extern "C" __global__ void spin(long long cycles) {
  long long t0 = clock64();
  while (clock64() - t0 < cycles) {}
}
"""


class Bench:
    def __init__(self) -> None:
        import pycuda.driver as drv
        import pycuda.gpuarray as ga
        from pycuda.compiler import SourceModule

        drv.init()
        self.ctx = drv.Device(0).retain_primary_context()
        self.ctx.push()
        self.drv, self.ga = drv, ga
        self.dev = drv.Context.get_device()
        self.name = self.dev.name()
        self.clock_khz = self.dev.get_attribute(drv.device_attribute.CLOCK_RATE)
        self.spin = SourceModule(SPIN_SRC, no_extern_c=True).get_function("spin")
        self.mm = MatmulKernels()
        self.stream = drv.Stream()
        self.rng = np.random.default_rng(0)

    def time_batch(self, launch: Any, reps: int, batches: int = 5) -> float:
        """Median seconds per launch; launch(i) queues the i-th launch on self.stream."""
        drv = self.drv
        launch(0)  # warm-up
        times = []
        for _ in range(batches):
            start, end = drv.Event(), drv.Event()
            self.spin(np.int64(self.clock_khz * 10), block=(1, 1, 1), stream=self.stream)
            start.record(self.stream)
            for i in range(reps):
                launch(i)
            end.record(self.stream)
            end.synchronize()
            times.append(start.time_till(end) / 1e3 / reps)
        return statistics.median(times)

    def time_graph(self, launch: Any, reps: int, batches: int = 5) -> float:
        """Median seconds per launch when `reps` launches are replayed as one CUDA graph (as
        the decode step runs them): the launch gaps of small kernels shrink. NaN if
        cuda.bindings is missing."""
        try:
            cu = importlib.import_module("cuda.bindings.driver")
        except ImportError:
            return float("nan")

        def ok(res: Any, what: str) -> Any:
            if res[0] != cu.CUresult.CUDA_SUCCESS:
                raise RuntimeError(f"{what}: {res[0]}")
            return res[1] if len(res) > 1 else None

        st = cu.CUstream(self.stream.handle)
        launch(0)
        self.stream.synchronize()
        mode = cu.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL
        ok(cu.cuStreamBeginCapture(st, mode), "cuStreamBeginCapture")
        for i in range(reps):
            launch(i)
        graph = ok(cu.cuStreamEndCapture(st), "cuStreamEndCapture")
        exe = ok(cu.cuGraphInstantiate(graph, 0), "cuGraphInstantiate")
        cu.cuGraphDestroy(graph)
        ok(cu.cuGraphLaunch(exe, st), "cuGraphLaunch")  # warm-up
        times = []
        for _ in range(batches):
            start, end = self.drv.Event(), self.drv.Event()
            self.spin(np.int64(self.clock_khz * 10), block=(1, 1, 1), stream=self.stream)
            start.record(self.stream)
            ok(cu.cuGraphLaunch(exe, st), "cuGraphLaunch")
            end.record(self.stream)
            end.synchronize()
            times.append(start.time_till(end) / 1e3 / reps)
        cu.cuGraphExecDestroy(exe)
        return statistics.median(times)

    def copy_bandwidth(self) -> float:
        n = 1 << 30
        a, b = self.drv.mem_alloc(n), self.drv.mem_alloc(n)
        self.drv.memset_d8(int(a), 1, n)

        def launch(_: int) -> None:
            self.drv.memcpy_dtod_async(b, a, n, self.stream)

        t = self.time_batch(launch, 10)
        return 2 * n / t  # bytes read + written

    def weights(self, qtype: int, n: int, k: int, copies: int) -> list[QWeight]:
        """`copies` copies of one random matrix, 256-byte aligned, in one allocation."""
        raw, _ = random_matrix(qtype, n, k, self.rng)
        step = -(-raw.nbytes // 256) * 256
        buf = self.drv.mem_alloc(step * copies)
        self._keep = [*getattr(self, "_keep", []), buf]
        self.drv.memcpy_htod(buf, raw)
        for i in range(1, copies):
            self.drv.memcpy_dtod(int(buf) + i * step, buf, raw.nbytes)
        return [QWeight(int(buf) + i * step, qtype, n, k, raw.nbytes) for i in range(copies)]

    def release(self) -> None:
        self._keep = []
        self.drv.Context.synchronize()


def gemm_ab(b: Bench, shapes: list[tuple[str, str, int, int, int, int]], m: int) -> list[Any]:
    """Old (v1) and new (v2) prefill gemm per shape at m tokens, same process and card."""
    mm, ga = b.mm, b.ga
    variants = [
        ("v1_64", {"version": 1, "tile_m": 64}),
        ("v1_128", {"version": 1, "tile_m": 128}),
        ("v2_64", {"version": 2, "tile_m": 64}),
        ("v2_128", {"version": 2, "tile_m": 128}),
        ("v2", {"version": 2}),
        ("v3_64", {"version": 3, "tile_m": 64}),
        ("v3_128", {"version": 3, "tile_m": 128}),
        ("v3", {"version": 3}),
        ("v3_again", {"version": 3}),
    ]
    print(f"\ngemm, {m} tokens, us (TFLOP/s: best v1, default v2, default v3 with its x16 pass)")
    names = " ".join(f"{v[0]:>9}" for v in variants)
    head = f"{'model':13} {'matrix':18} {'N':>6} {'K':>5} {'type':5}"
    print(f"{head} {names} {'v1 TF':>6} {'v2 TF':>6} {'v3 TF':>6}")
    rows: list[dict[str, Any]] = []
    for model, mat, n, k, qtype, count in shapes:
        lay = layout(qtype)
        nbytes = n * lay.row_bytes(k)
        copies = max(1, min(64, -(-ROTATE_BYTES // nbytes)))
        ws = b.weights(qtype, n, k, copies)
        x = ga.to_gpu(b.rng.standard_normal((m, k), dtype=np.float32))
        y = ga.empty((m, n), np.float32)
        xb, yb = (int(x.gpudata), x.nbytes), (int(y.gpudata), y.nbytes)
        reps = 10 if nbytes < (64 << 20) else 3
        t: dict[str, float] = {}
        for name, kw in variants:

            def launch(
                i: int, kw: dict[str, int] = kw, ws: list[QWeight] = ws, xb: Any = xb, yb: Any = yb
            ) -> None:
                mm.gemm(ws[i % len(ws)], xb, yb, m, stream=b.stream, **kw)

            t[name] = b.time_batch(launch, reps)
        flop = 2 * m * n * k
        t1 = min(t["v1_64"], t["v1_128"])
        row = {
            "model": model,
            "matrix": mat,
            "N": n,
            "K": k,
            "type": lay.name,
            "count": count,
            "m": m,
            "times_s": t,
            "v2_kernel": plan_gemm(ws[0], xb, yb, m, version=2).kernel,
            "v1_best_TFLOPs": flop / t1 / 1e12,
            "v2_TFLOPs": flop / t["v2"] / 1e12,
            "v3_TFLOPs": flop / t["v3"] / 1e12,
        }
        rows.append(row)
        cells = " ".join(f"{t[v[0]] * 1e6:9.1f}" for v in variants)
        print(
            f"{model:13} {mat:18} {n:6} {k:5} {lay.name:5} {cells} "
            f"{row['v1_best_TFLOPs']:6.1f} {row['v2_TFLOPs']:6.1f} {row['v3_TFLOPs']:6.1f}  "
            f"{row['v2_kernel']}"
        )
        b.release()
    print(f"\nper {m}-token prefill, matrices only (sum of time x count):")
    for model in dict.fromkeys(r["model"] for r in rows):
        rs = [r for r in rows if r["model"] == model]
        t1 = sum(min(r["times_s"]["v1_64"], r["times_s"]["v1_128"]) * r["count"] for r in rs)
        t2 = sum(r["times_s"]["v2"] * r["count"] for r in rs)
        t3 = sum(r["times_s"]["v3"] * r["count"] for r in rs)
        tb = sum(min(r["times_s"][v] for v in ("v2", "v3")) * r["count"] for r in rs)
        print(
            f"  {model:13} v1 best tile {t1 * 1e3:.2f} ms ({m / t1:.0f} tok/s), "
            f"v2 {t2 * 1e3:.2f} ms ({m / t2:.0f} tok/s, {t1 / t2:.2f}x), "
            f"v3 {t3 * 1e3:.2f} ms ({m / t3:.0f} tok/s, {t1 / t3:.2f}x), "
            f"best of v2/v3 per shape {tb * 1e3:.2f} ms ({m / tb:.0f} tok/s)"
        )
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", type=Path)
    ap.add_argument("--quick", action="store_true", help="fewer shapes (smoke run)")
    ap.add_argument("--no-gemm", action="store_true", help="gemv only (skip the 512-token gemm)")
    ap.add_argument("--gemm-only", action="store_true", help="gemm v1 vs v2 only (512 tokens)")
    args = ap.parse_args()
    b = Bench()
    if args.gemm_only:
        print(f"device: {b.name}")
        rows_g = gemm_ab(b, SHAPES[::4] if args.quick else SHAPES, 512)
        if args.json:
            args.json.write_text(json.dumps({"device": b.name, "gemm": rows_g}, indent=1))
        b.ctx.pop()
        return 0
    mm, ga = b.mm, b.ga
    bw = b.copy_bandwidth()
    print(f"device: {b.name}; device-to-device copy {bw / 1e9:.0f} GB/s (read+write)")
    rows: list[dict[str, Any]] = []
    shapes = SHAPES[::4] if args.quick else SHAPES
    hdr = f"{'model':13} {'matrix':18} {'N':>6} {'K':>5} {'type':5} {'MB':>7}"
    print(
        f"{hdr} {'gemv us':>8} {'GB/s':>6} {'%bw':>4} {'v3 us':>7} {'v3 %bw':>6} "
        f"{'r1 us':>7} {'r2 us':>7} {'r4 us':>7} {'gemm512 us':>10} {'TFLOP/s':>7}"
    )
    for model, mat, n, k, qtype, count in shapes:
        lay = layout(qtype)
        nbytes = n * lay.row_bytes(k)
        copies = max(1, min(4096, -(-ROTATE_BYTES // nbytes)))
        ws = b.weights(qtype, n, k, copies)
        x = ga.to_gpu(b.rng.standard_normal((512, k), dtype=np.float32))
        y = ga.empty((512, n), np.float32)
        xb, yb = (int(x.gpudata), x.nbytes), (int(y.gpudata), y.nbytes)

        def gemv(i: int, ws: list[QWeight] = ws, xb: Any = xb, yb: Any = yb, **kw: Any) -> None:
            mm.gemv(ws[i % len(ws)], xb, yb, 1, stream=b.stream, **kw)

        def gemm(i: int, ws: list[QWeight] = ws, xb: Any = xb, yb: Any = yb, tm: int = 64) -> None:
            mm.gemm(ws[i % len(ws)], xb, yb, 512, stream=b.stream, tile_m=tm, version=1)

        t1 = b.time_batch(gemv, 200)  # the default kernel (v4, rows per warp by rule)
        t1_v3 = b.time_batch(lambda i: gemv(i, version=3), 200)  # previous kernel
        # every v4 variant: plain r1/r2/r4, xpf, async r1/r2/r4
        variants = [("plain", 1), ("plain", 2), ("plain", 4), ("xpf", 1)]
        variants += [("async", 1), ("async", 2), ("async", 4)]
        t_var = {
            f"{m}_r{rw}": b.time_batch(lambda i, m=m, rw=rw: gemv(i, mode=m, rows_per_warp=rw), 200)
            for m, rw in variants
        }
        t_rw = {rw: t_var[f"plain_r{rw}"] for rw in (1, 2, 4)}
        t1_again = b.time_batch(gemv, 200)  # the default once more: run-to-run spread
        mm.gemv_cap = False  # async r2 with one block per tile (capped by default)
        t1_nocap = b.time_batch(lambda i: gemv(i, mode="async", rows_per_warp=2), 200)
        mm.gemv_cap = True
        tgr = b.time_graph(gemv, 200)  # v4 launches replayed as one CUDA graph
        tgr_v3 = b.time_graph(lambda i: gemv(i, version=3), 200)
        reps = 10 if nbytes < (64 << 20) else 3
        if args.no_gemm:
            tg64 = tg128 = float("nan")
        else:
            tg64 = b.time_batch(gemm, reps)
            tg128 = b.time_batch(lambda i: gemm(i, tm=128), reps)
        tg = min(tg64, tg128)
        row: dict[str, Any] = {
            "model": model,
            "matrix": mat,
            "N": n,
            "K": k,
            "type": lay.name,
            "count": count,
            "bytes": nbytes,
            "gemv_s": t1,
            "gemv_repeat_s": t1_again,
            "gemv_kernel": plan_gemv(ws[0], xb, yb, 1).kernel,
            "gemv_v3_s": t1_v3,
            "gemv_async_r2_nocap_s": t1_nocap,
            "gemv_variants_s": t_var,
            "gemv_graph_s": tgr,
            "gemv_v3_graph_s": tgr_v3,
            "gemv_r1_s": t_rw[1],
            "gemv_r2_s": t_rw[2],
            "gemv_r4_s": t_rw[4],
            "gemv_GBps": nbytes / t1 / 1e9,
            "gemv_frac_bw": nbytes / t1 / bw,
            "gemv_v3_frac_bw": nbytes / t1_v3 / bw,
            "gemm512_s": tg,
            "gemm512_TFLOPs": 2 * 512 * n * k / tg / 1e12,
            "gemm512_tile64_s": tg64,
            "gemm512_tile128_s": tg128,
            "gemm_v1_auto_kernel": plan_gemm(ws[0], xb, yb, 512, version=1).kernel,
            "gemm_default_version": gemm_version(ws[0]),
        }
        rows.append(row)
        print(
            f"{model:13} {mat:18} {n:6} {k:5} {lay.name:5} {nbytes / 1e6:7.2f} "
            f"{t1 * 1e6:8.2f} {row['gemv_GBps']:6.0f} {100 * row['gemv_frac_bw']:4.0f} "
            f"{t1_v3 * 1e6:7.2f} {100 * row['gemv_v3_frac_bw']:6.0f} "
            f"{t_rw[1] * 1e6:7.2f} {t_rw[2] * 1e6:7.2f} {t_rw[4] * 1e6:7.2f} "
            f"{tg * 1e6:10.1f} {row['gemm512_TFLOPs']:7.1f} "
            f"(again {t1_again * 1e6:.2f}; xpf {t_var['xpf_r1'] * 1e6:.2f}; async r1/r2/r4 "
            f"{t_var['async_r1'] * 1e6:.2f}/{t_var['async_r2'] * 1e6:.2f}/"
            f"{t_var['async_r4'] * 1e6:.2f} (r2 uncapped {t1_nocap * 1e6:.2f}); "
            f"graph {tgr * 1e6:.2f}, v3 graph {tgr_v3 * 1e6:.2f}; {row['gemv_kernel']})"
        )
        b.release()

    print("\nper decoded token, matrices only (sum of gemv times x count):")
    for model in dict.fromkeys(r["model"] for r in rows):
        rs = [r for r in rows if r["model"] == model]
        t = sum(r["gemv_s"] * r["count"] for r in rs)
        t3 = sum(r["gemv_v3_s"] * r["count"] for r in rs)
        tg = sum(r["gemv_graph_s"] * r["count"] for r in rs)
        tg3 = sum(r["gemv_v3_graph_s"] * r["count"] for r in rs)
        by = sum(r["bytes"] * r["count"] for r in rs)
        print(
            f"  {model:13} {by / 1e9:.3f} GB in {t * 1e6:.0f} us -> {by / t / 1e9:.0f} GB/s, "
            f"{1 / t:.0f} tok/s ceiling from matmuls (floor at copy bw {by / bw * 1e6:.0f} us); "
            f"v3: {t3 * 1e6:.0f} us, {1 / t3:.0f} tok/s; in a graph: {tg * 1e6:.0f} us "
            f"({1 / tg:.0f} tok/s), v3 {tg3 * 1e6:.0f} us ({1 / tg3:.0f} tok/s)"
        )

    extra: dict[str, Any] = {}
    # weights reused across tokens: gemv for 2, 4, 8 tokens on Phi-3's gate_up
    ws = b.weights(12, 16384, 3072, 8)
    x = ga.to_gpu(b.rng.standard_normal((8, 3072), dtype=np.float32))
    y = ga.empty((8, 16384), np.float32)
    for nt in (1, 2, 4, 8):
        t = b.time_batch(lambda i, nt=nt: mm.gemv(ws[i % 8], x, y, nt, stream=b.stream), 48)
        t3 = b.time_batch(
            lambda i, nt=nt: mm.gemv(ws[i % 8], x, y, nt, stream=b.stream, version=3), 48
        )
        extra[f"phi3_ffn_up_gemv_ntok{nt}_us"] = t * 1e6
        extra[f"phi3_ffn_up_gemv_v3_ntok{nt}_us"] = t3 * 1e6
        print(f"phi3 ffn_up q4_k gemv ntok={nt}: {t * 1e6:.1f} us (v3 {t3 * 1e6:.1f} us)")
    b.release()

    # gpt-oss MoE: 32 MXFP4 experts 2880x2880, top-4
    n_exp, n, k = 32, 2880, 2880
    raw = np.concatenate([random_matrix(39, n, k, b.rng)[0] for _ in range(n_exp)])
    wd = ga.to_gpu(raw)
    we = QWeight(int(wd.gpudata), 39, n, k, raw.nbytes, experts=n_exp)
    per_tok = 4 * n * layout(39).row_bytes(k)
    for ntok in (1, 512):
        if ntok == 1:  # 8 disjoint expert sets in turn: every launch reads new weights
            sets = b.rng.permutation(n_exp).astype(np.int32).reshape(8, 4)
        else:
            sets = np.stack([b.rng.choice(n_exp, 4, replace=False) for _ in range(ntok)])
            sets = sets.astype(np.int32).reshape(1, -1)
        ids = [ga.to_gpu(np.ascontiguousarray(s)) for s in sets]
        x = ga.to_gpu(b.rng.standard_normal((ntok, k), dtype=np.float32))
        y = ga.empty((ntok * 4, n), np.float32)
        form = "gemv" if ntok == 1 else "gemm"
        t = b.time_batch(
            lambda i, ids=ids, x=x, y=y, ntok=ntok, form=form: mm.moe(
                we,
                ids[i % len(ids)],
                ntok,
                4,
                x,
                y,
                per_slot_input=False,
                form=form,
                stream=b.stream,
            ),
            48 if ntok == 1 else 5,
        )
        if ntok == 1:
            extra["gptoss_moe_gemv_us"] = t * 1e6
            print(
                f"gpt-oss moe_gemv 4 experts x {n}x{k} mxfp4: {t * 1e6:.1f} us, "
                f"{per_tok / t / 1e9:.0f} GB/s ({100 * per_tok / t / bw:.0f}% of copy bw)"
            )
        else:
            extra["gptoss_moe_gemm512_us"] = t * 1e6
            print(
                f"gpt-oss moe_gemm 512 tokens x top-4: {t * 1e6:.0f} us, "
                f"{2 * 512 * 4 * n * k / t / 1e12:.1f} TFLOP/s"
            )
    if args.json:
        args.json.write_text(
            json.dumps(
                {"device": b.name, "copy_GBps": bw / 1e9, "rows": rows, "extra": extra}, indent=1
            )
        )
    b.ctx.pop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
