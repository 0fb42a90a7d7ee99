"""In-process fuzz of the wire decoders (hypothesis): whatever the bytes, `decode_job` returns a
Job or raises InvalidJob - nothing else - and reads the job_id the payload carries (also when
the payload does not parse: bad UTF-8, lone surrogates, NaN, truncated...); `decode_cancel`
raises only WorkerError; the client's `decode_event` / `decode_health` only msgspec errors.

Sizes: ORCD_FUZZ_DECODE_EXAMPLES examples per property (default 600; the nightly run uses
20000). The expectation comes from tests/payload_strategies.py (Python's json module and the
way each payload was built), not from the code under test."""

from __future__ import annotations

import contextlib
import os
import time
import tracemalloc

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from payload_strategies import (
    Case,
    any_payloads,
    broken_job,
    cancel_payloads,
    deep_nesting,
    huge_job,
    small_job_cases,
)

from worker.errors import ErrorCode, WorkerError
from worker.protocol import (
    MAX_JOB_PAYLOAD_BYTES,
    InvalidJob,
    Job,
    decode_cancel,
    decode_event,
    decode_health,
    decode_job,
    encode,
)

EXAMPLES = int(os.environ.get("ORCD_FUZZ_DECODE_EXAMPLES", "600"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=os.environ.get("ORCD_FUZZ_RANDOM", "") == "",
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def outcome(case: Case) -> Job | InvalidJob:
    """decode_job's result; any exception but InvalidJob fails the test."""
    try:
        return decode_job(case.payload)
    except InvalidJob as exc:
        return exc


def check(case: Case) -> Job | InvalidJob:
    got = outcome(case)
    if isinstance(got, Job):
        assert got.job_id == case.job_id, (case, got)
        # a decoded job encodes and decodes to itself
        assert decode_job(encode(got)) == got
    else:
        assert got.code is ErrorCode.INVALID_REQUEST and not got.retriable
        assert got.job_id == case.job_id, (case.kind, case.payload[:300], got.job_id, got.message)
        assert got.message.startswith("invalid job: ")
        if got.raw_job_id is not None:
            assert len(got.raw_job_id) <= 200
    return got


@FUZZ
@given(small_job_cases)
def test_decode_job_reads_the_job_id_of_any_payload(case: Case) -> None:
    check(case)


@FUZZ
@given(broken_job())
def test_unparseable_job_with_a_readable_id_keeps_it(case: Case) -> None:
    """The payloads of issue 13 (bad UTF-8, lone surrogates, NaN/Infinity, truncated or
    malformed after the job_id): the id is read, so the job gets its INVALID_REQUEST event."""
    got = check(case)
    if isinstance(got, InvalidJob):
        assert got.job_id is not None


@settings(FUZZ, max_examples=max(20, EXAMPLES // 20))
@given(deep_nesting())
def test_deep_nesting_is_invalid_not_a_crash(case: Case) -> None:
    """msgspec's generic decoder raises RecursionError past ~1000 levels; before the fix that
    escaped decode_job and stopped the worker's job loop (a 5 KB poison message)."""
    got = check(case)
    assert isinstance(got, InvalidJob)


@settings(FUZZ, max_examples=12)
@given(huge_job())
def test_payload_over_the_limit_is_refused_unread_with_its_job_id(case: Case) -> None:
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        got = check(case)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    took = time.perf_counter() - t0
    if len(case.payload) > MAX_JOB_PAYLOAD_BYTES:
        assert isinstance(got, InvalidJob)
        assert f"at most {MAX_JOB_PAYLOAD_BYTES} allowed" in got.message
        # refused without decoding the prompt into a string
        assert peak < len(case.payload) // 4, peak
    assert took < 1.0


@pytest.mark.parametrize(
    ("payload", "job_id"),
    [
        (b'{"job_id": "a",}', "a"),
        (b'{"job_id": "abc", "prompt": "\xff"}', "abc"),
        (b'{"prompt": "\\ud800", "job_id": "abc"}', "abc"),
        (b'{"prompt": "x", "temperature": NaN, "job_id": "abc"}', "abc"),
        (b'{"job_id": "abc", "max_tokens": Infinity}', "abc"),
        (b'{"job_id": "abc", "prompt": "trunc', "abc"),
        (b' {"job_id":"ws"} trailing', "ws"),
        (b'{"job\\u005fid": "esc", "x": NaN}', "esc"),
        (b'{"job_id":"first","job_id":"second",', "second"),
        (b'{"a":{"b":[{"c":"]"}]},"job_id":"y",', "y"),
        # not readable: inside the id, nested, inside a string, not an object, bad id
        (b'{"job_id": "ab', None),
        (b'{"messages": [{"job_id": "inner"}], "x": NaN}', None),
        (b'{"a": "\\"job_id\\": \\"fake\\"", "b": NaN}', None),
        (b'[{"job_id": "a"}', None),
        (b'{"job_id": "bad id", "x": NaN}', None),
        (b'{"job_id": 5, "x": NaN}', None),
        (b'{"x" "y", "job_id": "late"}', None),  # no colon: the structure is lost
        (b'{"x": bareword, "job_id": "late"}', "late"),
    ],
)
def test_salvage_examples(payload: bytes, job_id: str | None) -> None:
    with pytest.raises(InvalidJob) as info:
        decode_job(payload)
    assert info.value.job_id == job_id


def test_lenient_scan_is_linear_on_pathological_payloads() -> None:
    """The scan of a payload that does not parse costs at most ~0.3 s per MiB of the worst
    shapes (one Python step per bracket run or member), and is capped at the payload limit."""
    for payload in (
        b'{"x": "' + b"\\a" * 500_000,
        b"{" + b'"k":[1],' * 60_000,
        b'{"x":' + b"[" * 1_000_000,
        b'{"x":' + b"[1" * 250_000,
        b"{" + b'"k" : "v" , ' * 40_000 + b'"job_id":"end", NaN',
    ):
        t0 = time.perf_counter()
        with pytest.raises(InvalidJob):
            decode_job(payload)
        assert time.perf_counter() - t0 < 1.5, payload[:40]


@FUZZ
@given(cancel_payloads)
def test_decode_cancel_raises_only_worker_errors(payload: bytes) -> None:
    try:
        req = decode_cancel(payload)
    except WorkerError as exc:
        assert exc.code is ErrorCode.INVALID_REQUEST
    else:
        assert req.job_id


@FUZZ
@given(st.one_of(any_payloads, cancel_payloads))
def test_client_decoders_raise_only_msgspec_errors(payload: bytes) -> None:
    for decode in (decode_event, decode_health):
        with contextlib.suppress(msgspec.DecodeError):
            decode(payload)
