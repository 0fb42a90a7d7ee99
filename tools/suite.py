"""The performance suite of `worker-orcd bench --suite` against a live worker, over NATS:
time to first token, inter-token latency, health reply latency, cancel latency, how soon an
abandoned job (lease not renewed) is ended, and device memory back at its baseline after many
jobs, each with p50/p95/p99 and pass/fail against the targets of docs/design.md; with
`concurrency`, N clients at once (each sends its next job as soon as its last one ends, so
jobs keep arriving while others decode): aggregate tokens/s, and TTFT and inter-token
percentiles per job. Everything is measured from the client side, the way a user sees it.

    result = await run_suite(client, model_ref, worker_id)   # a plain dict, JSON-ready
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import tempfile
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tools.live import WorkerProc, shutdown_and_wait, wait_healthy
from worker.client import OrcdClient
from worker.nats.options import NatsConnectOptions
from worker.nats.server import EmbeddedNatsServer
from worker.protocol import End, Error, Health, Started, Token

T = TypeVar("T")

TARGETS_MS = {
    "ttft_p95": 20.0,
    "inter_token_p95": 1.5,
    "health_p99": 2.0,
    "cancel_p95": 10.0,
    "abandoned_p95": 1000.0,  # lease run out -> CANCELLED
}


def percentiles(values_s: list[float]) -> dict[str, float | int]:
    """p50/p95/p99 (nearest rank) of durations in seconds, reported in milliseconds."""
    xs = sorted(values_s)
    if not xs:
        return {"n": 0}

    def q(p: float) -> float:
        return round(xs[min(len(xs) - 1, max(0, round(p * (len(xs) - 1))))] * 1e3, 4)

    return {"n": len(xs), "p50_ms": q(0.50), "p95_ms": q(0.95), "p99_ms": q(0.99)}


async def _timed_job(
    client: OrcdClient, model_ref: str, prompt: str, max_tokens: int
) -> tuple[float, list[float], End | Error, int]:
    """(TTFT s, inter-token gaps s, terminal event, prompt tokens) of one greedy job."""
    t0 = time.perf_counter()
    last: float | None = None
    ttft = float("nan")
    gaps: list[float] = []
    terminal: End | Error | None = None
    prompt_tokens = -1
    async for ev in client.generate(
        model_ref, prompt=prompt, max_tokens=max_tokens, temperature=0.0, seed=1, timeout_s=600
    ):
        now = time.perf_counter()
        if isinstance(ev, Started):
            prompt_tokens = ev.prompt_tokens
        elif isinstance(ev, Token):
            if last is None:
                ttft = now - t0
            else:
                gaps.append(now - last)
            last = now
        elif isinstance(ev, End | Error):
            terminal = ev
    assert terminal is not None
    return ttft, gaps, terminal, prompt_tokens


async def _cancel_once(client: OrcdClient, model_ref: str, prompt: str) -> float | None:
    """Seconds from sending the cancel of a running job to receiving its CANCELLED error."""
    job_id = f"suite-cancel-{uuid.uuid4().hex[:12]}"
    first = asyncio.Event()
    sent_at: list[float] = []
    done_at: list[float] = []

    async def follow() -> None:
        async for ev in client.generate(
            model_ref,
            prompt=prompt,
            job_id=job_id,
            max_tokens=2048,
            temperature=0.0,
            timeout_s=600,
        ):
            if isinstance(ev, Token):
                first.set()
            elif isinstance(ev, Error) and sent_at:
                done_at.append(time.perf_counter())

    task = asyncio.create_task(follow())
    await asyncio.wait_for(first.wait(), 600)
    sent_at.append(time.perf_counter())
    await client.nc.publish(client.subjects.cancel, f'{{"job_id": "{job_id}"}}'.encode())
    await asyncio.wait_for(task, 600)
    return done_at[0] - sent_at[0] if done_at else None


async def _abandoned_once(
    client: OrcdClient, model_ref: str, prompt: str, lease_s: float
) -> float | None:
    """A job with a lease nobody renews: seconds from its lease running out to its CANCELLED
    event, the lease counted from the job's publish (the worker takes it later, so this is an
    upper bound on the worker's delay). None if the job ended by itself first (EOS)."""
    from worker.protocol import Job

    job = Job(
        job_id=f"suite-abandon-{uuid.uuid4().hex[:12]}",
        prompt=prompt,
        max_tokens=2048,
        temperature=0.0,
        lease_s=lease_s,
    )
    published = ended = float("nan")

    async def publish() -> None:
        nonlocal published
        published = time.perf_counter()
        await client.submit(model_ref, job)

    async for ev in client.follow(job.job_id, timeout_s=600, before_first=publish):
        if isinstance(ev, End):
            return None
        if isinstance(ev, Error):
            ended = time.perf_counter()
            if ev.reason != "client_gone":
                raise RuntimeError(f"abandoned job ended otherwise: {ev}")
    return ended - (published + lease_s)


