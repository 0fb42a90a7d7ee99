"""GPU time of one matrix product of a decode step at model shapes, for every split-K choice:
what gemm_split picks (marked *) against the others, with the weights rotated over enough
copies that L2 (50 MB on an H200) never holds them, as in a real step. Up to 16 rows the
product is skinny's one launch, above it the gemm's launches (fp16 pre-pass for version 3,
the gemm, the in-order split sum), as MatmulKernels.linear runs them; a pass over the copies
is captured as a CUDA graph (programmatic edges as the worker makes them) and replayed, so
host launch costs do not count, as in a decode step.

    python3 -m tools.skinny_sweep [--rows 1,8,64] [--splits 1,2,3,4,5,6,8,12] [--shapes ...]

A split changes a product's bits (its K ranges are summed separately, then in order), so
gemm_split must stay a function of the weight shape and the GPU for every row count; this
sweep is how a change of that policy is judged (BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# (name, rows N, cols K, ggml type) of the full-size synthetic layouts (Q4_K_M, gpt-oss MXFP4)
SHAPES: dict[str, tuple[int, int, int]] = {
    "phi3.qkv": (9216, 3072, 13),
    "phi3.gate_up": (16384, 3072, 12),
    "phi3.o": (3072, 3072, 12),
    "phi3.down.q4_k": (3072, 8192, 12),
    "phi3.down.q6_k": (3072, 8192, 14),
    "phi3.head": (32064, 3072, 14),
    "qwen.qkv": (1152, 896, 6),
    "qwen.o": (896, 896, 6),
    "qwen.gate_up": (9728, 896, 6),
    "qwen.down.q4_k": (896, 4864, 12),
    "qwen.down.q6_k": (896, 4864, 14),
    "gptoss.qkv": (5120, 2880, 8),
    "gptoss.o": (2880, 4096, 8),
    "qwen.head": (151936, 896, 8),
    "gptoss.head": (201088, 2880, 8),
    "gptoss.router": (32, 2880, 0),
}


def _time(ctx: Any, steps: list[Callable[[], None]]) -> float:
    """GPU microseconds a step, the steps captured as one CUDA graph and replayed."""
    import pycuda.driver as drv

    for f in steps:  # workspaces are allocated here, never inside the capture
        f()
    with ctx.capture() as cap:
        for f in steps:
            f()
    assert cap.graph is not None
    passes = max(2, 200 // len(steps))
    cap.graph.launch()
    start, end = drv.Event(), drv.Event()
    start.record(ctx.stream)
    for _ in range(passes):
        cap.graph.launch()
    end.record(ctx.stream)
    end.synchronize()
    cap.graph.destroy()
    return float(start.time_till(end)) * 1e3 / (passes * len(steps))


def _sweep(ctx: Any, mk: Any, name: str, rows: list[int], wants: list[int], l2_bytes: int) -> None:
    """Print the time of every split of one shape at each row count."""
    import pycuda.driver as drv

    from tools.synth_blocks import random_matrix
    from worker.backends.cuda.plans.base import QWeight
    from worker.backends.cuda.plans.dense import SKINNY_MAX_ROWS, gemm_split, plan_skinny, split_k

    rng = np.random.default_rng(0)
    n, k, qtype = SHAPES[name]
    raw, _ = random_matrix(qtype, n, k, rng)
    copies = [drv.to_device(raw) for _ in range(max(2, -(-l2_bytes // raw.nbytes)))]
    ws = [QWeight(int(c), qtype, n, k, raw.nbytes) for c in copies]
    chosen = gemm_split(ws[0], ctx.facts.multiprocessors)
    for m in rows:
        x = drv.to_device(rng.standard_normal((m, k)).astype(np.float32))
        y = drv.mem_alloc(m * n * 4)
        xb, yb = (x, m * k * 4), (y, m * n * 4)
        # distinct splits, gemm_split's first
        for split in dict.fromkeys([chosen] + [split_k(ws[0], want) for want in wants]):
            steps: list[Callable[[], None]] = [
                partial(mk.run, plan_skinny(w, xb, yb, m, split=split), ctx.stream)
                if m <= SKINNY_MAX_ROWS
                else partial(mk.gemm, w, xb, yb, m, split=split, stream=ctx.stream)
                for w in ws
            ]
            us = _time(ctx, steps)
            mark = "*" if split == chosen else " "
            gbs = raw.nbytes / us / 1e3
            print(f"{name:16s} {m:4d} {split[0]:3d}{mark} {us:8.2f} {gbs:7.1f}", flush=True)
        x.free()
        y.free()
    for c in copies:
        c.free()


def _sweep_i15(ctx: Any, name: str, rows: list[int], wants: list[int], l2_bytes: int) -> None:
    """The same for the 15-bit integer product (cuda_src/i15.cu: the K-quant shapes whose K
    is a multiple of 256, and the Q4_0 / Q5_0 / Q8_0 ones) as the worker launches it (the
    activation pre-pass, then the product summing its own splits), by the staged tensor-core
    core (`i15gp`), up to 8 rows its one-n8-tile form (`i15gp8`), above it its form that
    folds the splits in one block a tile (`i15gpf`)."""
    import pycuda.gpuarray as ga

    from tools.i15 import I15, LEGACY, P8_ROWS
    from tools.synth_blocks import random_matrix
    from worker.backends.cuda.compile import load_module

    rng = np.random.default_rng(0)
    n, k, qtype = SHAPES[name]
    legacy = qtype in LEGACY
    if not (legacy or (qtype in (12, 13, 14) and k % 256 == 0)):
        return
    raw, _ = random_matrix(qtype, n, k, rng)
    copies = [ga.to_gpu(raw) for _ in range(max(2, -(-l2_bytes // raw.nbytes)))]
    i15 = I15(load_module("i15", ctx.facts.arch), qtype)
    units = -(-k // 256)  # super-blocks, or chunks of 8 blocks of 32
    for m in rows:
        x = ga.to_gpu(rng.standard_normal((m, k)).astype(np.float32))
        y = ga.empty((m, n), np.float32)
        for split in sorted({s for s in wants if s <= units}):
            if (split - 1) * -(-units // split) >= units:
                continue  # an empty split
            b = i15.buffers(m, k, n, split)
            for core in ("gemmp", "gemmp8", "gemmpf"):
                if (core == "gemmp8" and m > P8_ROWS) or (core == "gemmpf" and m <= P8_ROWS):
                    continue  # gemm15p8 up to 8 rows, the folded gemm15p above
                if core == "gemmpf" and i15.gemmpf is None:
                    continue  # no folded Q6_K core
                steps: list[Callable[[], None]] = [
                    partial(i15.run, c, x, y, m, n, k, split, b, ctx.stream, core, True)
                    for c in copies
                ]
                us = _time(ctx, steps)
                gbs = raw.nbytes / us / 1e3
                label = f"{name} i15{core[0]}{core[4:]}"
                print(f"{label:16s} {m:4d} {split:3d}  {us:8.2f} {gbs:7.1f}", flush=True)
        x.gpudata.free()
        y.gpudata.free()
    for c in copies:
        c.gpudata.free()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,8,64")
    ap.add_argument("--splits", default="1,2,3,4,5,6,8,12")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--l2-bytes", type=int, default=400_000_000, help="weight bytes rotated")
    ap.add_argument("--i15", action="store_true", help="also the 15-bit integer product")
    args = ap.parse_args(argv)

    from worker.backends.cuda.context import CudaContext
    from worker.backends.cuda.matmul import MatmulKernels

    ctx = CudaContext(0)
    try:
        mk = MatmulKernels()
        print(f"{'shape':16s} {'rows':>4s} {'S':>4s} {'us':>8s} {'GB/s':>7s}")
        rows = [int(r) for r in args.rows.split(",")]
        wants = [int(s) for s in args.splits.split(",")]
        for name in args.shapes.split(","):
            _sweep(ctx, mk, name, rows, wants, args.l2_bytes)
            if args.i15:
                _sweep_i15(ctx, name, rows, wants, args.l2_bytes)
    finally:
        ctx.close()  # pops the context: PyCUDA aborts at exit if one is left current


if __name__ == "__main__":
    main()
