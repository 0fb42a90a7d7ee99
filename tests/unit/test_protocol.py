"""Every validation rule of docs/protocol.md on jobs, events, cancel and health messages."""

from __future__ import annotations

import json
import time
from typing import Any

import msgspec
import pytest

from worker.errors import ErrorCode, WorkerError
from worker.protocol import (
    UINT64_MAX,
    CancelReply,
    End,
    Error,
    Health,
    InvalidJob,
    Started,
    Subjects,
    Token,
    consumer_name,
    decode_cancel,
    decode_event,
    decode_health,
    decode_job,
    encode,
    model_ref_from_name,
)


def job(**fields: Any) -> bytes:
    base: dict[str, Any] = {"job_id": "job-1", "prompt": "hello"}
    base.update(fields)
    return json.dumps({k: v for k, v in base.items() if v is not ...}).encode()


def test_minimal_job_gets_spec_defaults() -> None:
    j = decode_job(job())
    assert j.job_id == "job-1" and j.prompt == "hello" and j.messages is None
    assert (j.max_tokens, j.temperature, j.top_p, j.top_k, j.min_p) == (2048, 1.0, 1.0, 0, 0.0)
    assert j.repetition_penalty == 1.0 and j.stop == [] and j.seed is None


def test_full_job_round_trips() -> None:
    j = decode_job(
        job(
            max_tokens=7,
            temperature=0.7,
            top_p=0.9,
            top_k=40,
            min_p=0.05,
            repetition_penalty=1.1,
            stop=["\n\n", "END"],
            seed=UINT64_MAX,
        )
    )
    assert decode_job(encode(j)) == j
    assert j.seed == UINT64_MAX


def test_chat_messages_job() -> None:
    j = decode_job(job(prompt=..., messages=[{"role": "user", "content": "hi"}]))
    assert j.messages is not None and j.messages[0].role == "user"


def expect_invalid(data: bytes, needle: str, job_id: str | None = "job-1") -> InvalidJob:
    with pytest.raises(InvalidJob) as info:
        decode_job(data)
    exc = info.value
    assert exc.code is ErrorCode.INVALID_REQUEST and not exc.retriable
    assert needle in exc.message, exc.message
    assert exc.job_id == job_id
    return exc


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 2049}, "max_tokens"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"max_tokens": "5"}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"temperature": -0.01}, "temperature"),
        ({"temperature": 2.01}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": -0.1}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2**40}, "top_k"),
        ({"min_p": -0.5}, "min_p"),
        ({"min_p": 1.5}, "min_p"),
        ({"repetition_penalty": -1}, "repetition_penalty"),
        ({"repetition_penalty": 2.5}, "repetition_penalty"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"stop": "END"}, "stop"),
        ({"stop": [1]}, "stop"),
        ({"seed": -1}, "seed"),
        ({"seed": UINT64_MAX + 1}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "x" * 32769}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": ..., "messages": []}, "messages"),
        ({"prompt": ..., "messages": [{"role": "robot", "content": "x"}]}, "role"),
        ({"prompt": ..., "messages": [{"role": "user"}]}, "content"),
        ({"prompt": ..., "messages": [{"role": "user", "content": "x", "x": 1}]}, "unknown"),
        ({"prompt": ..., "messages": [{"role": "user", "content": "x" * 32769}]}, "32768"),
        ({"prompt": ...}, "exactly one"),
        ({"messages": [{"role": "user", "content": "x"}]}, "exactly one"),
        ({"temprature": 0.5}, "unknown field `temprature`"),
    ],
)
def test_invalid_field_is_rejected_with_the_field_named(
    fields: dict[str, Any], needle: str
) -> None:
    expect_invalid(job(**fields), needle)


def test_boundaries_are_inclusive() -> None:
    for fields in (
        {"max_tokens": 1},
        {"max_tokens": 2048},
        {"temperature": 0},
        {"temperature": 2},
        {"top_p": 0},
        {"top_p": 1},
        {"min_p": 1},
        {"repetition_penalty": 0},
        {"repetition_penalty": 2},
        {"seed": 0},
        {"prompt": "x" * 32768},
        {"stop": ["a", "b", "c", "d"]},
    ):
        decode_job(job(**fields))


@pytest.mark.parametrize(
    "bad_id",
    ["", "a" * 129, "has space", "dot.ted", "star*", "gt>", "ünïcode", "new\nline", "end\n"],
)
def test_bad_job_id_is_rejected_and_not_used_as_a_subject(bad_id: str) -> None:
    exc = expect_invalid(job(job_id=bad_id), "job_id", job_id=None)
    assert exc.raw_job_id == bad_id[:200]


def test_job_id_limits() -> None:
    assert decode_job(job(job_id="a" * 128)).job_id == "a" * 128
    assert decode_job(job(job_id="A-z_09")).job_id == "A-z_09"
    expect_invalid(job(job_id=5), "job_id", job_id=None)
    expect_invalid(job(job_id=...), "job_id", job_id=None)


