"""Hypothesis strategies for job payloads (and cancel/health payloads), shared by the
in-process decode fuzz (tests/unit/test_protocol_fuzz.py) and the fuzz through NATS
(tests/e2e/test_e2e_fuzz.py).

Every job strategy yields a `Case`: the payload bytes and the job_id the worker must read from
it. The expectation is computed here, independently of worker/protocol.py:

- a payload that is JSON (Python's own json module; NaN and lone surrogates accepted) has a
  readable job_id when it is an object whose top-level ``job_id`` (the last one, as in any
  decode) is a string of 1-128 ``[A-Za-z0-9_-]``;
- a payload built here member by member, then broken on purpose (invalid UTF-8, a lone
  surrogate escape, NaN/Infinity, a raw control character, truncated after the job_id member,
  trailing bytes...), keeps its job_id readable when the break leaves the object's structure
  up to and including the job_id member intact: that is what the worker promises (docs/protocol.md:
  such a job still gets its INVALID_REQUEST event on its own subject);
- anything else (random bytes, deep nesting, JSON that is not an object) has none.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

JOB_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")
# A few ids shared by many cases, so duplicate job ids happen often.
DUP_IDS = ("dup-a", "dup-b", "dup-c")
FIELDS = (
    "prompt",
    "messages",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "stop",
    "seed",
)
NUMERIC = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed")


@dataclass(frozen=True)
class Case:
    payload: bytes
    job_id: str | None  # the job_id the worker must read (None: none readable)
    kind: str  # the generator that made it (reported as a count per kind)

    def __repr__(self) -> str:  # a megabyte payload is no use in a failure report
        head = self.payload[:300] + (b"..." if len(self.payload) > 300 else b"")
        return f"Case({head!r} [{len(self.payload)} bytes], job_id={self.job_id!r}, {self.kind})"


def valid_id(value: object) -> bool:
    return isinstance(value, str) and JOB_ID_RE.fullmatch(value) is not None


def expected_job_id(payload: bytes) -> str | None:
    """The readable job_id of a payload that is JSON (Python's parser), else None."""
    try:
        obj = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(obj, dict):
        return None
    value = obj.get("job_id")
    return value if valid_id(value) else None


# ----------------------------------------------------------------------------- values

BOUNDARY_INTS = (
    -(2**63),
    -1,
    0,
    1,
    2,
    2047,
    2048,
    2049,
    32768,
    2**31 - 1,
    2**31,
    2**31 + 1,
    2**53 + 1,
    2**63 - 1,
    2**63,
    2**64 - 1,
    2**64,
    10**30,
)
BOUNDARY_FLOATS = (
    0.0,
    -0.0,
    1e-300,
    5e-324,
    0.5,
    1.0,
    1.0000000001,
    2.0,
    2.0000000001,
    -1e-9,
    1e308,
    -1e308,
)

job_ids = st.one_of(
    st.from_regex(JOB_ID_RE, fullmatch=True),
    st.sampled_from(DUP_IDS),
    st.just("a" * 128),
)
bad_job_ids: st.SearchStrategy[Any] = st.one_of(
    st.sampled_from(["", "a" * 129, "has space", "dot.ted", "star*", "gt>", "ünï", "nl\n", "é"]),
    st.integers(),
    st.none(),
    st.booleans(),
    st.lists(st.sampled_from(DUP_IDS), max_size=2),
    st.text(max_size=20).filter(lambda s: not valid_id(s)),
)


def _big_text(min_chars: int, max_chars: int) -> st.SearchStrategy[str]:
    """Long strings without asking hypothesis for every character (cheap to generate)."""
    return st.tuples(st.integers(min_chars, max_chars), st.sampled_from("xé语😀")).map(
        lambda t: t[1] * t[0]
    )


json_scalars: st.SearchStrategy[Any] = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from(BOUNDARY_INTS),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
)
json_values: st.SearchStrategy[Any] = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=20,
)

texts = st.one_of(
    st.text(max_size=60),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=30),
    _big_text(1, 40_000),  # around the 32768-character limit
    st.sampled_from(["", " ", "\x00", "<|im_start|>", "<|endoftext|>", "\ufeff", "\u202e"]),
)
messages: st.SearchStrategy[Any] = st.one_of(
    st.lists(
        st.fixed_dictionaries(
            {
                "role": st.one_of(
                    st.sampled_from(["system", "user", "assistant", "tool"]),
                    st.sampled_from(["admin", "", "USER"]),
                    json_scalars,
                ),
                "content": st.one_of(texts, json_scalars),
            },
            optional={"name": st.text(max_size=5)},
        ),
        max_size=4,
    ),
    st.integers(0, 1100).map(lambda n: [{"role": "user", "content": "hi"}] * n),
    json_values,
)


