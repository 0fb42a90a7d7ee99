"""NATS frontend actor: the only code that talks to NATS (it knows nothing of the device).

- request-reply: health (``orcd.health.<id>``, ``orcd.health``), metrics
  (``orcd.metrics.<id>``), shutdown (``orcd.control.<id>.shutdown``); cancel messages
  (``orcd.cancel``) go to the cancellation actor;
- a heartbeat publish of the health payload every few seconds;
- jobs: pull from the shared durable consumer only as many as there is room for in the
  running batch (the rest stay queued in ORCD_JOBS for any worker), decode and validate each
  (invalid: `error` event + ``term``), hand valid ones to the inference actor, keep every
  held message alive with in-progress acks; a redelivered job whose terminal event is
  already stored (its ack was lost, e.g. in a leader election) is acked, not run again;
- leases (actors/leases.py): keepalives on ``orcd.keepalive.<job_id>`` renew the leases of
  the jobs held here; `lease_watch` ends an expired one through the cancels channel, as an
  ``orcd.cancel`` request with reason ``client_gone`` would;
- the inference actor's output: each job's events published in order (pipelined), cancel
  replies, device status for health; after a job's terminal event, every event of it
  confirmed stored, then the ack (a device failure naks instead, so another worker redoes
  the job).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
import nats.errors
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext

from actors.leases import LeaseTable, watch
from actors.messages import (
    CancelPayload,
    DeviceStatus,
    InferenceIn,
    JobEvents,
    NewJob,
    Outgoing,
    Reply,
)
from actors.state import WorkerState
from worker.config import WorkerConfig
from worker.errors import ErrorCode
from worker.metrics import WorkerMetrics
from worker.narration import narrate
from worker.nats.jetstream import (
    EventPublisher,
    connect,
    ensure_streams,
    job_subscription,
    stream_names,
)
from worker.protocol import (
    CLIENT_GONE,
    CancelRequest,
    End,
    Error,
    InvalidJob,
    ShutdownReply,
    consumer_name,
    decode_event,
    decode_job,
    encode,
    handed_back,
)


@dataclass(eq=False)
class _Held:
    """A job pulled from JetStream and not yet acked."""

    msg: Msg
    job_id: str
    attempt: int
    pub: EventPublisher
    started: asyncio.Task[None] | None = None  # the publisher's start() (base count)
    terminal: bool = False


class Frontend:
    def __init__(
        self,
        cfg: WorkerConfig,
        state: WorkerState,
        metrics: WorkerMetrics,
        shutdown: anyio.Event,
    ) -> None:
        self.cfg = cfg
        self.subjects = cfg.subjects
        self.state = state
        self.metrics = metrics
        self.shutdown = shutdown
        self.held: dict[str, _Held] = {}
        self._room = anyio.Event()  # set when a held job ends (room to pull more)
        self._pull_stopped = anyio.Event()  # the job loop pulls no more
        self._background: set[asyncio.Future[None]] = set()
        # jobs whose id is running here already: each waits for the one before it
        self._same_id: dict[str, deque[Msg]] = {}
        self._jobs: MemoryObjectSendStream[InferenceIn] | None = None
        self.failed = False  # the device failed: drain and exit non-zero
        self.nc: NatsClient | None = None
        self.js: JetStreamContext | None = None
        self._subs: list[Subscription] = []
        self._jobs_stream, self._events_stream = stream_names(self.subjects)
        self._connected = False
        self._closing = False
        self.reconnects = 0
        self.url = ""
        self.on_ready: Callable[[], None] | None = None  # runs once pulling starts
        self.leases = LeaseTable()

    # ----------------------------------------------------------------- connection

    async def connect(self, url: str) -> None:
        async def on_disconnect() -> None:
            if self._connected and not self._closing:
                narrate(
                    "nats_disconnected", "lost the NATS connection; reconnecting", level="WARNING"
                )
            self._connected = False

        async def on_reconnect() -> None:
            self._connected = True
            self.reconnects += 1
            self.leases.renew_all()  # no client could renew a lease during the outage
            narrate("nats_reconnected", f"reconnected to {url}")

        async def on_error(exc: Exception) -> None:
            narrate("nats_error", f"{type(exc).__name__}: {exc}", level="WARNING")

        def on_retry(attempt: int, reason: str, pause_s: float) -> None:
            narrate(
                "nats_connect_retry",
                f"cannot reach NATS at {url} ({reason}); attempt {attempt} failed, retrying in "
                f"{pause_s:.1f} s (giving up {self.cfg.nats_connect_timeout_s:g} s after start)",
                level="WARNING",
                nats_url=url,
                attempt=attempt,
            )

        self.nc = await connect(
            url,
            name=f"worker-orcd-{self.cfg.worker_id}",
            on_disconnect=on_disconnect,
            on_reconnect=on_reconnect,
            on_error=on_error,
            connect_timeout_s=self.cfg.nats_connect_timeout_s,
            on_retry=on_retry,
            # credentials and TLS apply to a server of the operator's, not the embedded one
            options=self.cfg.nats_options if self.cfg.nats_url is not None else None,
        )
        self.url = url
        self._connected = True
        self.js = self.nc.jetstream()
        await ensure_streams(
            self.js,
            self.subjects,
            events_max_age_s=self.cfg.events_max_age_s,
            replicas=self.cfg.stream_replicas,
        )
        narrate(
            "nats_connected",
            f"connected to {url} ({self.cfg.nats_options.describe()})",
            nats_url=url,
        )

    async def _reply(self, subject: str, payload: bytes) -> None:
        assert self.nc is not None
        with contextlib.suppress(Exception):
            await self.nc.publish(subject, payload)

    async def subscribe_control(self, cancels: MemoryObjectSendStream[CancelPayload]) -> None:
        nc = self.nc
        assert nc is not None

        async def on_health(msg: Msg) -> None:
            if msg.reply:
                await self._reply(msg.reply, self.state.health_bytes())

        async def on_metrics(msg: Msg) -> None:
            if msg.reply:
                self.metrics.vram_bytes.set(self.state.health().vram_bytes_used)
                await self._reply(msg.reply, self.metrics.render())

        async def on_cancel(msg: Msg) -> None:
            try:
                cancels.send_nowait(CancelPayload(bytes(msg.data), msg.reply or None))
            except anyio.WouldBlock:
                narrate("cancel_dropped", "cancellation actor busy", level="WARNING")

        async def on_shutdown(msg: Msg) -> None:
            narrate("shutdown_requested", "shutdown requested over NATS")
            self.state.set_draining()
            if msg.reply:
                reply = ShutdownReply(
                    worker_id=self.cfg.worker_id,
                    status="draining",
                    active_job_id=self.state.active_job_id,
                )
                await self._reply(msg.reply, encode(reply))
            self.shutdown.set()

        async def on_keepalive(msg: Msg) -> None:
            self.leases.renew(msg.subject.rsplit(".", 1)[-1])

        async def on_max_deliveries(msg: Msg) -> None:
            await self._give_up(msg.data)

        jobs_stream, _ = stream_names(self.subjects)
        durable = consumer_name(self.cfg.model_ref)
        advisory = f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{jobs_stream}.{durable}"
        wid = self.cfg.worker_id
        self._subs = [
            # one worker of the model ref (queue group) ends a job that ran out of attempts
            await nc.subscribe(advisory, queue=f"{durable}-max-deliveries", cb=on_max_deliveries),
            await nc.subscribe(self.subjects.health(wid), cb=on_health),
            await nc.subscribe(self.subjects.health_all, cb=on_health),
            await nc.subscribe(self.subjects.metrics(wid), cb=on_metrics),
            await nc.subscribe(self.subjects.cancel, cb=on_cancel),
            await nc.subscribe(self.subjects.shutdown(wid), cb=on_shutdown),
            await nc.subscribe(self.subjects.keepalive_wildcard, cb=on_keepalive),
        ]
        await nc.flush()

    async def heartbeat(self) -> None:
        """Publish the health payload every heartbeat interval (until cancelled)."""
        assert self.nc is not None
        subject = self.subjects.heartbeat(self.cfg.worker_id)
        while True:
            with contextlib.suppress(Exception):
                await self.nc.publish(subject, self.state.health_bytes())
            await anyio.sleep(self.cfg.heartbeat_interval_s)

    async def lease_watch(self, cancels: MemoryObjectSendStream[CancelPayload]) -> None:
        """End jobs whose lease ran out (until cancelled): the same message, on the same
        channel, as an ``orcd.cancel`` request with reason ``client_gone``."""

        async def end_job(job_id: str) -> None:
            request = CancelRequest(job_id=job_id, reason=CLIENT_GONE)
            await cancels.send(CancelPayload(encode(request), None))

        await watch(self.leases, end_job, lambda: self._connected)

    # ----------------------------------------------------------------- jobs

    async def serve(
        self,
        jobs: MemoryObjectSendStream[InferenceIn],
        outbox: MemoryObjectReceiveStream[Outgoing],
        capacity: int,
    ) -> None:
        """Pull jobs while there is room, publish what the inference actor sends, until a
        shutdown is requested and every held job has ended (or the grace time is over)."""
        self._jobs = jobs
        async with jobs, outbox, anyio.create_task_group() as tg:
            tg.start_soon(self._publish_loop, outbox)
            tg.start_soon(self._keep_alive_loop)
            await self._pull_loop(jobs, capacity)
            self._pull_stopped.set()
            # draining: the running jobs finish; after the grace they are handed back
            with anyio.move_on_after(self.cfg.shutdown_grace_s):
                while self.held:
                    self._room = anyio.Event()
                    await self._room.wait()
            for h in list(self.held.values()):
                narrate(
                    "shutdown_abandon",
                    "grace over: job left for redelivery",
                    level="WARNING",
                    job_id=h.job_id,
                )
                await self._nak(h)
            for queued in self._same_id.values():
                for msg in queued:
                    with contextlib.suppress(Exception):
                        await msg.nak()
            self._same_id.clear()
            tg.cancel_scope.cancel()

    async def _subscription(self) -> Any:
        assert self.js is not None
        while True:  # NATS may be away right now: wait for it
            try:
                return await job_subscription(
                    self.js,
                    self.subjects,
                    self.cfg.model_ref,
                    ack_wait_s=self.cfg.ack_wait_s,
                    max_deliver=self.cfg.max_deliver,
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                narrate("consumer_unavailable", f"{type(exc).__name__}: {exc}", level="WARNING")
                if self.shutdown.is_set():
                    return None
                await anyio.sleep(1.0)

    async def _pull_loop(self, jobs: MemoryObjectSendStream[InferenceIn], capacity: int) -> None:
        psub = await self._subscription()
        if psub is None:
            return
        narrate(
            "ready",
            f"serving {self.subjects.jobs(self.cfg.model_ref)} at {self.url} "
            f"(up to {capacity} jobs at once)",
            jobs_subject=self.subjects.jobs(self.cfg.model_ref),
            nats_url=self.url,
            max_batch=capacity,
        )
        if self.on_ready is not None:
            self.on_ready()
        try:
            while not self.shutdown.is_set() and not self.failed:
                room = capacity - len(self.held)
                if room <= 0:
                    self._room = anyio.Event()
                    with anyio.move_on_after(1.0):
                        await self._room.wait()
                    continue
                try:
                    msgs = await psub.fetch(room, timeout=1.0)
                except nats.errors.TimeoutError:
                    continue
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # outage: the client reconnects; try again
                    if self._connected:
                        narrate("fetch_failed", f"{type(exc).__name__}: {exc}", level="WARNING")
                    await anyio.sleep(0.25)
                    continue
                for msg in msgs:
                    if self.shutdown.is_set() or self.failed:  # hand it back
                        with contextlib.suppress(Exception):
                            await msg.nak()
                        continue
                    await self._accept(msg, jobs)
        finally:
            self._pull_stopped.set()
            with contextlib.suppress(Exception):
                await psub.unsubscribe()

    async def _accept(self, msg: Msg, jobs: MemoryObjectSendStream[InferenceIn]) -> None:
        meta = msg.metadata
        attempt = int(meta.num_delivered or 1)
        seq = meta.sequence.stream
        try:
            job = decode_job(msg.data)
        except InvalidJob as exc:
            await self._reject(msg, exc, seq)
            return
        job_id = job.job_id
        if attempt > 1 and await self._already_finished(job_id):
            narrate(
                "duplicate_delivery",
                "redelivered, but its terminal event is stored: acked without running again",
                job_id=job_id,
                attempt=attempt,
            )
            await self._ack(msg, job_id)
            return
        if job_id in self.held:
            # the same job id again while that job runs here: its events would mix with the
            # running one's on the job's subject, so it runs after it (kept alive meanwhile)
            self._same_id.setdefault(job_id, deque()).append(msg)
            narrate("job_waits", "the same job id is running here: runs after it", job_id=job_id)
            return
        pub = EventPublisher(
            self._nc(),
            self._js(),
            self.subjects.events(job_id),
            f"{job_id}.{seq}.{attempt}",
            self._events_stream,
        )
        h = _Held(msg, job_id, attempt, pub)
        h.started = asyncio.ensure_future(pub.start())
        self.held[job_id] = h
        if job.lease_s is not None:
            self.leases.hold(job_id, job.lease_s)
        self._update_running()
        await jobs.send(NewJob(job, attempt))

    async def _publish_loop(self, outbox: MemoryObjectReceiveStream[Outgoing]) -> None:
        async with anyio.create_task_group() as tg:
            async for item in outbox:
                if isinstance(item, JobEvents):
                    for ev in item.events:
                        h = self.held.get(ev.job_id)
                        if h is None or h.terminal:
                            continue  # handed back (shutdown) or a late duplicate
                        if h.started is not None:
                            if not h.started.done():
                                await h.started
                            h.started = None
                        if isinstance(ev, End | Error):
                            h.terminal = True
                            tg.start_soon(self._finish, h, ev)
                        else:
                            await h.pub.publish(encode(ev))
                elif isinstance(item, Reply):
                    await self._reply(item.subject, item.payload)
                elif isinstance(item, DeviceStatus):
                    self._device_status(item)

    def _device_status(self, st: DeviceStatus) -> None:
        if st.info is not None:
            self.state.info = st.info
            self.metrics.vram_bytes.set(st.info.vram_bytes_used)
        if st.resident is not None:
            self.state.resident = st.resident
        if st.unhealthy_reason is not None:
            self._unhealthy(st.unhealthy_reason)
        if st.fatal and not self.failed:
            self.failed = True
            narrate("shutdown", "device failure: draining, then exiting", level="CRITICAL")
            self.shutdown.set()

    async def _finish(self, h: _Held, ev: End | Error) -> None:
        """Terminal event: only after every earlier one is stored (the in-progress acks keep
        running meanwhile, an outage may last), then the ack; a CUDA error naks instead."""
        self._record_outcome(ev, h.job_id)  # before a client can see it
        stored = await h.pub.finish(encode(ev))
        self._after_terminal(h.job_id, stored, h.pub.republished)
        if handed_back(ev):
            # another worker redoes it; handed back only once this one pulls no more, or it
            # could take the job straight back (a delivery spent on a failed device)
            with anyio.move_on_after(5.0):
                await self._pull_stopped.wait()
            await self._nak(h)
            return
        await self._ack(h.msg, h.job_id)
        self.state.jobs_completed += 1
        self._release(h)

    async def _already_finished(self, job_id: str) -> bool:
        """The job's last stored event ends it (End, or an Error other than CUDA_ERROR,
        which hands a job back to be redone)."""
        try:
            raw = await self._js().get_last_msg(self._events_stream, self.subjects.events(job_id))
            last = decode_event(raw.data or b"")
        except Exception:  # nothing stored (not found), or unreadable: run it
            return False
        return isinstance(last, End | Error) and not handed_back(last)

    async def _accept_next(self, msg: Msg) -> None:
        """A job that waited for its id's previous job: run it now, or hand it back."""
        if self.shutdown.is_set() or self.failed or self._jobs is None:
            with contextlib.suppress(Exception):
                await msg.nak()
            return
        await self._accept(msg, self._jobs)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _unhealthy(self, reason: str) -> None:
        """Health turns unhealthy; said at once (log and a heartbeat), not at the next beat,
        so whatever watches the worker learns it before the worker drains and exits."""
        first = self.state.unhealthy_reason is None
        self.state.set_unhealthy(reason)
        if first:
            narrate("unhealthy", reason, level="CRITICAL", reason=reason)
            if self.nc is not None and self._connected:
                subject = self.subjects.heartbeat(self.cfg.worker_id)
                self._spawn(self._reply(subject, self.state.health_bytes()))

    def _release(self, h: _Held) -> None:
        if self.held.get(h.job_id) is h:
            del self.held[h.job_id]
            self.leases.release(h.job_id)
            queued = self._same_id.get(h.job_id)
            if queued:
                msg = queued.popleft()
                if not queued:
                    del self._same_id[h.job_id]
                self._spawn(self._accept_next(msg))
        self._update_running()
        self._room.set()

    def _update_running(self) -> None:
        self.state.running_jobs = len(self.held)
        self.state.active_job_id = next(iter(self.held), None)
        self.metrics.active.set(len(self.held))

    async def _nak(self, h: _Held) -> None:
        with contextlib.suppress(Exception):
            await h.msg.nak()
        h.terminal = True
        self._release(h)

    async def _keep_alive_loop(self) -> None:
        """In-progress acks for every held job (JetStream redelivers a job whose worker
        stops sending them)."""
        period = max(0.5, min(5.0, self.cfg.ack_wait_s / 3))
        while True:
            await anyio.sleep(period)
            waiting = [m for q in self._same_id.values() for m in q]
            for msg in [h.msg for h in self.held.values()] + waiting:
                with contextlib.suppress(Exception):
                    await msg.in_progress()

    def _record_outcome(self, ev: End | Error, job_id: str) -> None:
        self.metrics.outcome("ok" if isinstance(ev, End) else ev.code.value)
        if isinstance(ev, Error):
            if ev.code is ErrorCode.CUDA_ERROR:
                # a CUDA error may have poisoned the context: report it so the orchestrator
                # can restart this worker
                self._unhealthy(f"CUDA error: {ev.message}")
            narrate(
                "error",
                f"{ev.code}: {ev.message}",
                level="WARNING",
                job_id=job_id,
                code=ev.code.value,
            )

    def _after_terminal(self, job_id: str, stored: bool, republished: int) -> None:
        if not stored:
            narrate("error", "events could not be confirmed stored", level="ERROR", job_id=job_id)
        if republished:
            narrate(
                "events_republished",
                f"{republished} events re-sent after an unconfirmed store",
                level="WARNING",
                job_id=job_id,
                count=republished,
            )

    async def _give_up(self, advisory: bytes) -> None:
        """A job was delivered --max-deliver times without being acked (its workers died or
        hung each time): end it with an `error` event and remove it, so no client waits on
        a job JetStream will never deliver again."""
        try:
            info = json.loads(advisory)
            seq = int(info["stream_seq"])
            deliveries = int(info.get("deliveries", 0))
            raw = await self._js().get_msg(self._jobs_stream, seq)
        except Exception as exc:
            narrate("max_deliveries_unreadable", f"{type(exc).__name__}: {exc}", level="ERROR")
            return
        try:
            job_id: str | None = decode_job(raw.data or b"").job_id
        except InvalidJob as exc:
            job_id = exc.job_id
        message = (
            f"job delivered {deliveries} times without finishing (its workers stopped or "
            "timed out each time); not retried"
        )
        narrate("error", message, level="ERROR", job_id=job_id, code=ErrorCode.INTERNAL.value)
        self.metrics.outcome("MAX_DELIVERIES")
        if job_id is not None:
            err = Error(job_id=job_id, code=ErrorCode.INTERNAL, message=message, retriable=False)
            pub = EventPublisher(
                self._nc(),
                self._js(),
                self.subjects.events(job_id),
                f"{job_id}.{seq}.max",
                self._events_stream,
            )
            await pub.finish(encode(err), deadline_s=10.0)
        with contextlib.suppress(Exception):
            await self._js().delete_msg(self._jobs_stream, seq)

    def _js(self) -> JetStreamContext:
        assert self.js is not None
        return self.js

    def _nc(self) -> NatsClient:
        assert self.nc is not None
        return self.nc

    async def _ack(self, msg: Msg, job_id: str) -> None:
        deadline = time.monotonic() + self.cfg.ack_wait_s
        while True:
            try:
                await msg.ack_sync(timeout=2.0)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if time.monotonic() >= deadline:
                    narrate(
                        "ack_failed", f"{type(exc).__name__}: {exc}", level="ERROR", job_id=job_id
                    )
                    return
                await anyio.sleep(0.25)

    async def _reject(self, msg: Msg, exc: InvalidJob, seq: int) -> None:
        narrate(
            "error",
            exc.message,
            level="WARNING",
            job_id=exc.job_id,
            code=exc.code.value,
            raw_job_id=exc.raw_job_id,
        )
        self.metrics.outcome(exc.code.value)
        if exc.job_id is not None:
            err = Error(job_id=exc.job_id, code=exc.code, message=exc.message, retriable=False)
            pub = EventPublisher(
                self._nc(),
                self._js(),
                self.subjects.events(exc.job_id),
                f"{exc.job_id}.{seq}.rej",
                self._events_stream,
            )
            await pub.finish(encode(err), deadline_s=10.0)
        else:
            err = Error(
                job_id=exc.raw_job_id or "", code=exc.code, message=exc.message, retriable=False
            )
            await self._reply(self.subjects.rejected, encode(err))
        with contextlib.suppress(Exception):
            await msg.term()

    async def close(self) -> None:
        nc = self.nc
        if nc is None:
            return
        self._closing = True
        with contextlib.suppress(Exception):
            await nc.publish(self.subjects.heartbeat(self.cfg.worker_id), self.state.health_bytes())
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        with contextlib.suppress(Exception):
            await nc.flush(timeout=2)
        with contextlib.suppress(Exception):
            await nc.close()
