"""The NATS interface (docs/protocol.md): msgspec structs for every message, subject names.

Every payload is JSON. Decoding is strict: unknown fields are rejected, types are not coerced
(``true`` is not a number, ``"1"`` is not an int), and every range of docs/protocol.md is
checked with a message naming the field. `decode_job` turns any failure into a `WorkerError`
with code ``INVALID_REQUEST`` and, where the raw payload still has a readable job_id, says
which job it was so the worker can publish the `error` event on that job's subject.

Events carry their kind in the ``event`` field (a msgspec tagged union), so a client decodes
any of them with `decode_event`.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, Final, Literal

import msgspec

from worker.errors import ErrorCode, WorkerError

# ----------------------------------------------------------------------------- limits
JOB_ID_PATTERN: Final = r"^[A-Za-z0-9_-]{1,128}$"
MAX_JOB_ID_LEN: Final = 128
MAX_PROMPT_CHARS: Final = 32768
MAX_MESSAGES: Final = 1024
MAX_TOKENS_LIMIT: Final = 2048
MAX_STOP_STRINGS: Final = 4
MAX_STOP_TOKENS: Final = 32  # per stop string; checked with the model's tokenizer
UINT64_MAX: Final = (1 << 64) - 1

_JOB_ID_RE: Final = re.compile(JOB_ID_PATTERN)

JobId = Annotated[
    str, msgspec.Meta(min_length=1, max_length=MAX_JOB_ID_LEN, pattern=JOB_ID_PATTERN)
]


def is_valid_job_id(value: object) -> bool:
    return isinstance(value, str) and _JOB_ID_RE.match(value) is not None


# ----------------------------------------------------------------------------- subjects


class Subjects:
    """Subject names under one prefix (``orcd`` by default, ``--subject-prefix`` changes it)."""

    def __init__(self, prefix: str = "orcd") -> None:
        if not prefix or any(c in prefix for c in " *>\t\r\n") or prefix.endswith("."):
            raise ValueError(f"invalid subject prefix {prefix!r}")
        self.prefix = prefix
        self.jobs_wildcard = f"{prefix}.jobs.>"
        self.events_wildcard = f"{prefix}.events.>"
        self.heartbeat_wildcard = f"{prefix}.heartbeat.*"
        self.cancel = f"{prefix}.cancel"
        self.health_all = f"{prefix}.health"
        # Error events of jobs whose job_id cannot be read (no per-job subject exists).
        self.rejected = f"{prefix}.rejected"

    def jobs(self, model_ref: str) -> str:
        return f"{self.prefix}.jobs.{model_ref}"

    def events(self, job_id: str) -> str:
        return f"{self.prefix}.events.{job_id}"

    def health(self, worker_id: str) -> str:
        return f"{self.prefix}.health.{worker_id}"

    def heartbeat(self, worker_id: str) -> str:
        return f"{self.prefix}.heartbeat.{worker_id}"

    def shutdown(self, worker_id: str) -> str:
        return f"{self.prefix}.control.{worker_id}.shutdown"

    def metrics(self, worker_id: str) -> str:
        return f"{self.prefix}.metrics.{worker_id}"


JOBS_STREAM: Final = "ORCD_JOBS"
EVENTS_STREAM: Final = "ORCD_EVENTS"


def consumer_name(model_ref: str) -> str:
    """The durable pull consumer shared by every worker serving `model_ref`."""
    return f"orcd-{model_ref}"


_REF_BAD = re.compile(r"[^A-Za-z0-9_-]+")


def model_ref_from_name(name: str) -> str:
    """A subject-safe model reference: `[A-Za-z0-9_-]`, lower case, at most 64 characters.

    ``qwen2.5-coder-0.5b-instruct-q4_k_m.gguf`` -> ``qwen2-5-coder-0-5b-instruct-q4_k_m``.
    """
    stem = name[:-5] if name.lower().endswith(".gguf") else name
    ref = _REF_BAD.sub("-", stem).strip("-").lower()[:64].strip("-")
    return ref or "model"


def validate_model_ref(ref: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", ref):
        raise ValueError(f"model ref {ref!r} must be 1-64 characters of [A-Za-z0-9_-]")
    return ref


# ----------------------------------------------------------------------------- job


class ChatMessage(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    role: Literal["system", "user", "assistant", "tool"]
    content: str


class Job(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A generation job (docs/protocol.md). Exactly one of `prompt` and `messages`."""

    job_id: JobId
    prompt: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_PROMPT_CHARS)] | None = None
    messages: (
        Annotated[list[ChatMessage], msgspec.Meta(min_length=1, max_length=MAX_MESSAGES)] | None
    ) = None
    max_tokens: Annotated[int, msgspec.Meta(ge=1, le=MAX_TOKENS_LIMIT)] = MAX_TOKENS_LIMIT
    temperature: Annotated[float, msgspec.Meta(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, msgspec.Meta(ge=0)] = 0
    min_p: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 0.0
    repetition_penalty: Annotated[float, msgspec.Meta(ge=0.0, le=2.0)] = 1.0
    stop: Annotated[
        list[Annotated[str, msgspec.Meta(min_length=1)]],
        msgspec.Meta(max_length=MAX_STOP_STRINGS),
    ] = msgspec.field(default_factory=list)
    seed: Annotated[int, msgspec.Meta(ge=0)] | None = None

    def __post_init__(self) -> None:
        # Raised ValueErrors become msgspec.ValidationError during decoding.
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("exactly one of `prompt` and `messages` must be given")
        if self.messages is not None:
            total = sum(len(m.content) for m in self.messages)
            if total > MAX_PROMPT_CHARS:
                raise ValueError(
                    f"`messages` hold {total} characters of content, "
                    f"at most {MAX_PROMPT_CHARS} allowed"
                )
        if self.seed is not None and self.seed > UINT64_MAX:
            raise ValueError("`seed` must be an unsigned 64-bit integer (0 to 2^64-1)")
        if self.top_k > (1 << 31):
            raise ValueError("`top_k` must be at most 2^31")


_job_decoder: Final = msgspec.json.Decoder(Job)
_any_decoder: Final = msgspec.json.Decoder()


class InvalidJob(WorkerError):
    """The payload is not a valid job. `job_id` is set when the raw payload has a valid one."""

    def __init__(self, message: str, job_id: str | None, raw_job_id: str | None) -> None:
        super().__init__(ErrorCode.INVALID_REQUEST, message, retriable=False)
        self.job_id = job_id
        self.raw_job_id = raw_job_id


def decode_job(data: bytes) -> Job:
    """Decode and validate a job payload; raises `InvalidJob` with a clear message."""
    try:
        return _job_decoder.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        job_id, raw = _salvage_job_id(data)
        raise InvalidJob(f"invalid job: {exc}", job_id, raw) from None


def _salvage_job_id(data: bytes) -> tuple[str | None, str | None]:
    try:
        obj = _any_decoder.decode(data)
    except (msgspec.DecodeError, ValueError):
        return None, None
    if not isinstance(obj, dict):
        return None, None
    raw = obj.get("job_id")
    if not isinstance(raw, str):
        return None, None
    return (raw if is_valid_job_id(raw) else None), raw[:200]


# ----------------------------------------------------------------------------- events


def rfc3339_now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


class Started(msgspec.Struct, forbid_unknown_fields=True, tag_field="event", tag="started"):
    job_id: str
    model: str
    started_at: str
    seed: int
    prompt_tokens: int
    attempt: int
    worker_id: str = ""


class Token(msgspec.Struct, forbid_unknown_fields=True, tag_field="event", tag="token"):
    job_id: str
    i: int
    t: str
    id: int


class Metrics(msgspec.Struct, forbid_unknown_fields=True, tag_field="event", tag="metrics"):
    job_id: str
    tokens: int
    tokens_per_s: float


StopReason = Literal["eos", "max_tokens", "stop"]


class End(msgspec.Struct, forbid_unknown_fields=True, tag_field="event", tag="end"):
    job_id: str
    tokens_out: int
    stop_reason: StopReason
    prompt_tokens: int
    ttft_ms: float
    decode_time_ms: float
    tokens_per_s: float


class Error(msgspec.Struct, forbid_unknown_fields=True, tag_field="event", tag="error"):
    job_id: str
    code: ErrorCode
    message: str
    retriable: bool


Event = Started | Token | Metrics | End | Error
TerminalEvent = End | Error

_event_decoder: Final = msgspec.json.Decoder(Event)
_encoder: Final = msgspec.json.Encoder()


def decode_event(data: bytes) -> Event:
    return _event_decoder.decode(data)


def encode(obj: Any) -> bytes:
    return _encoder.encode(obj)


def error_event(job_id: str, exc: WorkerError) -> Error:
    return Error(job_id=job_id, code=exc.code, message=exc.message, retriable=exc.retriable)


# ----------------------------------------------------------------------------- cancel

CancelStatus = Literal[
    # the job runs on this worker: it stops within one decode step and ends CANCELLED
    "cancelling",
    # a cancel for the running job was already taken
    "already_cancelling",
    # not running here: remembered; if this worker reaches the job it ends CANCELLED
    "recorded",
    # a cancel for this job was already remembered
    "already_recorded",
    # this worker already finished the job; nothing to cancel
    "already_finished",
]


class CancelRequest(msgspec.Struct, forbid_unknown_fields=True):
    job_id: JobId


class CancelReply(msgspec.Struct, forbid_unknown_fields=True):
    job_id: str
    status: CancelStatus
    worker_id: str
    detail: str = ""


_cancel_decoder: Final = msgspec.json.Decoder(CancelRequest)
_cancel_reply_decoder: Final = msgspec.json.Decoder(CancelReply)


def decode_cancel(data: bytes) -> CancelRequest:
    try:
        return _cancel_decoder.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise WorkerError(ErrorCode.INVALID_REQUEST, f"invalid cancel request: {exc}") from None


def decode_cancel_reply(data: bytes) -> CancelReply:
    return _cancel_reply_decoder.decode(data)


class ErrorReply(msgspec.Struct, forbid_unknown_fields=True):
    """Reply to a request that could not be served (bad cancel payload, etc.)."""

    error: ErrorCode
    message: str


# ----------------------------------------------------------------------------- health

HealthStatus = Literal["starting", "healthy", "unhealthy", "draining"]


class Health(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    status: HealthStatus
    worker_id: str
    model: str
    model_ref: str
    device: str
    gpu_device: int | None
    resident: bool
    quant_kind: str
    vram_bytes_used: int
    tokenizer_kind: str
    vocab_size: int
    context_length: int
    uptime_seconds: float
    sm: str | None
    cuda_runtime_version: str | None
    active_job_id: str | None  # the longest-running job of the batch, if any
    jobs_completed: int
    version: str
    running_jobs: int = 0  # jobs this worker holds now (running or waiting for KV blocks)
    max_batch: int = 0  # most jobs it runs together
    # source commit of the worker's build (worker.buildinfo); "" from workers that predate it
    commit: str = ""


_health_decoder: Final = msgspec.json.Decoder(Health)


def decode_health(data: bytes) -> Health:
    return _health_decoder.decode(data)


class ShutdownReply(msgspec.Struct, forbid_unknown_fields=True):
    worker_id: str
    status: Literal["draining"]
    active_job_id: str | None
