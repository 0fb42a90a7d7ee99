"""Public async client of the worker's NATS interface (docs/protocol.md).

    async with await OrcdClient.connect("nats://127.0.0.1:4222") as client:
        async for event in client.generate("qwen2-5-0-5b", prompt="Write a haiku", seed=1):
            if isinstance(event, Token):
                print(event.t, end="")

`connect` gives up after `connect_timeout_s` with `NatsUnavailable`. `generate` first checks
that a worker serves the model reference (`NoWorker` otherwise: a job nobody takes would wait
silently), subscribes to ``orcd.events.<job_id>`` before it publishes the job, so no event is
missed, and cancels the job on the worker when the caller stops early: a `break` out of the
loop, an exception, or the task being cancelled. If the live stream shows a gap (a token index
skipped, or silence longer than `gap_timeout_s`, e.g. across a NATS outage) it fills it from
JetStream (ORCD_EVENTS), so the caller sees every event of every attempt exactly once, in
order. `replay` reads a job's whole stored stream; `cancel` and `health` are request-reply.

Leases: `generate` gives each job a lease (`lease_s`, 30 s unless told otherwise) and renews it
on ``orcd.keepalive.<job_id>`` while the caller reads the events (`run_job` does for any
Job with a lease; `keepalive` is the same renewal for callers that follow a job themselves,
e.g. the HTTP gateway). A client that vanishes stops renewing, and the worker ends its job
``CANCELLED`` with reason ``client_gone`` within a second of the lease running out.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from types import TracebackType
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from worker.nats.jetstream import NatsUnavailable, connect, stream_names
from worker.nats.options import NatsConnectOptions
from worker.protocol import (
    CancelReply,
    CancelRequest,
    End,
    Error,
    Event,
    Health,
    Job,
    Metrics,
    Started,
    Subjects,
    Token,
    consumer_name,
    decode_cancel_reply,
    decode_event,
    decode_health,
    encode,
    handed_back,
)

__all__ = ["NatsUnavailable", "NoWorker", "OrcdClient"]

_EventKey = tuple[int, str, int]
DEFAULT_LEASE_S = 30.0

DEFAULT_CONNECT_TIMEOUT_S = 5.0
# A heartbeat this recent from a worker of the model reference is proof enough that it is
# served (workers send one every 5 s by default).
HEARTBEAT_FRESH_S = 12.0


class NoWorker(LookupError):
    """No worker serves the model reference (checked before a job is published)."""


def is_terminal(event: Event) -> bool:
    """The job's last event: End, or an Error other than one that hands the job back for
    another attempt (`handed_back`)."""
    return isinstance(event, End) or (isinstance(event, Error) and not handed_back(event))


class OrcdClient:
    def __init__(self, nc: NatsClient, prefix: str = "orcd") -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.subjects = Subjects(prefix)
        self._jobs_stream, self._events_stream = stream_names(self.subjects)
        self._running: set[str] = set()  # jobs this client published and still follows
        self._cancels: set[asyncio.Task[None]] = set()
        # worker_id -> (model_ref, status, monotonic time) from orcd.heartbeat.*
        self._heartbeats: dict[str, tuple[str, str, float]] = {}
        self._heartbeat_sub: Any = None

    @classmethod
    async def connect(
        cls,
        url: str,
        prefix: str = "orcd",
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        options: NatsConnectOptions | None = None,
        **nats_options: Any,
    ) -> OrcdClient:
        """Connect to NATS at `url` (comma-separated: several servers of a cluster);
        `NatsUnavailable` after `connect_timeout_s`. `options`: credentials and TLS
        (worker.nats.options: `nats_connect_options(args)` builds them from the shared
        command-line flags); `nats_options` go to nats-py's connect as they are."""
        nc = await connect(
            url,
            name=f"orcd-client-{uuid.uuid4().hex[:8]}",
            connect_timeout_s=connect_timeout_s,
            options=options,
            **nats_options,
        )
        client = cls(nc, prefix)
        await client._watch_heartbeats()
        return client

    async def close(self) -> None:
        """Cancel the jobs this client published and still follows, then disconnect."""
        for job_id in list(self._running):
            self._send_cancel(job_id)
        if self._cancels:
            with contextlib.suppress(Exception):
                await asyncio.wait(set(self._cancels), timeout=2.0)
        with contextlib.suppress(Exception):
            await self.nc.drain()

    async def __aenter__(self) -> OrcdClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # ------------------------------------------------------------------ jobs

    @staticmethod
    def make_job(
        *,
        prompt: str | None = None,
        messages: Sequence[dict[str, str]] | None = None,
        job_id: str | None = None,
        **params: Any,
    ) -> Job:
        """A Job checked by the rules the worker applies (docs/protocol.md), so a bad field
        fails here, naming it (msgspec.ValidationError), rather than on the worker."""
        fields: dict[str, Any] = {"job_id": job_id or uuid.uuid4().hex, **params}
        if prompt is not None:
            fields["prompt"] = prompt
        if messages is not None:
            fields["messages"] = messages
        return msgspec.convert(fields, Job)

    async def submit(self, model_ref: str, job: Job | bytes) -> None:
        """Publish a job (a Job, or raw bytes - for testing the worker's validation) and wait
        for JetStream to store it. A Job is de-duplicated by its job_id (2-minute window)."""
        subject = self.subjects.jobs(model_ref)
        try:
            if isinstance(job, Job):
                headers = {"Nats-Msg-Id": job.job_id}
                await self.js.publish(subject, encode(job), headers=headers)
            else:
                await self.js.publish(subject, job)
        except (nats.errors.NoRespondersError, nats.js.errors.NoStreamResponseError):
            raise NoWorker(
                f"nothing stores jobs on {subject} at {self.url}: no worker has created the "
                f"{self._jobs_stream} stream on this server yet"
            ) from None

    async def generate(
        self,
        model_ref: str,
        *,
        prompt: str | None = None,
        messages: Sequence[dict[str, str]] | None = None,
        job_id: str | None = None,
        timeout_s: float | None = None,
        gap_timeout_s: float = 5.0,
        require_worker: bool = True,
        lease_s: float | None = DEFAULT_LEASE_S,
        **params: Any,
    ) -> AsyncGenerator[Event, None]:
        """Submit a job and yield its events until the terminal one. The job's lease is
        renewed meanwhile (`lease_s=None`: no lease, the job runs to its end regardless).

        With `require_worker` (the default) `NoWorker` is raised before anything is published
        when no worker serves `model_ref`; without it the job waits in the queue for one."""
        job = self.make_job(
            prompt=prompt, messages=messages, job_id=job_id, lease_s=lease_s, **params
        )
        if require_worker:
            await self.require_worker(model_ref)
        async with contextlib.aclosing(
            self.run_job(model_ref, job, timeout_s=timeout_s, gap_timeout_s=gap_timeout_s)
        ) as events:
            async for event in events:
                yield event

    async def run_job(
        self,
        model_ref: str,
        job: Job | bytes,
        *,
        job_id: str | None = None,
        timeout_s: float | None = None,
        gap_timeout_s: float = 5.0,
        lease_s: float | None = None,
    ) -> AsyncGenerator[Event, None]:
        """Publish `job` and yield its events until the terminal one, renewing its lease
        (a Job's own `lease_s`; for raw bytes, `lease_s`) until then. Stopping early (break,
        exception, task cancelled, `aclose`) cancels the job on the worker."""
        jid = job.job_id if isinstance(job, Job) else job_id
        if jid is None:
            raise ValueError("job_id is needed to follow a raw job")
        lease = job.lease_s if isinstance(job, Job) else lease_s
        published = False
        finished = False

        async def publish() -> None:
            nonlocal published
            await self.submit(model_ref, job)
            published = True
            self._running.add(jid)

        try:
            async with contextlib.AsyncExitStack() as stack:
                if lease is not None:
                    await stack.enter_async_context(self.keepalive(jid, lease))
                events = await stack.enter_async_context(
                    contextlib.aclosing(
                        self.follow(
                            jid,
                            timeout_s=timeout_s,
                            gap_timeout_s=gap_timeout_s,
                            before_first=publish,
                        )
                    )
                )
                async for event in events:
                    finished = is_terminal(event)
                    yield event
        finally:
            self._running.discard(jid)
            if published and not finished:
                # shielded: the cancel goes out even while this task is being cancelled
                await asyncio.shield(self._send_cancel(jid))

    @contextlib.asynccontextmanager
    async def keepalive(self, job_id: str, lease_s: float) -> AsyncIterator[None]:
        """Renew `job_id`'s lease (four times per `lease_s`) while the block runs; leaving
        it (or this process dying) stops the renewal."""
        subject = self.subjects.keepalive(job_id)
        period = max(0.05, lease_s / 4)

        async def renew() -> None:
            while True:
                with contextlib.suppress(Exception):  # an outage: the worker waits it out
                    await self.nc.publish(subject, b"")
                await asyncio.sleep(period)

        task = asyncio.create_task(renew())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _send_cancel(self, job_id: str) -> asyncio.Task[None]:
        """Publish a cancel for `job_id` (no reply awaited) on a task of its own."""

        async def send() -> None:
            with contextlib.suppress(Exception):
                await self.nc.publish(self.subjects.cancel, encode({"job_id": job_id}))
                await self.nc.flush(timeout=2)

        task = asyncio.ensure_future(send())
        self._cancels.add(task)
        task.add_done_callback(self._cancels.discard)
        return task

    # ------------------------------------------------------------------ workers

    async def _watch_heartbeats(self) -> None:
        async def on_heartbeat(msg: Msg) -> None:
            with contextlib.suppress(msgspec.ValidationError, msgspec.DecodeError):
                h = decode_health(msg.data)
                self._heartbeats[h.worker_id] = (h.model_ref, h.status, time.monotonic())

        self._heartbeat_sub = await self.nc.subscribe(self.subjects.heartbeat("*"), cb=on_heartbeat)

    async def served_refs(self, timeout_s: float = 0.5) -> dict[str, list[Health]]:
        """Model references served now: ref -> health of each worker answering ``orcd.health``
        within `timeout_s` (draining workers left out)."""
        out: dict[str, list[Health]] = {}
        for h in await self.health_all(timeout_s):
            if h.status != "draining":
                out.setdefault(h.model_ref, []).append(h)
        return out

    async def require_worker(self, model_ref: str, timeout_s: float = 1.0) -> None:
        """Return once a worker is seen serving `model_ref`; raise `NoWorker` otherwise.

        Evidence, quickest first: a recent heartbeat of such a worker; an answer on
        ``orcd.health`` (every worker answers; the wait ends at the first one that serves the
        reference); pull requests waiting on the consumer ``orcd-<ref>`` (an idle worker)."""
        now = time.monotonic()
        for ref, status, seen in self._heartbeats.values():
            if ref == model_ref and status != "draining" and now - seen < HEARTBEAT_FRESH_S:
                return
        answered = await self.health_all(timeout_s, until_model_ref=model_ref)
        seen = time.monotonic()
        for h in answered:  # an answer counts as a heartbeat: the next job needs no request
            self._heartbeats[h.worker_id] = (h.model_ref, h.status, seen)
        serving = [h for h in answered if h.model_ref == model_ref and h.status != "draining"]
        if serving:
            return
        with contextlib.suppress(Exception):
            info = await self.js.consumer_info(
                self._jobs_stream, consumer_name(model_ref), timeout=timeout_s
            )
            if (info.num_waiting or 0) > 0:
                return
        others = sorted({h.model_ref for h in answered if h.status != "draining"})
        seen_refs = f"; workers there serve {', '.join(others)}" if others else ""
        raise NoWorker(
            f"no worker serves model ref {model_ref!r} on {self.url}{seen_refs}"
            if others
            else f"no worker serves model ref {model_ref!r}: none answered on "
            f"{self.subjects.health_all} at {self.url}"
        )

    @property
    def url(self) -> str:
        """The server this client is connected to."""
        server = self.nc.connected_url
        if server is None:
            return "NATS"
        return f"{server.scheme}://{server.hostname}:{server.port}"

    async def follow(
        self,
        job_id: str,
        *,
        timeout_s: float | None = None,
        gap_timeout_s: float = 5.0,
        before_first: Any = None,
    ) -> AsyncGenerator[Event, None]:
        """Yield a job's events (live, gaps filled from JetStream) until the terminal one.
        `before_first` (an async callable) runs once the live subscription is in place."""
        queue: asyncio.Queue[Msg] = asyncio.Queue()

        async def on_msg(msg: Msg) -> None:
            queue.put_nowait(msg)

        sub = await self.nc.subscribe(self.subjects.events(job_id), cb=on_msg)
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        seen: set[_EventKey] = set()
        attempt = 0
        next_i = 0
        in_gap = False
        last_replay = 0.0
        try:
            await self.nc.flush()
            if before_first is not None:
                await before_first()
            while True:
                wait = 0.5 if in_gap else gap_timeout_s
                if deadline is not None:
                    wait = min(wait, deadline - loop.time())
                    if wait <= 0:
                        raise TimeoutError(f"job {job_id}: no terminal event in {timeout_s} s")
                event: Event | None = None
                try:
                    # per event: no task per wait (wait_for makes one), none at all when
                    # the event is already queued
                    if queue.empty():
                        async with asyncio.timeout(wait):
                            msg = await queue.get()
                    else:
                        msg = queue.get_nowait()
                except TimeoutError:
                    gap = True
                else:
                    event = decode_event(msg.data)
                    if _live_key(event, attempt) in seen:
                        continue
                    gap = in_gap or _skips(event, next_i)
                if gap:
                    # something was missed (an outage): take it from JetStream, in order;
                    # live events meanwhile are dropped, the stream has them too
                    if event is not None and loop.time() - last_replay < 0.5:
                        continue
                    last_replay = loop.time()
                    try:
                        stored = await self.replay(job_id)
                    except (nats.errors.Error, nats.js.errors.Error, TimeoutError):
                        # JetStream is not answering (an outage, a stream leader being
                        # elected in a cluster): still in the gap, try again shortly
                        in_gap = True
                        continue
                    in_gap = False
                    keyed = _keyed(stored)
                    superseded = False
                    for n, (ev, k) in enumerate(keyed):
                        if superseded and not isinstance(ev, Started):
                            continue
                        superseded = False
                        if k in seen:
                            attempt, next_i = _advance(ev, attempt, next_i)
                            continue
                        if isinstance(ev, Token) and ev.i != next_i:
                            if any(isinstance(e, Started) for e, _ in keyed[n + 1 :]):
                                # a later attempt began (the worker of this one died before
                                # re-sending what an outage held back): the hole stays, and
                                # only the last attempt's events count
                                superseded = True
                                continue
                            in_gap = True  # not stored yet: the worker re-sends it
                            break
                        seen.add(k)
                        attempt, next_i = _advance(ev, attempt, next_i)
                        yield ev
                        if is_terminal(ev):
                            return
                    continue
                assert event is not None
                key = _live_key(event, attempt)
                seen.add(key)
                attempt, next_i = _advance(event, attempt, next_i)
                yield event
                if is_terminal(event):
                    return
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def replay(self, job_id: str, timeout_s: float = 5.0) -> list[Event]:
        """Every event of `job_id` stored in ORCD_EVENTS, attempt by attempt: `started`, its
        tokens by index (an event re-sent after an outage may be stored late), then the
        terminal event."""
        subject = self.subjects.events(job_id)
        config = ConsumerConfig(
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.NONE,
            inactive_threshold=30.0,
            filter_subject=subject,
        )
        psub = await self.js.pull_subscribe(subject, stream=self._events_stream, config=config)
        out: list[Event] = []
        try:
            info = await psub.consumer_info()
            remaining = info.num_pending or 0
            while remaining > 0:
                try:
                    msgs = await psub.fetch(min(remaining, 256), timeout=timeout_s)
                except nats.errors.TimeoutError:
                    break
                for m in msgs:
                    out.append(decode_event(m.data))
                    remaining = m.metadata.num_pending
        finally:
            with contextlib.suppress(Exception):
                await psub.unsubscribe()
            with contextlib.suppress(Exception):
                name = (await psub.consumer_info()).name
                await self.js.delete_consumer(self._events_stream, name)
        return normalize(out)

    # ------------------------------------------------------------------ control

    async def cancel(
        self, job_id: str, timeout_s: float = 0.5, reason: str | None = None
    ) -> list[CancelReply]:
        """Ask every worker to cancel `job_id`; returns the replies that came in `timeout_s`
        (stops early once the worker running the job answered). `reason` (``[a-z_]``, e.g.
        ``client_gone`` from a gateway whose HTTP client went away) is carried to the job's
        CANCELLED event."""
        inbox = self.nc.new_inbox()
        replies: list[CancelReply] = []
        got_running = asyncio.Event()

        async def on_reply(msg: Msg) -> None:
            with contextlib.suppress(msgspec.ValidationError, msgspec.DecodeError):
                reply = decode_cancel_reply(msg.data)
                replies.append(reply)
                if reply.status in ("cancelling", "already_cancelling", "already_finished"):
                    got_running.set()

        sub = await self.nc.subscribe(inbox, cb=on_reply)
        try:
            request = CancelRequest(job_id=job_id, reason=reason)
            await self.nc.publish(self.subjects.cancel, encode(request), reply=inbox)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(got_running.wait(), timeout_s)
        finally:
            await sub.unsubscribe()
        return replies

    async def cancel_nowait(self, job_id: str) -> None:
        """Publish a cancel for `job_id` without waiting for any reply (a client that has
        gone away: the job must stop, nobody waits to hear how)."""
        await self.nc.publish(self.subjects.cancel, encode({"job_id": job_id}))

    @property
    def connected(self) -> bool:
        """The NATS connection is up right now (not closed, not reconnecting)."""
        return bool(self.nc.is_connected)

    async def health(self, worker_id: str | None = None, timeout_s: float = 2.0) -> Health:
        """Health of one worker (or of whichever worker answers ``orcd.health`` first)."""
        subject = self.subjects.health(worker_id) if worker_id else self.subjects.health_all
        msg = await self.nc.request(subject, b"", timeout=timeout_s)
        return decode_health(msg.data)

    async def health_all(
        self, timeout_s: float = 0.5, *, until_model_ref: str | None = None
    ) -> list[Health]:
        """Health of every worker that answers ``orcd.health`` within `timeout_s` (one answer
        a worker, its latest).

        With `until_model_ref` the wait ends once a worker serving it has answered, and the
        question is asked again after 0.5 s, 1 s, 2 s ... while none has: a request or answer
        lost to a reconnect (core NATS keeps nothing) costs a re-ask, not the whole wait."""
        inbox = self.nc.new_inbox()
        out: dict[str, Health] = {}
        found = asyncio.Event()

        async def on_reply(msg: Msg) -> None:
            with contextlib.suppress(msgspec.ValidationError, msgspec.DecodeError):
                h = decode_health(msg.data)
                out[h.worker_id] = h
                if h.model_ref == until_model_ref and h.status != "draining":
                    found.set()

        sub = await self.nc.subscribe(inbox, cb=on_reply)
        try:
            deadline = time.monotonic() + timeout_s
            wait_s = 0.5 if until_model_ref is not None else timeout_s
            while True:
                await self.nc.publish(self.subjects.health_all, b"", reply=inbox)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        found.wait(), max(0.0, min(wait_s, deadline - time.monotonic()))
                    )
                if found.is_set() or time.monotonic() >= deadline:
                    break
                wait_s *= 2
        finally:
            await sub.unsubscribe()
        return list(out.values())

    async def shutdown(self, worker_id: str, timeout_s: float = 2.0) -> bytes:
        msg = await self.nc.request(self.subjects.shutdown(worker_id), b"", timeout=timeout_s)
        return bytes(msg.data)

    async def metrics(self, worker_id: str, timeout_s: float = 2.0) -> str:
        msg = await self.nc.request(self.subjects.metrics(worker_id), b"", timeout=timeout_s)
        return bytes(msg.data).decode()


