"""NATS connection and the JetStream objects of SPEC §3.

- `connect`: a nats-py connection that reconnects forever (an outage is waited out).
- `ensure_streams`: ORCD_JOBS (work queue over ``orcd.jobs.>``, messages of at most
  MAX_JOB_PAYLOAD_BYTES) and ORCD_EVENTS (limits
  retention over ``orcd.events.>``, configurable max age, 2-minute duplicate window) are
  created if missing; an existing stream is used as it is.
- `job_subscription`: the durable pull consumer ``orcd-<ref>`` shared by every worker of a
  model reference (explicit ack, ack wait, bounded redeliveries).
- `EventPublisher`: publishes one attempt's events in order through JetStream with a
  ``Nats-Msg-Id`` per event (``<job>.<attempt>.<seq>``); before the job is acked every event
  is confirmed stored, and any event whose store was not confirmed (an outage) is published
  again - the duplicate window drops the copies that did arrive, so nothing is lost.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from worker.nats.options import NatsConnectOptions, split_servers
from worker.protocol import (
    EVENTS_STREAM,
    JOBS_STREAM,
    MAX_JOB_PAYLOAD_BYTES,
    Subjects,
    consumer_name,
)

EVENTS_DUPLICATE_WINDOW_S = 120.0
PUBLISH_ASYNC_MAX_PENDING = 8192
STALL_CHECK_PENDING = PUBLISH_ASYNC_MAX_PENDING // 2


def stream_names(subjects: Subjects) -> tuple[str, str]:
    """(jobs stream, events stream); ORCD_JOBS / ORCD_EVENTS for the default prefix."""
    if subjects.prefix == "orcd":
        return JOBS_STREAM, EVENTS_STREAM
    base = "".join(c if c.isalnum() else "_" for c in subjects.prefix).upper()
    return f"{base}_JOBS", f"{base}_EVENTS"


async def connect(
    url: str,
    *,
    name: str,
    on_disconnect: Callable[[], Awaitable[None]] | None = None,
    on_reconnect: Callable[[], Awaitable[None]] | None = None,
    on_error: Callable[[Exception], Awaitable[None]] | None = None,
    connect_timeout_s: float = 30.0,
    options: NatsConnectOptions | None = None,
) -> NatsClient:
    """Connect, retrying the first connection for up to `connect_timeout_s`; once up, the
    client reconnects forever and buffers publishes (8 MiB) while the server is away.
    `url` may list several servers, comma-separated (a cluster's nodes: the client moves to
    another when one goes away); `options` carries credentials and TLS."""

    async def _disc() -> None:
        if on_disconnect is not None:
            await on_disconnect()

    async def _reco() -> None:
        if on_reconnect is not None:
            await on_reconnect()

    async def _err(exc: Exception) -> None:
        if on_error is not None:
            await on_error(exc)

    deadline = time.monotonic() + connect_timeout_s
    while True:
        try:
            return await nats.connect(
                servers=split_servers(url),
                name=name,
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.25,
                connect_timeout=2,
                ping_interval=5,
                max_outstanding_pings=3,
                pending_size=8 * 1024 * 1024,
                disconnected_cb=_disc,
                reconnected_cb=_reco,
                error_cb=_err,
                **(options.connect_kwargs() if options is not None else {}),
            )
        except (TimeoutError, nats.errors.NoServersError, OSError):
            if time.monotonic() >= deadline:
                raise
            await asyncio.sleep(0.25)


async def ensure_streams(
    js: JetStreamContext, subjects: Subjects, *, events_max_age_s: float, replicas: int = 1
) -> None:
    jobs_name, events_name = stream_names(subjects)
    await _ensure_stream(
        js,
        StreamConfig(
            name=jobs_name,
            subjects=[subjects.jobs_wildcard],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            num_replicas=replicas,
            duplicate_window=EVENTS_DUPLICATE_WINDOW_S,
            # a larger job is refused to its publisher at once (the worker refuses one that
            # reaches it through a stream created without this limit)
            max_msg_size=MAX_JOB_PAYLOAD_BYTES,
        ),
    )
    await _ensure_stream(
        js,
        StreamConfig(
            name=events_name,
            subjects=[subjects.events_wildcard],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            num_replicas=replicas,
            max_age=events_max_age_s,
            duplicate_window=EVENTS_DUPLICATE_WINDOW_S,
        ),
    )


async def _ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
    assert config.name is not None
    for _ in range(20):
        try:
            await js.stream_info(config.name)
            return
        except nats.js.errors.NotFoundError:
            pass
        try:
            await js.add_stream(config)
            return
        except nats.js.errors.BadRequestError:
            # another worker created it between our two calls
            await asyncio.sleep(0.05)
        except (nats.errors.TimeoutError, nats.js.errors.ServiceUnavailableError):
            await asyncio.sleep(0.25)
    await js.stream_info(config.name)


async def job_subscription(
    js: JetStreamContext,
    subjects: Subjects,
    model_ref: str,
    *,
    ack_wait_s: float,
    max_deliver: int,
) -> JetStreamContext.PullSubscription:
    jobs_name, _ = stream_names(subjects)
    durable = consumer_name(model_ref)
    config = ConsumerConfig(
        durable_name=durable,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=ack_wait_s,
        max_deliver=max_deliver,
        filter_subject=subjects.jobs(model_ref),
        max_ack_pending=-1,
    )
    for attempt in range(20):
        try:
            return await js.pull_subscribe(
                subjects.jobs(model_ref), durable=durable, stream=jobs_name, config=config
            )
        except nats.js.errors.BadRequestError:
            # consumer created concurrently by another worker: bind to it
            if attempt > 2:
                return await js.pull_subscribe_bind(durable=durable, stream=jobs_name)
            await asyncio.sleep(0.05)
    return await js.pull_subscribe_bind(durable=durable, stream=jobs_name)


class EventPublisher:
    """Confirmed publishing of one job attempt's events (see the module doc).

    Events go out pipelined (`publish`); `finish` publishes the terminal event only after
    every earlier event is confirmed stored (re-sending, with the same ``Nats-Msg-Id``, any
    whose store was not confirmed), and then confirms the terminal event itself. So whoever
    reads ORCD_EVENTS up to a terminal event has every event of that attempt; an event
    re-sent after an outage may sit later in the stream than its index says (readers order
    tokens by ``i``: worker.client does).
    """

    def __init__(
        self,
        js: JetStreamContext,
        subject: str,
        msg_id_prefix: str,
        stream: str,
        epoch: Callable[[], int] | None = None,
    ) -> None:
        self._epoch = epoch  # bumps on every reconnect: time to repair what the outage lost
        self._seen_epoch = epoch() if epoch is not None else 0
        self._js = js
        self._subject = subject
        self._prefix = msg_id_prefix
        self._stream = stream
        self._n = 0
        self._sent: list[tuple[str, bytes, asyncio.Future[Any] | None]] = []
        self.republished = 0  # events sent again (their store was not confirmed)

    def _next_id(self) -> str:
        msg_id = f"{self._prefix}.{self._n}"
        self._n += 1
        return msg_id

    async def publish(self, payload: bytes) -> None:
        if self._epoch is not None and self._epoch() != self._seen_epoch:
            # reconnected since the last event: store what the outage lost before going on,
            # so readers of the stream see the gap closed within seconds
            self._seen_epoch = self._epoch()
            await self.confirm()
        msg_id = self._next_id()
        fut: asyncio.Future[Any] | None
        try:
            # wait_stall makes nats-py wrap the semaphore in asyncio.wait_for (a task per
            # event, ~10x the cost of the publish): only pay it when the window is nearly
            # full (acks stalled by an outage), so a stall still fails after 5 s
            stall = 5.0 if self._js.publish_async_pending() >= STALL_CHECK_PENDING else None
            fut = await self._js.publish_async(
                self._subject, payload, wait_stall=stall, headers={"Nats-Msg-Id": msg_id}
            )
        except Exception:
            fut = None  # re-sent by `confirm`
        self._sent.append((msg_id, payload, fut))

    async def _publish_sync(self, msg_id: str, payload: bytes, deadline: float) -> bool:
        while True:
            try:
                await self._js.publish(
                    self._subject, payload, timeout=2.0, headers={"Nats-Msg-Id": msg_id}
                )
                return True
            except Exception:
                if time.monotonic() >= deadline:
                    return False
                await asyncio.sleep(0.25)

    async def confirm(self, deadline_s: float = 60.0) -> bool:
        """Wait until every event published so far is stored; re-send, in order, from the
        first one that is not confirmed. False if the deadline passes first."""
        deadline = time.monotonic() + deadline_s
        first_missing: int | None = None
        for k, (_, _, fut) in enumerate(self._sent):
            ok = False
            if fut is not None:
                try:
                    await asyncio.wait_for(
                        asyncio.shield(fut), max(0.1, min(5.0, deadline - time.monotonic()))
                    )
                    ok = fut.exception() is None
                except Exception:
                    ok = False
            if not ok:
                first_missing = k
                break
        if first_missing is None:
            self._sent.clear()
            return True
        for _, _, fut in self._sent[first_missing:]:
            if fut is not None and not fut.done():
                fut.cancel()  # releases nats-py's pending-publish slot
        for msg_id, payload, _ in self._sent[first_missing:]:
            self.republished += 1
            if not await self._publish_sync(msg_id, payload, deadline):
                return False
        self._sent.clear()
        return True

    async def finish(self, payload: bytes, deadline_s: float = 60.0) -> bool:
        """Publish the terminal event after every earlier one is stored, and confirm it."""
        deadline = time.monotonic() + deadline_s
        ok = await self.confirm(deadline_s)
        return await self._publish_sync(self._next_id(), payload, deadline) and ok
