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

import json
import re
from datetime import UTC, datetime
from typing import Annotated, Any, Final, Literal

import msgspec

from worker.errors import ErrorCode, WorkerError

# ----------------------------------------------------------------------------- limits
# \A...\Z, not ^...$: "$" also matches before a final newline, and "id\n" is no subject name
JOB_ID_PATTERN: Final = r"\A[A-Za-z0-9_-]{1,128}\Z"
MAX_JOB_ID_LEN: Final = 128
MAX_PROMPT_CHARS: Final = 32768
MAX_MESSAGES: Final = 1024
MAX_TOKENS_LIMIT: Final = 2048
MAX_STOP_STRINGS: Final = 4
MAX_STOP_TOKENS: Final = 32  # per stop string; checked with the model's tokenizer
UINT64_MAX: Final = (1 << 64) - 1
# A valid job is at most ~0.4 MiB of JSON (32768 characters of prompt or message content,
# each at most 12 bytes escaped, plus the other fields); anything larger is refused unread.
MAX_JOB_PAYLOAD_BYTES: Final = 512 * 1024
# A job's lease (`lease_s`): the worker ends the job CANCELLED (reason "client_gone") when no
# keepalive came on orcd.keepalive.<job_id> for that long.
MIN_LEASE_S: Final = 1.0
MAX_LEASE_S: Final = 3600.0
CLIENT_GONE: Final = "client_gone"

_JOB_ID_RE: Final = re.compile(JOB_ID_PATTERN)

JobId = Annotated[
    str, msgspec.Meta(min_length=1, max_length=MAX_JOB_ID_LEN, pattern=JOB_ID_PATTERN)
]


def is_valid_job_id(value: object) -> bool:
    return isinstance(value, str) and _JOB_ID_RE.fullmatch(value) is not None


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
        self.keepalive_wildcard = f"{prefix}.keepalive.*"

    def jobs(self, model_ref: str) -> str:
        return f"{self.prefix}.jobs.{model_ref}"

    def events(self, job_id: str) -> str:
        return f"{self.prefix}.events.{job_id}"

    def health(self, worker_id: str) -> str:
        return f"{self.prefix}.health.{worker_id}"

    def keepalive(self, job_id: str) -> str:
        """Where a job's client renews the job's lease (an empty message will do)."""
        return f"{self.prefix}.keepalive.{job_id}"

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


class Job(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    """A generation job (docs/protocol.md). Exactly one of `prompt` and `messages`.

    `lease_s` (optional, 1-3600): the client renews the job on ``orcd.keepalive.<job_id>``
    at least that often while it reads the events; a worker holding the job ends it
    ``CANCELLED`` with reason ``client_gone`` within a second of the lease running out. A job
    without it runs to its end whoever reads it. Fields at their default are not encoded, so
    a job without a lease is the same bytes as before leases existed."""

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
    lease_s: Annotated[float, msgspec.Meta(ge=MIN_LEASE_S, le=MAX_LEASE_S)] | None = None

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
    if len(data) > MAX_JOB_PAYLOAD_BYTES:
        # not decoded: only the first MAX_JOB_PAYLOAD_BYTES are scanned for the job_id
        job_id, raw = _scan_job_id(memoryview(data)[:MAX_JOB_PAYLOAD_BYTES])
        raise InvalidJob(
            f"invalid job: the payload is {len(data)} bytes, at most "
            f"{MAX_JOB_PAYLOAD_BYTES} allowed",
            job_id,
            raw,
        )
    try:
        return _job_decoder.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError) as exc:
        job_id, raw = _salvage_job_id(data)
        raise InvalidJob(f"invalid job: {exc}", job_id, raw) from None


