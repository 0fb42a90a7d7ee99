"""NATS frontend actor: the only code that talks to NATS (it knows nothing of the device).

- request-reply: health (``orcd.health.<id>``, ``orcd.health``), metrics
  (``orcd.metrics.<id>``), shutdown (``orcd.control.<id>.shutdown``); cancel messages
  (``orcd.cancel``) are forwarded to the cancellation actor;
- a heartbeat publish of the health payload every few seconds;
- the job loop: pull one job at a time from the shared durable consumer, decode and validate
  it (invalid: `error` event + ``term``), end queued-cancelled jobs ``CANCELLED``, hand valid
  ones to the inference actor, publish that job's events in order, keep the message alive
  with in-progress acks, confirm every event stored and only then ack;
- leases (actors/leases.py): keepalives on ``orcd.keepalive.<job_id>`` renew the leases of
  the jobs held here; `lease_watch` ends an expired one through the cancels channel, as an
  ``orcd.cancel`` request with reason ``client_gone`` would.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass

import anyio
import nats.errors
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext

from actors.cancellation import CancelMsg, CancelRegistry
from actors.inference import Ticket
from actors.leases import LeaseTable, watch
from actors.state import WorkerState
from worker.config import WorkerConfig
from worker.errors import ErrorCode
from worker.metrics import WorkerMetrics
from worker.narration import narrate
from worker.nats.jetstream import (
    PUBLISH_ASYNC_MAX_PENDING,
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
    Event,
    InvalidJob,
    ShutdownReply,
    consumer_name,
    decode_job,
    encode,
)


@dataclass
class FrontendLinks:
    tickets: MemoryObjectSendStream[Ticket]  # -> inference
    events: MemoryObjectReceiveStream[Event]  # <- inference
    cancels: MemoryObjectSendStream[CancelMsg]  # -> cancellation


class Frontend:
    def __init__(
        self,
        cfg: WorkerConfig,
        state: WorkerState,
        metrics: WorkerMetrics,
        registry: CancelRegistry,
        shutdown: anyio.Event,
    ) -> None:
        self.cfg = cfg
        self.subjects = cfg.subjects
        self.state = state
        self.metrics = metrics
        self.registry = registry
        self.shutdown = shutdown
        self.nc: NatsClient | None = None
        self.js: JetStreamContext | None = None
        self._subs: list[Subscription] = []
        self._jobs_stream, self._events_stream = stream_names(self.subjects)
        self._connected = False
        self._closing = False
        self.reconnects = 0
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

        self.nc = await connect(
            url,
            name=f"worker-orcd-{self.cfg.worker_id}",
            on_disconnect=on_disconnect,
            on_reconnect=on_reconnect,
            on_error=on_error,
            # credentials and TLS apply to a server of the operator's, not the embedded one
            options=self.cfg.nats_options if self.cfg.nats_url is not None else None,
        )
        self._connected = True
        self.js = self.nc.jetstream(publish_async_max_pending=PUBLISH_ASYNC_MAX_PENDING)
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

    async def subscribe_control(self, cancels: MemoryObjectSendStream[CancelMsg]) -> None:
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
                cancels.send_nowait((bytes(msg.data), msg.reply or None))
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

    async def lease_watch(self, cancels: MemoryObjectSendStream[CancelMsg]) -> None:
        """End jobs whose lease ran out (until cancelled): the same message, on the same
        channel, as an ``orcd.cancel`` request with reason ``client_gone``."""

        async def end_job(job_id: str) -> None:
            await cancels.send((encode(CancelRequest(job_id=job_id, reason=CLIENT_GONE)), None))

        await watch(self.leases, end_job, lambda: self._connected)

    # ----------------------------------------------------------------- jobs

    async def job_loop(self, links: FrontendLinks) -> None:
        """Pull and serve jobs one at a time until shutdown is requested."""
        assert self.js is not None
        while True:  # NATS may be away right now: wait for it
            try:
                psub = await job_subscription(
                    self.js,
                    self.subjects,
                    self.cfg.model_ref,
                    ack_wait_s=self.cfg.ack_wait_s,
                    max_deliver=self.cfg.max_deliver,
                )
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                narrate("consumer_unavailable", f"{type(exc).__name__}: {exc}", level="WARNING")
                if self.shutdown.is_set():
                    return
                await anyio.sleep(1.0)
        narrate(
            "ready",
            f"serving {self.subjects.jobs(self.cfg.model_ref)}",
            jobs_subject=self.subjects.jobs(self.cfg.model_ref),
        )
        async with links.tickets, links.events:
            while not self.shutdown.is_set():
                try:
                    msgs = await psub.fetch(1, timeout=1.0)
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
                    if self.shutdown.is_set():  # fetched while shutdown began: hand it back
                        with contextlib.suppress(Exception):
                            await msg.nak()
                        continue
                    await self.handle(msg, links)
            with contextlib.suppress(Exception):
                await psub.unsubscribe()

    async def handle(self, msg: Msg, links: FrontendLinks) -> None:
        meta = msg.metadata
        attempt = int(meta.num_delivered or 1)
        seq = meta.sequence.stream
        try:
            job = decode_job(msg.data)
        except InvalidJob as exc:
            await self._reject(msg, exc, seq)
            return
        job_id = job.job_id
        if self.registry.take_pending(job_id):
            narrate("cancelled", "job cancelled before it started", job_id=job_id)
            err = Error(
                job_id=job_id,
                code=ErrorCode.CANCELLED,
                message="job cancelled before it started",
                retriable=False,
            )
            err = self.registry.with_reason(err)
            pub = EventPublisher(
                self._js(),
                self.subjects.events(job_id),
                f"{job_id}.{seq}.{attempt}",
                self._events_stream,
            )
            await pub.finish(encode(err))
            await self._ack(msg, job_id)
            self.registry.end(job_id)
            self.metrics.outcome(ErrorCode.CANCELLED.value)
            return
        active = self.registry.begin(job_id)
        if job.lease_s is not None:
            self.leases.hold(job_id, job.lease_s)
        self.state.active_job_id = job_id
        self.metrics.active.set(1)
        pub = EventPublisher(
            self._js(),
            self.subjects.events(job_id),
            f"{job_id}.{seq}.{attempt}",
            self._events_stream,
            epoch=lambda: self.reconnects,
        )
        abandon = False
        try:
            await links.tickets.send(Ticket(job=job, attempt=attempt, active=active))
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._keep_alive, msg)
                grace_at: float | None = None
                while True:
                    if self.shutdown.is_set() and grace_at is None:
                        grace_at = time.monotonic() + self.cfg.shutdown_grace_s
                    timeout = 1.0 if grace_at is None else max(0.05, grace_at - time.monotonic())
                    ev: Event | None = None
                    with anyio.move_on_after(timeout):
                        ev = await links.events.receive()
                    if ev is None:
                        if grace_at is not None and time.monotonic() >= grace_at and not abandon:
                            # shutdown grace is over: stop the job; another worker redoes it
                            narrate(
                                "shutdown_abandon",
                                "grace over: job left for redelivery",
                                level="WARNING",
                                job_id=job_id,
                            )
                            abandon = True
                            active.cancel.set()
                        continue
                    if isinstance(ev, End | Error):
                        if isinstance(ev, Error):
                            ev = self.registry.with_reason(ev)  # e.g. client_gone
                        if not abandon:
                            # terminal event: only after every earlier one is stored; the
                            # in-progress acks keep running meanwhile (an outage may last)
                            self._record_outcome(ev, job_id)  # before a client can see it
                            stored = await pub.finish(encode(ev))
                            self._after_terminal(job_id, stored, pub.republished)
                        break
                    if not abandon:
                        await pub.publish(encode(ev))
                tg.cancel_scope.cancel()
            if abandon:
                with contextlib.suppress(Exception):
                    await msg.nak()
            else:
                await self._ack(msg, job_id)
                self.state.jobs_completed += 1
        finally:
            self.leases.release(job_id)
            self.registry.end(job_id)
            self.state.active_job_id = None
            self.metrics.active.set(0)

    def _record_outcome(self, ev: End | Error, job_id: str) -> None:
        self.metrics.outcome("ok" if isinstance(ev, End) else ev.code.value)
        if isinstance(ev, Error):
            if ev.code is ErrorCode.CUDA_ERROR:
                # a CUDA error may have poisoned the context: report it so the orchestrator
                # can restart this worker
                self.state.set_unhealthy(f"CUDA error: {ev.message}")
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

    async def _keep_alive(self, msg: Msg) -> None:
        period = max(0.5, min(5.0, self.cfg.ack_wait_s / 3))
        while True:
            await anyio.sleep(period)
            with contextlib.suppress(Exception):
                await msg.in_progress()

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