async def run_concurrency(
    clients: list[OrcdClient],
    model_ref: str,
    n: int,
    *,
    jobs_per_client: int,
    max_tokens: int,
    prompt: str,
) -> dict[str, Any]:
    """`n` closed-loop clients, `jobs_per_client` greedy jobs each, spread over the NATS
    connections in `clients`. Every prompt starts with its own words, so no job reuses
    another's prompt blocks (the prefix cache would flatter TTFT)."""
    ttfts: list[float] = []
    gaps: list[float] = []
    errors: list[str] = []
    tokens = 0

    async def one(k: int) -> None:
        nonlocal tokens
        client = clients[k % len(clients)]
        for j in range(jobs_per_client):
            text = f"job {k} {j}: {prompt}"
            ttft, g, terminal, _ = await _timed_job(client, model_ref, text, max_tokens)
            if isinstance(terminal, End):
                ttfts.append(ttft)
                gaps.extend(g)
                tokens += terminal.tokens_out
            else:
                errors.append(f"{terminal.code}: {terminal.message}")

    t0 = time.perf_counter()
    await asyncio.gather(*(one(k) for k in range(n)))
    wall = time.perf_counter() - t0
    return {
        "clients": n,
        "jobs": n * jobs_per_client,
        "tokens": tokens,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 1),
        "ttft": percentiles(ttfts),
        "inter_token": percentiles(gaps),
        "errors": errors,
    }


async def run_prefix_ttft(
    client: OrcdClient, model_ref: str, prefix: str, jobs: int, max_tokens: int = 8
) -> dict[str, Any]:
    """TTFT of jobs whose prompts share a long prefix (the worker's prefix cache maps its
    blocks instead of computing them) against jobs of the same length whose prompts all
    differ from the first token on (nothing to share). One warm-up job publishes the prefix."""

    async def ttfts(prompts: list[str]) -> list[float]:
        out = []
        for p in prompts:
            ttft, _, terminal, _ = await _timed_job(client, model_ref, p, max_tokens)
            if isinstance(terminal, End):
                out.append(ttft)
        return out

    await ttfts([f"{prefix} question 0"])
    shared = await ttfts([f"{prefix} question {i + 1}" for i in range(jobs)])
    unique = await ttfts([f"{i + 1} {prefix} question" for i in range(jobs)])
    return {"shared_prefix": percentiles(shared), "no_shared_prefix": percentiles(unique)}


