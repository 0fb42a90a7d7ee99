"""Every message the actors send each other, in one place.

The actors share no mutable objects: they talk only through anyio memory object streams
carrying these (immutable) messages; the supervisor creates every stream.

    frontend ──NewJob──────────────► inference ──(engine inbox)──► engine thread
    cancellation ──CancelJob───────► inference                     (scheduler + backend)
    vram_monitor ──ResidencyCheck──► inference
    inference ──Outgoing───────────► frontend   (events, cancel replies, device status)
    frontend ──CancelPayload───────► cancellation
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from anyio.streams.memory import MemoryObjectSendStream

from worker.backends.base import BackendInfo
from worker.engine.scheduler import Request
from worker.protocol import Event, Job

# ---------------------------------------------------------------- into the inference actor


@dataclass(frozen=True, slots=True)
class NewJob:
    """A decoded, validated job pulled from JetStream (delivery `attempt`)."""

    job: Job
    attempt: int
    received: float = field(default_factory=time.perf_counter)


@dataclass(frozen=True, slots=True)
class CancelJob:
    """End job `job_id` (running or queued here, or when it arrives). The outcome goes back
    as a `Reply` to `reply_to` when set; `reason` is carried into the error message."""

    job_id: str
    reply_to: str | None = None
    reason: str = "job cancelled"
    code: str | None = None  # the request's reason (e.g. client_gone), on the error event
    requested: float = field(default_factory=time.perf_counter)


@dataclass(frozen=True, slots=True)
class ResidencyCheck:
    """Check, on the engine thread between two steps, that every weight and KV allocation is
    in device memory; the (ResidencyReport, BackendInfo) pair, or the exception, is sent to
    `reply` (a one-slot stream the caller waits on)."""

    reply: MemoryObjectSendStream[Any]


InferenceIn = NewJob | CancelJob | ResidencyCheck


@dataclass(frozen=True, slots=True)
class Admit:
    """Inference actor -> engine thread: a prepared job."""

    request: Request
    job: Job
    attempt: int


EngineIn = Admit | CancelJob | ResidencyCheck


# ---------------------------------------------------------------- out to the frontend


@dataclass(frozen=True, slots=True)
class JobEvents:
    """Protocol events of one or more jobs, in the order they must be published (each
    job's events in its own order); a job's terminal event is its last."""

    events: list[Event]


@dataclass(frozen=True, slots=True)
class Reply:
    """A request-reply answer for NATS (cancel outcomes)."""

    subject: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class DeviceStatus:
    """What health reports about the device and the engine (cached by the frontend)."""

    info: BackendInfo | None = None
    resident: bool | None = None
    unhealthy_reason: str | None = None
    running: int | None = None  # jobs in the running batch
    fatal: bool = False  # the device failed: drain and exit non-zero


Outgoing = JobEvents | Reply | DeviceStatus


# ---------------------------------------------------------------- into cancellation


@dataclass(frozen=True, slots=True)
class CancelPayload:
    """A raw ``orcd.cancel`` message (validated by the cancellation actor)."""

    data: bytes
    reply_to: str | None
