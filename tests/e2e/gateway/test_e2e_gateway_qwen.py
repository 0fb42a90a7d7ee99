"""The gateway on the real Qwen2.5-Coder-0.5B Q4_K_M file (CPU backend) with the openai SDK:
chat and completions, streamed and not, give the greedy text of the same job over NATS."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from gwhelpers import sdk
from openai.types.chat import ChatCompletionChunk

from worker.client import OrcdClient
from worker.nats.server import EmbeddedNatsServer
from worker.protocol import End, Token

REF = "qwen"
HAIKU = [{"role": "user", "content": "Write a haiku about the sea."}]
CODE = "def fibonacci(n):"
GREEDY = {"max_tokens": 10, "temperature": 0.0, "seed": 42}


@pytest.mark.slow
async def test_real_qwen_through_the_gateway(
    nats_server: EmbeddedNatsServer,
    client: OrcdClient,
    spawn_worker: Any,
    spawn_gateway: Any,
    real_qwen: Path,
    gather: Any,
) -> None:
    spawn_worker(real_qwen, nats_server.url, REF, "--ctx-size", "256").wait_ready(300)
    gw = spawn_gateway(nats_server.url)
    oa = sdk(gw, timeout=600)

    async def over_nats(**job: Any) -> tuple[str, End]:
        evs = await gather(client.generate(REF, timeout_s=600, **job, **GREEDY))
        assert isinstance(evs[-1], End), evs[-1]
        return "".join(e.t for e in evs if isinstance(e, Token)), evs[-1]

    chat_text, chat_end = await over_nats(messages=HAIKU)
    assert chat_text.strip()
    print(f"qwen chat (greedy, 10 tokens): {chat_text!r}")
    r = await oa.chat.completions.create(model=REF, messages=HAIKU, **GREEDY)
    assert r.choices[0].message.content == chat_text
    assert r.usage is not None and r.usage.prompt_tokens == chat_end.prompt_tokens
    assert r.usage.completion_tokens == chat_end.tokens_out
    stream = await oa.chat.completions.create(
        model=REF, messages=HAIKU, stream=True, stream_options={"include_usage": True}, **GREEDY
    )
    chunks: list[ChatCompletionChunk] = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat_text
    assert chunks[-1].usage == r.usage

    code_text, code_end = await over_nats(prompt=CODE)
    assert code_text.strip()
    print(f"qwen completion (greedy, 10 tokens): {code_text!r}")
    c = await oa.completions.create(model=REF, prompt=CODE, **GREEDY)
    assert c.choices[0].text == code_text
    assert c.choices[0].finish_reason == (
        "length" if code_end.stop_reason == "max_tokens" else "stop"
    )
    cstream = await oa.completions.create(model=REF, prompt=CODE, stream=True, **GREEDY)
    assert "".join([x.choices[0].text async for x in cstream if x.choices]) == code_text
    await oa.close()
