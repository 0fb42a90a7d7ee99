"""SSE chunks and full responses, checked against the openai SDK's own response models
(strict pydantic validation of the raw JSON), and API-key checks."""

from __future__ import annotations

import hmac
import json
from pathlib import Path
from typing import Any

import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from worker.gateway.auth import ApiKeys
from worker.gateway.render import ChunkTemplate, error_chunk, full_response
from worker.protocol import End

END = End(
    job_id="j",
    tokens_out=3,
    stop_reason="max_tokens",
    prompt_tokens=11,
    ttft_ms=1.0,
    decode_time_ms=2.0,
    tokens_per_s=3.0,
)
TEXTS = ["Hel", 'lo "wo', "rld\n\t\\ é 🌊", "\x00\u2028"]


def sse_events(raw: bytes) -> list[str]:
    assert raw.endswith(b"\n\n")
    out = []
    for block in raw.decode().split("\n\n")[:-1]:
        assert block.startswith("data: ") and "\n" not in block, block
        out.append(block[len("data: ") :])
    return out


@pytest.mark.parametrize("include_usage", [False, True])
def test_chat_stream_chunks_are_valid_chunks(include_usage: bool) -> None:
    t = ChunkTemplate("chat", "chatcmpl-1", 1700000000, "qwen", "orcd-0.1.0-abc", include_usage)
    raw = t.opening() + b"".join(t.token(x) for x in TEXTS) + t.closing(END)
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate_json(e, strict=True) for e in events[:-1]]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "".join(TEXTS)
    assert {c.id for c in chunks} == {"chatcmpl-1"}
    assert {c.system_fingerprint for c in chunks} == {"orcd-0.1.0-abc"}
    assert {c.model for c in chunks} == {"qwen"} and {c.created for c in chunks} == {1700000000}
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "length"
    if include_usage:
        last = chunks[-1]
        assert last.choices == [] and last.usage is not None
        assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (11, 3)
        assert last.usage.total_tokens == 14
        assert all(c.usage is None for c in chunks[:-1])
        assert all('"usage":null' in e for e in events[:-2])
    else:
        assert all("usage" not in e for e in events[:-1])


def completion_chunk(event: str) -> Completion:
    """A streamed text_completion chunk as the SDK's Completion model. Mid-stream chunks
    carry ``finish_reason: null`` (as OpenAI's and every compatible server's do), which the
    model - written for whole responses - does not admit: such a chunk is checked with
    that one field set, every other field strictly."""
    obj = json.loads(event)
    for choice in obj["choices"]:
        if choice["finish_reason"] is None:
            choice["finish_reason"] = "stop"
    return Completion.model_validate_json(json.dumps(obj), strict=True)


def test_completion_stream_chunks_are_valid_completions() -> None:
    t = ChunkTemplate("completion", "cmpl-1", 1700000000, "qwen", "fp", True)
    assert t.opening() == b""
    raw = b"".join(t.token(x) for x in TEXTS) + t.closing(END)
    events = sse_events(raw)
    chunks = [completion_chunk(e) for e in events[:-1]]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "".join(TEXTS)
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 14


def test_full_responses_are_valid() -> None:
    chat = ChatCompletion.model_validate_json(
        full_response("chat", "chatcmpl-2", 1, "qwen", "fp", "".join(TEXTS), END), strict=True
    )
    assert chat.choices[0].message.content == "".join(TEXTS)
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].finish_reason == "length"
    assert chat.usage is not None and chat.usage.completion_tokens == 3
    eos = End(**{**{f: getattr(END, f) for f in END.__struct_fields__}, "stop_reason": "eos"})
    comp = Completion.model_validate_json(
        full_response("completion", "cmpl-2", 1, "qwen", "fp", "x", eos), strict=True
    )
    assert comp.choices[0].text == "x" and comp.choices[0].finish_reason == "stop"


def test_error_chunk_then_done() -> None:
    payload = {"error": {"message": "m", "type": "server_error", "param": None, "code": "x"}}
    events = sse_events(error_chunk(payload))
    assert json.loads(events[0]) == payload and events[1] == "[DONE]"


def test_api_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "keys"
    f.write_text("# ops keys\n\n  sk-one  \nsk-two\n")
    keys = ApiKeys.from_file(f)
    assert keys.enabled and len(keys) == 2
    assert keys.check(b"Bearer sk-one") and keys.check(b"bearer sk-two")
    for bad in (
        None,
        b"",
        b"Bearer",
        b"Bearer sk-three",
        b"Basic sk-one",
        b"sk-one",
        b"Bearer sk-on",
    ):
        assert not keys.check(bad), bad
    # every key is compared whichever matches (and whether any does): constant work
    calls: list[Any] = []
    real = hmac.compare_digest

    def counting(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    for header in (b"Bearer sk-one", b"Bearer sk-two", b"Bearer nope"):
        calls.clear()
        keys.check(header)
        assert len(calls) == 2 and all(len(a) == len(b) == 32 for a, b in calls)
    # no keys configured: open
    assert ApiKeys([]).check(None)
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n")
    with pytest.raises(ValueError, match="no API keys"):
        ApiKeys.from_file(empty)
