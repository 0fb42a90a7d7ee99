#!/usr/bin/env python3
"""MoE kernels, old against new in one process on one card (docs/kernels.md "H10: MoE
kernels"): gpt-oss-20b's experts, 32 MXFP4 matrices of 2880x2880, top-4.

    python3 scripts/device/moe_bench.py [--json OUT.json]

Decode (1 and 2 tokens): moe_gemv3 (previous kernel) and moe_gemv with 1/2/4 rows per warp,
as back-to-back stream launches and replayed in a CUDA graph (how the decode step runs them);
8 disjoint expert sets in turn, so every launch reads weights no earlier launch left in L2.
Gate and up as two launches against one moe_gemv_pair launch.
Prefill (128 and 512 tokens, random top-4 routing): moe_gemm3 (ballot scan) against the routing
pre-pass + routed gemm, version 4 (gemm_tile core) and version 5 (gemm2 core, docs/kernels.md
"H13"), each with 64- and 128-token tiles (version 5 timed twice: the spread), the default,
and the pre-pass alone. Timing as in scripts/gpu_matmul_bench.py (events around launches
queued behind a spin kernel, median of 5). --prefill-only skips the decode part.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_matmul_bench import Bench

from tools.synth_blocks import random_matrix
from worker.backends.cuda.matmul import (
    QWeight,
    moe_workspace_bytes,
    plan_moe_route,
)
from worker.backends.cuda.quant_layout import layout

N_EXP, N, K, TOPK = 32, 2880, 2880, 4


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", type=Path)
    ap.add_argument("--prefill-only", action="store_true")
    args = ap.parse_args()
    b = Bench()
    mm, ga = b.mm, b.ga
    bw = b.copy_bandwidth()
    print(f"device: {b.name}; device-to-device copy {bw / 1e9:.0f} GB/s (read+write)")
    raw = np.concatenate([random_matrix(39, N, K, b.rng)[0] for _ in range(N_EXP)])
    wd = ga.to_gpu(raw)
    we = QWeight(int(wd.gpudata), 39, N, K, raw.nbytes, experts=N_EXP)
    wd2 = wd.copy()  # the "up" tensor of the gate+up timings: same bytes, other addresses
    we2 = QWeight(int(wd2.gpudata), 39, N, K, raw.nbytes, experts=N_EXP)
    expert_bytes = N * layout(39).row_bytes(K)
    out: dict[str, Any] = {"device": b.name, "copy_GBps": bw / 1e9, "decode": {}, "prefill": {}}

    variants: list[tuple[str, dict[str, Any]]] = [
        ("v3", {"version": 3}),
        ("r1", {"rows_per_warp": 1}),
        ("r2", {"rows_per_warp": 2}),
        ("r4", {"rows_per_warp": 4}),
        ("r2o", {"rows_per_warp": 2, "opt": True}),
        ("r4o", {"rows_per_warp": 4, "opt": True}),
        ("default", {}),
    ]
    print("\ndecode, us per launch (stream / graph), GB/s and % of copy bw of the stream time")
    for ntok in () if args.prefill_only else (1, 2):
        n_assign = ntok * TOPK
        # 8 disjoint expert sets per token in turn (141 MB of weights cycled: > L2)
        sets = [b.rng.permutation(N_EXP).astype(np.int32) for _ in range(ntok)]
        hids = [np.concatenate([s[4 * j : 4 * j + 4] for s in sets]) for j in range(8)]
        ids = [ga.to_gpu(h.astype(np.int32)) for h in hids]
        # weight bytes a launch reads: its distinct experts (two tokens may share one)
        nbytes = expert_bytes * float(np.mean([len(set(h.tolist())) for h in hids]))
        for per_slot in (False, True):
            x = ga.to_gpu(
                b.rng.standard_normal((ntok, TOPK if per_slot else 1, K), dtype=np.float32)
            )
            y = ga.empty((n_assign, N), np.float32)
            for name, kw in variants:

                def launch(
                    i: int,
                    kw: dict[str, Any] = kw,
                    x: Any = x,
                    y: Any = y,
                    ntok: int = ntok,
                    per_slot: bool = per_slot,
                    ids: list[Any] = ids,
                ) -> None:
                    mm.moe(
                        we,
                        ids[i % 8],
                        ntok,
                        TOPK,
                        x,
                        y,
                        per_slot_input=per_slot,
                        form="gemv",
                        stream=b.stream,
                        **kw,
                    )

                t = b.time_batch(launch, 48)
                tg = b.time_graph(launch, 48)
                key = f"ntok{ntok}_{'per_slot' if per_slot else 'shared'}_{name}"
                out["decode"][key] = {"stream_us": t * 1e6, "graph_us": tg * 1e6}
                print(
                    f"  ntok {ntok} {'per-slot x' if per_slot else 'shared x  '} {name:8} "
                    f"{t * 1e6:7.2f} / {tg * 1e6:7.2f} us  {nbytes / t / 1e9:6.0f} GB/s "
                    f"{100 * nbytes / t / bw:4.0f} %"
                )
        # gate and up: two moe_gemv launches against one moe_gemv_pair launch (a copy of the
        # experts at other addresses stands for the second tensor)
        x = ga.to_gpu(b.rng.standard_normal((ntok, K), dtype=np.float32))
        y0, y1 = ga.empty((n_assign, N), np.float32), ga.empty((n_assign, N), np.float32)
        for name, pair in (("two_launches", 0), ("pair_r2", 2), ("pair_r4", 4)):

            def gate_up(
                i: int,
                pair: int = pair,
                x: Any = x,
                y0: Any = y0,
                y1: Any = y1,
                ntok: int = ntok,
                ids: list[Any] = ids,
            ) -> None:
                if pair:
                    mm.moe_pair(
                        we,
                        we2,
                        ids[i % 8],
                        ntok,
                        TOPK,
                        x,
                        y0,
                        y1,
                        stream=b.stream,
                        rows_per_warp=pair,
                    )
                    return
                for w, y in ((we, y0), (we2, y1)):
                    mm.moe(w, ids[i % 8], ntok, TOPK, x, y, per_slot_input=False, stream=b.stream)

            t = b.time_batch(gate_up, 48)
            tg = b.time_graph(gate_up, 48)
            out["decode"][f"ntok{ntok}_gate_up_{name}"] = {
                "stream_us": t * 1e6,
                "graph_us": tg * 1e6,
            }
            print(
                f"  ntok {ntok} gate+up {name:12} {t * 1e6:7.2f} / {tg * 1e6:7.2f} us  "
                f"{2 * nbytes / t / 1e9:6.0f} GB/s {100 * 2 * nbytes / t / bw:4.0f} %"
            )
        b.drv.Context.synchronize()

    print("\nprefill, us per launch (TFLOP/s)")
    for ntok in (128, 512):
        n_assign = ntok * TOPK
        route_ids = np.stack([b.rng.choice(N_EXP, TOPK, replace=False) for _ in range(ntok)])
        ids_dev = ga.to_gpu(route_ids.astype(np.int32).reshape(-1))
        x = ga.to_gpu(b.rng.standard_normal((ntok, K), dtype=np.float32))
        y = ga.empty((n_assign, N), np.float32)
        flop = 2 * n_assign * N * K
        for name, kw in (
            ("v3", {"version": 3}),
            ("v4_tile64", {"version": 4, "tile_m": 64}),
            ("v4_tile128", {"version": 4, "tile_m": 128}),
            ("v5_tile64", {"version": 5, "tile_m": 64}),
            ("v5_tile128", {"version": 5, "tile_m": 128}),
            ("v5_tile64_again", {"version": 5, "tile_m": 64}),
            ("v5_tile128_again", {"version": 5, "tile_m": 128}),
            ("default", {}),
        ):

            def launch_g(
                i: int, kw: dict[str, Any] = kw, x: Any = x, y: Any = y, ids: Any = ids_dev
            ) -> None:
                mm.moe(
                    we,
                    ids,
                    x.shape[0],
                    TOPK,
                    x,
                    y,
                    per_slot_input=False,
                    form="gemm",
                    stream=b.stream,
                    **kw,
                )

            t = b.time_batch(launch_g, 5)
            out["prefill"][f"ntok{ntok}_{name}"] = {"us": t * 1e6, "TFLOPs": flop / t / 1e12}
            print(f"  {ntok:4} tokens {name:16} {t * 1e6:8.1f} us  {flop / t / 1e12:5.1f} TFLOP/s")
        ws = ga.empty(moe_workspace_bytes(n_assign, N_EXP, 64) // 4 + 4, np.int32)
        route = plan_moe_route(ids_dev, n_assign, N_EXP, ws)
        t = b.time_batch(lambda i, route=route: mm.run(route, b.stream), 20)
        out["prefill"][f"ntok{ntok}_route_only"] = {"us": t * 1e6}
        print(f"  {ntok:4} tokens moe_route alone {t * 1e6:.1f} us")
        b.drv.Context.synchronize()
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    b.ctx.pop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
