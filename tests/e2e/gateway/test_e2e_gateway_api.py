"""The gateway end to end on a tiny model: a real nats-server, real `worker-orcd serve`
subprocesses (CPU backend), a real `worker-orcd gateway` subprocess and the real openai SDK.

Each response is compared with the same job over NATS (greedy: equal text, finish_reason
from stop_reason, usage from `end`) and validated strictly against the SDK's own models."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import openai
import pytest
from gwhelpers import http, metric, sdk, wait_for
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from worker.client import OrcdClient
from worker.errors import ErrorCode
from worker.nats.server import EmbeddedNatsServer
from worker.protocol import End, Error, Started, Token

REF = "tiny"
MESSAGES = [{"role": "user", "content": "Tell me about the sea."}]
PROMPT = "Once upon a time"


async def over_nats(client: OrcdClient, gather: Any, **job: Any) -> tuple[str, End]:
    evs = await gather(client.generate(REF, timeout_s=120, **job))
    end = evs[-1]
    assert isinstance(end, End), end
    return "".join(e.t for e in evs if isinstance(e, Token)), end


def sse_data(raw: str) -> list[str]:
    out = []
    for block in raw.split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            out.append(block[len("data: ") :])
    return out


async def test_chat_and_completions_match_nats(
    nats_server: EmbeddedNatsServer,
    client: OrcdClient,
    spawn_worker: Any,
    spawn_gateway: Any,
    tiny_model: Path,
    gather: Any,
) -> None:
    w = spawn_worker(tiny_model, nats_server.url, REF, "--ctx-size", "4096").wait_ready()
    gw = spawn_gateway(nats_server.url)
    oa = sdk(gw)
    health = await client.health(w.worker_id)
    assert health.commit, "the worker reports its commit"
    fingerprint = f"orcd-{health.version}-{health.commit}"
    params: dict[str, Any] = {"max_tokens": 24, "temperature": 0.0, "seed": 3}

    # ---- chat, not streamed
    ref_text, ref_end = await over_nats(client, gather, messages=MESSAGES, **params)
    assert ref_text
    raw = await oa.chat.completions.with_raw_response.create(model=REF, messages=MESSAGES, **params)
    strict = ChatCompletion.model_validate_json(raw.http_response.text, strict=True)
    chat = raw.parse()
    assert strict == chat
    assert chat.object == "chat.completion" and chat.model == REF
    assert chat.id.startswith("chatcmpl-") and raw.headers["x-orcd-job-id"] == chat.id
    assert chat.system_fingerprint == fingerprint
    assert len(chat.choices) == 1 and chat.choices[0].index == 0
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == ref_text
    assert chat.choices[0].finish_reason == (
        "length" if ref_end.stop_reason == "max_tokens" else "stop"
    )
    assert chat.usage is not None
    assert chat.usage.prompt_tokens == ref_end.prompt_tokens
    assert chat.usage.completion_tokens == ref_end.tokens_out
    assert chat.usage.total_tokens == ref_end.prompt_tokens + ref_end.tokens_out

    # ---- chat, streamed with usage: the SDK's chunks, and the raw SSE validated strictly
    stream = await oa.chat.completions.create(
        model=REF,
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
        **params,
    )
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref_text
    assert [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ] == [chat.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == chat.usage
    assert {c.system_fingerprint for c in chunks} == {fingerprint}
    assert len({c.id for c in chunks}) == 1 and chunks[0].id != chat.id
    async with http(gw) as h:
        body = {"model": REF, "messages": MESSAGES, "stream": True, **params}
        r = await h.post("/v1/chat/completions", json=body)
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        data = sse_data(r.text)
        assert data[-1] == "[DONE]"
        raw_chunks = [ChatCompletionChunk.model_validate_json(d, strict=True) for d in data[:-1]]
        assert all("usage" not in json.loads(d) for d in data[:-1])  # not asked for
        assert "".join(c.choices[0].delta.content or "" for c in raw_chunks) == ref_text

    # ---- completions, both ways
    ref_text, ref_end = await over_nats(client, gather, prompt=PROMPT, **params)
    raw_c = await oa.completions.with_raw_response.create(model=REF, prompt=PROMPT, **params)
    comp = Completion.model_validate_json(raw_c.http_response.text, strict=True)
    assert comp.object == "text_completion" and comp.id.startswith("cmpl-")
    assert comp.choices[0].text == ref_text and comp.system_fingerprint == fingerprint
    assert comp.usage is not None and comp.usage.completion_tokens == ref_end.tokens_out
    stream_c = await oa.completions.create(
        model=REF, prompt=PROMPT, stream=True, stream_options={"include_usage": True}, **params
    )
    cchunks = [c async for c in stream_c]
    assert "".join(c.choices[0].text for c in cchunks if c.choices) == ref_text
    assert (
        cchunks[-1].usage is not None and cchunks[-1].usage.total_tokens == comp.usage.total_tokens
    )
    assert all(c.object == "text_completion" for c in cchunks)

    # ---- a stop string (taken from the greedy text): cut before it, finish_reason "stop"
    stop = ref_text[len(ref_text) // 2 :][:3]
    assert stop.strip(), ref_text
    stop_text, stop_end = await over_nats(client, gather, prompt=PROMPT, stop=[stop], **params)
    assert stop_end.stop_reason == "stop" and stop not in stop_text
    got = await oa.completions.create(model=REF, prompt=PROMPT, stop=stop, **params)
    assert got.choices[0].text == stop_text and got.choices[0].finish_reason == "stop"

    # ---- the extra sampling parameters reach the worker: same seed, same tokens
    extra = {"top_k": 5, "min_p": 0.01, "repetition_penalty": 1.2}
    sampled = {"max_tokens": 16, "temperature": 0.8, "top_p": 0.9, "seed": 11}
    ref_text, _ = await over_nats(client, gather, prompt=PROMPT, **sampled, **extra)
    got = await oa.completions.create(model=REF, prompt=PROMPT, extra_body=extra, **sampled)
    assert got.choices[0].text == ref_text
    differs = await oa.completions.create(model=REF, prompt=PROMPT, **sampled)
    other, _ = await over_nats(client, gather, prompt=PROMPT, **sampled)
    assert differs.choices[0].text == other

    # ---- /v1/models, /health, /metrics
    models = await oa.models.list()
    assert [m.id for m in models.data] == [REF]
    assert models.data[0].object == "model" and models.data[0].owned_by == "worker-orcd"
    assert (await oa.models.retrieve(REF)).id == REF
    async with http(gw) as h:
        listing = (await h.get("/v1/models")).json()
        workers = listing["data"][0]["workers"]
        assert [x["worker_id"] for x in workers] == [w.worker_id]
        assert workers[0]["status"] == "healthy" and workers[0]["commit"] == health.commit
        assert workers[0]["context_length"] == 4096
        assert workers[0]["kv_capacity_tokens"] == health.kv_capacity_tokens > 0
        r = await h.get("/health")
        assert r.status_code == 200
        assert r.json()["nats_connected"] is True and r.json()["models"] == {REF: 1}
        text = (await h.get("/metrics")).text
    chat_ok = metric(
        text, "orcd_gateway_requests_total", endpoint="/v1/chat/completions", status="200"
    )
    comp_ok = metric(text, "orcd_gateway_requests_total", endpoint="/v1/completions", status="200")
    assert (chat_ok, comp_ok) == (3, 5)
    assert metric(text, "orcd_gateway_time_to_first_token_seconds_count") == 3  # 3 streams
    assert metric(text, "orcd_gateway_inter_token_seconds_count") > 20
    assert metric(text, "orcd_gateway_open_streams") == 0
    assert metric(text, "orcd_gateway_workers", model_ref=REF) == 1
    await oa.close()
    assert gw.stop() == 0  # SIGTERM: a clean exit
    assert gw.records("gateway_stopped")


async def test_disconnect_cancels_the_job_on_the_worker(
    nats_server: EmbeddedNatsServer,
    client: OrcdClient,
    spawn_worker: Any,
    spawn_gateway: Any,
    tiny_model: Path,
) -> None:
    """A client that goes away mid-stream (or mid-wait, not streamed): the gateway publishes
    the cancel within 100 ms and the job ends CANCELLED on the worker (ORCD_EVENTS)."""
    w = spawn_worker(tiny_model, nats_server.url, REF, "--ctx-size", "4096").wait_ready()
    gw = spawn_gateway(nats_server.url)
    cancels: list[tuple[float, str]] = []

    async def on_cancel(msg: Any) -> None:
        cancels.append((time.perf_counter(), json.loads(msg.data)["job_id"]))

    await client.nc.subscribe(client.subjects.cancel, cb=on_cancel)
    await client.nc.flush()
    long = {"max_tokens": 2048, "temperature": 0.0}

    async def terminal(job_id: str) -> Any:
        deadline = time.monotonic() + 30
        while True:
            evs = await client.replay(job_id)
            if evs and isinstance(evs[-1], End | Error):
                return evs
            assert time.monotonic() < deadline, f"job {job_id} did not end: {evs[-3:]}"
            await asyncio.sleep(0.1)

    # streamed: read a few chunks, then close the connection
    oa = sdk(gw)
    stream = await oa.chat.completions.create(model=REF, messages=MESSAGES, stream=True, **long)
    job_id = ""
    n = 0
    async for chunk in stream:
        job_id = chunk.id
        n += 1
        if n == 5:
            break
    t_close = time.perf_counter()
    await stream.close()
    await wait_for(lambda: any(j == job_id for _, j in cancels), 5, "the cancel")
    latency = next(t for t, j in cancels if j == job_id) - t_close
    print(f"disconnect -> orcd.cancel: {latency * 1000:.1f} ms")
    assert latency < 0.1
    evs = await terminal(job_id)
    assert isinstance(evs[0], Started) and evs[0].worker_id == w.worker_id
    last = evs[-1]
    assert isinstance(last, Error) and last.code is ErrorCode.CANCELLED
    assert sum(isinstance(e, Token) for e in evs) < 2048
    assert w.wait_event("cancelled", 10)["job_id"] == job_id

    # not streamed: the client's read timeout drops the connection while the job runs
    impatient = sdk(gw, timeout=1.5)
    with pytest.raises(openai.APITimeoutError):
        await impatient.completions.create(model=REF, prompt=PROMPT, **long)
    t_gone = time.perf_counter()

    # (the streamed job may have been cancelled twice: by the gateway and its client's close)
    def completion_cancels() -> list[tuple[float, str]]:
        return [c for c in cancels if c[1].startswith("cmpl-")]

    await wait_for(lambda: bool(completion_cancels()), 5, "the completion's cancel")
    gone = completion_cancels()
    assert gone[0][0] - t_gone < 0.1
    evs = await terminal(gone[0][1])
    assert isinstance(evs[-1], Error) and evs[-1].code is ErrorCode.CANCELLED

    # a job cancelled by someone else mid-stream: an error chunk, which the SDK raises
    stream = await oa.chat.completions.create(model=REF, messages=MESSAGES, stream=True, **long)
    with pytest.raises(openai.APIError) as info:
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                await client.cancel(chunk.id)
    assert info.value.code == "cancelled"

    async with http(gw) as h:
        text = (await h.get("/metrics")).text
    assert metric(text, "orcd_gateway_client_disconnects_total") == 2
    assert metric(text, "orcd_gateway_open_streams") == 0
    # the worker is fine and serves the next request
    done = await oa.chat.completions.create(
        model=REF, messages=MESSAGES, max_tokens=3, temperature=0.0
    )
    assert done.usage is not None and done.usage.completion_tokens == 3
    await oa.close()
    await impatient.close()


async def test_two_workers_behind_one_gateway_share_the_load(
    nats_server: EmbeddedNatsServer,
    client: OrcdClient,
    spawn_worker: Any,
    spawn_gateway: Any,
    tiny_model: Path,
) -> None:
    a = spawn_worker(tiny_model, nats_server.url, REF, "--ctx-size", "4096")
    b = spawn_worker(tiny_model, nats_server.url, REF, "--ctx-size", "4096")
    a.wait_ready()
    b.wait_ready()
    gw = spawn_gateway(nats_server.url)
    oa = sdk(gw)
    async with http(gw) as h:
        listing = (await h.get("/v1/models")).json()["data"]
    assert [m["id"] for m in listing] == [REF]
    assert sorted(x["worker_id"] for x in listing[0]["workers"]) == sorted(
        [a.worker_id, b.worker_id]
    )

    async def one(k: int) -> tuple[str, str]:
        stream = await oa.chat.completions.create(
            model=REF,
            messages=[{"role": "user", "content": f"request {k}"}],
            max_tokens=48,
            temperature=0.0,
            stream=True,
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        return stream_id(stream), text

    def stream_id(stream: Any) -> str:
        return str(stream.response.headers["x-orcd-job-id"])

    results = await asyncio.gather(*(one(k) for k in range(12)))
    served_by: dict[str, int] = {}
    for job_id, _ in results:
        started = (await client.replay(job_id))[0]
        assert isinstance(started, Started)
        served_by[started.worker_id] = served_by.get(started.worker_id, 0) + 1
    print(f"jobs per worker: {served_by}")
    assert set(served_by) == {a.worker_id, b.worker_id}
    assert sum(served_by.values()) == 12
    await oa.close()


async def test_stream_survives_its_worker_dying(
    nats_server: EmbeddedNatsServer,
    client: OrcdClient,
    spawn_worker: Any,
    spawn_gateway: Any,
    tiny_model: Path,
    gather: Any,
) -> None:
    """The worker streaming a greedy job is killed; JetStream redelivers the job to the other
    worker, whose attempt re-sends from token 0: the client's stream goes on where it was,
    with no token twice, and ends with the text of the same job run undisturbed."""
    flags = ("--ctx-size", "4096", "--ack-wait-s", "2")
    a = spawn_worker(tiny_model, nats_server.url, REF, *flags)
    b = spawn_worker(tiny_model, nats_server.url, REF, *flags)
    a.wait_ready()
    b.wait_ready()
    gw = spawn_gateway(nats_server.url)
    oa = sdk(gw)
    params: dict[str, Any] = {"max_tokens": 400, "temperature": 0.0, "seed": 5}
    ref_text, ref_end = await over_nats(client, gather, messages=MESSAGES, **params)
    stream = await oa.chat.completions.create(
        model=REF, messages=MESSAGES, stream=True, stream_options={"include_usage": True}, **params
    )
    parts: list[str] = []
    killed = False
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
        if len(parts) == 20 and not killed:
            started = (await client.replay(chunk.id))[0]
            assert isinstance(started, Started)
            victim = a if started.worker_id == a.worker_id else b
            os.kill(victim.pid, signal.SIGKILL)
            killed = True
        last = chunk
    assert killed
    evs = await client.replay(last.id)
    assert [e.attempt for e in evs if isinstance(e, Started)] == [1, 2]
    assert "".join(parts) == ref_text
    assert last.usage is not None and last.usage.completion_tokens == ref_end.tokens_out
    await oa.close()
