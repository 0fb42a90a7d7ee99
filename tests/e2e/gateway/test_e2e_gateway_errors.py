"""Every error status of the gateway, end to end (nats-server, CPU workers, gateway
subprocess, openai SDK): 400 (the gateway's own validation, the worker's INVALID_REQUEST and
CONTEXT_LENGTH_EXCEEDED, streamed or not), 401, 404, 413, 500 INTERNAL, 503 (no worker, NATS
down), 504 (no first event in time); each in OpenAI's error shape."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import pytest
from gwhelpers import http, metric, sdk, wait_for

from worker.client import OrcdClient
from worker.errors import ErrorCode
from worker.nats.server import EmbeddedNatsServer
from worker.protocol import Error

REF = "tiny"
MESSAGES = [{"role": "user", "content": "hi"}]


def error_of(exc: openai.APIStatusError, status: int, code: str | None) -> dict[str, Any]:
    assert exc.status_code == status, exc
    body = exc.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert body["error"]["code"] == code, body
    assert exc.response.headers["content-type"] == "application/json"
    return dict(body["error"])


async def test_400_404_413(
    nats_server: EmbeddedNatsServer,
    spawn_worker: Any,
    spawn_gateway: Any,
    tiny_model: Path,
) -> None:
    spawn_worker(tiny_model, nats_server.url, REF, "--ctx-size", "4096").wait_ready()
    small = spawn_worker(tiny_model, nats_server.url, "small", "--ctx-size", "64")
    small.wait_ready()
    gw = spawn_gateway(nats_server.url, "--max-body-bytes", "4096")
    oa = sdk(gw)

    # ---- 400, the gateway's own checks
    cases: list[tuple[dict[str, Any], str]] = [
        ({"n": 2}, "n"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
        ({"logprobs": True}, "logprobs"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"max_tokens": 5000}, "max_tokens"),
        ({"temperature": 3.0}, "temperature"),
        ({"extra_body": {"frobnicate": 1}}, "frobnicate"),
    ]
    for params, param in cases:
        with pytest.raises(openai.BadRequestError) as info:
            await oa.chat.completions.create(model=REF, messages=MESSAGES, **params)
        err = error_of(info.value, 400, None)
        assert err["param"] == param and err["type"] == "invalid_request_error", err
    with pytest.raises(openai.BadRequestError) as info:
        await oa.completions.create(model=REF, prompt=["a", "b"])
    assert error_of(info.value, 400, None)["param"] == "prompt"
    async with http(gw) as h:
        r = await h.post(
            "/v1/chat/completions", content=b"{nope", headers={"content-type": "application/json"}
        )
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]

    # ---- 400 from the worker: INVALID_REQUEST (a stop string over 32 tokens), streamed or not
    long_stop = " ".join(["alpha"] * 40)
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as info:
            await oa.chat.completions.create(
                model=REF, messages=MESSAGES, stop=[long_stop], max_tokens=4, stream=stream
            )
        err = error_of(info.value, 400, "invalid_request")
        assert "32" in err["message"]

    # ---- 400 from the worker: CONTEXT_LENGTH_EXCEEDED (a prompt longer than 64 tokens)
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as info:
            await oa.completions.create(
                model="small", prompt="word " * 200, max_tokens=4, stream=stream
            )
        error_of(info.value, 400, "context_length_exceeded")

    # ---- 404: no worker serves the model; a name that cannot be a model ref
    for model in ("no-such-model", "a.b.>"):
        with pytest.raises(openai.NotFoundError) as info:
            await oa.chat.completions.create(model=model, messages=MESSAGES)
        assert error_of(info.value, 404, "model_not_found")["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        await oa.models.retrieve("no-such-model")
    async with http(gw) as h:
        r = await h.get("/v1/nothing-here")
        assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_url"

        # ---- 413: refused before parsing, whether the length is declared or not
        big = b'{"model": "tiny", "prompt": "' + b"x" * 5000 + b'"}'
        r = await h.post("/v1/completions", content=big)
        assert r.status_code == 413
        assert r.json()["error"]["code"] == "request_too_large"

        async def chunked() -> AsyncIterator[bytes]:
            for _ in range(10):
                yield b"x" * 1000

        r = await h.post("/v1/completions", content=chunked())
        assert r.status_code == 413 and "transfer-encoding" in r.request.headers
        # ... while a body under the limit (and not JSON) gets to the parser: 400
        r = await h.post("/v1/completions", content=b"x" * 1000)
        assert r.status_code == 400

        text = (await h.get("/metrics")).text
    assert (
        metric(text, "orcd_gateway_requests_total", endpoint="/v1/completions", status="413") == 2
    )
    assert (
        metric(text, "orcd_gateway_requests_total", endpoint="/v1/chat/completions", status="404")
        == 2
    )
    # the worker carried on
    ok = await oa.chat.completions.create(
        model=REF, messages=MESSAGES, max_tokens=2, temperature=0.0
    )
    assert ok.choices[0].finish_reason == "length"
    await oa.close()


async def test_401_api_keys(
    nats_server: EmbeddedNatsServer,
    spawn_worker: Any,
    spawn_gateway: Any,
    tiny_model: Path,
    tmp_path: Path,
) -> None:
    spawn_worker(tiny_model, nats_server.url, REF, "--ctx-size", "4096").wait_ready()
    keys = tmp_path / "keys"
    keys.write_text("# gateway keys\nsk-first-5f1d\nsk-second-9c2e\n")
    gw = spawn_gateway(nats_server.url, "--api-key-file", str(keys))
    for wrong in ("sk-wrong", "sk-first-5f1", "sk-first-5f1dX"):
        bad = sdk(gw, api_key=wrong)
        with pytest.raises(openai.AuthenticationError) as info:
            await bad.chat.completions.create(
                model=REF, messages=MESSAGES, max_tokens=2, temperature=0.0
            )
        err = error_of(info.value, 401, "invalid_api_key")
        assert wrong not in err["message"]
        with pytest.raises(openai.AuthenticationError):
            await bad.models.list()
        await bad.close()
    for key in ("sk-first-5f1d", "sk-second-9c2e"):
        good = sdk(gw, api_key=key)
        r = await good.chat.completions.create(
            model=REF, messages=MESSAGES, max_tokens=2, temperature=0.0
        )
        assert r.usage is not None and r.usage.completion_tokens == 2
        assert [m.id for m in (await good.models.list()).data] == [REF]
        await good.close()
    async with http(gw) as h:
        r = await h.post("/v1/chat/completions", json={"model": REF, "messages": MESSAGES})
        assert r.status_code == 401  # no Authorization header at all
        assert (await h.get("/health")).status_code == 200  # health and metrics stay open
        assert (await h.get("/metrics")).status_code == 200
    async with http(gw) as h:
        text = (await h.get("/metrics")).text
    assert metric(text, "orcd_gateway_requests_total", endpoint="/v1/models", status="401") == 3
    assert (
        metric(text, "orcd_gateway_requests_total", endpoint="/v1/chat/completions", status="401")
        == 4
    )
    log = gw.output()
    assert "sk-first" not in log and "sk-second" not in log and "sk-wrong" not in log


async def test_500_internal_when_the_job_runs_out_of_deliveries(
    nats_server: EmbeddedNatsServer,
    spawn_worker: Any,
    spawn_gateway: Any,
    tiny_model: Path,
) -> None:
    """The worker running the job dies; with --max-deliver 1 the other worker ends the job
    INTERNAL: the waiting (not streamed) request gets a 500 carrying that code."""
    flags = ("--ctx-size", "4096", "--ack-wait-s", "2", "--max-deliver", "1")
    a = spawn_worker(tiny_model, nats_server.url, REF, *flags)
    b = spawn_worker(tiny_model, nats_server.url, REF, *flags)
    a.wait_ready()
    b.wait_ready()
    gw = spawn_gateway(nats_server.url)
    oa = sdk(gw)
    request = asyncio.create_task(
        oa.completions.create(model=REF, prompt="x", max_tokens=2048, temperature=0.0)
    )
    await wait_for(
        lambda: request.done() or bool(a.events("execute_start") or b.events("execute_start")),
        30,
        "a worker to start the job",
    )
    assert not request.done(), request.result()  # a failure here says why
    victim = a if a.events("execute_start") else b
    os.kill(victim.pid, signal.SIGKILL)
    with pytest.raises(openai.InternalServerError) as info:
        await asyncio.wait_for(request, 60)
    err = error_of(info.value, 500, "internal")
    assert err["type"] == "server_error" and "delivered 1 times" in err["message"]
    await oa.close()


async def test_503_no_worker_and_nats_down(
    nats_server: EmbeddedNatsServer,
    client: OrcdClient,
    spawn_worker: Any,
    spawn_gateway: Any,
    tiny_model: Path,
) -> None:
    gw = spawn_gateway(nats_server.url)
    oa = sdk(gw)
    # no worker at all
    with pytest.raises(openai.InternalServerError) as info:
        await oa.chat.completions.create(model=REF, messages=MESSAGES)
    error_of(info.value, 503, "no_worker")
    assert (await oa.models.list()).data == []

    # a worker comes up: served (the gateway asks the workers when a model is unknown)
    spawn_worker(tiny_model, nats_server.url, REF, "--ctx-size", "4096").wait_ready()
    r = await oa.chat.completions.create(
        model=REF, messages=MESSAGES, max_tokens=2, temperature=0.0
    )
    assert r.choices[0].finish_reason == "length"

    # NATS goes away: /health says so, requests get 503 at once
    nats_server.stop()
    async with http(gw) as h:
        deadline = asyncio.get_running_loop().time() + 20
        while (await h.get("/health")).status_code != 503:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.05)
        assert (await h.get("/health")).json()["nats_connected"] is False
    with pytest.raises(openai.InternalServerError) as info:
        await oa.chat.completions.create(
            model=REF, messages=MESSAGES, max_tokens=2, temperature=0.0
        )
    error_of(info.value, 503, "nats_unavailable")

    # and comes back (same port, same store): the gateway reconnects and serves again
    nats_server.start()
    async with http(gw) as h:
        deadline = asyncio.get_running_loop().time() + 30
        while (await h.get("/health")).status_code != 200:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.1)
    for _ in range(100):  # the worker reconnects too
        try:
            r = await oa.chat.completions.create(
                model=REF, messages=MESSAGES, max_tokens=2, temperature=0.0
            )
            break
        except openai.APIStatusError as exc:
            assert exc.status_code in (503, 504), exc
            await asyncio.sleep(0.2)
    assert r.choices[0].finish_reason == "length"
    await oa.close()


async def test_504_no_first_event_in_time(
    nats_server: EmbeddedNatsServer,
    client: OrcdClient,
    spawn_worker: Any,
    spawn_gateway: Any,
    tiny_model: Path,
) -> None:
    """The only worker is stopped (SIGSTOP: alive to the gateway, taking no job): 504 after
    --first-event-timeout-s, and the job is cancelled, so it ends CANCELLED once the worker
    runs again instead of generating for nobody."""
    w = spawn_worker(tiny_model, nats_server.url, REF, "--ctx-size", "4096").wait_ready()
    gw = spawn_gateway(nats_server.url, "--first-event-timeout-s", "1.5", "--worker-ttl-s", "120")
    oa = sdk(gw)
    assert [m.id for m in (await oa.models.list()).data] == [REF]
    os.kill(w.pid, signal.SIGSTOP)
    try:
        t0 = asyncio.get_running_loop().time()
        for stream in (False, True):
            with pytest.raises(openai.APIStatusError) as info:
                await oa.chat.completions.create(
                    model=REF, messages=MESSAGES, max_tokens=2, temperature=0.0, stream=stream
                )
            err = error_of(info.value, 504, "timeout")
            assert err["type"] == "timeout_error"
        assert asyncio.get_running_loop().time() - t0 < 10
    finally:
        os.kill(w.pid, signal.SIGCONT)
    # the worker wakes, finds both jobs cancelled: each ends CANCELLED, none runs
    await wait_for(lambda: len(w.events("cancelled")) >= 2, 30, "both jobs cancelled")
    async with http(gw) as h:
        text = (await h.get("/metrics")).text
    assert (
        metric(text, "orcd_gateway_requests_total", endpoint="/v1/chat/completions", status="504")
        == 2
    )
    assert metric(text, "orcd_gateway_client_disconnects_total") == 0
    job_ids = [e["job_id"] for e in w.events("cancelled")]
    for job_id in job_ids:
        last = (await client.replay(job_id))[-1]
        assert isinstance(last, Error) and last.code is ErrorCode.CANCELLED
    assert not w.events("execute_start")
    r = await oa.chat.completions.create(
        model=REF, messages=MESSAGES, max_tokens=2, temperature=0.0
    )
    assert r.choices[0].finish_reason == "length"
    await oa.close()
