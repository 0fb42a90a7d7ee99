"""Cancellation actor (SPEC §3 Cancel).

The frontend hands every ``orcd.cancel`` message to this actor over a channel. The actor
owns the `CancelRegistry`:

- the running job: its `threading.Event` is set; the engine checks it every decode step, so
  the job stops within one step and ends with ``CANCELLED``;
- any other job: its id is remembered in a bounded TTL set; if this worker reaches that job
  it ends ``CANCELLED`` without running;
- a job this worker already finished: nothing to do, and the reply says so.

Repeated cancels are idempotent and say so (``already_cancelling`` / ``already_recorded``).

A cancel may carry a reason (``client_gone`` when a job's lease ran out: actors/leases.py
sends its cancels down the same channel); the registry keeps the first one per job and the
frontend puts it on the job's CANCELLED event (`with_reason`).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import msgspec
from anyio.streams.memory import MemoryObjectReceiveStream

from worker.errors import ErrorCode, WorkerError
from worker.narration import narrate
from worker.protocol import (
    CLIENT_GONE,
    CancelReply,
    CancelStatus,
    Error,
    ErrorReply,
    decode_cancel,
    encode,
)

_REASON_TEXT = {CLIENT_GONE: "its client stopped renewing the job's lease"}


class TtlSet:
    """Job ids with an expiry; at most `max_items` (oldest dropped first)."""

    def __init__(self, ttl_s: float, max_items: int) -> None:
        self.ttl_s = ttl_s
        self.max_items = max_items
        self._items: OrderedDict[str, float] = OrderedDict()

    def _expire(self, now: float) -> None:
        while self._items:
            _key, expires = next(iter(self._items.items()))
            if expires > now and len(self._items) <= self.max_items:
                break
            self._items.popitem(last=False)

    def add(self, key: str, now: float | None = None) -> bool:
        """Add `key`; False if it was already present (and not expired)."""
        now = time.monotonic() if now is None else now
        self._expire(now)
        present = key in self._items
        self._items[key] = now + self.ttl_s
        self._items.move_to_end(key)
        self._expire(now)
        return not present

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        expires = self._items.get(key)
        return expires is not None and expires > time.monotonic()

    def discard(self, key: str) -> None:
        self._items.pop(key, None)

    def __len__(self) -> int:
        return len(self._items)


@dataclass
class ActiveJob:
    job_id: str
    cancel: threading.Event
    cancel_requested_at: float | None = None
    tokens_after_cancel: int = 0  # token events emitted once the flag was set


class CancelRegistry:
    def __init__(self, ttl_s: float = 3600.0, max_items: int = 10000) -> None:
        self.pending = TtlSet(ttl_s, max_items)  # cancelled before this worker reached them
        self.finished = TtlSet(ttl_s, max_items)  # finished here recently
        self.active: ActiveJob | None = None
        self._reasons: OrderedDict[str, str] = OrderedDict()  # job_id -> first reason given
        self._max_reasons = max_items

    def reason(self, job_id: str) -> str | None:
        return self._reasons.get(job_id)

    def _note_reason(self, job_id: str, reason: str | None) -> None:
        if reason is None or job_id in self._reasons:
            return
        self._reasons[job_id] = reason
        while len(self._reasons) > self._max_reasons:
            self._reasons.popitem(last=False)

    def begin(self, job_id: str) -> ActiveJob:
        job = ActiveJob(job_id, threading.Event())
        if job_id in self.pending:
            # cancel arrived while the job was being set up
            job.cancel.set()
            job.cancel_requested_at = time.perf_counter()
        self.active = job
        return job

    def end(self, job_id: str) -> None:
        if self.active is not None and self.active.job_id == job_id:
            self.active = None
        self.pending.discard(job_id)
        self.finished.add(job_id)
        self._reasons.pop(job_id, None)

    def take_pending(self, job_id: str) -> bool:
        """True if `job_id` was cancelled before it was reached (it must end CANCELLED)."""
        return job_id in self.pending

    def cancel(self, job_id: str, reason: str | None = None) -> CancelStatus:
        active = self.active
        if active is not None and active.job_id == job_id:
            if active.cancel.is_set():
                return "already_cancelling"
            self._note_reason(job_id, reason)
            active.cancel_requested_at = time.perf_counter()
            active.cancel.set()
            return "cancelling"
        if job_id in self.finished:
            return "already_finished"
        if self.pending.add(job_id):
            self._note_reason(job_id, reason)
            return "recorded"
        return "already_recorded"

    def with_reason(self, event: Error) -> Error:
        """`event` with the job's cancel reason on it, if it is a CANCELLED error of a job
        cancelled with one (``reason`` field, and said in the message)."""
        reason = self._reasons.get(event.job_id)
        if event.code is not ErrorCode.CANCELLED or reason is None or event.reason is not None:
            return event
        text = _REASON_TEXT.get(reason, reason)
        return msgspec.structs.replace(
            event, reason=reason, message=f"{event.message} ({reason}: {text})"
        )


CancelMsg = tuple[bytes, str | None]  # (payload, reply subject)


async def cancellation_actor(
    inbox: MemoryObjectReceiveStream[CancelMsg],
    registry: CancelRegistry,
    worker_id: str,
    reply: Callable[[str, bytes], Awaitable[None]],
) -> None:
    async with inbox:
        async for payload, reply_to in inbox:
            try:
                req = decode_cancel(payload)
            except WorkerError as exc:
                narrate("cancel_invalid", exc.message, level="WARNING")
                if reply_to:
                    await reply(reply_to, encode(ErrorReply(error=exc.code, message=exc.message)))
                continue
            status = registry.cancel(req.job_id, req.reason)
            narrate(
                "cancel",
                f"cancel request: {status}",
                job_id=req.job_id,
                status=status,
                reason=req.reason,
            )
            if reply_to:
                try:
                    await reply(
                        reply_to,
                        encode(CancelReply(job_id=req.job_id, status=status, worker_id=worker_id)),
                    )
                except (msgspec.EncodeError, OSError) as exc:  # pragma: no cover
                    narrate("cancel_reply_failed", str(exc), level="WARNING")
