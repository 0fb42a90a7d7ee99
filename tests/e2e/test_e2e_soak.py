"""200 jobs in a row against one worker: every one completes and the worker's memory stays
within a stated bound. And the soak (tools/soak.py): random jobs from several clients
at once with 10 % cancels.

Bound: after a 20-job warm-up, the worker's resident set may grow by at most 16 MiB over the
next 180 jobs (tiny model, max_tokens 8). A leak of one event list, one KV copy or one
subscription per job would exceed it (the KV cache alone is ~0.9 MiB per copy here)."""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from tools.soak import run_soak
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


SOAK_JOBS = int(os.environ.get("ORCD_SOAK_JOBS", "150"))
# after the warm-up, the worker's resident set may grow by at most this much by the end
SOAK_RSS_BOUND_MIB = 24.0


@pytest.mark.slow
async def test_soak_random_jobs_several_clients_with_cancels(
    nats_server: EmbeddedNatsServer, spawn_worker: Any, tiny_model: Path
) -> None:
    """ORCD_SOAK_JOBS jobs (150 in CI; 1000 for the nightly size) with random parameters from
    four clients, four jobs in flight each, 10 % cancelled 0-300 ms after submission, against
    one worker: every job ends exactly once (its client and a listener on orcd.events.> each
    see one terminal event), only the cancelled ones end otherwise than `end`, the worker's
    RSS returns near its post-warm-up size. Prints jobs/s and latency percentiles."""
    w = spawn_worker(tiny_model, nats_server.url, "soak", "--ctx-size", "512").wait_ready()
    report = await run_soak(
        nats_server.url,
        "soak",
        jobs=SOAK_JOBS,
        clients=4,
        in_flight=4,
        cancel_fraction=0.1,
        max_tokens_max=24,
        seed=11,
        worker_pid=w.pid,
    )
    print(f"\nsoak: {json.dumps(asdict(report))}")
    assert report.problems == [], report.problems[:10]
    assert sum(report.outcomes.values()) == SOAK_JOBS
    assert set(report.outcomes) <= {"end", "CANCELLED"}, report.outcomes
    assert report.outcomes.get("CANCELLED", 0) <= report.cancels_sent
    growth = report.rss_mib["end"] - report.rss_mib["after_warmup"]
    assert growth < SOAK_RSS_BOUND_MIB, report.rss_mib
    assert w.proc.poll() is None
