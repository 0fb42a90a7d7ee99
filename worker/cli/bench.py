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
    positive_int_list,
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
  worker-orcd bench --model phi3.gguf --no-cold --reps 3
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
    p.add_argument(
        "--max-batch", type=int, default=None, metavar="N", help="backend max batch (default: KV)"
    )
    p.add_argument(
        "--prefill-chunk",
        type=int,
        default=2048,
        metavar="N",
        help="prompt tokens a step in the batched runs (2048)",
    )
    p.add_argument(
        "--no-invariant",
        action="store_true",
        help="batch invariance off: 1-8 row steps use the decode gemv (A/B its cost)",
    )
    p.add_argument(
        "--batch",
        type=positive_int_list,
        default=[],
        metavar="LIST",
        help="also run llama-batched-bench's measurement for these B, e.g. 1,8,32,64,128, "
        "and print its table",
    )
    p.add_argument("--batch-pp", type=int, default=128, metavar="N", help="PP of --batch (128)")
    p.add_argument("--batch-tg", type=int, default=128, metavar="N", help="TG of --batch (128)")
    s = p.add_argument_group("--suite", "the performance suite against a live worker over NATS")
    s.add_argument(
        "--suite",
        action="store_true",
        help="run `worker-orcd serve` subprocesses and measure them over NATS",
    )
    s.add_argument(
        "--device",
        choices=["cuda", "cpu"],
        default=None,
        help="the suite's workers' backend (cuda); without --suite the bench is the GPU's",
    )
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
        "--concurrency",
        type=positive_int_list,
        default=[],
        metavar="LIST",
        help="also run N clients at once for each N, e.g. 1,16,64 (each sends its next job "
        "when its last ends): aggregate tokens/s, TTFT and inter-token percentiles",
    )
    s.add_argument(
        "--jobs-per-client",
        type=positive_int,
        default=4,
        metavar="N",
        help="jobs each --concurrency client sends (4)",
    )
    s.add_argument(
        "--prefix-tokens",
        type=int,
        default=0,
        metavar="N",
        help="also time TTFT of jobs sharing an N-token prompt prefix (the prefix cache) "
        "against jobs whose prompts share nothing, e.g. 1000",
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
    from worker.nats.options import add_nats_connect_arguments

    add_nats_connect_arguments(p)  # for --suite with --nats-url
    p.set_defaults(func=run, parser=p)


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


class NoGpuStack(Exception):
    """The CUDA backend cannot start here (PyCUDA or cuda-bindings missing)."""


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
            max_batch=args.max_batch,
            prefill_chunk=args.prefill_chunk,
            batch_invariant=not args.no_invariant,
        )
        return be, time.perf_counter() - t0
    except ImportError as exc:  # the backend imports PyCUDA / cuda-bindings as it starts
        raise NoGpuStack(
            f"the CUDA backend cannot start ({exc}): bench measures an NVIDIA GPU "
            "(pip install '.[cuda]' there); `bench --suite --device cpu` runs without one"
        ) from exc
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
    from worker.engine.single import SingleSequence

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
    result["max_batch"] = be.max_batch
    result["kv_blocks"] = be.n_blocks
    result["vram_bytes_used"] = be.vram_bytes_used()
    result["graphs"] = be.use_graphs
    result["batch_invariant"] = be.invariant
    result["arithmetic"] = be.arithmetic
    rng = np.random.default_rng(0)
    V = be.vocab_size
    prompt = [int(t) for t in rng.integers(0, V, size=args.pp)]
    greedy = SamplingParams(temperature=0.0)
    seq = SingleSequence(be)
    # pp: the prompt as one chunk ending in the first token, median of reps
    seq.forward_sample(prompt, greedy, 0.0, [])  # warm-up
    pp_times = []
    for _ in range(args.reps):
        seq.reset()
        t0 = time.perf_counter()
        seq.forward_sample(prompt, greedy, 0.0, [])
        pp_times.append(time.perf_counter() - t0)
    result["pp_tokens"] = args.pp
    result["pp_tok_s"] = round(args.pp / statistics.median(pp_times), 1)
    # tg: greedy decode steps after the prompt (graph replays of the one-row bucket)
    tg_rates = []
    for _ in range(args.reps):
        seq.reset()
        tok = seq.forward_sample(prompt, greedy, 0.0, [])
        tok = seq.forward_sample([tok], greedy, 0.0, [])
        t0 = time.perf_counter()
        for _ in range(args.tg):
            tok = seq.forward_sample([tok], greedy, 0.0, [])
        tg_rates.append(args.tg / (time.perf_counter() - t0))
    result["tg_tokens"] = args.tg
    result["tg_tok_s"] = round(statistics.median(tg_rates), 1)
    wbytes = _decode_weight_bytes(be)
    result["decode_weight_bytes"] = wbytes
    if args.batch:
        result["batched"] = measure_batched(be, args)
    result["missing"] = [
        "ttft_ms_p50/p95/p99 over NATS (bench --suite)",
        "inter_token_ms_p50/p95/p99 over NATS (bench --suite)",
    ]
    be.close()
    return result


