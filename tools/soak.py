"""Soak: many jobs with random parameters from several concurrent clients, a fraction of
them cancelled, against whatever worker(s) serve a model reference; every job must end
exactly once (one terminal event on its subject, seen by a listener on ``orcd.events.>``
as well as by its client). Prints jobs/s and the latency distribution as one JSON object.

    python -m tools.soak --nats-url nats://127.0.0.1:4222 --model-ref qwen \\
        --jobs 1000 --clients 4 --cancel-fraction 0.1 [--worker-pid PID]

With ``--worker-pid`` (a local worker) it also reports the worker's resident set after a
warm-up and at the end. tests/e2e/test_e2e_soak.py runs it against a CPU worker.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from nats.aio.msg import Msg

from worker.client import OrcdClient
from worker.errors import ErrorCode
from worker.nats.options import NatsConnectOptions, add_nats_connect_arguments
from worker.nats.options import nats_connect_options as _options_from_args
from worker.protocol import End, Error, Token, decode_event

WORDS = [
    "the",
    "a",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "code",
    "python",
    "worker",
    "token",
    "stream",
]


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def random_job(rng: random.Random, job_id: str, max_tokens_max: int) -> dict[str, Any]:
    words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40)))
    job: dict[str, Any] = {"job_id": job_id, "max_tokens": rng.randint(1, max_tokens_max)}
    if rng.random() < 0.3:
        job["messages"] = [{"role": "user", "content": words}]
    else:
        job["prompt"] = words
    job["temperature"] = rng.choice([0.0, round(rng.uniform(0.05, 1.5), 3)])
    if rng.random() < 0.5:
        job["top_p"] = round(rng.uniform(0.1, 1.0), 3)
    if rng.random() < 0.5:
        job["top_k"] = rng.randint(0, 100)
    if rng.random() < 0.3:
        job["min_p"] = round(rng.uniform(0.0, 0.3), 3)
    if rng.random() < 0.3:
        job["repetition_penalty"] = round(rng.uniform(0.8, 1.5), 3)
    if rng.random() < 0.2:
        job["stop"] = [rng.choice(WORDS)]
    if rng.random() < 0.7:
        job["seed"] = rng.randint(0, 2**64 - 1)
    return job


@dataclass
class SoakReport:
    jobs: int
    clients: int
    cancels_sent: int
    seconds: float
    jobs_per_s: float
    outcomes: dict[str, int]
    latency_ms: dict[str, float]  # submit -> terminal event
    ttft_ms: dict[str, float]  # submit -> first token (jobs with one)
    tokens: int
    problems: list[str] = field(default_factory=list)
    rss_mib: dict[str, float] = field(default_factory=dict)


def _dist(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    qs = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else values
    pick = (lambda p: qs[p - 1]) if len(values) > 1 else (lambda p: values[0])
    return {
        "p50": round(pick(50) * 1000, 2),
        "p95": round(pick(95) * 1000, 2),
        "p99": round(pick(99) * 1000, 2),
        "max": round(max(values) * 1000, 2),
    }


async def run_soak(
    url: str,
    model_ref: str,
    *,
    jobs: int = 1000,
    clients: int = 4,
    in_flight: int = 4,
    cancel_fraction: float = 0.1,
    max_tokens_max: int = 24,
    seed: int = 0,
    worker_pid: int | None = None,
    options: NatsConnectOptions | None = None,
    job_timeout_s: float = 600.0,
) -> SoakReport:
    """`jobs` jobs spread over `clients` connections, each with `in_flight` jobs at a time;
    `cancel_fraction` of them cancelled a random 0-300 ms after submission."""
    rng = random.Random(seed)
    prefix = f"soak{seed}-{int(time.time() * 1000) % 10**9}"
    specs = [random_job(rng, f"{prefix}-{k}", max_tokens_max) for k in range(jobs)]
    cancel_at = {s["job_id"]: rng.uniform(0, 0.3) for s in specs if rng.random() < cancel_fraction}
    conns = [await OrcdClient.connect(url, options=options) for _ in range(clients)]
    listener = await OrcdClient.connect(url, options=options)
    terminals: collections.Counter[str] = collections.Counter()
    outcomes: collections.Counter[str] = collections.Counter()
    latency: list[float] = []
    ttft: list[float] = []
    problems: list[str] = []
    tokens = 0
    rss: dict[str, float] = {}
    done = 0
    warmup = max(1, jobs // 20)

    async def on_event(msg: Msg) -> None:
        ev = decode_event(msg.data)
        if ev.job_id.startswith(prefix) and isinstance(ev, End | Error):
            terminals[ev.job_id] += 1

    sub = await listener.nc.subscribe(listener.subjects.events_wildcard, cb=on_event)
    await listener.nc.flush()

    async def one(client: OrcdClient, spec: dict[str, Any]) -> None:
        nonlocal tokens, done
        job_id = spec["job_id"]
        t0 = time.perf_counter()
        first: float | None = None
        canceller = None
        if job_id in cancel_at:

            async def cancel_later() -> None:
                await asyncio.sleep(cancel_at[job_id])
                await client.cancel(job_id)

            canceller = asyncio.create_task(cancel_later())
        terminal: End | Error | None = None
        params = {k: v for k, v in spec.items() if k != "job_id"}
        try:
            async for ev in client.generate(
                model_ref, job_id=job_id, timeout_s=job_timeout_s, **params
            ):
                if isinstance(ev, Token):
                    tokens += 1
                    if first is None:
                        first = time.perf_counter() - t0
                if isinstance(ev, End | Error):
                    terminal = ev
        except Exception as exc:
            problems.append(f"{job_id}: {type(exc).__name__}: {exc}")
            return
        finally:
            if canceller is not None:
                canceller.cancel()
        latency.append(time.perf_counter() - t0)
        if first is not None:
            ttft.append(first)
        assert terminal is not None
        outcome = "end" if isinstance(terminal, End) else terminal.code.value
        outcomes[outcome] += 1
        cancelled = isinstance(terminal, Error) and terminal.code is ErrorCode.CANCELLED
        if not isinstance(terminal, End) and not (cancelled and job_id in cancel_at):
            problems.append(f"{job_id}: {outcome}: {getattr(terminal, 'message', '')}")
        done += 1
        if worker_pid is not None and done == warmup:
            rss["after_warmup"] = rss_bytes(worker_pid) / 2**20

    async def client_loop(k: int) -> None:
        mine = specs[k::clients]
        sem = asyncio.Semaphore(in_flight)

        async def guarded(spec: dict[str, Any]) -> None:
            async with sem:
                await one(conns[k], spec)

        await asyncio.gather(*(guarded(s) for s in mine))

    t_start = time.perf_counter()
    try:
        await asyncio.gather(*(client_loop(k) for k in range(clients)))
        seconds = time.perf_counter() - t_start
        await asyncio.sleep(1.0)  # a second terminal event would show up now
        for spec in specs:
            n = terminals[spec["job_id"]]
            if n != 1:
                problems.append(f"{spec['job_id']}: {n} terminal events on its subject")
        if worker_pid is not None:
            rss["end"] = rss_bytes(worker_pid) / 2**20
    finally:
        await sub.unsubscribe()
        for c in [*conns, listener]:
            await c.close()
    return SoakReport(
        jobs=jobs,
        clients=clients,
        cancels_sent=len(cancel_at),
        seconds=round(seconds, 2),
        jobs_per_s=round(jobs / seconds, 2),
        outcomes=dict(outcomes),
        latency_ms=_dist(latency),
        ttft_ms=_dist(ttft),
        tokens=tokens,
        problems=problems,
        rss_mib={k: round(v, 1) for k, v in rss.items()},
    )


def main(argv: list[str] | None = None) -> int:  # pragma: no cover - manual tool
    p = argparse.ArgumentParser(prog="python -m tools.soak", description=__doc__)
    p.add_argument("--nats-url", default="nats://127.0.0.1:4222")
    p.add_argument("--model-ref", required=True)
    p.add_argument("--jobs", type=int, default=1000)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--in-flight", type=int, default=4, help="jobs at a time per client")
    p.add_argument("--cancel-fraction", type=float, default=0.1)
    p.add_argument("--max-tokens-max", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker-pid", type=int, help="report this local worker's RSS")
    add_nats_connect_arguments(p)
    args = p.parse_args(argv)
    report = asyncio.run(
        run_soak(
            args.nats_url,
            args.model_ref,
            jobs=args.jobs,
            clients=args.clients,
            in_flight=args.in_flight,
            cancel_fraction=args.cancel_fraction,
            max_tokens_max=args.max_tokens_max,
            seed=args.seed,
            worker_pid=args.worker_pid,
            options=_options_from_args(args),
        )
    )
    print(json.dumps(asdict(report)))
    return 1 if report.problems else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
