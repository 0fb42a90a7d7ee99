"""`worker-orcd bench --model PATH`: the CUDA backend's speed figures as one JSON object.

Measured here (on the GPU, in this process): load time with a cold and a warm kernel cache
(two loads; the cold one compiles into an empty cache directory), the weights upload rate
next to a plain pinned host-to-device copy, prompt processing (pp512: a 512-token prompt,
median of `--reps`), decode (tg128: 128 greedy one-token graph steps after a 512-token
prompt, tokens/s), the GPU name and the commit. Fields that need a live worker over NATS
(TTFT and inter-token p50/p95/p99) are listed under `missing` rather than estimated.

`worker-orcd bench --suite --model PATH [--device cuda|cpu] [--nats-url URL] ...` instead runs
the performance suite against a live worker (tools/suite.py, from a source checkout): it
starts nats-server (unless --nats-url) and `worker-orcd serve` subprocesses and prints one
JSON object with load, TTFT, inter-token, health, cancel and shutdown p50/p95/p99, VRAM back
at baseline, and pass/fail against the targets of docs/design.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from worker.cli._common import (
    EXIT_INTERRUPTED,
    SubParsers,
    add_command,
    add_model_options,
    add_model_ref_option,
    model_path,
    positive_int,
)

ORDER = 70


def register(subparsers: SubParsers) -> None:
    p = add_command(
        subparsers,
        "bench",
        summary="measure prompt and decode speed and load time (GPU)",
        description="Load MODEL on the GPU and print one JSON object: prompt processing "
        "(pp512) and decode (tg128) tokens/s, sampled decode, load time with a cold and a warm "
        "kernel cache, host-to-device rates, the fraction of the memory-bandwidth floor, GPU "
        "name and commit. With --suite, start `worker-orcd serve` subprocesses instead and "
        "measure them over NATS (time to first token, inter-token, health, cancel, shutdown, "
        "VRAM after many jobs; p50/p95/p99 against the targets in docs/design.md); the suite "
        "runs from a source checkout. Errors are JSON too: {'error': ...}.",
        examples="""\
  worker-orcd bench --model qwen.gguf
  worker-orcd bench --model phi3.gguf --no-cold --reps 3 --sweep-pdl
  worker-orcd bench --suite --device cpu --model tiny.gguf --jobs 5 --vram-jobs 10""",
    )
    add_model_options(p, positional=True)
    p.add_argument("--gpu-device", type=int, default=0, metavar="N", help="GPU index")
    p.add_argument(
        "--ctx-size",
        type=positive_int,
        default=4096,
        metavar="N",
        help="context length in tokens (the KV cache is sized for it)",
    )
    p.add_argument("--pp", type=positive_int, default=512, metavar="N", help="prompt length")
    p.add_argument("--tg", type=positive_int, default=128, metavar="N", help="decode steps")
    p.add_argument("--reps", type=positive_int, default=5, metavar="N", help="repetitions (median)")
    p.add_argument("--no-cold", action="store_true", help="skip the cold-cache load")
    p.add_argument("--no-graphs", action="store_true", help="eager decode (for comparison)")
    a = p.add_argument_group("A/B sweeps (same process, same warm card)")
    a.add_argument(
        "--sweep-splits",
        default="",
        metavar="LIST",
        help="also time tg at these attention key-chunk counts, e.g. 8,16,32",
    )
    a.add_argument("--sweep-fused", action="store_true", help="also time the other decode path")
    a.add_argument(
        "--sweep-pdl",
        action="store_true",
        help="also time decode with programmatic dependent launch off and on (twice each)",
    )
    s = p.add_argument_group("--suite", "the performance suite against live workers over NATS")
    s.add_argument(
        "--suite",
        action="store_true",
        help="run `worker-orcd serve` subprocesses and measure them over NATS",
    )
    s.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="worker backend")
    s.add_argument(
        "--nats-url",
        default=None,
        metavar="URL",
        help="NATS server (default: start an embedded nats-server)",
    )
    add_model_ref_option(
        s,
        "model reference the suite's workers serve (default: bench-suite-<random>, so "
        "workers already on a shared --nats-url never take the suite's jobs)",
    )
    s.add_argument(
        "--jobs", type=positive_int, default=20, metavar="N", help="TTFT/inter-token jobs"
    )
    s.add_argument(
        "--max-tokens", type=positive_int, default=64, metavar="N", help="tokens per job"
    )
    s.add_argument(
        "--prompt-tokens",
        type=positive_int,
        default=32,
        metavar="N",
        help="prompt length in tokens",
    )
    s.add_argument(
        "--health-requests",
        type=positive_int,
        default=1000,
        metavar="N",
        help="health requests timed",
    )
    s.add_argument(
        "--cancel-runs", type=positive_int, default=10, metavar="N", help="cancels timed"
    )
    s.add_argument(
        "--vram-jobs",
        type=positive_int,
        default=100,
        metavar="N",
        help="jobs before the VRAM baseline check",
    )
    s.add_argument(
        "--loads",
        type=positive_int,
        default=1,
        metavar="N",
        help="warm worker starts (load, shutdown)",
    )
    s.add_argument(
        "--load-timeout-s",
        type=float,
        default=600.0,
        metavar="S",
        help="time allowed for a worker to load",
    )
    p.set_defaults(func=run, parser=p)


def _greedy_rate(be: Any, prompt: list[int], greedy: Any, n: int) -> float:
    """Decode tokens/s with `greedy` settings over n steps after the prompt and one step
    (which captures the decode graph when the backend's settings just changed)."""
    be.reset()
    tok = be.forward_sample(prompt, greedy, 0.0, [])
    tok = be.forward_sample([tok], greedy, 0.0, [])
    t0 = time.perf_counter()
    for _ in range(n):
        tok = be.forward_sample([tok], greedy, 0.0, [])
    return n / (time.perf_counter() - t0)


def _commit() -> str:
    """The checkout's commit; WORKER_ORCD_COMMIT names it where no .git travels along."""
    if os.environ.get("WORKER_ORCD_COMMIT"):
        return os.environ["WORKER_ORCD_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parents[2],
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parents[2],
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _load(path: Path, args: argparse.Namespace, cache_dir: str | None) -> tuple[Any, float]:
    from worker.backends.cuda import CudaBackend

    old = os.environ.get("WORKER_ORCD_CACHE")
    if cache_dir is not None:
        os.environ["WORKER_ORCD_CACHE"] = cache_dir
    try:
        t0 = time.perf_counter()
        be = CudaBackend(
            path,
            ctx_size=args.ctx_size,
            gpu_device=args.gpu_device,
            graphs=not args.no_graphs,
        )
        return be, time.perf_counter() - t0
    finally:
        if cache_dir is not None:
            if old is None:
                os.environ.pop("WORKER_ORCD_CACHE", None)
            else:
                os.environ["WORKER_ORCD_CACHE"] = old


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    from worker.backends.cuda.loader import measure_h2d
    from worker.engine.params import SamplingParams

    result: dict[str, Any] = {"model": str(args.model), "commit": _commit()}
    if not args.no_cold:
        with tempfile.TemporaryDirectory() as cold:
            be, secs = _load(args.model, args, cold)
            result["load_s_cold_kernel_cache"] = round(secs, 3)
            result["kernel_load_s_cold"] = round(be.kernel_load_s, 3)
            be.close()
    be, secs = _load(args.model, args, None)  # the default cache (warm after one load)
    if args.no_cold:
        be.close()
        be, secs = _load(args.model, args, None)
    result["load_s_warm_kernel_cache"] = round(secs, 3)
    result["kernel_load_s_warm"] = round(be.kernel_load_s, 3)
    result["weights_upload_gb_s"] = round(be.load_stats.gb_per_s, 2)
    result["weights_bytes"] = be.load_stats.bytes
    result["h2d_plain_pinned_gb_s"] = round(measure_h2d(be.ctx), 2)
    result["gpu"] = be.info.gpu_name
    result["sm"] = be.info.sm
    result["driver"] = be.info.cuda_runtime_version
    result["arch"] = be.hp.arch
    result["ctx_size"] = be.context_length
    result["vram_bytes_used"] = be.vram_bytes_used()
    result["graphs"] = be.use_graphs
    rng = np.random.default_rng(0)
    V = be.vocab_size
    prompt = [int(t) for t in rng.integers(0, V, size=args.pp)]
    # pp: one forward over the prompt (logits of the last position), median of reps
    pp_times = []
    be.reset()
    be.forward(prompt)  # warm-up
    for _ in range(args.reps):
        be.reset()
        t0 = time.perf_counter()
        be.forward(prompt)
        pp_times.append(time.perf_counter() - t0)
    pp_s = statistics.median(pp_times)
    result[f"pp{args.pp}_tok_s"] = round(args.pp / pp_s, 1)
    # tg: greedy decode steps after the prompt; only the id crosses to the host each step
    greedy = SamplingParams(temperature=0.0)
    tg_rates = []
    step_us: list[float] = []
    for rep in range(max(1, args.reps // 2) + 1):
        be.reset()
        tok = be.forward_sample(prompt, greedy, 0.0, [])
        steps = []
        t0 = time.perf_counter()
        for _ in range(args.tg):
            s0 = time.perf_counter()
            tok = be.forward_sample([tok], greedy, 0.0, [])
            steps.append(time.perf_counter() - s0)
        el = time.perf_counter() - t0
        if rep > 0:  # the first repetition captures the graph
            tg_rates.append(args.tg / el)
            step_us += [s * 1e6 for s in steps]
    result[f"tg{args.tg}_tok_s"] = round(statistics.median(tg_rates), 1)
    result["decode_splits"] = be.decode_splits
    if args.sweep_splits:
        sweep = {}
        default = be.decode_splits
        for n_split in [int(v) for v in args.sweep_splits.split(",") if v.strip()]:
            be.set_decode_splits(n_split)
            sweep[str(n_split)] = round(_greedy_rate(be, prompt, greedy, args.tg), 1)
        be.set_decode_splits(default)
        result["tg_by_decode_splits"] = sweep
    if args.sweep_fused:  # the other decode attention path (RoPE + KV store fused or not)
        be.set_fused_decode(not be.fused_decode)
        rates = [_greedy_rate(be, prompt, greedy, args.tg) for _ in range(2)]
        result[f"tg_fused_decode_{be.fused_decode}"] = round(max(rates), 1)
        be.set_fused_decode(not be.fused_decode)
    result["fused_decode"] = be.fused_decode
    if args.sweep_pdl:  # programmatic dependent launch in the decode graph off / on, twice
        for on in (False, True, False, True):
            be.set_pdl(on)
            key = f"tg_pdl_{'on' if on else 'off'}"
            result.setdefault(key, []).append(round(_greedy_rate(be, prompt, greedy, args.tg), 1))
            if on:
                result["pdl_edges"] = list(be.pdl_edges)
        be.set_pdl(None)
    step_us.sort()
    result["decode_step_us_p50"] = round(step_us[len(step_us) // 2], 1)
    result["decode_step_us_p99"] = round(step_us[int(len(step_us) * 0.99)], 1)
    # sampled decode, as the engine calls it (next_draw given): temperature 0.8, top-p 0.9,
    # top-k 40, and the job defaults (temperature 1.0, nothing else): the GPU sampler's cost
    for key, params in (
        ("tg_sampled_tok_s", SamplingParams(temperature=0.8, top_p=0.9, top_k=40)),
        ("tg_sampled_default_tok_s", SamplingParams()),
    ):
        draws = [(i * 0.618) % 1.0 for i in range(34)]
        be.reset()
        tok = be.forward_sample(prompt, params, 0.5, [], next_draw=draws[0])
        t0 = time.perf_counter()
        gen: list[int] = []
        for i in range(32):
            tok = be.forward_sample([tok], params, draws[i], gen, next_draw=draws[i + 1])
            gen.append(tok)
        result[key] = round(32 / (time.perf_counter() - t0), 1)
    floor_bytes = _decode_weight_bytes(be)
    result["weight_bytes_per_token"] = floor_bytes
    tg = result[f"tg{args.tg}_tok_s"]
    result["decode_floor_fraction_at_3TB_s"] = round(tg * floor_bytes / 3.0e12, 3)
    result["missing"] = [
        "ttft_ms_p50/p95/p99 over NATS (needs a live worker: bench --suite)",
        "inter_token_ms_p50/p95/p99 over NATS",
    ]
    be.close()
    return result


def _decode_weight_bytes(be: Any) -> int:
    """Bytes of weights one decode step reads: every tensor once, except the embedding
    table, of which one row is read (unless it is also the LM head), and expert tensors,
    of which the chosen experts' share is read."""
    total = 0
    tied = "output.weight" not in be.gf.tensors
    hp = be.hp
    for name, ti in be.gf.tensors.items():
        if name == "token_embd.weight" and not tied:
            total += ti.nbytes // max(1, ti.shape[1] if len(ti.shape) > 1 else 1)
        elif "_exps." in name and hp.n_expert:  # MoE: the chosen experts only
            total += ti.nbytes * hp.n_expert_used // hp.n_expert
        else:
            total += ti.nbytes
    return int(total)


def measure_suite(args: argparse.Namespace) -> dict[str, Any]:
    import asyncio

    from worker.cli._tools import import_tool

    suite = import_tool("suite", "bench --suite")
    opts = suite.LiveSuiteOptions(
        model=args.model,
        device=args.device,
        gpu_device=args.gpu_device,
        nats_url=args.nats_url,
        model_ref=args.model_ref or f"bench-suite-{uuid.uuid4().hex[:8]}",
        ctx_size=args.ctx_size,
        jobs=args.jobs,
        max_tokens=args.max_tokens,
        prompt_tokens=args.prompt_tokens,
        health_requests=args.health_requests,
        cancel_runs=args.cancel_runs,
        vram_jobs=args.vram_jobs,
        loads=args.loads,
        cold=not args.no_cold,
        load_timeout_s=args.load_timeout_s,
    )
    result = asyncio.run(suite.run_live_suite(opts))
    result["commit"] = _commit()
    return result


def run(args: argparse.Namespace) -> int:
    args.model = model_path(args.parser, args)
    try:
        result = measure_suite(args) if args.suite else measure(args)
    except KeyboardInterrupt:
        print(json.dumps({"error": "interrupted"}), flush=True)
        return EXIT_INTERRUPTED
    except Exception as exc:  # report, do not hide: one JSON object either way
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        return 1
    print(json.dumps(result))
    sys.stdout.flush()
    return 0
