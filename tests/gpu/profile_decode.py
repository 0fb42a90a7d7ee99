"""Where a decode step's time goes (run on the device, not a test):

    python3 tests/gpu/profile_decode.py MODEL [CTX]

Prints the GPU time of one replayed decode graph, the host time of a whole
forward_sample step, and a per-kernel table from an eager step with events around every
launch (count per step, mean us, total us per step)."""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from typing import Any

import numpy as np

from worker.backends.cuda import CudaBackend
from worker.engine.params import SamplingParams


def main() -> None:
    path = sys.argv[1]
    ctx = int(sys.argv[2]) if len(sys.argv) > 2 else 4096
    be = CudaBackend(path, ctx_size=ctx)
    drv, st = be.ctx.drv, be.ctx.stream
    rng = np.random.default_rng(0)
    prompt = [int(t) for t in rng.integers(0, be.vocab_size, 512)]
    greedy = SamplingParams(temperature=0.0)
    be.reset()
    tok = be.forward_sample(prompt, greedy, 0.0, [])
    tok = be.forward_sample([tok], greedy, 0.0, [])  # captures the graph

    def graph_us() -> float:
        g = be._decode_graph("greedy")
        s, e = drv.Event(), drv.Event()
        gpu_ms = []
        for _ in range(50):
            be._set_inputs([tok], be.n_past - 1)  # replay the same position
            s.record(st)
            g.launch()
            e.record(st)
            e.synchronize()
            gpu_ms.append(e.time_since(s))
        return float(np.median(gpu_ms) * 1e3)

    be._drain()  # a queued speculative step (forward_sample) must not overlap the replays
    print(f"graph replay GPU time: median {graph_us():.1f} us (prefer-L1 context)")
    for cname in ("PREFER_NONE", "PREFER_SHARED", "PREFER_L1"):
        drv.Context.set_cache_config(getattr(drv.func_cache, cname))
        for gr in be._graphs.values():
            gr.destroy()
        be._graphs.clear()
        print(f"  cache config {cname}: graph replay {graph_us():.1f} us")
    for splits in (8, 16, 32):
        be.set_decode_splits(splits)
        for fused in (False, True):
            be.set_fused_decode(fused)
            print(f"  decode splits {splits}, fused rope+attention {fused}: {graph_us():.1f} us")
    be.set_decode_splits(16)
    be.set_fused_decode(False)
    host = []
    for _ in range(50):
        t0 = time.perf_counter()
        tok = be.forward_sample([tok], greedy, 0.0, [])
        host.append(time.perf_counter() - t0)
    print(f"forward_sample step (host wall): median {np.median(host) * 1e6:.1f} us")
    for spec in (False, True, False, True):
        be.spec_decode = spec
        be._drain()
        host = []
        for _ in range(100):
            t0 = time.perf_counter()
            tok = be.forward_sample([tok], greedy, 0.0, [])
            host.append(time.perf_counter() - t0)
        print(f"  speculative greedy steps {spec}: median {np.median(host) * 1e6:.1f} us")
    be._drain()
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=40)
    t0 = time.perf_counter()
    for _ in range(10):
        tok = be.forward_sample([tok], params, 0.3, [1, 2, 3])
    print(f"sampled step (host wall): {(time.perf_counter() - t0) / 10 * 1e6:.1f} us")
    params = SamplingParams(temperature=1.0)
    t0 = time.perf_counter()
    for _ in range(10):
        tok = be.forward_sample([tok], params, 0.3, [])
    print(
        f"sampled step T=1 no filters (host wall): {(time.perf_counter() - t0) / 10 * 1e6:.1f} us"
    )

    times: dict[str, list[float]] = defaultdict(list)
    orig_launch = be.k.launch
    orig_run = be.mm.run

    def timed(name: str, *a: Any, **kw: Any) -> None:
        s0, e0 = drv.Event(), drv.Event()
        s0.record(st)
        orig_launch(name, *a, **kw)
        e0.record(st)
        e0.synchronize()
        times[name].append(e0.time_since(s0) * 1e3)

    def timed_run(launch: Any, stream: Any = None) -> None:
        s0, e0 = drv.Event(), drv.Event()
        s0.record(st)
        orig_run(launch, stream)
        e0.record(st)
        e0.synchronize()
        key = f"{launch.kernel} N={launch.args[2]} K={launch.args[3]}"
        times[key].append(e0.time_since(s0) * 1e3)

    be.k.launch = timed  # type: ignore[method-assign]
    be.mm.run = timed_run  # type: ignore[method-assign]
    steps = 5
    for _ in range(steps):
        be._set_inputs([tok], be.n_past)
        be._enqueue_decode("greedy")
        be._n_past += 1
    be.ctx.sync("profile")
    rows = sorted(times.items(), key=lambda kv: -sum(kv[1]))
    total = sum(sum(v) for v in times.values()) / steps
    print(f"eager step, sum of kernel times: {total:.1f} us")
    print(f"{'kernel':60s} {'n/step':>7s} {'mean us':>8s} {'us/step':>8s}")
    for name, v in rows:
        print(f"{name:60s} {len(v) / steps:7.1f} {np.mean(v):8.2f} {sum(v) / steps:8.1f}")
    be.close()


if __name__ == "__main__":
    main()
