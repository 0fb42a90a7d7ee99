"""The seed's performance suite against a live worker, over NATS (SPEC §6 `bench --suite`):
time to first token, inter-token latency, health reply latency, cancel latency and device
memory back at its baseline after many jobs, each with p50/p95/p99 and pass/fail against the
SPEC targets. Everything is measured from the client side, the way a user sees it.

    result = await run_suite(client, model_ref, worker_id)   # a plain dict, JSON-ready
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from worker.client import OrcdClient
from worker.protocol import End, Error, Token

TARGETS_MS = {
    "ttft_p95": 20.0,
    "inter_token_p95": 1.5,
    "health_p99": 2.0,
    "cancel_p95": 10.0,
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
) -> tuple[float, list[float], End | Error]:
    t0 = time.perf_counter()
    last: float | None = None
    ttft = float("nan")
    gaps: list[float] = []
    terminal: End | Error | None = None
    async for ev in client.generate(
        model_ref, prompt=prompt, max_tokens=max_tokens, temperature=0.0, seed=1, timeout_s=600
    ):
        now = time.perf_counter()
        if isinstance(ev, Token):
            if last is None:
                ttft = now - t0
            else:
                gaps.append(now - last)
            last = now
        elif isinstance(ev, End | Error):
            terminal = ev
    assert terminal is not None
    return ttft, gaps, terminal


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
) -> dict[str, Any]:
    prompt = " ".join(["token"] * prompt_words)  # about 32 tokens with a chat-less prompt
    out: dict[str, Any] = {"model_ref": model_ref, "worker_id": worker_id}
    health0 = await client.health(worker_id)
    out["device"] = health0.device
    out["model"] = health0.model

    # time to first token and inter-token latency over NATS
    ttfts: list[float] = []
    gaps: list[float] = []
    for _ in range(jobs):
        ttft, g, terminal = await _timed_job(client, model_ref, prompt, max_tokens)
        if isinstance(terminal, End):
            ttfts.append(ttft)
            gaps += g
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
        "vram_back_at_baseline": after == base,
    }
    return out
