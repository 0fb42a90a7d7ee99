"""Abandoned jobs (leases): a job with `lease_s` whose client stops renewing it on
``orcd.keepalive.<job_id>`` ends CANCELLED with reason ``client_gone`` within one second of
the lease running out - running, or waiting in the queue when its client vanished - while a
job whose client keeps renewing runs to its end however long it takes.

The vanishing client is a real `worker-orcd submit --lease-s 1` process killed with -9; the
test follows the job's subject from outside and times its terminal event."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from nats.aio.msg import Msg

from worker.client import OrcdClient
from worker.errors import ErrorCode
from worker.nats.server import EmbeddedNatsServer
from worker.protocol import CLIENT_GONE, End, Error, Event, Started, Token, decode_event

REF = "tiny"
LEASE_S = 1.0
LONG = ("--max-tokens", "2048", "--temperature", "0")
# The prompt of the long jobs: 2,048 tokens after ~1,500 prompt tokens (each step attends
# over 1.5-3.5k positions) take ~5 s on the 2-core box; after a 1-token prompt they took
# under 3 s once the worker's per-token host work shrank, short enough for a job to end
# before the test cancels it or its lease runs out.
LONG_PROMPT = "x " * 1500


class Watch:
    """Every event of one job as it arrives on its subject, with arrival times."""

    def __init__(self) -> None:
        self.events: list[tuple[float, Event]] = []
        self.done = asyncio.Event()

    async def on_msg(self, msg: Msg) -> None:
        ev = decode_event(msg.data)
        self.events.append((time.monotonic(), ev))
        if isinstance(ev, End | Error):
            self.done.set()

    def tokens(self) -> int:
        return sum(isinstance(e, Token) for _, e in self.events)

    async def wait_tokens(self, n: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.tokens() < n:
            assert time.monotonic() < deadline, f"fewer than {n} tokens: {self.events[-3:]}"
            await asyncio.sleep(0.01)

    def terminal(self) -> tuple[float, Event]:
        return self.events[-1]


async def watch(client: OrcdClient, job_id: str) -> Watch:
    w = Watch()
    await client.nc.subscribe(client.subjects.events(job_id), cb=w.on_msg)
    await client.nc.flush()
    return w


def submit_process(url: str, job_id: str, *flags: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            *(sys.executable, "-m", "worker", "submit", "--nats-url", url, "--model-ref", REF),
            *("--job-id", job_id, "--lease-s", str(LEASE_S), *flags, LONG_PROMPT),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def assert_client_gone(ev: Event) -> Error:
    assert isinstance(ev, Error), ev
    assert ev.code is ErrorCode.CANCELLED and not ev.retriable
    assert ev.reason == CLIENT_GONE and CLIENT_GONE in ev.message, ev
    return ev


async def test_running_job_of_a_vanished_client_ends_client_gone(
    nats_server: EmbeddedNatsServer,
    client: OrcdClient,
    spawn_worker: Any,
    tiny_model: Path,
    gather: Any,
) -> None:
    w = spawn_worker(tiny_model, nats_server.url, REF, "--ctx-size", "4096").wait_ready()
    job = await watch(client, "gone-1")
    proc = submit_process(nats_server.url, "gone-1", *LONG)
    try:
        await job.wait_tokens(5)
        killed_at = time.monotonic()
        os.kill(proc.pid, signal.SIGKILL)
        await asyncio.wait_for(job.done.wait(), 30)
    finally:
        proc.kill()
        proc.wait()
    ended_at, last = job.terminal()
    assert_client_gone(last)
    late = ended_at - killed_at - LEASE_S
    print(f"client_gone event {late * 1000:.0f} ms after the lease ran out")
    assert late <= 1.0, f"ended {late:.2f} s after the lease ran out"
    assert job.tokens() < 2048
    assert [r["job_id"] for r in w.events("lease_expired")] == ["gone-1"]
    # the worker serves the next job
    evs = await gather(client.generate(REF, prompt="hi", max_tokens=3, timeout_s=60))
    assert isinstance(evs[-1], End)
    assert (await client.health(w.worker_id)).status == "healthy"


async def test_a_renewed_lease_outlives_many_lease_periods(
    nats_server: EmbeddedNatsServer,
    client: OrcdClient,
    spawn_worker: Any,
    tiny_model: Path,
    gather: Any,
) -> None:
    """worker.client renews the lease by itself while the caller reads the events."""
    w = spawn_worker(tiny_model, nats_server.url, REF, "--ctx-size", "4096").wait_ready()
    t0 = time.monotonic()
    evs = await gather(
        client.generate(
            REF,
            prompt=LONG_PROMPT,
            max_tokens=2048,
            temperature=0.0,
            lease_s=LEASE_S,
            timeout_s=180,
        )
    )
    took = time.monotonic() - t0
    assert isinstance(evs[-1], End), evs[-1]
    assert took > 3 * LEASE_S, f"job too short ({took:.1f} s) to need its lease renewed"
    assert not w.events("lease_expired")


async def test_queued_job_of_a_vanished_client_ends_when_reached(
    nats_server: EmbeddedNatsServer,
    client: OrcdClient,
    spawn_worker: Any,
    tiny_model: Path,
) -> None:
    """A job whose client vanished while it waited behind another ends client_gone as soon
    as the lease has run out and the worker holds it: at once when reached, if the worker
    takes one job at a time; a lease after the kill, if it took it alongside."""
    spawn_worker(tiny_model, nats_server.url, REF, "--ctx-size", "4096").wait_ready()
    first = await watch(client, "busy-1")
    queued = await watch(client, "gone-2")
    busy = asyncio.create_task(
        client.run_job(
            REF,
            OrcdClient.make_job(
                prompt=LONG_PROMPT, job_id="busy-1", max_tokens=2048, temperature=0
            ),
            timeout_s=120,
        ).__anext__()
    )
    await first.wait_tokens(3)
    proc = submit_process(nats_server.url, "gone-2", *LONG)
    try:
        deadline = time.monotonic() + 60
        while (await client.js.stream_info("ORCD_JOBS")).state.messages < 2:
            assert time.monotonic() < deadline, "the submit process published no job"
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # a few keepalives go out
        killed_at = time.monotonic()
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    await asyncio.sleep(LEASE_S + 0.5)
    await client.cancel("busy-1")
    await asyncio.wait_for(first.done.wait(), 30)
    await asyncio.wait_for(queued.done.wait(), 30)
    busy.cancel()
    ended_at, last = queued.terminal()
    assert_client_gone(last)
    first_end = first.terminal()[0]
    late = ended_at - max(killed_at + LEASE_S, first_end)
    assert late <= 1.0, f"ended {late:.2f} s after it could have"
    # ended early: one attempt, far from its 2048 tokens
    started = [e for _, e in queued.events if isinstance(e, Started)]
    assert len(started) <= 1 and queued.tokens() < 2048
    print(f"queued job ended {late * 1000:.0f} ms after it could have, {queued.tokens()} tokens")


async def test_cancel_with_a_reason_carries_it_to_the_event(
    nats_server: EmbeddedNatsServer,
    client: OrcdClient,
    spawn_worker: Any,
    tiny_model: Path,
) -> None:
    """What a gateway does when its HTTP client disconnects: cancel with reason client_gone."""
    spawn_worker(tiny_model, nats_server.url, REF, "--ctx-size", "4096").wait_ready()
    job = await watch(client, "gw-1")
    task = asyncio.create_task(
        client.run_job(
            REF,
            # greedy: a sampled first token may be the tiny model's EOS, and the job must
            # still be running when the cancel arrives
            OrcdClient.make_job(prompt=LONG_PROMPT, job_id="gw-1", max_tokens=2048, temperature=0),
            timeout_s=60,
        ).__anext__()
    )
    await job.wait_tokens(2)
    replies = await client.cancel("gw-1", reason=CLIENT_GONE)
    assert [r.status for r in replies] == ["cancelling"]
    await asyncio.wait_for(job.done.wait(), 30)
    task.cancel()
    assert_client_gone(job.terminal()[1])
    # a plain cancel has no reason
    job2 = await watch(client, "plain-1")
    await client.cancel("plain-1")
    await client.submit(REF, OrcdClient.make_job(prompt="x", job_id="plain-1", max_tokens=4))
    await asyncio.wait_for(job2.done.wait(), 30)
    last = job2.terminal()[1]
    assert isinstance(last, Error) and last.code is ErrorCode.CANCELLED and last.reason is None
