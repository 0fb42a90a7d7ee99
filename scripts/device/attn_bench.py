#!/usr/bin/env python3
"""Prefill attention, old (attn_split) against new (attn_prefill_tc), in one process on one
card (docs/kernels.md "H12: tensor-core prefill attention"), at the real models' shapes.

    python3 scripts/device/attn_bench.py [--tokens 512] [--json OUT.json]

Each shape: one layer's attention for a prompt of --tokens tokens at position 0 (and a
second chunk of the same length after them; and short chunks of 4..64 tokens ending at
position 4096, unless --no-short), the split count the backend uses
(attn_split_count(kv, 16, 64)); the median over 7 batches of 20 back-to-back launches timed
with events, queued behind a 10 ms spin kernel (the host's launch rate stays out). Also the
two outputs' relative difference (each against the other: the GPU tests check each against
NumPy) and the tc kernel's tensor-core rate over the tile-level flops (4 * 64 * 64 *
head_dim per visited 64x64 tile) and over the exact causal flops.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_matmul_bench import SPIN_SRC

from worker.backends.cuda.context import CudaContext
from worker.backends.cuda.kernels import (
    TC_BM,
    TC_BN,
    AttnShape,
    Kernels,
    attn_split_count,
)

# name, n_head, n_kv, head_dim, window, sinks
SHAPES = [
    ("phi3", 32, 32, 96, 0, False),
    ("gpt-oss full", 64, 8, 64, 0, True),
    ("gpt-oss swa128", 64, 8, 64, 128, True),
    ("qwen2.5-0.5b", 14, 2, 64, 0, False),
    ("llama-8b", 32, 8, 128, 0, False),
]


def tile_flops(n: int, pos0: int, nh: int, hd: int, window: int) -> tuple[float, float]:
    """(flops of the 64x64 tiles the kernel visits, exact flops of the visible pairs)."""
    tiles = 0
    for qt in range(-(-n // TC_BM)):
        t_first, t_last = qt * TC_BM, min(qt * TC_BM + TC_BM, n) - 1
        hi = pos0 + t_last + 1
        lo = max(0, pos0 + t_first - window + 1) if window > 0 else 0
        tiles += -(-hi // TC_BN) - lo // TC_BN
    q = np.arange(pos0, pos0 + n)[:, None]
    j = np.arange(pos0 + n)[None, :]
    vis = j <= q
    if window > 0:
        vis &= q - j < window
    per_pair = 4 * hd  # QK^T and PV, a multiply-add each
    return float(tiles * TC_BM * TC_BN * per_pair * nh), float(vis.sum() * per_pair * nh)


def bench_shape(
    ctx: Any,
    spin: Any,
    k: Kernels,
    rng: np.random.Generator,
    n: int,
    pos0: int,
    name: str,
    nh: int,
    nkv: int,
    hd: int,
    window: int,
    sinks: bool,
) -> dict[str, Any]:
    """Time attn_split and attn_prefill_tc on one shape; the row of the table."""
    drv = ctx.drv
    clock_khz = ctx.device.get_attribute(drv.device_attribute.CLOCK_RATE)
    kv = pos0 + n
    cache = kv + 64
    bufs = []

    def put(a: np.ndarray, what: str) -> Any:
        b = ctx.alloc(max(a.nbytes, 16), what)
        ctx.htod(b, np.ascontiguousarray(a))
        bufs.append(b)
        return b

    kc = put((rng.standard_normal((cache, nkv, hd)) * 0.5).astype(np.float16), "kc")
    vc = put(rng.standard_normal((cache, nkv, hd)).astype(np.float16), "vc")
    q = put(rng.standard_normal((n, nh * hd)).astype(np.float32), "q")
    sk = put(rng.standard_normal(nh).astype(np.float32), "sinks") if sinks else None
    pos = put(np.array([pos0], np.int32), "pos")
    out_tc = put(np.full(n * nh * hd, np.nan, np.float32), "out_tc")
    out_sp = put(np.full(n * nh * hd, np.nan, np.float32), "out_sp")
    n_split = attn_split_count(kv, 16, 64)
    opart = put(np.zeros(n * nh * n_split * hd, np.float32), "opart")
    ml = put(np.zeros(n * nh * n_split * 2, np.float32), "ml")
    tickets = put(np.zeros(n * nh, np.uint32), "tickets")
    scale = float(1.0 / np.sqrt(hd))

    def run_tc() -> None:
        k.attention_prefill_tc(
            q=q,
            q_stride=nh * hd,
            kcache=kc,
            vcache=vc,
            pos=pos,
            out=out_tc,
            out_stride=nh * hd,
            n_tokens=n,
            n_head=nh,
            n_kv=nkv,
            head_dim=hd,
            ctx=cache,
            max_kv=kv,
            scale=scale,
            window=window,
            sinks=sk,
        )

    def run_split() -> None:
        k.attention(
            q=q,
            q_stride=nh * hd,
            kcache=kc,
            vcache=vc,
            opart=opart,
            ml=ml,
            pos=pos,
            out=out_sp,
            out_stride=nh * hd,
            tickets=tickets,
            shape=AttnShape(n, nh, nkv, hd, n_split, -(-kv // n_split)),
            ctx=cache,
            max_kv=kv,
            scale=scale,
            window=window,
            sinks=sk,
        )

    def timed(fn: Any, reps: int = 20, batches: int = 7) -> float:
        fn()
        ctx.sync("warm-up")
        ts = []
        for _ in range(batches):
            a, b = drv.Event(), drv.Event()
            # the launches queue behind a 10 ms spin: the host's launch rate stays out
            spin(np.int64(clock_khz * 10), block=(1, 1, 1), stream=ctx.stream)
            a.record(ctx.stream)
            for _ in range(reps):
                fn()
            b.record(ctx.stream)
            b.synchronize()
            ts.append(a.time_till(b) * 1e3 / reps)
        ctx.sync(name)
        return statistics.median(ts)

    t_split = timed(run_split)
    t_tc = timed(run_tc)
    t_tc2 = timed(run_tc)  # the same version twice: the spread
    a = np.empty(n * nh * hd, np.float32)
    b = np.empty(n * nh * hd, np.float32)
    ctx.dtoh(a, out_tc)
    ctx.dtoh(b, out_sp)
    diff = float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b.astype(np.float64)))
    tf, ef = tile_flops(n, pos0, nh, hd, window)
    row = {
        "shape": name,
        "n_head": nh,
        "n_kv": nkv,
        "head_dim": hd,
        "window": window,
        "sinks": sinks,
        "tokens": n,
        "pos0": pos0,
        "split_us": t_split,
        "tc_us": t_tc,
        "tc_us_again": t_tc2,
        "speedup": t_split / t_tc,
        "tc_vs_split_rel": diff,
        "tc_tile_tflops": tf / t_tc / 1e6,
        "tc_exact_tflops": ef / t_tc / 1e6,
    }
    print(json.dumps(row), flush=True)
    for bb in bufs:
        ctx.free(bb)
    return row


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--no-short", action="store_true", help="skip the short-chunk rows")
    args = ap.parse_args()
    ctx = CudaContext(0)
    k = Kernels(ctx, sync_each=False)
    from pycuda.compiler import SourceModule

    spin = SourceModule(SPIN_SRC, no_extern_c=True).get_function("spin")
    rng = np.random.default_rng(0)
    print(f"device: {ctx.facts.name} ({ctx.facts.multiprocessors} SMs)")
    rows: list[dict[str, Any]] = []
    n = args.tokens
    for pos0 in (0, n):
        for name, nh, nkv, hd, window, sinks in SHAPES:
            rows.append(bench_shape(ctx, spin, k, rng, n, pos0, name, nh, nkv, hd, window, sinks))
    # short chunks far into the context (few query rows, ~4k keys): where the backend's
    # TC_MIN_ROWS / TC_SHORT_KV rule keeps attn_split; these rows say where tc starts to win
    if not args.no_short:
        for m in (4, 16, 32, 64):
            for name, nh, nkv, hd, window, sinks in SHAPES[:4]:
                rows.append(
                    bench_shape(ctx, spin, k, rng, m, 4096 - m, name, nh, nkv, hd, window, sinks)
                )
    print("\nprefill attention, us per layer (median of 7 x 20 launches)")
    print(
        f"{'shape':16s} {'tok':>4s} {'pos0':>5s} {'split':>9s} {'tc':>9s} {'tc again':>9s} "
        f"{'x':>6s} {'tile TF/s':>9s} {'rel diff':>9s}"
    )
    for r in rows:
        print(
            f"{r['shape']:16s} {r['tokens']:4d} {r['pos0']:5d} {r['split_us']:9.1f} "
            f"{r['tc_us']:9.1f} "
            f"{r['tc_us_again']:9.1f} {r['speedup']:6.1f} {r['tc_tile_tflops']:9.1f} "
            f"{r['tc_vs_split_rel']:9.1e}"
        )
    if args.json:
        args.json.write_text(json.dumps({"device": ctx.facts.name, "rows": rows}, indent=1))
    ctx.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
