"""NATS connection and the JetStream objects of the worker's interface (docs/protocol.md).

- `connect`: a nats-py connection, given up after a timeout at first (`NatsUnavailable`),
  then reconnecting forever (an outage is waited out).
- `ensure_streams`: ORCD_JOBS (work queue over ``orcd.jobs.>``, messages of at most
  MAX_JOB_PAYLOAD_BYTES) and ORCD_EVENTS (limits
  retention over ``orcd.events.>``, configurable max age, 2-minute duplicate window) are
  created if missing; an existing stream is used as it is.
- `job_subscription`: the durable pull consumer ``orcd-<ref>`` shared by every worker of a
  model reference (explicit ack, ack wait, bounded redeliveries).
- `EventPublisher`: publishes one attempt's events in order with a ``Nats-Msg-Id`` per event
  (``<job>.<seq>.<attempt>.<n>``) as plain publishes the stream captures; before the terminal
  event (and the ack) every event is confirmed stored, and if an outage lost some they are
  published again - the duplicate window drops the copies that did arrive, so nothing is
  lost. While connected, a token event is framed here (one ``HPUB`` line) and appended to
  nats-py's outgoing buffer, the one its own publish fills and its flusher writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
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


class NatsUnavailable(ConnectionError):
    """NATS could not be reached within the connect timeout (the message says why)."""


def describe_connect_error(exc: BaseException | None) -> str:
    """A short reason for a failed connection attempt, for one line of output."""
    if exc is None:
        return "no answer"
    if isinstance(exc, socket.gaierror):
        return "unknown host"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, TimeoutError):
        return "timed out"
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _ReadLoopRecords(logging.Filter):
    """nats-py logs an exception that ends its read loop through the standard logging module,
    which (unconfigured) prints it to stderr with a traceback. The one a PONG raises when the
    ping waiting for it was cancelled (Ctrl-C during a flush) is InvalidStateError, harmless
    at shutdown: dropped. Any other is kept as one line, without the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, asyncio.InvalidStateError):
            return False
        if exc is not None:
            record.msg = f"{record.getMessage()}: {type(exc).__name__}: {exc}"
            record.args = ()
            record.exc_info = None
        return True


_READ_LOOP_FILTER = _ReadLoopRecords()


async def connect(
    url: str,
    *,
    name: str,
    on_disconnect: Callable[[], Awaitable[None]] | None = None,
    on_reconnect: Callable[[], Awaitable[None]] | None = None,
    on_error: Callable[[Exception], Awaitable[None]] | None = None,
    connect_timeout_s: float = 30.0,
    on_retry: Callable[[int, str, float], None] | None = None,
    options: NatsConnectOptions | None = None,
    **nats_options: Any,
) -> NatsClient:
    """Connect within `connect_timeout_s` or raise `NatsUnavailable`; once connected, the
    client reconnects forever and buffers publishes (8 MiB) while the server is away.

    The first connection is retried with a growing pause (0.5 s doubling to 5 s, never past
    the deadline); `on_retry(attempt, reason, pause_s)` is told of each failed attempt.
    nats-py itself would retry a first connection forever once reconnects are unlimited, so
    each attempt allows it one retry and the unlimited reconnects are switched on only after
    the connection is up (its options are read at every reconnect).

    `url` may list several servers, comma-separated (a cluster's nodes: the client moves to
    another when one goes away); `options` carries credentials and TLS (worker/nats/
    options.py); `nats_options` go to nats-py's connect as they are."""
    connected = False
    last_error: list[BaseException | None] = [None]
    logging.getLogger("nats.aio.client").addFilter(_READ_LOOP_FILTER)  # once: a set

    async def _disc() -> None:
        if connected and on_disconnect is not None:
            await on_disconnect()

    async def _reco() -> None:
        if on_reconnect is not None:
            await on_reconnect()

    async def _err(exc: Exception) -> None:
        if not connected:
            last_error[0] = exc  # reported once per attempt, by the loop below
        elif on_error is not None:
            await on_error(exc)

    loop = asyncio.get_running_loop()
    deadline = loop.time() + connect_timeout_s
    pause = 0.5
    attempt = 0
    reason = ""
    while True:
        attempt += 1
        last_error[0] = None
        nc = NatsClient()
        left = deadline - loop.time()
        # nats-py annotates these as int; fractions of a second work and are what we want
        kwargs: dict[str, Any] = {
            "servers": split_servers(url),
            "name": name,
            "allow_reconnect": True,
            "max_reconnect_attempts": 1,
            "reconnect_time_wait": 0.25,
            "connect_timeout": max(0.1, min(2.0, left)),
            "ping_interval": 5,
            "max_outstanding_pings": 3,
            "pending_size": 8 * 1024 * 1024,
            "disconnected_cb": _disc,
            "reconnected_cb": _reco,
            "error_cb": _err,
            **(options.connect_kwargs() if options is not None else {}),
            **nats_options,
        }
        try:
            await asyncio.wait_for(nc.connect(**kwargs), max(0.1, left))
        except (TimeoutError, OSError, nats.errors.Error) as exc:
            with contextlib.suppress(Exception):
                await nc.close()
            _reraise_swallowed_cancel()
            why = describe_connect_error(
                last_error[0] if isinstance(exc, nats.errors.NoServersError) else exc
            )
            # an attempt cut short by the deadline says less than the one before it
            reason = reason if why == "timed out" and reason else why
            left = deadline - loop.time()
            if left <= 0.05:
                raise NatsUnavailable(
                    f"cannot reach NATS at {url} within {connect_timeout_s:g} s ({reason})"
                ) from None
            wait = min(pause, left)
            if on_retry is not None:
                on_retry(attempt, reason, wait)
            await asyncio.sleep(wait)
            pause = min(pause * 2, 5.0)
            continue
        nc.options["max_reconnect_attempts"] = -1  # from now on an outage is waited out
        connected = True
        return nc