async def run_suite(
    client: OrcdClient,
    model_ref: str,
    worker_id: str,
    *,
    jobs: int = 20,
    max_tokens: int = 64,
    prompt_words: int = 24,
    health_requests: int = 1000,
    cancel_runs: int = 10,
    vram_jobs: int = 100,
    prompt: str | None = None,
    abandoned_runs: int = 3,
    lease_s: float = 1.0,
) -> dict[str, Any]:
    if prompt is None:
        prompt = " ".join(["token"] * prompt_words)  # about 32 tokens with a chat-less prompt
    out: dict[str, Any] = {"model_ref": model_ref, "worker_id": worker_id}
    health0 = await client.health(worker_id)
    out["device"] = health0.device
    out["model"] = health0.model

    # time to first token and inter-token latency over NATS
    ttfts: list[float] = []
    gaps: list[float] = []
    errors: list[str] = []
    for _ in range(jobs):
        ttft, g, terminal, n_prompt = await _timed_job(client, model_ref, prompt, max_tokens)
        out["prompt_tokens"] = n_prompt
        if isinstance(terminal, End):
            ttfts.append(ttft)
            gaps += g
        else:
            errors.append(f"{terminal.code}: {terminal.message}")
    out["job_errors"] = errors
    out["ttft"] = percentiles(ttfts)
    out["inter_token"] = percentiles(gaps)

    # health reply latency (request-reply round trip)
    lat: list[float] = []
    for _ in range(health_requests):
        t0 = time.perf_counter()
        await client.health(worker_id)
        lat.append(time.perf_counter() - t0)
    out["health"] = percentiles(lat)

    # cancel latency: cancel request sent -> CANCELLED error received
    cancel_lat: list[float] = []
    for _ in range(cancel_runs):
        latency = await _cancel_once(client, model_ref, prompt)
        if latency is not None:
            cancel_lat.append(latency)
    out["cancel"] = percentiles(cancel_lat)

    # abandoned jobs: lease run out -> CANCELLED (client_gone)
    # (a job that ends by itself before its lease runs out measures nothing: other prompts)
    gone: list[float] = []
    for k in range(4 * abandoned_runs):
        if len(gone) == abandoned_runs:
            break
        latency = await _abandoned_once(client, model_ref, ("x", prompt)[k % 2], lease_s)
        if latency is not None:
            gone.append(latency)
    out["abandoned"] = {**percentiles(gone), "lease_s": lease_s}

    # device memory back at its baseline after many jobs
    base = (await client.health(worker_id)).vram_bytes_used
    for _ in range(vram_jobs):
        await _timed_job(client, model_ref, prompt, 8)
    after = (await client.health(worker_id)).vram_bytes_used
    out["vram"] = {"baseline_bytes": base, "after_bytes": after, "jobs": vram_jobs}

    def ok(key: str, field: str, target: str) -> bool:
        value = out[key].get(field)
        return value is not None and value < TARGETS_MS[target]

    out["pass"] = {
        "ttft_p95_lt_20ms": ok("ttft", "p95_ms", "ttft_p95"),
        "inter_token_p95_lt_1_5ms": ok("inter_token", "p95_ms", "inter_token_p95"),
        "health_p99_lt_2ms": ok("health", "p99_ms", "health_p99"),
        "cancel_p95_lt_10ms": ok("cancel", "p95_ms", "cancel_p95"),
        "abandoned_p95_lt_1s": ok("abandoned", "p95_ms", "abandoned_p95"),
        "vram_back_at_baseline": after == base,
    }
    return out


@dataclass
class LiveSuiteOptions:
    """What `bench --suite` runs: the model, where, and how many of each measurement."""

    model: Path
    device: str = "cuda"
    gpu_device: int = 0
    nats_url: str | None = None  # None: start an embedded nats-server
    # credentials and TLS for nats_url: the suite's clients use them, its workers get them
    # as WORKER_ORCD_NATS_* variables
    nats_options: NatsConnectOptions | None = None
    model_ref: str = "bench-suite"
    ctx_size: int | None = None
    jobs: int = 20
    max_tokens: int = 64
    prompt_tokens: int = 32  # the prompt is built with the model's own tokenizer
    health_requests: int = 1000
    cancel_runs: int = 10
    vram_jobs: int = 100
    loads: int = 1  # warm starts (each gives a load and a shutdown sample)
    cold: bool = True  # on cuda: one start first with an empty kernel cache
    concurrency: list[int] = field(default_factory=list)  # clients at once, one phase each
    jobs_per_client: int = 4
    prefix_tokens: int = 0  # > 0: TTFT with and without a shared prefix of this many tokens
    prefix_jobs: int = 10
    load_timeout_s: float = 600.0
    serve_flags: list[str] = field(default_factory=list)


_WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "small",
    "robots",
    "count",
    "prime",
    "numbers",
    "under",
    "the",
    "bright",
    "morning",
    "sun",
    "and",
    "write",
    "short",
    "notes",
    "about",
    "fast",
    "kernels",
]


