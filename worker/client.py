"""Public async client of the worker's NATS interface (SPEC §3, §5).

    async with await OrcdClient.connect("nats://127.0.0.1:4222") as client:
        async for event in client.generate("qwen2-5-0-5b", prompt="Write a haiku", seed=1):
            if isinstance(event, Token):
                print(event.t, end="")

`generate` subscribes to ``orcd.events.<job_id>`` before it publishes the job, so no event is
missed. If the live stream shows a gap (a token index skipped, or silence longer than
`gap_timeout_s`, e.g. across a NATS outage) it fills it from JetStream (ORCD_EVENTS), so the
caller sees every event of every attempt exactly once, in order. `replay` reads a job's whole
stored stream; `cancel` and `health` are request-reply.

Leases: `generate` gives each job a lease (`lease_s`, 30 s unless told otherwise) and renews it
on ``orcd.keepalive.<job_id>`` while the caller reads the events (`run_job` does for any
Job with a lease; `keepalive` is the same renewal for callers that follow a job themselves,
e.g. the HTTP gateway). A client that vanishes stops renewing, and the worker ends its job
``CANCELLED`` with reason ``client_gone`` within a second of the lease running out.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Sequence
from types import TracebackType
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from worker.nats.jetstream import connect, stream_names
from worker.nats.options import NatsConnectOptions
from worker.protocol import (
    CancelReply,
    CancelRequest,
    ChatMessage,
    End,
    Error,
    Event,
    Health,
    Job,
    Metrics,
    Started,
    Subjects,
    Token,
    decode_cancel_reply,
    decode_event,
    decode_health,
    encode,
)

_EventKey = tuple[int, str, int]
DEFAULT_LEASE_S = 30.0


def is_terminal(event: Event) -> bool:
    return isinstance(event, End | Error)


class OrcdClient:
    def __init__(self, nc: NatsClient, prefix: str = "orcd") -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.subjects = Subjects(prefix)
        self._jobs_stream, self._events_stream = stream_names(self.subjects)

    @classmethod
    async def connect(
        cls,
        url: str,
        prefix: str = "orcd",
        connect_timeout_s: float = 10.0,
        options: NatsConnectOptions | None = None,
    ) -> OrcdClient:
        """Connect to `url` (comma-separated: several servers of a cluster) with the
        credentials and TLS of `options` (worker.nats.options: `nats_connect_options(args)`
        builds them from the shared command-line flags)."""
        nc = await connect(
            url,
            name=f"orcd-client-{uuid.uuid4().hex[:8]}",
            connect_timeout_s=connect_timeout_s,
            options=options,
        )
        return cls(nc, prefix)

    async def close(self) -> None:
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
        msgs = None if messages is None else [ChatMessage(**m) for m in messages]  # type: ignore[arg-type]
        return Job(job_id=job_id or uuid.uuid4().hex, prompt=prompt, messages=msgs, **params)

    async def submit(self, model_ref: str, job: Job | bytes) -> None:
        """Publish a job (a Job, or raw bytes - for testing the worker's validation) and wait
        for JetStream to store it. A Job is de-duplicated by its job_id (2-minute window)."""
        if isinstance(job, Job):
            headers = {"Nats-Msg-Id": job.job_id}
            await self.js.publish(self.subjects.jobs(model_ref), encode(job), headers=headers)
        else:
            await self.js.publish(self.subjects.jobs(model_ref), job)

    async def generate(
        self,
        model_ref: str,
        *,
        prompt: str | None = None,
        messages: Sequence[dict[str, str]] | None = None,
        job_id: str | None = None,
        timeout_s: float | None = None,
        gap_timeout_s: float = 5.0,
        lease_s: float | None = DEFAULT_LEASE_S,
        **params: Any,
    ) -> AsyncIterator[Event]:
        """Submit a job and yield its events until the terminal one. The job's lease is
        renewed meanwhile (`lease_s=None`: no lease, the job runs to its end regardless)."""
        job = self.make_job(
            prompt=prompt, messages=messages, job_id=job_id, lease_s=lease_s, **params
        )
        async for event in self.run_job(
            model_ref, job, timeout_s=timeout_s, gap_timeout_s=gap_timeout_s
        ):
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
    ) -> AsyncIterator[Event]:
        """Submit `job` and yield its events until the terminal one, renewing its lease
        (a Job's own `lease_s`; for raw bytes, `lease_s`) until then."""
        jid = job.job_id if isinstance(job, Job) else job_id
        if jid is None:
            raise ValueError("job_id is needed to follow a raw job")
        lease = job.lease_s if isinstance(job, Job) else lease_s
        async with contextlib.AsyncExitStack() as stack:
            if lease is not None:
                await stack.enter_async_context(self.keepalive(jid, lease))
            async for event in self.follow(
                jid,
                timeout_s=timeout_s,
                gap_timeout_s=gap_timeout_s,
                before_first=lambda: self.submit(model_ref, job),
            ):
                yield event

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

    async def follow(
        self,
        job_id: str,
        *,
        timeout_s: float | None = None,
        gap_timeout_s: float = 5.0,
        before_first: Any = None,
    ) -> AsyncIterator[Event]:
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
                    msg = await asyncio.wait_for(queue.get(), wait)
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
                    for ev, k in _keyed(stored):
                        if k in seen:
                            attempt, next_i = _advance(ev, attempt, next_i)
                            continue
                        if isinstance(ev, Token) and ev.i != next_i:
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

    async def health(self, worker_id: str | None = None, timeout_s: float = 2.0) -> Health:
        """Health of one worker (or of whichever worker answers ``orcd.health`` first)."""
        subject = self.subjects.health(worker_id) if worker_id else self.subjects.health_all
        msg = await self.nc.request(subject, b"", timeout=timeout_s)
        return decode_health(msg.data)

    async def health_all(self, timeout_s: float = 0.5) -> list[Health]:
        """Health of every worker that answers ``orcd.health`` within `timeout_s`."""
        inbox = self.nc.new_inbox()
        out: list[Health] = []

        async def on_reply(msg: Msg) -> None:
            out.append(decode_health(msg.data))

        sub = await self.nc.subscribe(inbox, cb=on_reply)
        try:
            await self.nc.publish(self.subjects.health_all, b"", reply=inbox)
            await asyncio.sleep(timeout_s)
        finally:
            await sub.unsubscribe()
        return out

    async def shutdown(self, worker_id: str, timeout_s: float = 2.0) -> bytes:
        msg = await self.nc.request(self.subjects.shutdown(worker_id), b"", timeout=timeout_s)
        return bytes(msg.data)

    async def metrics(self, worker_id: str, timeout_s: float = 2.0) -> str:
        msg = await self.nc.request(self.subjects.metrics(worker_id), b"", timeout=timeout_s)
        return bytes(msg.data).decode()


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
