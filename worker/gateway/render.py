"""Worker events -> OpenAI response bodies and Server-Sent Events chunks.

A stream's chunks differ only in the token text, so each stream renders its JSON once up to
the text and once after it (`ChunkTemplate`); a token costs one msgspec encode of its text and
two byte concatenations, no JSON tree.
"""

from __future__ import annotations

from typing import Any, Final, Literal

import msgspec

from worker.gateway.translate import finish_reason
from worker.protocol import End

_enc: Final = msgspec.json.Encoder()
DONE: Final = b"data: [DONE]\n\n"

Kind = Literal["chat", "completion"]


def usage(end: End) -> dict[str, int]:
    return {
        "prompt_tokens": end.prompt_tokens,
        "completion_tokens": end.tokens_out,
        "total_tokens": end.prompt_tokens + end.tokens_out,
    }


class ChunkTemplate:
    """The SSE chunks of one streamed response (chat.completion.chunk or text_completion)."""

    def __init__(
        self,
        kind: Kind,
        response_id: str,
        created: int,
        model: str,
        fingerprint: str,
        include_usage: bool,
    ) -> None:
        self.kind = kind
        self.include_usage = include_usage
        self._head: dict[str, Any] = {
            "id": response_id,
            "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
            "created": created,
            "model": model,
            "system_fingerprint": fingerprint,
        }
        marker = "\x00TEXT\x00"
        whole = self._encode(self._choice(marker, None))
        before, after = whole.split(_enc.encode(marker))
        self._prefix = b"data: " + before
        self._suffix = after + b"\n\n"

    def _choice(self, text: str | None, finish: str | None) -> dict[str, Any]:
        if self.kind == "chat":
            delta: dict[str, Any] = {} if text is None else {"content": text}
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"text": text or "", "index": 0, "logprobs": None, "finish_reason": finish}

    def _encode(self, choice: dict[str, Any] | None, end: End | None = None) -> bytes:
        body = dict(self._head)
        body["choices"] = [] if choice is None else [choice]
        if self.include_usage:
            body["usage"] = None if end is None else usage(end)
        return _enc.encode(body)

    def token(self, text: str) -> bytes:
        """One token's chunk (the hot path)."""
        return self._prefix + _enc.encode(text) + self._suffix

    def opening(self) -> bytes:
        """Sent before the first token: a chat stream's first delta names the role."""
        if self.kind != "chat":
            return b""
        choice = {
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
        return b"data: " + self._encode(choice) + b"\n\n"

    def closing(self, end: End) -> bytes:
        """The finish_reason chunk, the usage chunk when asked for, and ``[DONE]``."""
        out = b"data: " + self._encode(self._choice(None, finish_reason(end.stop_reason)))
        out += b"\n\n"
        if self.include_usage:
            out += b"data: " + self._encode(None, end) + b"\n\n"
        return out + DONE


def error_chunk(payload: dict[str, Any]) -> bytes:
    """An error after the stream has begun (status 200 is out): OpenAI's SDKs raise it."""
    return b"data: " + _enc.encode(payload) + b"\n\n" + DONE


def full_response(
    kind: Kind,
    response_id: str,
    created: int,
    model: str,
    fingerprint: str,
    text: str,
    end: End,
) -> bytes:
    """The non-streamed response (chat.completion or text_completion)."""
    finish = finish_reason(end.stop_reason)
    choice: dict[str, Any]
    if kind == "chat":
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text, "refusal": None},
            "logprobs": None,
            "finish_reason": finish,
        }
    else:
        choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}
    return _enc.encode(
        {
            "id": response_id,
            "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": created,
            "model": model,
            "system_fingerprint": fingerprint,
            "choices": [choice],
            "usage": usage(end),
        }
    )