BATCHED_HEADER = (
    "|    PP |     TG |    B |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s "
    "|      T s |    S t/s |"
)


def measure_batched(be: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    """llama-batched-bench's measurement on this worker's engine: for each B, B jobs with
    PP-token prompts all admitted at once; T_PP = time until every job has its first token
    (the prompts prefilled, --prefill-chunk tokens a step); T_TG = time for the next TG steps
    of all B (graph-replayed decode steps, through the scheduler: host time included).
    S_PP = B*PP/T_PP, S_TG = B*TG/T_TG, S = B*(PP+TG)/(T_PP+T_TG). Prints the table."""
    import numpy as np

    from worker.engine.params import SamplingParams
    from worker.engine.scheduler import Request, Scheduler
    from worker.tokenizer.loader import load_tokenizer

    tok = load_tokenizer(be.gf.metadata)
    rng = np.random.default_rng(1)
    rows = []
    print(BATCHED_HEADER)
    print("|" + "|".join("-" * (len(c)) for c in BATCHED_HEADER.split("|")[1:-1]) + "|")
    for b in args.batch:
        if b > be.max_batch:
            print(f"| B={b} skipped: more than max_batch {be.max_batch} |")
            continue
        for warm_up in (True, False):
            sched = Scheduler(be, tok, max_batch=b, prefill_chunk=args.prefill_chunk)
            for k in range(b):
                ids = [int(t) for t in rng.integers(100, be.vocab_size, args.batch_pp)]
                sched.add(
                    Request(
                        f"b{k}",
                        ids,
                        max_tokens=2 if warm_up else args.batch_tg + 1,
                        params=SamplingParams(temperature=0.0),
                        ignore_eos=True,
                    )
                )
            if warm_up:  # the same step sizes once, untimed: their graphs get captured
                while not sched.idle:
                    sched.step()
        t0 = time.perf_counter()
        while any(s.prefilling or not s.generated for s in sched.running.values()) or (
            sched.waiting
        ):
            sched.step()
        t_pp = time.perf_counter() - t0
        steps = 0
        t1 = time.perf_counter()
        while not sched.idle:
            sched.step()
            steps += 1
        t_tg = time.perf_counter() - t1
        pp, tg = args.batch_pp, args.batch_tg
        row = {
            "PP": pp,
            "TG": tg,
            "B": b,
            "N_KV": b * (pp + tg),
            "T_PP": round(t_pp, 3),
            "S_PP": round(b * pp / t_pp, 1),
            "T_TG": round(t_tg, 3),
            "S_TG": round(b * tg / t_tg, 1),
            "T": round(t_pp + t_tg, 3),
            "S": round(b * (pp + tg) / (t_pp + t_tg), 1),
            "decode_steps": steps,
        }
        rows.append(row)
        print(
            f"| {pp:5d} | {tg:6d} | {b:4d} | {row['N_KV']:6d} | {t_pp:8.3f} | "
            f"{row['S_PP']:8.1f} | {t_tg:8.3f} | {row['S_TG']:8.1f} | {row['T']:8.3f} | "
            f"{row['S']:8.1f} |"
        )
        sys.stdout.flush()
    return rows


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


def measure_suite(args: argparse.Namespace, nats_options: Any) -> dict[str, Any]:
    import asyncio

    from worker.cli._tools import import_tool

    suite = import_tool("suite", "bench --suite")
    opts = suite.LiveSuiteOptions(
        model=args.model,
        device=args.device,
        gpu_device=args.gpu_device,
        nats_url=args.nats_url,
        nats_options=nats_options,
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
        concurrency=args.concurrency,
        jobs_per_client=args.jobs_per_client,
        prefix_tokens=args.prefix_tokens,
        load_timeout_s=args.load_timeout_s,
    )
    result = asyncio.run(suite.run_live_suite(opts))
    result["commit"] = _commit()
    return result


def run(args: argparse.Namespace) -> int:
    from worker.nats.options import connect_flags_given, url_connect_options

    args.model = model_path(args.parser, args)
    given = connect_flags_given(args)
    if given and not args.suite:
        args.parser.error(f"{' '.join(given)}: only for --suite with --nats-url")
    if args.device is not None and not args.suite:
        args.parser.error(
            "--device: only for --suite (the in-process bench measures the GPU; "
            "`bench --suite --device cpu` measures a CPU worker over NATS)"
        )
    args.device = args.device or "cuda"
    try:
        nats_options = url_connect_options(args) if args.suite else None
    except ValueError as exc:
        args.parser.error(str(exc))
    try:
        result = measure_suite(args, nats_options) if args.suite else measure(args)
    except KeyboardInterrupt:
        print(json.dumps({"error": "interrupted"}), flush=True)
        return EXIT_INTERRUPTED
    except NoGpuStack as exc:
        print(json.dumps({"error": str(exc)}))
        return 1
    except Exception as exc:  # report, do not hide: one JSON object either way
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        return 1
    print(json.dumps(result))
    sys.stdout.flush()
    return 0