def _reraise_swallowed_cancel() -> None:
    """Python 3.11's asyncio.wait_for (used inside nats-py's connect and close) can drop a
    cancellation that lands as a connection attempt fails, so a Ctrl-C during the retry loop
    would be waited out to the deadline: a pending cancel request is honoured here instead."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


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


JS_API = "$JS.API"  # the JetStream API prefix of nc.jetstream() (no domain)


class _StreamState(msgspec.Struct):
    subjects: dict[str, int] | None = None


class _StreamInfo(msgspec.Struct):
    """What EventPublisher reads of a stream-info answer (or its error)."""

    state: _StreamState = msgspec.field(default_factory=_StreamState)
    error: dict[str, Any] | None = None


_STREAM_INFO = msgspec.json.Decoder(_StreamInfo)

_NC_BUFFER = ("_pending", "_pending_data_size", "_max_pending_size", "_flush_queue")


def _hpub_head(nc: NatsClient, subject: str) -> bytes | None:
    """``HPUB <subject> `` for framing events into `nc`'s outgoing buffer, or None where that
    buffer is not as expected (another nats-py) or the subject is not one plain token
    string: then events go through nats-py's publish."""
    if not all(hasattr(nc, a) for a in _NC_BUFFER) or not callable(
        getattr(nc, "_flush_pending", None)
    ):
        return None
    if not subject or any(c.isspace() for c in subject) or not subject.isascii():
        return None
    return f"HPUB {subject} ".encode()


