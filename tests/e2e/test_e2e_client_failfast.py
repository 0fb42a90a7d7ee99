"""worker.client as a program uses it: connect gives up in time, a job for a model reference
nobody serves is refused before it is published, and a caller that stops early (break, task
cancelled, client closed) cancels its job on the worker."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from worker.client import NatsUnavailable, NoWorker, OrcdClient, is_terminal
from worker.nats.server import EmbeddedNatsServer
from worker.protocol import Error, Token

REF = "client-tiny"
LONG = {"prompt": "Once upon a time", "max_tokens": 2048, "temperature": 0.0}


async def last_event(client: OrcdClient, job_id: str) -> Any:
    """The job's last stored event, once it is terminal (the worker needs a step or two)."""
    events: list[Any] = []
    for _ in range(100):
        events = await client.replay(job_id)
        if events and is_terminal(events[-1]):
            return events[-1]
        await asyncio.sleep(0.05)
    raise AssertionError(f"{job_id} did not end: {events[-3:]}")


async def test_connect_gives_up_with_the_reason() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(NatsUnavailable, match="connection refused"):
        await OrcdClient.connect(f"nats://127.0.0.1:{port}", connect_timeout_s=1.0)
    assert time.monotonic() - t0 < 3


async def test_no_worker_is_refused_before_publishing(
    nats_server: EmbeddedNatsServer, client: OrcdClient, spawn_worker: Any, tiny_model: Path
) -> None:
    t0 = time.monotonic()
    with pytest.raises(NoWorker, match="none answered"):
        async for _ in client.generate(REF, prompt="hi"):
            pass
    assert time.monotonic() - t0 < 3
    spawn_worker(tiny_model, nats_server.url, REF).wait_ready()
    with pytest.raises(NoWorker, match=f"'other'.*serve {REF}"):
        async for _ in client.generate("other", prompt="hi"):
            pass
    n = 0  # greedy: sampling at temperature 1 on the tiny vocabulary can draw end-of-text
    async for ev in client.generate(REF, prompt="hi", max_tokens=3, temperature=0.0):
        n += isinstance(ev, Token)
    assert n == 3


async def test_stopping_early_cancels_the_job(
    nats_server: EmbeddedNatsServer, client: OrcdClient, spawn_worker: Any, tiny_model: Path
) -> None:
    spawn_worker(tiny_model, nats_server.url, REF).wait_ready()
    # break out of the loop
    async for ev in client.generate(REF, job_id="by-break", **LONG):
        if isinstance(ev, Token):
            break
    end = await last_event(client, "by-break")
    assert isinstance(end, Error) and end.code == "CANCELLED", end

    # the task running the loop is cancelled
    first = asyncio.Event()

    async def consume() -> None:
        async for ev in client.generate(REF, job_id="by-task", **LONG):
            if isinstance(ev, Token):
                first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    end = await last_event(client, "by-task")
    assert isinstance(end, Error) and end.code == "CANCELLED", end

    # the client is closed while a job streams (the iterator itself left open)
    other = await OrcdClient.connect(nats_server.url)
    events = other.generate(REF, job_id="by-close", **LONG)
    while not isinstance(await anext(events), Token):
        pass
    await other.close()
    end = await last_event(client, "by-close")
    assert isinstance(end, Error) and end.code == "CANCELLED", end


class HealthAnswerer:
    """A stand-in worker on ``orcd.health``: counts the asks and answers every one from the
    `answer_from`-th on with a healthy worker "w-1" serving REF."""

    def __init__(self, answer_from: int = 1) -> None:
        self.asked = 0
        self.answer_from = answer_from

    async def answer(self, msg: Any) -> None:
        from worker.protocol import Health, encode

        self.asked += 1
        if self.asked < self.answer_from:
            return
        health = Health(
            status="healthy", worker_id="w-1", model="m", model_ref=REF, device="cpu",
            gpu_device=None, resident=True, quant_kind="q8_0", vram_bytes_used=0,
            tokenizer_kind="bpe", vocab_size=10, context_length=64, uptime_seconds=1.0, sm=None,
            cuda_runtime_version=None, active_job_id=None, jobs_completed=0, version="0",
        )  # fmt: skip
        await msg.respond(encode(health))


@contextlib.asynccontextmanager
async def answered(url: str, answerer: HealthAnswerer) -> AsyncIterator[OrcdClient]:
    """A client, with `answerer` subscribed on its own connection (closed after both)."""
    client = await OrcdClient.connect(url)
    conn = await OrcdClient.connect(url)
    await conn.nc.subscribe(client.subjects.health_all, cb=answerer.answer)
    await conn.nc.flush()
    try:
        yield client
    finally:
        await conn.close()
        await client.close()


async def test_a_health_answer_spares_the_next_jobs_the_worker_lookup(
    nats_server: EmbeddedNatsServer,
) -> None:
    """require_worker asks ``orcd.health`` (again while unanswered); the answer counts as a
    fresh heartbeat, so the jobs after it are published without that round trip (until it
    ages out)."""
    worker = HealthAnswerer()
    async with answered(nats_server.url, worker) as client:
        # the wait ends at the first answer; the generous limit only keeps a stalled box (a
        # full test run on 2 cores once took over 1 s) from failing the test, and a stall past
        # the first re-ask may have asked twice: what matters is that the next jobs ask nothing
        await client.require_worker(REF, timeout_s=10.0)
        await asyncio.sleep(0.5)  # (a re-ask sent before the answer came is counted now)
        first = worker.asked
        assert first >= 1
        for _ in range(4):
            await client.require_worker(REF, timeout_s=10.0)
        assert worker.asked == first
        with pytest.raises(NoWorker, match="serve client-tiny"):
            await client.require_worker("other")  # the remembered answer names another ref
        assert worker.asked > first


async def test_a_lost_health_request_is_asked_again(nats_server: EmbeddedNatsServer) -> None:
    """A worker that misses the first ``orcd.health`` (core NATS keeps nothing across a
    reconnect) is found by the re-ask, well inside require_worker's limit; every answer
    counts once per worker."""
    worker = HealthAnswerer(answer_from=2)
    async with answered(nats_server.url, worker) as client:
        t0 = time.monotonic()
        await client.require_worker(REF, timeout_s=10.0)
        assert worker.asked >= 2 and time.monotonic() - t0 < 9  # found before the limit
        before = worker.asked  # answered from here on: asks at 0, 0.5 and 1.5 s of 2
        found = await client.health_all(2.0, until_model_ref="nobody")
        assert [h.worker_id for h in found] == ["w-1"]
        for _ in range(50):  # (the last ask may still be on its way to the answerer)
            if worker.asked >= before + 2:
                break
            await asyncio.sleep(0.1)
        assert worker.asked >= before + 2