def field_value(name: str) -> st.SearchStrategy[Any]:
    """Valid, boundary and wrong-typed values for one Job field."""
    if name == "prompt":
        return st.one_of(texts, json_values)
    if name == "messages":
        return messages
    if name == "stop":
        return st.one_of(
            st.lists(st.text(max_size=12), max_size=6),
            st.lists(_big_text(30, 200), max_size=2),
            json_values,
        )
    if name in ("max_tokens", "top_k", "seed"):
        return st.one_of(
            st.sampled_from(BOUNDARY_INTS),
            st.integers(-5, 4100),
            st.sampled_from(BOUNDARY_FLOATS),
            json_values,
        )
    return st.one_of(
        st.sampled_from(BOUNDARY_FLOATS),
        st.floats(-3, 3),
        st.sampled_from(BOUNDARY_INTS),
        json_values,
    )


@st.composite
def job_members(draw: st.DrawFn) -> dict[str, Any]:
    """A job-like object: mostly sensible, often with one or more fields wrong."""
    out: dict[str, Any] = {}
    if draw(st.booleans()):
        out["prompt"] = draw(st.one_of(st.text(min_size=1, max_size=40), field_value("prompt")))
    else:
        out["messages"] = draw(messages)
    for name in draw(st.lists(st.sampled_from(FIELDS), max_size=5, unique=True)):
        out[name] = draw(field_value(name))
    if draw(st.integers(0, 9)) == 0:
        out[draw(st.text(min_size=1, max_size=10))] = draw(json_values)  # unknown field
    return out


def _dump(value: Any) -> bytes:
    return json.dumps(value, allow_nan=True).encode("utf-8")


# ----------------------------------------------------------------------------- breaks

INVALID_UTF8 = (b"\x80", b"\xc3\x28", b"\xed\xa0\x80", b"\xf5\x80\x80\x80", b"\xff", b"\xc0\xaf")
LONE_SURROGATES = (b"\\ud800", b"\\udfff", b"\\ud83d x", b"\\udc00\\ud800")
NON_FINITE = (b"NaN", b"Infinity", b"-Infinity", b"nan", b"inf")
CONTROL = (b"\x00", b"\n", b"\t", b"\x1f")
GARBAGE = (b"x", b"}", b"]", b",", b"{", b'"', b"\\", b" trailing", b"\x00\xff")
# Breaks inside another member's value: they leave every member's structure intact.
CONTENT_BREAKS = ("bad_utf8", "lone_surrogate", "non_finite", "control_char")
# Breaks of the structure: they must come after the job_id member.
TAIL_BREAKS = ("truncate", "trailing_bytes", "trailing_comma", "unclosed", "garbage_member")


@st.composite
def broken_job(draw: st.DrawFn) -> Case:
    """A job whose job_id member is intact and readable, broken elsewhere."""
    job_id = draw(job_ids)
    members = [
        (json.dumps(k).encode(), _dump(v)) for k, v in draw(job_members()).items() if k != "job_id"
    ]
    at = draw(st.integers(0, len(members)))
    members.insert(at, (b'"job_id"', _dump(job_id)))
    breaks = draw(
        st.lists(st.sampled_from(CONTENT_BREAKS + TAIL_BREAKS), min_size=1, max_size=3, unique=True)
    )
    others = [k for k in range(len(members)) if k != at]
    for kind in breaks:
        if kind not in CONTENT_BREAKS or not others:
            continue
        k = draw(st.sampled_from(others))
        key, _ = members[k]
        if kind == "non_finite":
            members[k] = (key, draw(st.sampled_from(NON_FINITE)))
            continue
        pieces = {"bad_utf8": INVALID_UTF8, "lone_surrogate": LONE_SURROGATES}
        piece = draw(st.sampled_from(pieces.get(kind, CONTROL)))
        members[k] = (key, b'"ok ' + piece + b' ok"')
    sep = draw(st.sampled_from([b",", b", ", b" ,\n "]))
    body = sep.join(k + b":" + v for k, v in members)
    payload = b"{" + body + b"}"
    if "garbage_member" in breaks:
        garbage = draw(st.sampled_from([b"x", b"'k': 1", b"1: 2", b'"k" 1']))
        payload = payload[:-1] + sep + garbage + b"}"
    if "trailing_comma" in breaks:
        payload = payload[:-1] + b",}"
    if "unclosed" in breaks:
        payload = payload[:-1]
    if "trailing_bytes" in breaks:
        payload += draw(st.sampled_from(GARBAGE))
    if "truncate" in breaks:
        # cut anywhere after the job_id member's closing quote
        prefix = b"{" + sep.join(k + b":" + v for k, v in members[: at + 1])
        cut = draw(st.integers(len(prefix), len(payload)))
        payload = payload[:cut]
    return Case(payload, job_id, "broken:" + "+".join(sorted(breaks)))


@st.composite
def structured_job(draw: st.DrawFn) -> Case:
    """Well-formed JSON shaped like a job: valid, or wrong in its fields and job_id."""
    obj = draw(job_members())
    choice = draw(st.integers(0, 9))
    if choice < 7:
        obj["job_id"] = draw(job_ids)
    elif choice < 9:
        obj["job_id"] = draw(bad_job_ids)
    items = list(obj.items())
    items = draw(st.permutations(items))
    payload = _dump(dict(items))
    return Case(payload, expected_job_id(payload), "structured")


