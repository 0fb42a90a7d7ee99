"""GPU time of one skinny product (a decode step's matrix product) at model shapes, for every
split-K choice: what gemm_split picks (marked *) against the others, with the weights
rotated over enough copies that L2 (50 MB on an H200) never holds them, as in a real step.

    python3 -m tools.skinny_sweep [--rows 1,8] [--splits 1,2,3,4,5,6,8,12] [--shapes NAME,...]

A split changes a product's bits (its K ranges are summed separately, then in order), so
gemm_split must stay a function of the weight shape and the GPU for every row count; this
sweep is how a change of that policy is judged (BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# (name, rows N, cols K, ggml type) of the full-size synthetic Q4_K_M layouts
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
}


def _splits(k: int, qk: int, wants: list[int]) -> list[tuple[int, int]]:
    """Distinct (S, kps) for the wanted split counts: whole raw chunks a split, as gemm_split
    cuts them."""
    from worker.backends.cuda.matmul import GEMM2_BK

    spc = max(qk, 128) // GEMM2_BK
    chunks = -(-(k // GEMM2_BK) // spc)
    out: list[tuple[int, int]] = []
    for want in wants:
        per = -(-chunks // min(max(want, 1), chunks))
        s = -(-chunks // per)
        split = (s, per * spc if s > 1 else 0)
        if split not in out:
            out.append(split)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,8")
    ap.add_argument("--splits", default="1,2,3,4,5,6,8,12")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--l2-bytes", type=int, default=400_000_000, help="weight bytes rotated")
    args = ap.parse_args(argv)

    import pycuda.autoinit  # noqa: F401  (a context for this process)
    import pycuda.driver as drv

    from tools.synth_blocks import random_matrix
    from worker.backends.cuda.matmul import MatmulKernels, QWeight, gemm_split, plan_skinny
    from worker.backends.cuda.quant_layout import layout

    mk = MatmulKernels()
    sms = int(drv.Context.get_device().get_attribute(drv.device_attribute.MULTIPROCESSOR_COUNT))
    rng = np.random.default_rng(0)
    rows = [int(r) for r in args.rows.split(",")]
    wants = [int(s) for s in args.splits.split(",")]
    print(f"{'shape':16s} {'rows':>4s} {'S':>4s} {'us':>8s} {'GB/s':>7s}")
    for name in args.shapes.split(","):
        n, k, qtype = SHAPES[name]
        raw, _ = random_matrix(qtype, n, k, rng)
        copies = [drv.to_device(raw) for _ in range(max(2, -(-args.l2_bytes // raw.nbytes)))]
        ws = [QWeight(int(c), qtype, n, k, raw.nbytes) for c in copies]
        chosen = gemm_split(ws[0], sms)
        for m in rows:
            x = drv.to_device(rng.standard_normal((m, k)).astype(np.float32))
            y = drv.mem_alloc(m * n * 4)
            for split in _splits(k, layout(qtype).qk, [chosen[0], *wants]):
                launches = [
                    plan_skinny(w, (x, m * k * 4), (y, m * n * 4), m, split=split) for w in ws
                ]
                reps = max(len(launches), 200)
                for i in range(len(launches)):
                    mk.run(launches[i])
                start, end = drv.Event(), drv.Event()
                start.record()
                for i in range(reps):
                    mk.run(launches[i % len(launches)])
                end.record()
                end.synchronize()
                us = start.time_till(end) * 1e3 / reps
                mark = "*" if split == chosen else " "
                gbs = raw.nbytes / us / 1e3
                print(f"{name:16s} {m:4d} {split[0]:3d}{mark} {us:8.2f} {gbs:7.1f}")
            x.free()
            y.free()
        for c in copies:
            c.free()


if __name__ == "__main__":
    main()
