"""Per-kernel GPU time of a decode step (of --batch rows) and of a prefill, as the worker runs
them (decode steps replay their bucket's CUDA graph), from CUPTI kernel records taken by
torch.profiler: CUPTI's activity tracing sees every kernel of the process, PyCUDA's
included, graph nodes too.

    python3 -m tools.kernel_profile MODEL.gguf [--batch 1] [--steps 32] [--prompt 512] [--json F]

Prints, per kernel name, launches per step, GPU us per step and share of the step, and the
step's GPU-busy fraction (sum of kernel time / wall time between the first kernel's start
and the last one's end): the difference is launch gaps and idle time inside the graph.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, cast

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _kernels(trace: Path) -> list[dict[str, Any]]:
    with open(trace) as f:
        events = json.load(f)["traceEvents"]
    return [e for e in events if e.get("cat") == "kernel" and "dur" in e]


def _table(kern: list[dict[str, Any]], per: int) -> dict[str, Any]:
    by: dict[str, list[float]] = defaultdict(list)
    for e in kern:
        by[e["name"]].append(float(e["dur"]))
    busy = sum(sum(v) for v in by.values())
    span = max(e["ts"] + e["dur"] for e in kern) - min(e["ts"] for e in kern) if kern else 0.0
    rows = sorted(
        (
            {
                "kernel": k,
                "launches_per": round(len(v) / per, 2),
                "us_per": round(sum(v) / per, 2),
                "us_each": round(sum(v) / len(v), 2),
                "share": round(sum(v) / busy, 4) if busy else 0.0,
            }
            for k, v in by.items()
        ),
        key=lambda r: -cast(float, r["us_per"]),
    )
    return {
        "busy_us_per": round(busy / per, 1),
        "span_us_per": round(span / per, 1),
        "busy_fraction": round(busy / span, 3) if span else 0.0,
        "kernels": rows,
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--ctx-size", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=1, help="decode rows a step")
    ap.add_argument("--json")
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args()

    import numpy as np
    import torch
    from torch.profiler import ProfilerActivity, profile

    from worker.backends.cuda import CudaBackend
    from worker.engine.params import SamplingParams
    from worker.engine.scheduler import Request, Scheduler
    from worker.engine.single import SingleSequence
    from worker.tokenizer.loader import load_tokenizer

    be = CudaBackend(a.model, ctx_size=a.ctx_size, max_batch=max(a.batch, 8))
    torch.cuda.init()  # same device, the primary context the backend already holds
    greedy = SamplingParams(temperature=0.0)
    rng = np.random.default_rng(0)
    prompt = [int(t) for t in rng.integers(0, be.vocab_size, a.prompt)]
    out: dict[str, Any] = {
        "model": os.path.basename(a.model),
        "device": torch.cuda.get_device_name(),
    }
    with tempfile.TemporaryDirectory() as d:
        # decode: --batch jobs past their prompts, then profile `steps` steps of all of them;
        # each job its own prompt, so that rows differ (a MoE layer routes them to different
        # experts, as concurrent jobs do)
        sched = Scheduler(be, load_tokenizer(be.gf.metadata), max_batch=a.batch)
        for k in range(a.batch):
            mine = [int(t) for t in rng.integers(0, be.vocab_size, 64)]
            sched.add(
                # (no job ends inside the profile, however long its warm-up)
                Request(f"p{k}", mine, max_tokens=a.steps + 1000, params=greedy, ignore_eos=True)
            )
        # warm until every job is past its prompt (64 jobs' prompts take several steps of
        # prefill chunks), so the profiled steps are decode rows only
        for _ in range(10_000):
            if not sched.waiting and not any(s.prefilling for s in sched.running.values()):
                break
            sched.step()
        for _ in range(6):
            sched.step()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            for _ in range(a.steps):
                sched.step()
            wall = time.perf_counter() - t0
        prof.export_chrome_trace(f"{d}/dec.json")
        out["decode"] = _table(_kernels(Path(f"{d}/dec.json")), a.steps)
        out["decode"]["wall_us_per_step"] = round(wall / a.steps * 1e6, 1)
        out["decode"]["rows"] = a.batch
        # prefill of the whole prompt (warm once first)
        seq = SingleSequence(be)
        seq.forward_sample(prompt, greedy, 0.0, [])
        seq.reset()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            seq.forward_sample(prompt, greedy, 0.0, [])
            wall = time.perf_counter() - t0
        prof.export_chrome_trace(f"{d}/pre.json")
        out["prefill"] = _table(_kernels(Path(f"{d}/pre.json")), 1)
        out["prefill"]["host_us"] = round(wall * 1e6, 1)
        out["prefill"]["tokens"] = a.prompt
    be.close()
    for what in ("decode", "prefill"):
        t = out[what]
        print(
            f"== {out['model']} {what} ({out['device']}): GPU busy {t['busy_us_per']} us, "
            f"span {t['span_us_per']} us, busy fraction {t['busy_fraction']}, "
            f"wall {t.get('wall_us_per_step', t.get('host_us'))} us"
        )
        for r in t["kernels"][: a.top]:
            print(
                f"  {r['us_per']:9.1f} us {100 * r['share']:5.1f} %  x{r['launches_per']:<6} "
                f"{r['us_each']:8.2f} us each  {r['kernel']}"
            )
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