@st.composite
def valid_job(draw: st.DrawFn) -> Case:
    """A job every field of which is in range (it runs), at and between the boundaries."""
    obj: dict[str, Any] = {"job_id": draw(job_ids)}
    if draw(st.booleans()):
        obj["prompt"] = draw(st.one_of(st.text(min_size=1, max_size=80), _big_text(1, 3000)))
    else:
        obj["messages"] = draw(
            st.lists(
                st.fixed_dictionaries(
                    {
                        "role": st.sampled_from(["system", "user", "assistant", "tool"]),
                        "content": st.text(max_size=40),
                    }
                ),
                min_size=1,
                max_size=4,
            )
        )
    ranges: dict[str, st.SearchStrategy[Any]] = {
        "max_tokens": st.integers(1, 2048),
        "temperature": st.one_of(st.sampled_from([0.0, 2.0]), st.floats(0, 2)),
        "top_p": st.floats(0, 1),
        "top_k": st.one_of(st.integers(0, 100), st.just(2**31)),
        "min_p": st.floats(0, 1),
        "repetition_penalty": st.floats(0, 2),
        "stop": st.lists(st.text(min_size=1, max_size=8), max_size=4),
        "seed": st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 2**64 - 1])),
    }
    for name in draw(st.lists(st.sampled_from(sorted(ranges)), max_size=8, unique=True)):
        obj[name] = draw(ranges[name])
    items = draw(st.permutations(list(obj.items())))
    payload = _dump(dict(items))
    return Case(payload, obj["job_id"], "valid")


@st.composite
def random_json(draw: st.DrawFn) -> Case:
    value = draw(json_values)
    if isinstance(value, dict) and draw(st.booleans()):
        value["job_id"] = draw(st.one_of(job_ids, bad_job_ids))
    payload = _dump(value)
    return Case(payload, expected_job_id(payload), "random_json")


@st.composite
def random_bytes(draw: st.DrawFn) -> Case:
    payload = draw(
        st.one_of(
            st.binary(max_size=200),
            st.binary(max_size=40).map(lambda b: b"{" + b),
            st.binary(max_size=40).map(lambda b: b'{"job_id"' + b),
        )
    )
    job_id = expected_job_id(payload)
    if job_id is None and b"job_id" in payload:
        # bytes after b'{"job_id"' may by chance form a readable member; say which
        m = re.match(rb'\{\s*"job_id"\s*:\s*"([A-Za-z0-9_-]{1,128})"', payload)
        job_id = m.group(1).decode() if m else None
    return Case(payload, job_id, "random_bytes")


@st.composite
def deep_nesting(draw: st.DrawFn) -> Case:
    """Nesting far deeper than any JSON decoder recurses (a job_id member before it, or not)."""
    depth = draw(st.sampled_from([64, 1000, 5000, 100_000]))
    opener = draw(st.sampled_from([b"[", b'{"a":']))
    with_id = draw(st.booleans())
    job_id = draw(job_ids) if with_id else None
    head = b'{"job_id": ' + _dump(job_id) + b', "prompt": "x", "stop": ' if with_id else b""
    closed = draw(st.booleans())
    closer = b"]" if opener == b"[" else b"}"
    body = opener * depth + b"1" + (closer * depth if closed else b"")
    payload = head + body + (b"}" if with_id and closed else b"")
    return Case(payload, job_id, "deep_nesting")


@st.composite
def huge_job(draw: st.DrawFn) -> Case:
    """A job around the payload limit (512 KiB) and past NATS's default max payload (1 MiB)."""
    n = draw(st.sampled_from([500_000, 530_000, 900_000, 1_100_000]))
    job_id = draw(job_ids)
    payload = _dump({"job_id": job_id, "prompt": "x" * n})
    return Case(payload, job_id, "huge")


job_cases: st.SearchStrategy[Case] = st.one_of(
    valid_job(),
    structured_job(),
    broken_job(),
    random_json(),
    random_bytes(),
    deep_nesting(),
    huge_job(),
)
# Cheap cases only (no megabyte payloads): for the fast in-process fuzz with many examples.
small_job_cases: st.SearchStrategy[Case] = st.one_of(
    valid_job(), structured_job(), broken_job(), random_json(), random_bytes(), deep_nesting()
)

# ----------------------------------------------------------------------------- control

cancel_payloads: st.SearchStrategy[bytes] = st.one_of(
    st.builds(lambda j: _dump({"job_id": j}), st.one_of(job_ids, bad_job_ids)),
    st.builds(lambda j, v: _dump({"job_id": j, "extra": v}), job_ids, json_scalars),
    json_values.map(_dump),
    st.binary(max_size=64),
    st.sampled_from([b"", b"{", b'{"job_id": "a"', b'{"job_id": NaN}', b"[" * 5000]),
)
any_payloads: st.SearchStrategy[bytes] = st.one_of(
    st.binary(max_size=100), json_values.map(_dump), st.just(b"[" * 10_000)
)