def prompt_of_tokens(model: Path, n_tokens: int) -> tuple[str, int]:
    """A plain-text prompt of ordinary words that the model's tokenizer encodes to as many
    tokens as fit in `n_tokens` (special tokens included); returns it and its token count."""
    from worker.gguf.reader import open_gguf
    from worker.tokenizer.loader import load_tokenizer

    with open_gguf(model) as gf:
        tok = load_tokenizer(gf.metadata, model_path=model)
        words: list[str] = []
        best = (_WORDS[0], len(tok.encode(_WORDS[0])))
        for i in range(4 * n_tokens):
            words.append(_WORDS[i % len(_WORDS)])
            text = " ".join(words)
            n = len(tok.encode(text))
            if n > n_tokens:
                break
            best = (text, n)
    return best


def _gpu_name(index: int) -> str | None:
    """The card's name from nvidia-smi (the bench process opens no CUDA context of its own,
    so the worker's device memory figures are its own)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", str(index)],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


async def run_live_suite(opts: LiveSuiteOptions) -> dict[str, Any]:
    """Start nats-server (unless a URL is given) and `worker-orcd serve` subprocesses, and
    measure everything `bench --suite` reports, from the client side:

    * load time: process start -> first ``healthy`` health reply; on cuda one start with an
      empty kernel cache (cold) and `loads` starts with that cache filled (warm);
    * TTFT, inter-token, health and cancel latency (`run_suite`) and VRAM back at its
      baseline after `vram_jobs` jobs, on the last worker started;
    * shutdown time: shutdown request -> process exit, for every worker started, and the
      exit codes (0 within 30 s).
    """
    server: EmbeddedNatsServer | None = None
    url = opts.nats_url
    if url is None:
        server = EmbeddedNatsServer()
        server.start()
        url = server.url
    workers: list[WorkerProc] = []
    cache = tempfile.TemporaryDirectory(prefix="orcd-bench-cache-")
    try:
        client = await OrcdClient.connect(url, options=opts.nats_options)
        try:
            return await _live(opts, client, url, server is not None, workers, cache.name)
        finally:
            await client.close()
    finally:
        for w in workers:
            w.stop()
        if server is not None:
            server.cleanup()
        cache.cleanup()


async def _live(
    opts: LiveSuiteOptions,
    client: OrcdClient,
    url: str,
    embedded: bool,
    workers: list[WorkerProc],
    cache_dir: str,
) -> dict[str, Any]:
    flags = list(opts.serve_flags)
    if opts.ctx_size is not None:
        flags += ["--ctx-size", str(opts.ctx_size)]
    if opts.device == "cuda":
        flags += ["--gpu-device", str(opts.gpu_device)]
    cuda = opts.device == "cuda"
    # On cuda every start gets its own kernel cache directory: empty for the cold start,
    # the one the cold start filled for the warm ones (or the default cache without --cold).
    env = {"WORKER_ORCD_CACHE": cache_dir} if cuda and opts.cold else {}
    if opts.nats_options is not None:
        env.update(opts.nats_options.environ())

    def spawn() -> WorkerProc:
        w = WorkerProc(opts.model, url, opts.model_ref, *flags, device=opts.device, env=env)
        workers.append(w)
        return w

    prompt, _ = prompt_of_tokens(opts.model, opts.prompt_tokens)
    cold_s: list[float] = []
    warm_s: list[float] = []
    shutdown_s: list[float] = []
    exit_codes: list[int] = []
    health: Health | None = None
    n_starts = max(1, opts.loads) + (1 if cuda and opts.cold else 0)
    out: dict[str, Any] = {}
    for i in range(n_starts):
        w = spawn()
        secs, health = await wait_healthy(client, w, timeout=opts.load_timeout_s)
        (cold_s if cuda and opts.cold and i == 0 else warm_s).append(secs)
        if i == n_starts - 1:
            out = await _while_alive(
                w,
                run_suite(
                    client,
                    opts.model_ref,
                    w.worker_id,
                    jobs=opts.jobs,
                    max_tokens=opts.max_tokens,
                    prompt=prompt,
                    health_requests=opts.health_requests,
                    cancel_runs=opts.cancel_runs,
                    vram_jobs=opts.vram_jobs,
                ),
            )
            if opts.concurrency:
                out["concurrency"] = await _while_alive(w, concurrency_phases(opts, url, prompt))
            if opts.prefix_tokens > 0:
                prefix, n = prompt_of_tokens(opts.model, opts.prefix_tokens)
                ttft = await _while_alive(
                    w, run_prefix_ttft(client, opts.model_ref, prefix, opts.prefix_jobs)
                )
                out["prefix_cache"] = {"prefix_tokens": n, **ttft}
        secs, rc = await shutdown_and_wait(client, w)
        shutdown_s.append(secs)
        exit_codes.append(rc)
    assert health is not None

    result: dict[str, Any] = {
        "suite": True,
        "model": str(opts.model),
        "device": health.device,
        "gpu": _gpu_name(opts.gpu_device) if cuda else None,
        "gpu_device": health.gpu_device,
        "sm": health.sm,
        "cuda_runtime_version": health.cuda_runtime_version,
        "quant_kind": health.quant_kind,
        "context_length": health.context_length,
        "worker_version": health.version,
        "model_ref": opts.model_ref,
        "nats_url": url,
        "embedded_nats": embedded,
        "prompt_tokens": out.get("prompt_tokens"),
        "max_tokens": opts.max_tokens,
    }
    load: dict[str, Any] = {"warm": percentiles(warm_s)}
    if cold_s:
        load["cold_kernel_cache"] = percentiles(cold_s)
    elif cuda:
        load["warm_is"] = "the default kernel cache (no cold start was run)"
    result["load"] = load
    for key in ("ttft", "inter_token", "health", "cancel"):
        result[key] = out[key]
    result["abort"] = {"cancelled": out["cancel"], "abandoned": out["abandoned"]}
    for key in ("concurrency", "prefix_cache"):
        if key in out:
            result[key] = out[key]
    result["vram"] = out["vram"]
    result["shutdown"] = {**percentiles(shutdown_s), "exit_codes": exit_codes}
    result["job_errors"] = out["job_errors"]
    result["targets_ms"] = {**TARGETS_MS, "warm_load": 3000.0, "shutdown": 30000.0}
    warm_p95 = result["load"]["warm"].get("p95_ms")
    shut_max = max(shutdown_s) if shutdown_s else None
    passes = dict(out["pass"])
    passes["warm_load_lt_3s"] = warm_p95 is not None and warm_p95 < 3000.0
    passes["shutdown_lt_30s_exit_0"] = (
        shut_max is not None and shut_max < 30.0 and all(rc == 0 for rc in exit_codes)
    )
    result["pass"] = passes
    result["pass_all"] = all(passes.values())
    missing: list[str] = []
    if not cuda:
        missing.append(
            "vram: the cpu backend holds no device memory (vram_bytes_used is 0), so the "
            "baseline check is trivially true; it means something on cuda only"
        )
        missing.append("load cold vs warm kernel cache: cuda only (cpu compiles no kernels)")
    result["missing"] = missing
    return result


class WorkerExited(RuntimeError):
    """The measured worker ended while the suite still had jobs out."""


async def _while_alive(w: WorkerProc, work: Awaitable[T]) -> T:
    """`work`, or WorkerExited as soon as the worker's process ends (its jobs would wait
    for a worker until their timeouts: minutes of a device call)."""
    task = asyncio.ensure_future(work)
    while not task.done():
        rc = w.proc.poll()
        if rc is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            tail = " | ".join(line.strip() for line in w.lines[-3:])
            raise WorkerExited(f"the worker exited with {rc} during the measurement: {tail}")
        await asyncio.wait({task}, timeout=0.25)
    return task.result()


async def concurrency_phases(opts: LiveSuiteOptions, url: str, prompt: str) -> list[Any]:
    """One `run_concurrency` phase per entry of opts.concurrency, after a warm-up round at
    that width (the worker's first steps at a new batch size capture its CUDA graphs). The
    clients share one NATS connection per 16 of them."""
    conns = [
        await OrcdClient.connect(url, options=opts.nats_options)
        for _ in range(max(1, (max(opts.concurrency) + 15) // 16))
    ]
    try:
        phases = []
        for n in opts.concurrency:
            await run_concurrency(
                conns, opts.model_ref, n, jobs_per_client=1, max_tokens=8, prompt=prompt
            )
            phases.append(
                await run_concurrency(
                    conns,
                    opts.model_ref,
                    n,
                    jobs_per_client=opts.jobs_per_client,
                    max_tokens=opts.max_tokens,
                    prompt=prompt,
                )
            )
        return phases
    finally:
        for c in conns:
            await c.close()
