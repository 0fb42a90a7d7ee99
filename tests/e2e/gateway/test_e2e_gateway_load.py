"""256 concurrent SSE streams through one gateway process, without errors (tiny model, a few
tokens each; two CPU workers behind it)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx2
from gwhelpers import metric
from openai.types.chat import ChatCompletionChunk

from worker.nats.server import EmbeddedNatsServer

REF = "tiny"
STREAMS = 256


async def test_256_concurrent_streams(
    nats_server: EmbeddedNatsServer,
    spawn_worker: Any,
    spawn_gateway: Any,
    tiny_model: Path,
) -> None:
    workers = [spawn_worker(tiny_model, nats_server.url, REF, "--ctx-size", "1024") for _ in "ab"]
    for w in workers:
        w.wait_ready()
    gw = spawn_gateway(nats_server.url, "--first-event-timeout-s", "300")
    peak_open = 0

    async def one(h: httpx2.AsyncClient, k: int) -> tuple[str, int]:
        body = {
            "model": REF,
            "messages": [{"role": "user", "content": f"stream number {k}"}],
            "max_tokens": 4,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        async with h.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200, await r.aread()
            data = [line[6:] async for line in r.aiter_lines() if line.startswith("data: ")]
        assert data[-1] == "[DONE]", data[-3:]
        chunks = [ChatCompletionChunk.model_validate_json(d, strict=True) for d in data[:-1]]
        assert len({c.id for c in chunks}) == 1
        usage = chunks[-1].usage
        assert usage is not None and usage.completion_tokens == 4
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        return chunks[0].id, usage.completion_tokens

    async def watch_open(h: httpx2.AsyncClient, stop: asyncio.Event) -> None:
        nonlocal peak_open
        while not stop.is_set():
            text = (await h.get("/metrics")).text
            peak_open = max(peak_open, int(metric(text, "orcd_gateway_requests_in_flight")))
            await asyncio.sleep(0.05)

    limits = httpx2.Limits(max_connections=STREAMS + 16, max_keepalive_connections=STREAMS)
    async with httpx2.AsyncClient(base_url=gw.url, timeout=300, limits=limits) as h:
        t0 = time.perf_counter()
        stop = asyncio.Event()
        watcher = asyncio.create_task(watch_open(h, stop))
        results = await asyncio.gather(*(one(h, k) for k in range(STREAMS)))
        stop.set()
        await watcher
        wall = time.perf_counter() - t0
        text = (await h.get("/metrics")).text
    print(f"{STREAMS} streams in {wall:.1f} s; at most {peak_open} in flight at once")
    assert len({rid for rid, _ in results}) == STREAMS
    ok = metric(text, "orcd_gateway_requests_total", endpoint="/v1/chat/completions", status="200")
    assert ok == STREAMS
    assert metric(text, "orcd_gateway_open_streams") == 0
    assert metric(text, "orcd_gateway_requests_in_flight") == 0
    assert peak_open > STREAMS // 2  # they really were concurrent
