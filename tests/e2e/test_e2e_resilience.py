"""Failures around a running job: kill -9 of the worker (redelivery to a second worker),
nats-server restart (reconnect, nothing lost), shutdown request and SIGTERM (drain, exit 0);
and under load: nats-server killed -9 with several jobs in flight, a worker killed -9 with
two workers sharing eight jobs (every job ends exactly once, attempts counted). A job past
--inference-timeout-sec (INFERENCE_TIMEOUT): tests/e2e/test_e2e_jobs.py."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

from tests.e2e.stored_events import stored_end, stored_started
from worker.client import OrcdClient, final_attempt
from worker.errors import ErrorCode
from worker.nats.server import EmbeddedNatsServer
from worker.protocol import End, Error, Event, Metrics, Started, Token, decode_health, encode

REF = "tiny"
LONG = {"prompt": "x", "max_tokens": 2048, "temperature": 0.0}


def complete(events: list[Event], job_id: str) -> End:
    assert isinstance(events[0], Started) and isinstance(events[-1], End), (events[:1], events[-1:])
    tokens = [e for e in events if isinstance(e, Token)]
    assert [t.i for t in tokens] == list(range(len(tokens)))
    assert all(e.job_id == job_id for e in events)
    end = events[-1]
    assert end.tokens_out == len(tokens)
    return end


async def wait_tokens(events: list[Event], n: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while sum(isinstance(e, Token) for e in events) < n:
        assert time.monotonic() < deadline, "job produced no tokens"
        await asyncio.sleep(0.02)


async def test_kill_9_mid_job_second_worker_completes_it(
    nats_server: EmbeddedNatsServer,
    client: OrcdClient,
    spawn_worker: Any,
    tiny_model: Path,
) -> None:
    flags = ("--ctx-size", "4096", "--ack-wait-s", "2")
    a = spawn_worker(tiny_model, nats_server.url, REF, *flags)
    b = spawn_worker(tiny_model, nats_server.url, REF, *flags)
    a.wait_ready()
    b.wait_ready()
    seen: list[Event] = []

    async def follow() -> None:
        async for ev in client.generate(REF, job_id="k9", timeout_s=180, gap_timeout_s=2, **LONG):
            seen.append(ev)

    task = asyncio.create_task(follow())
    await wait_tokens(seen, 10)
    first = seen[0]
    assert isinstance(first, Started) and first.attempt == 1
    victim, survivor = (a, b) if first.worker_id == a.worker_id else (b, a)
    os.kill(victim.pid, signal.SIGKILL)
    await asyncio.wait_for(task, 150)
    starts = [e for e in seen if isinstance(e, Started)]
    assert [s.attempt for s in starts] == [1, 2]
    assert starts[1].worker_id == survivor.worker_id
    complete(final_attempt(seen), "k9")
    # a late client replaying ORCD_EVENTS sees the whole second attempt
    stored = await client.replay("k9")
    end = complete(final_attempt(stored), "k9")
    assert end.tokens_out == seen[-1].tokens_out  # type: ignore[union-attr]
    assert [e.attempt for e in stored if isinstance(e, Started)] == [1, 2]


async def test_nats_restart_mid_job_nothing_lost(
    tmp_path: Path, spawn_worker: Any, tiny_model: Path
) -> None:
    srv = EmbeddedNatsServer(store_dir=tmp_path / "nats-restart")
    srv.start()
    client = await OrcdClient.connect(srv.url)
    try:
        w = spawn_worker(tiny_model, srv.url, REF, "--ctx-size", "4096").wait_ready()
        seen: list[Event] = []

        async def follow() -> None:
            async for ev in client.generate(
                REF, job_id="restart", timeout_s=180, gap_timeout_s=2, **LONG
            ):
                seen.append(ev)

        task = asyncio.create_task(follow())
        await wait_tokens(seen, 20)
        srv.stop()  # SIGTERM: the server goes away mid-job
        await asyncio.sleep(1.5)
        srv.start()
        await asyncio.wait_for(task, 150)
        end = complete(seen, "restart")  # the live stream, gaps filled from JetStream
        stored = await client.replay("restart")
        assert [e for e in stored] == seen  # exactly once, in order, nothing lost
        assert end.tokens_out > 20
        w.wait_event("nats_reconnected", 10)
        print(
            f"events re-sent by the worker: {[r['count'] for r in w.events('events_republished')]}"
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                if (await client.health(w.worker_id)).status == "healthy":
                    break
            except Exception:
                pass
            assert time.monotonic() < deadline
            await asyncio.sleep(0.2)
        evs = [ev async for ev in client.generate(REF, prompt="hi", max_tokens=3, timeout_s=60)]
        complete(evs, evs[0].job_id)
        print(
            f"events re-sent by the worker: {[r['count'] for r in w.events('events_republished')]}"
        )
    finally:
        await client.close()
        srv.cleanup()


async def test_shutdown_request_mid_job_finishes_it_and_exits_0(
    nats_server: EmbeddedNatsServer,
    client: OrcdClient,
    spawn_worker: Any,
    tiny_model: Path,
) -> None:
    w = spawn_worker(tiny_model, nats_server.url, REF, "--ctx-size", "4096").wait_ready()
    seen: list[Event] = []

    async def follow() -> None:
        async for ev in client.generate(REF, job_id="drain", timeout_s=120, **LONG):
            seen.append(ev)

    task = asyncio.create_task(follow())
    await wait_tokens(seen, 5)
    reply = await client.shutdown(w.worker_id)
    assert b'"draining"' in reply and b'"drain"' in reply
    t0 = time.monotonic()
    await asyncio.wait_for(task, 60)
    complete(seen, "drain")
    assert await asyncio.to_thread(w.wait_exit, 35) == 0
    assert time.monotonic() - t0 < 30
    assert w.events("shutdown")


async def test_sigterm_mid_job_finishes_it_and_exits_0(
    nats_server: EmbeddedNatsServer,
    client: OrcdClient,
    spawn_worker: Any,
    tiny_model: Path,
) -> None:
    w = spawn_worker(tiny_model, nats_server.url, REF, "--ctx-size", "4096").wait_ready()
    seen: list[Event] = []

    async def follow() -> None:
        async for ev in client.generate(REF, job_id="term", timeout_s=120, **LONG):
            seen.append(ev)

    task = asyncio.create_task(follow())
    await wait_tokens(seen, 5)
    w.signal(signal.SIGTERM)
    await asyncio.wait_for(task, 60)
    complete(seen, "term")
    assert await asyncio.to_thread(w.wait_exit, 35) == 0
    # nothing left in the queue for this model
    assert (await client.js.stream_info("ORCD_JOBS")).state.messages == 0


async def test_in_progress_acks_keep_a_long_job_from_redelivery(
    nats_server: EmbeddedNatsServer,
    client: OrcdClient,
    spawn_worker: Any,
    tiny_model: Path,
) -> None:
    """A job running longer than the ack wait (1 s) is not redelivered to an idle second
    worker while its worker is alive: in-progress acks keep it."""
    flags = ("--ctx-size", "4096", "--ack-wait-s", "1")
    a = spawn_worker(tiny_model, nats_server.url, REF, *flags)
    b = spawn_worker(tiny_model, nats_server.url, REF, *flags)
    a.wait_ready()
    b.wait_ready()
    # orcd.health is answered by every worker
    assert {h.worker_id for h in await client.health_all()} == {a.worker_id, b.worker_id}
    t0 = time.monotonic()
    evs = [ev async for ev in client.generate(REF, job_id="long", timeout_s=180, **LONG)]
    took = time.monotonic() - t0
    end = complete(evs, "long")
    assert [e.attempt for e in evs if isinstance(e, Started)] == [1]
    assert took > 1.5, f"job too short ({took:.1f} s) to outlast the 1 s ack wait"
    print(f"long job: {end.tokens_out} tokens in {took:.1f} s, one attempt")
    # periodic metrics events (one a second) count the tokens so far
    counts = [e.tokens for e in evs if isinstance(e, Metrics)]
    assert counts and counts == sorted(counts) and counts[-1] <= end.tokens_out


async def test_job_out_of_deliveries_ends_with_an_error(
    nats_server: EmbeddedNatsServer,
    client: OrcdClient,
    spawn_worker: Any,
    tiny_model: Path,
) -> None:
    """With --max-deliver 1, a job whose worker dies is not redelivered: another worker of
    the model ref ends it with an error event (no client waits forever) and removes it."""
    flags = ("--ctx-size", "4096", "--ack-wait-s", "2", "--max-deliver", "1")
    a = spawn_worker(tiny_model, nats_server.url, REF, *flags)
    b = spawn_worker(tiny_model, nats_server.url, REF, *flags)
    a.wait_ready()
    b.wait_ready()
    seen: list[Event] = []

    async def follow() -> None:
        async for ev in client.generate(REF, job_id="doomed", timeout_s=120, **LONG):
            seen.append(ev)

    task = asyncio.create_task(follow())
    await wait_tokens(seen, 5)
    first = seen[0]
    assert isinstance(first, Started)
    victim, survivor = (a, b) if first.worker_id == a.worker_id else (b, a)
    os.kill(victim.pid, signal.SIGKILL)
    await asyncio.wait_for(task, 60)
    last = seen[-1]
    assert isinstance(last, Error) and last.code is ErrorCode.INTERNAL and not last.retriable
    assert "delivered 1 times" in last.message
    assert [e.attempt for e in seen if isinstance(e, Started)] == [1]
    assert survivor.wait_event("error", 10)["job_id"] == "doomed"
    deadline = time.monotonic() + 10  # removed right after the error event is stored
    while (await client.js.stream_info("ORCD_JOBS")).state.messages != 0:
        assert time.monotonic() < deadline, "the job was not removed from the queue"
        await asyncio.sleep(0.05)


# ----------------------------------------------------------------------------- under load
# Several jobs at once (queued and running, however many the worker runs together): the
# checks are per job, black-box, and hold whatever the scheduler.


def run_many(
    client: OrcdClient, job_ids: list[str], max_tokens: int = 300
) -> tuple[dict[str, list[Event]], asyncio.Future[Any]]:
    """Start every job at once; (each job's events as its client sees them, the runner)."""
    seen: dict[str, list[Event]] = {j: [] for j in job_ids}

    async def one(job_id: str) -> None:
        async for ev in client.generate(
            REF,
            job_id=job_id,
            prompt=f"job {job_id}",
            max_tokens=max_tokens,
            temperature=0.0,
            timeout_s=300,
            gap_timeout_s=2,
        ):
            seen[job_id].append(ev)

    return seen, asyncio.gather(*(one(j) for j in job_ids))


async def wait_any_tokens(seen: dict[str, list[Event]], n: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while sum(isinstance(e, Token) for evs in seen.values() for e in evs) < n:
        assert time.monotonic() < deadline, "no job produced tokens"
        await asyncio.sleep(0.02)


async def queue_empty(client: OrcdClient, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while (await client.js.stream_info("ORCD_JOBS")).state.messages:
        assert time.monotonic() < deadline, "jobs left in the queue"
        await asyncio.sleep(0.05)


def exactly_once(seen: dict[str, list[Event]]) -> int:
    """Every job: one terminal event seen by its client, an `end` after a complete final
    attempt. Returns the number of attempts in all."""
    attempts = 0
    for job_id, evs in seen.items():
        assert sum(isinstance(e, End | Error) for e in evs) == 1, (job_id, evs[-2:])
        complete(final_attempt(evs), job_id)
        attempts += sum(isinstance(e, Started) for e in evs)
    return attempts


async def test_nats_killed_and_restarted_under_running_jobs(
    tmp_path: Path, spawn_worker: Any, tiny_model: Path
) -> None:
    """nats-server killed -9 (no clean shutdown) with jobs running and queued, back 2 s
    later from the same store: every job ends exactly once, its events complete."""
    srv = EmbeddedNatsServer(store_dir=tmp_path / "nats-kill")
    srv.start()
    client = await OrcdClient.connect(srv.url)
    try:
        w = spawn_worker(tiny_model, srv.url, REF, "--ctx-size", "1024").wait_ready()
        job_ids = [f"nk-{k}" for k in range(5)]
        seen, runner = run_many(client, job_ids)
        await wait_any_tokens(seen, 10)
        srv.stop(signal.SIGKILL)
        await asyncio.sleep(2.0)
        srv.start()
        await asyncio.wait_for(runner, 240)
        attempts = exactly_once(seen)
        await queue_empty(client)
        for job_id in job_ids:  # the stored stream has the attempt the client saw end
            live = [e for e in final_attempt(seen[job_id]) if not isinstance(e, Metrics)]
            stored = await client.replay(job_id)
            assert isinstance(live[0], Started)
            starts = [k for k, e in enumerate(stored) if isinstance(e, Started)]
            at = next(k for k in starts if stored[k] == live[0])
            got = [e for e in stored[at:] if not isinstance(e, Metrics)][: len(live)]
            assert got == live, job_id
        assert (await client.health(w.worker_id, timeout_s=10)).status == "healthy"
        print(f"nats-server kill -9: {len(job_ids)} jobs, {attempts} attempts, none lost")
    finally:
        await client.close()
        srv.cleanup()


async def test_worker_killed_under_load_every_job_done_once(
    nats_server: EmbeddedNatsServer,
    client: OrcdClient,
    spawn_worker: Any,
    tiny_model: Path,
) -> None:
    """Two workers on one model, eight jobs; one worker killed -9 mid-run: every job ends
    exactly once from its client's view (its final attempt complete), the victim's running
    job(s) redelivered to the survivor (attempt 2)."""
    flags = ("--ctx-size", "1024", "--ack-wait-s", "2")
    a = spawn_worker(tiny_model, nats_server.url, REF, *flags)
    b = spawn_worker(tiny_model, nats_server.url, REF, *flags)
    a.wait_ready()
    b.wait_ready()
    job_ids = [f"wk-{k}" for k in range(8)]
    seen, runner = run_many(client, job_ids, max_tokens=200)
    deadline = time.monotonic() + 60
    victim = None
    while victim is None:
        for job_id in job_ids:
            evs = seen[job_id]
            if sum(isinstance(e, Token) for e in evs) >= 5 and not isinstance(evs[-1], End):
                wid = evs[0].worker_id  # type: ignore[union-attr]
                victim = a if wid == a.worker_id else b
                break
        assert time.monotonic() < deadline, "no job running"
        await asyncio.sleep(0.01)
    os.kill(victim.pid, signal.SIGKILL)
    await asyncio.wait_for(runner, 240)
    attempts = exactly_once(seen)
    redelivered = [
        j for j in job_ids if any(isinstance(e, Started) and e.attempt > 1 for e in seen[j])
    ]
    assert redelivered, "the killed worker's job was not redelivered"
    survivor = b if victim is a else a
    for j in redelivered:
        last_start = [e for e in seen[j] if isinstance(e, Started)][-1]
        assert last_start.worker_id == survivor.worker_id
    await queue_empty(client)  # each job's ack follows its terminal event
    print(f"worker kill -9: {len(job_ids)} jobs, {attempts} attempts, redelivered {redelivered}")


async def test_device_fault_fails_the_batch_then_drains_exits_3_and_jobs_are_redone(
    nats_server: EmbeddedNatsServer,
    client: OrcdClient,
    spawn_worker: Any,
    tiny_model: Path,
) -> None:
    """A device error in the engine thread (injected: WORKER_ORCD_FAIL_STEP) while it runs
    three jobs: each attempt ends CUDA_ERROR (retriable) and is handed back, health turns
    unhealthy, the worker drains and exits 3 so its supervisor restarts it, and a second
    worker redoes every job: the client follows each job through both attempts to its end."""
    flags = ("--ctx-size", "4096", "--max-batch", "4")
    a = spawn_worker(
        tiny_model, nats_server.url, REF, *flags, env={"WORKER_ORCD_FAIL_STEP": "40"}
    ).wait_ready()
    beats: list[str] = []

    async def on_beat(msg: Any) -> None:
        beats.append(decode_health(msg.data).status)

    await client.nc.subscribe(client.subjects.heartbeat(a.worker_id), cb=on_beat)
    seen: dict[str, list[Event]] = {f"fault-{k}": [] for k in range(3)}

    async def follow(job_id: str) -> None:
        async for ev in client.generate(
            REF, job_id=job_id, timeout_s=180, prompt="x", max_tokens=300, temperature=0.0
        ):
            seen[job_id].append(ev)

    tasks = [asyncio.create_task(follow(j)) for j in seen]
    # drained and gone: exit 3 after a device failure
    assert await asyncio.to_thread(a.wait_exit, 60) == 3
    assert a.events("error")[0]["code"] == "CUDA_ERROR"
    assert "injected" in a.events("unhealthy")[0]["reason"]
    assert "unhealthy" in beats  # what a watcher of the heartbeats saw before it exited
    for job_id, evs in seen.items():  # each attempt so far: started, tokens, CUDA_ERROR
        assert isinstance(evs[0], Started) and evs[0].worker_id == a.worker_id, evs[:1]
        err = next(e for e in evs if isinstance(e, Error))
        assert err.code is ErrorCode.CUDA_ERROR and err.retriable and "injected" in err.message
        assert not tasks[int(job_id[-1])].done()  # the client waits for the next attempt
    b = spawn_worker(tiny_model, nats_server.url, REF, *flags).wait_ready()
    await asyncio.wait_for(asyncio.gather(*tasks), 150)
    for job_id, evs in seen.items():
        starts = [e for e in evs if isinstance(e, Started)]
        assert [(s.attempt, s.worker_id) for s in starts] == [
            (1, a.worker_id),
            (2, b.worker_id),
        ]
        complete(final_attempt(evs), job_id)
    assert (await client.health(b.worker_id)).status == "healthy"


async def test_redelivered_job_whose_end_is_stored_is_acked_not_run_again(
    nats_server: EmbeddedNatsServer,
    client: OrcdClient,
    spawn_worker: Any,
    tiny_model: Path,
) -> None:
    """An ack lost after the terminal event was stored (e.g. during a leader election):
    JetStream delivers the job again, and the worker that gets it acks it without running it
    (no second `started`, no second terminal event). The first delivery is taken here by hand
    from the workers' own consumer and never acked; its `end` is stored as a worker's would be."""
    from worker.nats.jetstream import ensure_streams, job_subscription

    js = client.js
    await ensure_streams(js, client.subjects, events_max_age_s=3600)
    psub = await job_subscription(js, client.subjects, REF, ack_wait_s=30, max_deliver=5)
    job = client.make_job(prompt="x", job_id="acked-late", max_tokens=4, temperature=0.0)
    await client.submit(REF, job)
    (msg,) = await psub.fetch(1, timeout=5)
    assert msg.metadata.num_delivered == 1
    stored = [stored_started("acked-late", 1), stored_end("acked-late", 0)]
    for ev in stored:
        await js.publish(client.subjects.events("acked-late"), encode(ev))
    await msg.nak()  # the lost ack: JetStream delivers it again
    w = spawn_worker(tiny_model, nats_server.url, REF, "--ctx-size", "512").wait_ready()
    rec = await asyncio.to_thread(w.wait_event, "duplicate_delivery", 30)
    assert rec["job_id"] == "acked-late" and rec["attempt"] == 2
    deadline = time.monotonic() + 10
    while (await js.stream_info("ORCD_JOBS")).state.messages:  # acked: gone from the queue
        assert time.monotonic() < deadline, "the redelivered job was not acked"
        await asyncio.sleep(0.05)
    assert await client.replay("acked-late") == stored  # not run again
    assert not w.events("execute_start")


async def test_follow_moves_past_the_hole_of_an_attempt_whose_worker_died(
    client: OrcdClient,
) -> None:
    """A worker held events back through a NATS outage and was killed before re-sending
    them: its attempt's stored tokens keep a hole for good. While that attempt is the last
    one, the follower waits for the hole to fill; once a later attempt has started, it
    yields the later attempt to its end instead of waiting forever."""
    from worker.nats.jetstream import ensure_streams

    await ensure_streams(client.js, client.subjects, events_max_age_s=3600)
    job = "holed"

    def started(attempt: int) -> Started:
        return stored_started(job, attempt)

    def tok(i: int) -> Token:
        return Token(job_id=job, i=i, t=f"<{i}>", id=i)

    end = stored_end(job, 2)

    async def store(*events: Event) -> None:
        for ev in events:
            await client.js.publish(client.subjects.events(job), encode(ev))

    seen: list[Event] = []

    async def follow() -> None:
        async for ev in client.follow(job, timeout_s=30, gap_timeout_s=0.2):
            seen.append(ev)

    await store(started(1), tok(0), tok(2))  # token 1 of attempt 1 never stored
    task = asyncio.create_task(follow())
    await asyncio.sleep(1.5)  # the last attempt has a hole: wait, yield nothing past it
    assert seen == [started(1), tok(0)] and not task.done()
    await store(started(2), tok(0), tok(1), end)  # redelivered: attempt 2 runs to its end
    await asyncio.wait_for(task, 10)
    assert seen == [started(1), tok(0), started(2), tok(0), tok(1), end]
    assert final_attempt(seen) == [started(2), tok(0), tok(1), end]