@pytest.mark.parametrize(
    "data", [b"", b"not json", b"{", b"[1,2]", b"null", b'"job"', b"\xff\xfe", b'{"job_id": "a']
)
def test_malformed_payload_is_invalid_without_job_id(data: bytes) -> None:
    with pytest.raises(InvalidJob) as info:
        decode_job(data)
    assert info.value.code is ErrorCode.INVALID_REQUEST and info.value.job_id is None


def test_invalid_job_keeps_a_readable_job_id() -> None:
    exc = expect_invalid(job(max_tokens=0, extra=1), "", job_id="job-1")
    assert exc.raw_job_id == "job-1"


def test_decode_and_validate_under_one_millisecond() -> None:
    payload = job(
        max_tokens=128,
        temperature=0.7,
        top_p=0.95,
        top_k=40,
        min_p=0.05,
        repetition_penalty=1.1,
        stop=["\n\n", "END", "###", "</s>"],
        seed=123,
        prompt="Write a haiku about GPUs. " * 40,
    )
    n = 2000
    t0 = time.perf_counter()
    for _ in range(n):
        decode_job(payload)
    per_job = (time.perf_counter() - t0) / n
    assert per_job < 1e-3, f"{per_job * 1e6:.1f} µs per job"


def test_events_are_tagged_and_strict() -> None:
    events = [
        Started(
            job_id="j",
            model="m",
            started_at="2026-01-01T00:00:00Z",
            seed=1,
            prompt_tokens=3,
            attempt=1,
            worker_id="w",
        ),
        Token(job_id="j", i=0, t="hé", id=42),
        End(
            job_id="j",
            tokens_out=1,
            stop_reason="eos",
            prompt_tokens=3,
            ttft_ms=1.0,
            decode_time_ms=2.0,
            tokens_per_s=3.0,
        ),
        Error(job_id="j", code=ErrorCode.CANCELLED, message="x", retriable=False),
    ]
    for ev in events:
        data = encode(ev)
        assert json.loads(data)["event"] in ("started", "token", "end", "error")
        assert decode_event(data) == ev
    with pytest.raises(msgspec.ValidationError):
        decode_event(b'{"event": "token", "job_id": "j", "i": 0, "t": "", "id": 1, "x": 2}')
    with pytest.raises(msgspec.ValidationError):
        decode_event(
            b'{"event": "end", "job_id": "j", "tokens_out": 1, "stop_reason": "why",'
            b' "prompt_tokens": 1, "ttft_ms": 1, "decode_time_ms": 1, "tokens_per_s": 1}'
        )


def test_cancel_request_validation() -> None:
    assert decode_cancel(b'{"job_id": "abc"}').job_id == "abc"
    for bad in (b"{}", b'{"job_id": "a b"}', b'{"job_id": "a", "x": 1}', b"nope"):
        with pytest.raises(WorkerError) as info:
            decode_cancel(bad)
        assert info.value.code is ErrorCode.INVALID_REQUEST
    reply = CancelReply(job_id="a", status="cancelling", worker_id="w")
    assert msgspec.json.decode(encode(reply), type=CancelReply) == reply


def test_health_round_trip_and_unknown_fields() -> None:
    h = Health(
        status="healthy",
        worker_id="w",
        model="m",
        model_ref="r",
        device="cpu",
        gpu_device=None,
        resident=False,
        quant_kind="Q4_K_M",
        vram_bytes_used=0,
        tokenizer_kind="gguf-bpe",
        vocab_size=10,
        context_length=64,
        uptime_seconds=1.0,
        sm=None,
        cuda_runtime_version=None,
        active_job_id=None,
        jobs_completed=0,
        version="0.1.0",
    )
    assert decode_health(encode(h)) == h
    d = json.loads(encode(h))
    d["extra"] = 1
    with pytest.raises(msgspec.ValidationError):
        decode_health(json.dumps(d).encode())


def test_subjects_and_model_ref() -> None:
    s = Subjects()
    assert s.jobs("qwen") == "orcd.jobs.qwen" and s.events("j1") == "orcd.events.j1"
    assert s.health("w") == "orcd.health.w" and s.health_all == "orcd.health"
    assert s.heartbeat("w") == "orcd.heartbeat.w" and s.cancel == "orcd.cancel"
    assert s.shutdown("w") == "orcd.control.w.shutdown" and s.metrics("w") == "orcd.metrics.w"
    assert consumer_name("qwen") == "orcd-qwen"
    assert (
        model_ref_from_name("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")
        == "qwen2-5-coder-0-5b-instruct-q4_k_m"
    )
    assert model_ref_from_name("...gguf") == "model"
    with pytest.raises(ValueError):
        Subjects("bad prefix")