def _salvage_job_id(data: bytes) -> tuple[str | None, str | None]:
    """(valid job_id or None, the raw job_id text for the log, cut to 200 characters).
    Never raises: it runs on payloads that already failed.

    A payload that is JSON is read exactly (msgspec: the last of duplicate keys wins). One
    that is not (bad UTF-8, lone surrogates, NaN, truncated, trailing bytes...) is scanned
    leniently for the top-level ``"job_id"`` member: so a job whose client can be told still
    gets its INVALID_REQUEST event on its own subject."""
    try:
        obj = _any_decoder.decode(data)
    except (msgspec.DecodeError, ValueError, RecursionError):
        # RecursionError: msgspec's generic decoder gives up on very deep nesting
        return _scan_job_id(memoryview(data)[:MAX_JOB_PAYLOAD_BYTES])
    if not isinstance(obj, dict):
        return None, None
    raw = obj.get("job_id")
    if not isinstance(raw, str):
        return None, None
    return (raw if is_valid_job_id(raw) else None), raw[:200]


# Tokens of the lenient scan: a JSON string (any bytes inside; an escape takes the next byte),
# one structural byte, a run of anything else (numbers, literals, garbage), or whitespace.
_STR: Final = rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"'
_SCAN_TOKEN: Final = re.compile(_STR + rb'|[{}\[\]:,]|[^\s{}\[\]:,"]++|\s++', re.DOTALL)
# Inside a nested value: skip strings and everything but brackets in one match.
_SCAN_NESTED: Final = re.compile(rb"(?:" + _STR + rb'|[^"{}\[\]]++)*+', re.DOTALL)
# A whole simple member (string key, string or scalar value, then a comma) in one match: the
# common case, so a payload of many members costs one match each.
_SCAN_MEMBER: Final = re.compile(
    rb"\s*+(" + _STR + rb")\s*+:\s*+(" + _STR + rb'|[^\s{}\[\]:,"]++)\s*+,', re.DOTALL
)
_BRACKETS: Final = re.compile(rb"([\[{]++)|[\]}]++")
_JOB_ID_KEY: Final = b'"job_id"'
# Longest token worth reading as a job_id (or its key): 128 characters, each at most a
# 6-byte escape, and the quotes; a longer one is no valid job_id and is not copied whole.
_MAX_ID_TOKEN: Final = 6 * MAX_JOB_ID_LEN + 2
_SPACE: Final = frozenset(b" \t\r\n\f\v")
_LBRACE: Final = ord("{")
_QUOTE: Final = ord('"')
_COLON: Final = ord(":")
_COMMA: Final = ord(",")
_OPENERS: Final = frozenset(b"{[")


def _scan_job_id(data: bytes | memoryview) -> tuple[str | None, str | None]:
    """The top-level ``"job_id"`` member of a JSON object that may be malformed elsewhere
    (before, inside or after other members). The scan is linear, copies no long token,
    keeps nothing that grows with nesting, and stops where the object's structure can no
    longer be followed (an unterminated string, a missing colon...): the members read up to
    there count. The last ``job_id`` member read wins, as in a decode."""
    m = _SCAN_TOKEN.match(data)
    if m is not None and data[m.start()] in _SPACE:
        m = _SCAN_TOKEN.match(data, m.end())
    if m is None or data[m.start()] != _LBRACE:
        return None, None
    pos, n = m.end(), len(data)
    value: bytes | None = None  # the value token of the last job_id member read
    state = "key"  # key -> colon -> value -> comma -> key ...
    key_is_job_id = False
    while pos < n:
        if state == "key":
            member = _SCAN_MEMBER.match(data, pos)
            if member is not None:
                if _is_job_id_key(data, *member.span(1)):
                    start, end = member.span(2)
                    value = bytes(data[start : min(end, start + _MAX_ID_TOKEN)])
                pos = member.end()
                continue
        m = _SCAN_TOKEN.match(data, pos)
        if m is None:
            break  # an unterminated string
        start, pos = m.span()
        first = data[start]
        if first in _SPACE:
            continue
        if state == "key":
            if first != _QUOTE:
                break  # "}" (the end of the object) or garbage where a key belongs
            key_is_job_id, state = _is_job_id_key(data, start, pos), "colon"
        elif state == "colon":
            if first != _COLON:
                break
            state = "value"
        elif state == "value":
            if key_is_job_id:
                value = bytes(data[start : min(pos, start + _MAX_ID_TOKEN)])
            if first in _OPENERS:
                pos = _skip_nested(data, pos)
                if pos < 0:
                    break
            state = "comma"
        else:  # after a value
            if first != _COMMA:
                break
            state = "key"
    if value is None:
        return None, None
    text = _json_text(value) if value[:1] == b'"' else None
    if text is None:
        return None, value[:200].decode("utf-8", "replace")
    return (text if is_valid_job_id(text) else None), text[:200]


