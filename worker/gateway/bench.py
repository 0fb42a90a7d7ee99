"""`worker-orcd gateway-bench`: what the HTTP gateway adds to a job's latency, and whether one
gateway carries N concurrent SSE streams.

It starts nats-server (unless ``--nats-url``), ``--workers`` `worker-orcd serve` processes of
``--model`` (unless ``--model-ref`` names workers already running) and a gateway (unless
``--gateway-url``), then prints one JSON object:

- ``direct`` / ``gateway``: the same greedy job (a ``--prompt-words``-word prompt,
  ``--max-tokens`` tokens), ``--jobs`` times each, alternating, over NATS with `OrcdClient`
  and as a streamed ``/v1/completions`` request; time to first token (from the call to the
  first token with text) and inter-token gaps (between tokens with text: the gateway sends no
  chunk for an empty one), p50/p95/p99 in ms. ``added_ttft_p95_ms`` and
  ``added_inter_token_p95_ms`` are gateway minus direct.
- ``paired``: during the gateway runs the bench also follows ``orcd.events.*`` itself, so
  every token is seen twice in one process - from NATS and from the gateway's SSE stream;
  ``delivery_delay_ms`` is the difference per token (what the gateway hop costs, decode-time
  noise removed) and ``added_inter_token_p95_ms`` compares the gaps of the same tokens.
- ``concurrent``: ``--streams`` chat streams at once through the gateway (``--stream-max-
  tokens`` each, usage requested): how many ended with ``[DONE]``, a finish_reason and usage,
  the errors, the wall time and TTFT under that load.
- ``targets``: pass/fail against the gateway's targets (added TTFT p95 < 2 ms, added
  inter-token p95 < 0.3 ms, every stream without error).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import sys
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

WORDS = (
    "the quick brown fox jumps over the lazy dog while seven wizards quietly judge boxing "
    "matches near an old stone bridge under grey autumn skies"
)

TARGET_ADDED_TTFT_P95_MS = 2.0
TARGET_ADDED_INTER_TOKEN_P95_MS = 0.3


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, metavar="PATH", help="GGUF file for the workers")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="worker backend")
    p.add_argument("--workers", type=int, default=1, metavar="N", help="workers to start (1)")
    p.add_argument("--ctx-size", type=int, default=4096, metavar="N")
    p.add_argument("--nats-url", default=None, help="NATS URL (default: start nats-server)")
    p.add_argument("--gateway-url", default=None, help="use this gateway (default: start one)")
    p.add_argument(
        "--model-ref",
        default=None,
        metavar="R",
        help="model ref (default gw-bench-<random>; with no --model, workers of R must run)",
    )
    p.add_argument("--jobs", type=int, default=20, metavar="N", help="jobs per path (20)")
    p.add_argument("--max-tokens", type=int, default=64, metavar="N", help="tokens per job")
    p.add_argument("--prompt-words", type=int, default=32, metavar="N", help="prompt length")
    p.add_argument("--streams", type=int, default=256, metavar="N", help="concurrent streams")
    p.add_argument("--stream-max-tokens", type=int, default=16, metavar="N")
    p.add_argument(
        "--worker-flag",
        action="append",
        default=[],
        metavar="FLAG",
        help="extra flag for the workers' serve command (repeatable, e.g. --worker-flag=--x=1)",
    )
    from worker.nats.options import add_nats_connect_arguments

    add_nats_connect_arguments(p)  # with --nats-url: the bench, its workers and gateway use them


def _pcts(values: list[float]) -> dict[str, float | int]:
    if not values:
        return {"n": 0}
    a = np.asarray(values) * 1000.0
    return {
        "n": len(values),
        "p50": round(float(np.percentile(a, 50)), 4),
        "p95": round(float(np.percentile(a, 95)), 4),
        "p99": round(float(np.percentile(a, 99)), 4),
    }


def _gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


def main(args: argparse.Namespace) -> int:
    from worker.nats.options import url_connect_options

    if args.model is None and args.model_ref is None:
        print("worker-orcd gateway-bench: give --model (or --model-ref of running workers)")
        return 2
    try:
        options = url_connect_options(args)
    except ValueError as exc:
        print(f"worker-orcd gateway-bench: {exc}")
        return 2
    try:
        import httpx2  # noqa: F401
    except ImportError:
        print("worker-orcd gateway-bench needs httpx2 (pip install 'worker-orcd[test]')")
        return 2
    from worker.cli._tools import ToolsUnavailable, import_tool

    try:  # the workers are started as the suite starts them (tools/, a source checkout)
        live = import_tool("live", "gateway-bench")
    except ToolsUnavailable as exc:
        print(f"worker-orcd gateway-bench: {exc}")
        return 2
    result = asyncio.run(_bench(args, live, options))
    print(json.dumps(result, indent=2))
    return 0 if all(result["targets"].values()) else 1


async def _bench(args: argparse.Namespace, live: Any, options: Any) -> dict[str, Any]:
    """`live`: tools.live (WorkerProc, wait_healthy); `options`: NATS credentials and TLS for
    --nats-url, or None."""
    from worker.buildinfo import commit
    from worker.client import OrcdClient
    from worker.gateway.live import GatewayProc
    from worker.nats.server import EmbeddedNatsServer

    with contextlib.ExitStack() as stack:
        nats_url = args.nats_url
        if nats_url is None:
            srv = EmbeddedNatsServer()
            srv.start()
            stack.callback(srv.cleanup)
            nats_url = srv.url
        ref = args.model_ref or f"gw-bench-{uuid.uuid4().hex[:8]}"
        env = options.environ() if options is not None else None
        client = await OrcdClient.connect(nats_url, options=options)
        try:
            if args.model is not None:
                workers = []
                for _ in range(args.workers):
                    w = live.WorkerProc(
                        args.model,
                        nats_url,
                        ref,
                        "--ctx-size",
                        str(args.ctx_size),
                        *args.worker_flag,
                        device=args.device,
                        env=env,
                    )
                    stack.callback(w.stop)
                    workers.append(w)
                for w in workers:
                    await live.wait_healthy(client, w, timeout=900)
            url = args.gateway_url
            if url is None:
                gw = GatewayProc(nats_url, "--first-event-timeout-s", "900", env=env)
                stack.callback(gw.stop)
                await asyncio.to_thread(gw.wait_ready)
                url = gw.url
            out = await _measure(args, client, url.rstrip("/"), ref)
        finally:
            await client.close()
    out.update(
        model=str(args.model) if args.model else None,
        model_ref=ref,
        device=args.device,
        workers=args.workers if args.model else None,
        commit=commit(),
    )
    return out


async def _measure(args: argparse.Namespace, client: Any, url: str, ref: str) -> dict[str, Any]:
    import httpx2

    from worker.protocol import Error, Token, decode_event

    words = WORDS.split()
    prompt = " ".join(words[k % len(words)] for k in range(args.prompt_words))
    params = {"max_tokens": args.max_tokens, "temperature": 0.0, "seed": 1}
    body = msgspec.json.encode({"model": ref, "prompt": prompt, "stream": True, **params})

    # every token of every job as NATS delivers it to this process
    tap: dict[str, list[float]] = defaultdict(list)

    async def on_event(msg: Any) -> None:
        now = time.perf_counter()
        ev = decode_event(msg.data)
        if isinstance(ev, Token) and ev.t:
            tap[ev.job_id].append(now)

    sub = await client.nc.subscribe(client.subjects.events("*"), cb=on_event)

    async def direct() -> tuple[float, list[float]]:
        times: list[float] = []
        t0 = time.perf_counter()
        async for ev in client.generate(ref, prompt=prompt, timeout_s=900, **params):
            if isinstance(ev, Token) and ev.t:
                times.append(time.perf_counter())
            elif isinstance(ev, Error):
                raise RuntimeError(f"direct job failed: {ev.code}: {ev.message}")
        return t0, times

    async def via_gateway(http: httpx2.AsyncClient) -> tuple[float, list[float], str]:
        times: list[float] = []
        rid = ""
        t0 = time.perf_counter()
        headers = {"content-type": "application/json"}
        async with http.stream("POST", url + "/v1/completions", content=body, headers=headers) as r:
            if r.status_code != 200:
                raise RuntimeError(f"gateway answered {r.status_code}: {(await r.aread())!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    break
                chunk = msgspec.json.decode(line[6:])
                if "error" in chunk:
                    raise RuntimeError(f"gateway stream failed: {chunk['error']}")
                rid = chunk["id"]
                choices = chunk["choices"]
                if choices and choices[0]["text"]:
                    times.append(time.perf_counter())
        return t0, times, rid

    timeout = httpx2.Timeout(900.0, connect=10.0)
    limits = httpx2.Limits(max_connections=args.streams + 8, max_keepalive_connections=64)
    async with httpx2.AsyncClient(timeout=timeout, limits=limits) as http:
        for _ in range(2):  # warm-up: caches, connections, the gateway's worker directory
            await direct()
            await via_gateway(http)
        d_ttft: list[float] = []
        d_gaps: list[float] = []
        g_ttft: list[float] = []
        g_gaps: list[float] = []
        delays: list[float] = []
        tap_gaps: list[float] = []
        for k in range(args.jobs):
            order = ("direct", "gateway") if k % 2 == 0 else ("gateway", "direct")
            for which in order:
                if which == "direct":
                    t0, times = await direct()
                    if times:
                        d_ttft.append(times[0] - t0)
                        d_gaps += _gaps(times)
                else:
                    t0, times, rid = await via_gateway(http)
                    if times:
                        g_ttft.append(times[0] - t0)
                        g_gaps += _gaps(times)
                    nats_times = tap.pop(rid, [])
                    if len(nats_times) == len(times):
                        delays += [h - n for h, n in zip(times, nats_times, strict=True)]
                        tap_gaps += _gaps(nats_times)
        await sub.unsubscribe()
        concurrent = await _concurrent(args, http, url, ref, prompt)

    direct_stats = {"ttft_ms": _pcts(d_ttft), "inter_token_ms": _pcts(d_gaps)}
    gateway_stats = {"ttft_ms": _pcts(g_ttft), "inter_token_ms": _pcts(g_gaps)}
    added_ttft = _p95(g_ttft) - _p95(d_ttft)
    added_inter = _p95(g_gaps) - _p95(d_gaps)
    paired_inter = _p95(g_gaps) - _p95(tap_gaps)
    return {
        "jobs": args.jobs,
        "max_tokens": args.max_tokens,
        "prompt_words": args.prompt_words,
        "direct": direct_stats,
        "gateway": gateway_stats,
        "added_ttft_p95_ms": round(added_ttft, 4),
        "added_inter_token_p95_ms": round(added_inter, 4),
        "paired": {
            "tokens": len(delays),
            "delivery_delay_ms": _pcts(delays),
            "nats_inter_token_ms": _pcts(tap_gaps),
            "added_inter_token_p95_ms": round(paired_inter, 4),
        },
        "concurrent": concurrent,
        "targets": {
            "added_ttft_p95_lt_2ms": added_ttft < TARGET_ADDED_TTFT_P95_MS,
            "added_inter_token_p95_lt_0.3ms": added_inter < TARGET_ADDED_INTER_TOKEN_P95_MS,
            "concurrent_streams_without_errors": concurrent["errors"] == 0,
        },
    }


def _p95(values: list[float]) -> float:
    return float(np.percentile(np.asarray(values) * 1000.0, 95)) if values else float("nan")


async def _concurrent(
    args: argparse.Namespace, http: Any, url: str, ref: str, prompt: str
) -> dict[str, Any]:
    n = args.streams

    async def one(k: int) -> tuple[float, int]:
        body = {
            "model": ref,
            "messages": [{"role": "user", "content": f"{k}: {prompt}"}],
            "max_tokens": args.stream_max_tokens,
            "temperature": 0.0,
            "seed": k,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        t0 = time.perf_counter()
        ttft = -1.0
        finish = None
        usage = None
        done = False
        async with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"status {r.status_code}: {(await r.aread())[:200]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                chunk = msgspec.json.decode(line[6:])
                if "error" in chunk:
                    raise RuntimeError(f"error chunk: {chunk['error']}")
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for c in chunk["choices"]:
                    if c["delta"].get("content") and ttft < 0:
                        ttft = time.perf_counter() - t0
                    finish = c["finish_reason"] or finish
        if not (done and finish and usage):
            raise RuntimeError(f"stream {k} incomplete: done={done} finish={finish} usage={usage}")
        return ttft, int(usage["completion_tokens"])

    t0 = time.perf_counter()
    results = await asyncio.gather(*(one(k) for k in range(n)), return_exceptions=True)
    wall = time.perf_counter() - t0
    ok = [r for r in results if not isinstance(r, BaseException)]
    errors = [r for r in results if isinstance(r, BaseException)]
    for e in errors[:3]:
        print(f"gateway-bench: stream failed: {type(e).__name__}: {e}", file=sys.stderr)
    tokens = sum(t for _, t in ok)
    return {
        "streams": n,
        "ok": len(ok),
        "errors": len(errors),
        "wall_s": round(wall, 3),
        "tokens": tokens,
        "tokens_per_s": round(tokens / wall, 1) if wall > 0 else None,
        "ttft_ms": _pcts([t for t, _ in ok if t >= 0]),
    }
