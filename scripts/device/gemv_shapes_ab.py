"""Per-shape A/B of the v4 decode gemv modes in graph timing, for the matrix shapes a Qwen2.5-0.5B
and a Phi-3-mini decode step actually launch (q|k|v and gate|up fused by the loader).

    python3 scripts/device/gemv_shapes_ab.py [--json OUT.json]

Each variant: 200 launches (rotating weight copies >= 256 MB) captured as one CUDA graph,
median per launch of 5 replays; every variant is timed twice (A B ... A B order) so the
run-to-run spread is visible beside the differences.
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

from gpu_matmul_bench import ROTATE_BYTES, Bench

from worker.backends.cuda.matmul import gemv_mode
from worker.backends.cuda.quant_layout import layout

# (model, matrix, rows, cols, ggml type, launches per token)
SHAPES: list[tuple[str, str, int, int, int, int]] = [
    ("qwen", "qkv q5_0", 1152, 896, 6, 24),
    ("qwen", "q|k q5_0", 1024, 896, 6, 0),
    ("qwen", "v q8_0", 128, 896, 8, 0),
    ("qwen", "o q5_0", 896, 896, 6, 24),
    ("qwen", "gate|up q5_0", 9728, 896, 6, 24),
    ("qwen", "down q4_k", 896, 4864, 12, 12),
    ("qwen", "down q6_k", 896, 4864, 14, 12),
    ("qwen", "head q8_0", 151936, 896, 8, 1),
    ("phi3", "qkv q5_k", 9216, 3072, 13, 32),
    ("phi3", "o q4_k", 3072, 3072, 12, 32),
    ("phi3", "gate|up q4_k", 16384, 3072, 12, 32),
    ("phi3", "down q4_k", 3072, 8192, 12, 16),
    ("phi3", "down q6_k", 3072, 8192, 14, 16),
    ("phi3", "head q6_k", 32064, 3072, 14, 1),
]
VARIANTS = [("xpf", 1), ("plain", 1), ("plain", 2), ("plain", 4), ("async", 1), ("async", 2)]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    b = Bench()
    mm, ga = b.mm, b.ga
    print(f"device: {b.name}")
    rows: list[dict[str, Any]] = []
    names = [f"{m}:{r}" for m, r in VARIANTS]
    print(
        f"{'model':5} {'matrix':14} {'N':>6} {'K':>5} {'default':>9} "
        + " ".join(f"{n:>13}" for n in names)
    )
    for model, mat, n, k, qtype, count in SHAPES:
        nbytes = n * layout(qtype).row_bytes(k)
        copies = max(1, min(4096, -(-ROTATE_BYTES // nbytes)))
        ws = b.weights(qtype, n, k, copies)
        x = ga.to_gpu(b.rng.standard_normal((8, k), dtype=np.float32))
        y = ga.empty((8, n), np.float32)
        xb, yb = (int(x.gpudata), x.nbytes), (int(y.gpudata), y.nbytes)
        times: dict[str, list[float]] = {nm: [] for nm in names}
        for _ in range(2):
            for m, rw in VARIANTS:

                def g(
                    i: int, m: str = m, rw: int = rw, ws: Any = ws, xb: Any = xb, yb: Any = yb
                ) -> None:
                    mm.gemv(ws[i % len(ws)], xb, yb, 1, stream=b.stream, mode=m, rows_per_warp=rw)

                times[f"{m}:{rw}"].append(b.time_graph(g, 200) * 1e6)
        dm, drw = gemv_mode(n, 1)
        row = {
            "model": model,
            "matrix": mat,
            "N": n,
            "K": k,
            "qtype": qtype,
            "count": count,
            "bytes": nbytes,
            "default": f"{dm}:{drw}",
            "graph_us": times,
        }
        rows.append(row)
        cells = " ".join(f"{min(v):6.2f}/{max(v):6.2f}" for v in times.values())
        print(f"{model:5} {mat:14} {n:6} {k:5} {dm + ':' + str(drw):>9} {cells}")
        b.release()
    best: dict[str, float] = {}
    for r in rows:
        med = {nm: float(np.mean(v)) for nm, v in r["graph_us"].items()}
        bn = min(med, key=lambda nm: med[nm])
        r["best"] = bn
        print(
            f"{r['model']} {r['matrix']}: best {bn} {med[bn]:.2f} us; default "
            f"{r['default']} {med[r['default']]:.2f} us; x{r['count']}"
        )
        best[r["model"]] = best.get(r["model"], 0.0) + r["count"] * (med[r["default"]] - med[bn])
    print(
        "per-token saving if every shape took its best:", {m: round(v, 1) for m, v in best.items()}
    )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    b.ctx.pop()  # PyCUDA aborts at exit with a context still pushed (rc 134 in call 1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