def _is_job_id_key(data: bytes | memoryview, start: int, end: int) -> bool:
    if end - start > _MAX_ID_TOKEN:
        return False
    token = bytes(data[start:end])
    return token == _JOB_ID_KEY or (b"\\" in token and _json_text(token) == "job_id")


def _skip_nested(data: bytes | memoryview, pos: int) -> int:
    """Position just after the nested value whose opening bracket ends at `pos`; -1 if the
    payload ends first (bracket kinds are not matched: the scan is lenient). Runs of
    brackets are counted a run at a time, so deep nesting costs no more than its bytes."""
    depth, n = 1, len(data)
    while True:
        m = _SCAN_NESTED.match(data, pos)
        pos = m.end() if m is not None else pos
        if pos >= n:
            return -1
        run = _BRACKETS.match(data, pos)
        if run is None:  # an unterminated string: nothing more can be followed
            return -1
        if run.start(1) >= 0:  # a run of openers
            depth += run.end() - pos
        elif depth <= run.end() - pos:
            return pos + depth
        else:
            depth -= run.end() - pos
        pos = run.end()


def _json_text(token: bytes) -> str | None:
    """The text of a JSON string token (quotes included), or None if it is not valid UTF-8
    or has a bad escape."""
    try:
        text = json.loads(token.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return text if isinstance(text, str) else None


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


class Error(
    msgspec.Struct, forbid_unknown_fields=True, tag_field="event", tag="error", omit_defaults=True
):
    job_id: str
    code: ErrorCode
    message: str
    retriable: bool
    # Why a CANCELLED job was cancelled, when the worker knows more than "asked to":
    # "client_gone" (its lease ran out) or the reason a cancel request gave. Absent otherwise.
    reason: str | None = None


Event = Started | Token | Metrics | End | Error
TerminalEvent = End | Error


def handed_back(event: Event) -> bool:
    """An error that ends one attempt, not the job: after a device failure (CUDA_ERROR) the
    worker hands the job back and JetStream delivers it again (a new `started`, attempt + 1),
    or, out of deliveries, a worker ends it with INTERNAL."""
    return isinstance(event, Error) and event.code is ErrorCode.CUDA_ERROR


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


CancelReason = Annotated[str, msgspec.Meta(pattern=r"\A[a-z_]{1,32}\Z")]


class CancelRequest(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    job_id: JobId
    # optional, carried to the job's CANCELLED event (e.g. "client_gone" from a gateway
    # whose HTTP client disconnected; the worker's own lease expiry uses it too)
    reason: CancelReason | None = None


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
    # most KV positions one job can be given (prompt + generated tokens - 1): below
    # context_length when the KV cache is smaller (a job needing more gets VRAM_OOM); 0 from
    # workers that predate it
    kv_capacity_tokens: int = 0
    # source commit of the worker's build (worker.buildinfo); "" from workers that predate it
    commit: str = ""


_health_decoder: Final = msgspec.json.Decoder(Health)


def decode_health(data: bytes) -> Health:
    return _health_decoder.decode(data)


class ShutdownReply(msgspec.Struct, forbid_unknown_fields=True):
    worker_id: str
    status: Literal["draining"]
    active_job_id: str | None