class WorkerDirectory:
    """A live view of the workers behind one subject prefix: who serves which model ref.

    Fed by every worker's heartbeat (``orcd.heartbeat.*``, every few seconds) and by health
    replies (`refresh` asks ``orcd.health``, which every worker answers); a worker not heard
    from for `ttl_s` is gone. A worker's last heartbeat on shutdown says ``draining``, so it
    stops serving at once. Nothing here is routing: jobs still go to the shared consumer.

        directory = WorkerDirectory(client)
        await directory.start()
        directory.serving("qwen")   # healthy (or starting) workers of model ref "qwen"
    """

    def __init__(self, client: OrcdClient, ttl_s: float = 15.0) -> None:
        self.client = client
        self.ttl_s = ttl_s
        self._seen: dict[str, tuple[float, Health]] = {}
        self._sub: Any = None
        self._refreshing: asyncio.Task[None] | None = None
        self._loop = asyncio.get_running_loop()

    async def start(self, probe_s: float = 0.3) -> None:
        """Follow the heartbeats and ask every worker for its health once."""

        async def on_heartbeat(msg: Msg) -> None:
            with contextlib.suppress(msgspec.ValidationError, msgspec.DecodeError):
                self.update(decode_health(msg.data))

        self._sub = await self.client.nc.subscribe(
            self.client.subjects.heartbeat_wildcard, cb=on_heartbeat
        )
        await self.refresh(probe_s)

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None

    def update(self, health: Health) -> None:
        self._seen[health.worker_id] = (self._loop.time(), health)

    async def refresh(self, timeout_s: float = 0.25) -> None:
        """Ask every worker for its health (``orcd.health``) and take the replies that come
        within `timeout_s`; concurrent callers share one probe."""
        task = self._refreshing
        if task is None or task.done():

            async def probe() -> None:
                for h in await self.client.health_all(timeout_s):
                    self.update(h)

            task = self._refreshing = asyncio.ensure_future(probe())
        await asyncio.shield(task)

    async def lookup(self, worker_id: str, timeout_s: float = 0.25) -> Health | None:
        """The worker's last known health; asks it directly when it has not been seen."""
        entry = self._seen.get(worker_id)
        if entry is not None:
            return entry[1]
        try:
            h = await self.client.health(worker_id, timeout_s=timeout_s)
        except Exception:
            return None
        self.update(h)
        return h

    def live(self) -> list[Health]:
        """Every worker heard from within the TTL (any status), by worker id."""
        cutoff = self._loop.time() - self.ttl_s
        for wid in [w for w, (t, _) in self._seen.items() if t < cutoff]:
            del self._seen[wid]
        return [h for _, (_, h) in sorted(self._seen.items())]

    def workers(self, model_ref: str) -> list[Health]:
        """Live workers of `model_ref` (any status)."""
        return [h for h in self.live() if h.model_ref == model_ref]

    def serving(self, model_ref: str) -> list[Health]:
        """Live workers of `model_ref` that take jobs: ``healthy``, or ``starting`` (a job
        queued now is served once the model is loaded)."""
        return [h for h in self.workers(model_ref) if h.status in ("healthy", "starting")]

    def models(self) -> dict[str, list[Health]]:
        """Model ref -> its live workers that take jobs (refs with none are left out)."""
        out: dict[str, list[Health]] = {}
        for h in self.live():
            if h.status in ("healthy", "starting"):
                out.setdefault(h.model_ref, []).append(h)
        return out