class EventPublisher:
    """One job attempt's events, in order, captured by ORCD_EVENTS (see the module doc).

    Events go out as plain publishes carrying a ``Nats-Msg-Id`` (``<prefix>.<n>``): no round
    trip per event, so a worker streaming tens of thousands of tokens a second spends a few
    microseconds on each. The stream stores them in the order they were sent. `finish` makes
    sure that before the terminal event goes out every earlier one is stored: it waits until
    the stream holds them all (its per-subject count, measured against the count before the
    first event of the attempt); whatever an outage lost is published again, each confirmed,
    and the duplicate window drops copies that did arrive. Then the terminal event itself is
    published and confirmed. So whoever reads ORCD_EVENTS up to a terminal event has every
    event of that attempt (an event re-sent after an outage may sit later in the stream than
    its index says; readers order tokens by ``i``, as worker.client does).
    """

    def __init__(
        self,
        nc: NatsClient,
        js: JetStreamContext,
        subject: str,
        msg_id_prefix: str,
        stream: str,
    ) -> None:
        self._nc = nc
        self._js = js
        self._subject = subject
        self._prefix = msg_id_prefix
        self._stream = stream
        self._sent: list[tuple[str, bytes]] = []
        self._base: int | None = None
        self.republished = 0  # events sent again (their store was not confirmed)
        self._hpub = _hpub_head(nc, subject)
        self._info_request = msgspec.json.encode({"subjects_filter": subject})

    async def _count(self) -> int:
        """Events the stream holds on this subject: the stream-info API asked directly and
        only that count decoded (nats-py's stream_info builds the whole StreamInfo: ~220 us
        of CPU against ~165 for the request alone, twice a job)."""
        msg = await self._nc.request(
            f"{JS_API}.STREAM.INFO.{self._stream}", self._info_request, timeout=5.0
        )
        info = _STREAM_INFO.decode(msg.data)
        if info.error is not None:
            raise nats.js.errors.APIError(description=str(info.error))
        return int((info.state.subjects or {}).get(self._subject, 0))

    async def start(self, deadline_s: float = 10.0) -> None:
        """Note how many events the subject holds before this attempt publishes any."""
        deadline = time.monotonic() + deadline_s
        while True:
            try:
                self._base = await self._count()
                return
            except Exception:
                if time.monotonic() >= deadline:
                    self._base = None  # unknown: finish() re-sends everything, confirmed
                    return
                await asyncio.sleep(0.25)

    async def publish(self, payload: bytes) -> None:
        msg_id = f"{self._prefix}.{len(self._sent)}"
        self._sent.append((msg_id, payload))
        nc = self._nc
        if self._hpub is None or not nc.is_connected or nc.is_draining_pubs:
            # nats-py's publish: it buffers while reconnecting (and refuses while draining);
            # whatever an outage loses, finish() re-sends
            with contextlib.suppress(Exception):
                await nc.publish(self._subject, payload, headers={"Nats-Msg-Id": msg_id})
            return
        # What nats-py's publish would append, framed here: its header encoding and checks
        # cost ~3 us of the ~4 an event (20k events/s at 64 jobs). Subject and id are
        # plain tokens (checked once / by the job id's pattern).
        hdr = b"NATS/1.0\r\nNats-Msg-Id: %s\r\n\r\n" % msg_id.encode()
        cmd = b"%s%d %d\r\n%s%s\r\n" % (self._hpub, len(hdr), len(hdr) + len(payload), hdr, payload)
        nc._pending.append(cmd)
        nc._pending_data_size += len(cmd)
        try:
            if nc._pending_data_size > nc._max_pending_size:
                await nc._flush_pending(force_flush=True)
            elif nc._flush_queue is not None and nc._flush_queue.empty():
                await nc._flush_pending()  # wake the flusher (it writes all pending at once)
        except Exception:  # an outage meanwhile: finish() re-sends what it lost
            pass

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

    async def confirm(self, deadline_s: float = 60.0, settle_s: float = 2.0) -> bool:
        """Wait until every event published so far is stored (the stream stores plain
        publishes a little after they are sent: give it `settle_s`); then re-send, confirmed
        and in order, all of them if some are still missing. False if the deadline passes."""
        deadline = time.monotonic() + deadline_s
        if not self._sent:
            return True
        if self._base is not None:
            # the count request travels behind the events on this connection; the stream
            # stores them a little later, so the count is asked again until it settles
            settle = time.monotonic() + settle_s
            delay = 0.002
            while True:
                try:
                    if await self._count() >= self._base + len(self._sent):
                        return True
                except Exception:
                    pass
                if time.monotonic() >= min(settle, deadline):
                    break
                await asyncio.sleep(delay)
                delay = min(0.1, delay * 2)
        for msg_id, payload in self._sent:
            self.republished += 1
            if not await self._publish_sync(msg_id, payload, deadline):
                return False
        return True

    async def finish(self, payload: bytes, deadline_s: float = 60.0) -> bool:
        """Publish the terminal event after every earlier one is stored, and confirm it."""
        deadline = time.monotonic() + deadline_s
        ok = await self.confirm(deadline_s)
        msg_id = f"{self._prefix}.{len(self._sent)}"
        return await self._publish_sync(msg_id, payload, deadline) and ok
