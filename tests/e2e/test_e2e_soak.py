"""200 jobs in a row against one worker: every one completes and the worker's memory stays
within a stated bound.

Bound: after a 20-job warm-up, the worker's resident set may grow by at most 16 MiB over the
next 180 jobs (tiny model, max_tokens 8). A leak of one event list, one KV copy or one
subscription per job would exceed it (the KV cache alone is ~0.9 MiB per copy here)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from worker.client import OrcdClient
from worker.nats.server import EmbeddedNatsServer
from worker.protocol import End

REF = "tiny"
WARMUP = 20
TOTAL = 200
BOUND_BYTES = 16 * 1024 * 1024


@pytest.mark.slow
async def test_200_jobs_bounded_memory(
    nats_server: EmbeddedNatsServer,
    client: OrcdClient,
    spawn_worker: Any,
    tiny_model: Path,
    gather: Any,
) -> None:
    w = spawn_worker(tiny_model, nats_server.url, REF, "--ctx-size", "256").wait_ready()
    rss: list[int] = []
    for k in range(TOTAL):
        evs = await gather(
            client.generate(
                REF, prompt=f"job number {k}", max_tokens=8, temperature=0.8, seed=k, timeout_s=60
            )
        )
        assert isinstance(evs[-1], End), evs[-1]
        if k + 1 == WARMUP or k + 1 == TOTAL:
            rss.append(w.rss_bytes())
    growth = rss[1] - rss[0]
    print(
        f"worker RSS after {WARMUP} jobs {rss[0] / 2**20:.1f} MiB, after {TOTAL} "
        f"{rss[1] / 2**20:.1f} MiB, growth {growth / 2**20:.2f} MiB"
    )
    assert growth < BOUND_BYTES
    for _ in range(100):  # the last job's ack (and count) follows its terminal event
        health = await client.health(w.worker_id)
        if health.jobs_completed == TOTAL:
            break
        await asyncio.sleep(0.05)
    assert health.jobs_completed == TOTAL and health.status == "healthy"