def _skips(event: Event, next_i: int) -> bool:
    """The live event shows that something before it was missed."""
    if isinstance(event, Token):
        return event.i != next_i
    if isinstance(event, End):
        return event.tokens_out != next_i
    if isinstance(event, Metrics):
        return event.tokens > next_i
    return False


def _advance(event: Event, attempt: int, next_i: int) -> tuple[int, int]:
    if isinstance(event, Started):
        return event.attempt, 0
    if isinstance(event, Token):
        return attempt, event.i + 1
    return attempt, next_i


def _live_key(event: Event, attempt: int) -> _EventKey:
    """Identity of an event within a job: (attempt, kind, position)."""
    if isinstance(event, Started):
        return (event.attempt, "started", 0)
    if isinstance(event, Token):
        return (attempt, "token", event.i)
    if isinstance(event, Metrics):
        return (attempt, "metrics", event.tokens)
    return (attempt, type(event).__name__, 0)


def _keyed(events: list[Event]) -> list[tuple[Event, _EventKey]]:
    out: list[tuple[Event, _EventKey]] = []
    attempt = 0
    for ev in events:
        if isinstance(ev, Started):
            attempt = ev.attempt
        out.append((ev, _live_key(ev, attempt)))
    return out


def normalize(events: list[Event]) -> list[Event]:
    """Stored events in protocol order: per attempt (each `started` opens one), `started`,
    then tokens by index with each `metrics` event after the token it counts, then the
    terminal event; duplicates dropped."""
    segments: list[list[Event]] = [[]]
    for ev in events:
        if isinstance(ev, Started):
            segments.append([ev])
        else:
            segments[-1].append(ev)
    out: list[Event] = []
    for seg in segments:
        if not seg:
            continue
        head = [e for e in seg[:1] if isinstance(e, Started)]
        tokens: dict[int, Token] = {}
        metrics: dict[int, Metrics] = {}
        terminal: list[Event] = []
        for e in seg:
            if isinstance(e, Token):
                tokens.setdefault(e.i, e)
            elif isinstance(e, Metrics):
                metrics.setdefault(e.tokens, e)
            elif isinstance(e, End | Error):
                terminal.append(e)
        body: list[tuple[int, int, Event]] = [(i, 0, t) for i, t in tokens.items()]
        body += [(n - 1, 1, m) for n, m in metrics.items()]
        body.sort(key=lambda x: (x[0], x[1]))
        out += head + [e for _, _, e in body] + terminal[:1]
    return out


def final_attempt(events: list[Event]) -> list[Event]:
    """The events of the last attempt in a replayed stream (from its `started` on)."""
    starts = [k for k, ev in enumerate(events) if isinstance(ev, Started)]
    return events[starts[-1] :] if starts else []
