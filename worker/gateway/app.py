"""The gateway's ASGI application (Starlette routing, uvicorn serving; see docs/gateway.md).

The two completion endpoints are plain ASGI callables rather than Starlette request/response
functions: one coroutine reads the body (refusing it past the size limit before parsing),
submits the job through `OrcdClient`, waits for its first event and relays the rest, while a
second task listens for the client going away, which cancels the job on the worker at once
(``orcd.cancel``) and stops the relay. The HTTP status goes out with the first token (or the
terminal event), so a job the worker refuses before generating anything still gets its own
status (400 for INVALID_REQUEST / CONTEXT_LENGTH_EXCEEDED, ...) even when streamed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import anyio
import msgspec
import nats.errors
import nats.js.errors
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from worker.buildinfo import commit
from worker.client import OrcdClient, WorkerDirectory
from worker.gateway.auth import ApiKeys
from worker.gateway.errors import APIError, from_worker
from worker.gateway.metrics import CONTENT_TYPE, GatewayMetrics
from worker.gateway.render import ChunkTemplate, Kind, error_chunk, full_response
from worker.gateway.translate import (
    ChatRequest,
    CompletionRequest,
    chat_job,
    completion_job,
    decode_chat,
    decode_completion,
    model_ref,
)
from worker.narration import narrate
from worker.nats.options import NatsConnectOptions
from worker.protocol import (
    End,
    Error,
    Event,
    Health,
    Job,
    Metrics,
    Started,
    Token,
    handed_back,
)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_JSON: Final = [(b"content-type", b"application/json")]
_SSE: Final = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


@dataclass
class GatewayConfig:
    nats_url: str = "nats://127.0.0.1:4222"
    host: str = "127.0.0.1"
    port: int = 8000
    api_key_file: Path | None = None
    subject_prefix: str = "orcd"
    max_body_bytes: int = 1 << 20
    # 504 when a job's first event (its `started`, or an error) takes longer than this
    first_event_timeout_s: float = 60.0
    # a job still not finished after this long is cancelled (504, or an error chunk)
    request_timeout_s: float = 900.0
    # a worker not heard from (heartbeat or health reply) for this long is gone
    worker_ttl_s: float = 15.0
    # how long to wait for health replies when a model ref is not known yet
    discovery_probe_s: float = 0.25
    connect_timeout_s: float = 10.0
    nats_options: NatsConnectOptions = field(default_factory=NatsConnectOptions)

    def __post_init__(self) -> None:
        if self.max_body_bytes < 1024:
            raise ValueError("--max-body-bytes must be at least 1024")
        if min(self.first_event_timeout_s, self.request_timeout_s, self.worker_ttl_s) <= 0:
            raise ValueError("timeouts and the worker TTL must be > 0")


class ClientGone(Exception):
    """The HTTP client disconnected."""


def _fingerprint(health: Health | None) -> str:
    """``system_fingerprint``: the serving worker's version and source commit."""
    if health is None:
        return "orcd-unknown"
    return f"orcd-{health.version}-{health.commit or 'unknown'}"


async def _read_body(receive: Receive, headers: dict[bytes, bytes], limit: int) -> bytes:
    too_large = APIError(
        413, f"The request body is larger than {limit} bytes", code="request_too_large"
    )
    declared = headers.get(b"content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise too_large
        except ValueError:
            raise APIError(400, "Invalid Content-Length header") from None
    chunks: list[bytes] = []
    size = 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise ClientGone
        body = msg.get("body", b"")
        size += len(body)
        if size > limit:
            raise too_large
        chunks.append(body)
        if not msg.get("more_body", False):
            return b"".join(chunks)


async def _send_json(
    send: Send, status: int, body: bytes, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    headers = [*_JSON, (b"content-length", str(len(body)).encode()), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class _Relay:
    """One completion request's job: submitted, followed, relayed (see the module doc)."""

    def __init__(self, gw: Gateway, kind: Kind, endpoint: str, send: Send) -> None:
        self.gw = gw
        self.kind = kind
        self.endpoint = endpoint
        self.send = send
        self.job_id: str | None = None
        self.submitted = False
        self.finished = False  # the job's terminal event has been seen
        self.cancel_sent = False
        self.status: int | None = None  # the HTTP status sent
        # the response's last message is (being) sent: a disconnect from here on is the
        # server's own end of the exchange, not the client leaving
        self.responded = False

    def cancel_job(self) -> None:
        """Cancel the job on the worker (once) unless it has ended; does not wait."""
        if self.job_id is None or not self.submitted or self.finished or self.cancel_sent:
            return
        self.cancel_sent = True
        self.gw.spawn(self.gw.client.cancel_nowait(self.job_id))

    async def respond_error(self, err: APIError) -> None:
        self.status = err.status
        self.responded = True
        await _send_json(self.send, err.status, err.body())

    async def send_last(self, body: bytes) -> None:
        """The stream's last body message."""
        self.responded = True
        await self.send({"type": "http.response.body", "body": body, "more_body": False})


class Gateway:
    def __init__(
        self,
        client: OrcdClient,
        directory: WorkerDirectory,
        config: GatewayConfig,
        keys: ApiKeys | None = None,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        self.client = client
        self.directory = directory
        self.config = config
        self.keys = keys or ApiKeys([])
        self.metrics = metrics or GatewayMetrics()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._own_fingerprint = f"orcd-gateway-{commit()}"
        self.app = Starlette(
            routes=[
                Route("/v1/chat/completions", _Endpoint(self, "chat"), methods=["POST"]),
                Route("/v1/completions", _Endpoint(self, "completion"), methods=["POST"]),
                Route("/v1/models", self.list_models, methods=["GET"]),
                Route("/v1/models/{model:path}", self.get_model, methods=["GET"]),
                Route("/health", self.health, methods=["GET"]),
                Route("/metrics", self.prometheus, methods=["GET"]),
            ],
            exception_handlers={HTTPException: self._http_exception},
        )

    # ------------------------------------------------------------------ plumbing

    def spawn(self, coro: Awaitable[Any]) -> None:
        """Run `coro` in the background (held until done; failures are logged)."""
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                narrate("gateway_task_failed", repr(t.exception()), level="WARNING")

        task.add_done_callback(done)

    async def drain(self) -> None:
        """Wait for the background publishes (cancels) still in flight."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2.0)

    async def _http_exception(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 404:
            err = APIError(404, f"Unknown path {request.url.path}", code="unknown_url")
        elif exc.status_code == 405:
            err = APIError(405, f"Method {request.method} not allowed on {request.url.path}")
        else:
            err = APIError(exc.status_code, str(exc.detail))
        return Response(err.body(), status_code=err.status, media_type="application/json")

    def _authorize(self, headers: dict[bytes, bytes]) -> None:
        if not self.keys.check(headers.get(b"authorization")):
            raise APIError(
                401,
                "Incorrect or missing API key: pass it as 'Authorization: Bearer <key>'",
                code="invalid_api_key",
            )

    def _authorize_request(self, request: Request, endpoint: str) -> Response | None:
        auth = request.headers.get("authorization")
        try:
            self._authorize({} if auth is None else {b"authorization": auth.encode("latin-1")})
        except APIError as err:
            # the route's name, not the path: a label value per model name would be unbounded
            self.metrics.requests.labels(endpoint, str(err.status)).inc()
            return Response(err.body(), status_code=err.status, media_type="application/json")
        return None

    async def _check_served(self, ref: str) -> None:
        """503 when NATS or every worker is away, 404 when no live worker serves `ref`."""
        if not self.client.connected:
            raise APIError(503, "The gateway has no NATS connection", code="nats_unavailable")
        if self.directory.serving(ref):
            return
        await self.directory.refresh(self.config.discovery_probe_s)
        if self.directory.serving(ref):
            return
        if not self.client.connected:
            raise APIError(503, "The gateway has no NATS connection", code="nats_unavailable")
        if not self.directory.live():
            raise APIError(503, "No worker is reachable", code="no_worker")
        if self.directory.workers(ref):
            raise APIError(
                503, f"No worker of model `{ref}` is taking jobs now", code="model_unavailable"
            )
        raise APIError(
            404,
            f"The model `{ref}` does not exist (no live worker serves it)",
            param="model",
            code="model_not_found",
        )

    async def _worker_fingerprint(self, started: Started | None, ref: str) -> str:
        health = None
        if started is not None and started.worker_id:
            health = await self.directory.lookup(started.worker_id)
        if health is None:
            serving = self.directory.serving(ref)
            health = serving[0] if serving else None
        return _fingerprint(health)

    # ------------------------------------------------------------------ completions

    async def completion(self, kind: Kind, scope: Scope, receive: Receive, send: Send) -> None:
        t0 = time.perf_counter()
        endpoint = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
        relay = _Relay(self, kind, endpoint, send)
        headers = dict(scope["headers"])
        self.metrics.in_flight.inc()
        try:
            try:
                self._authorize(headers)
                body = await _read_body(receive, headers, self.config.max_body_bytes)
                req: ChatRequest | CompletionRequest
                if kind == "chat":
                    req = decode_chat(body)
                else:
                    req = decode_completion(body)
                ref = model_ref(req)
                job_id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
                job = chat_job(req, job_id) if isinstance(req, ChatRequest) else None
                if isinstance(req, CompletionRequest):
                    job = completion_job(req, job_id)
                assert job is not None
                await self._check_served(ref)
            except APIError as err:
                await relay.respond_error(err)
                return
            except ClientGone:
                return
            relay.job_id = job_id
            include_usage = bool(
                req.stream and req.stream_options and req.stream_options.include_usage
            )
            await self._run(relay, receive, ref, job, bool(req.stream), include_usage, t0)
        finally:
            self.metrics.in_flight.dec()
            if relay.status is not None:
                self.metrics.requests.labels(endpoint, str(relay.status)).inc()
            else:
                self.metrics.disconnects.inc()
                self.metrics.requests.labels(endpoint, "499").inc()

    async def _run(
        self,
        relay: _Relay,
        receive: Receive,
        ref: str,
        job: Job,
        stream: bool,
        include_usage: bool,
        t0: float,
    ) -> None:
        gone = False
        try:
            with anyio.CancelScope() as cancel_scope:

                async def watch() -> None:
                    nonlocal gone
                    while True:
                        msg = await receive()
                        if msg["type"] == "http.disconnect":
                            break
                    if relay.responded:
                        return
                    gone = True
                    relay.cancel_job()  # first: the worker stops within one step
                    cancel_scope.cancel()

                watcher = asyncio.ensure_future(watch())
                try:
                    await self._relay(relay, ref, job, stream, include_usage, t0)
                finally:
                    watcher.cancel()
            if gone and not relay.finished:
                narrate(
                    "client_gone",
                    "client disconnected; job cancelled",
                    job_id=job.job_id,
                    ref=ref,
                )
                relay.status = None  # counted as a disconnect
        finally:
            # also when this task itself is cancelled (the gateway shutting down)
            relay.cancel_job()

    async def _relay(
        self,
        relay: _Relay,
        ref: str,
        job: Job,
        stream: bool,
        include_usage: bool,
        t0: float,
    ) -> None:
        cfg = self.config
        events = self.client.run_job(ref, job, timeout_s=cfg.request_timeout_s)
        relay.submitted = True  # the publish happens inside: from here on, cancel on exit
        started: Started | None = None
        failure: APIError | None = None
        try:
            try:
                ev = await asyncio.wait_for(anext(events), cfg.first_event_timeout_s)
            except TimeoutError:
                raise APIError(
                    504,
                    f"No worker started the job within {cfg.first_event_timeout_s:g} s",
                    code="timeout",
                ) from None
            # before any token: Started / Metrics; the status waits for the first token
            # (an attempt handed back after a device failure: the next one follows)
            while isinstance(ev, Started | Metrics) or handed_back(ev):
                if isinstance(ev, Started):
                    started = ev
                ev = await anext(events)
            if isinstance(ev, Error):
                relay.finished = True
                raise from_worker(ev.code, ev.message)
            fingerprint = await self._worker_fingerprint(started, ref)
            created = int(time.time())
            if stream:
                await self._stream(relay, events, ev, fingerprint, created, include_usage, ref, t0)
            else:
                await self._collect(relay, events, ev, fingerprint, created, ref)
        except APIError as exc:
            failure = exc
        except (nats.errors.Error, nats.js.errors.Error, OSError) as exc:
            # (before TimeoutError: nats-py's timeouts are TimeoutErrors too)
            failure = APIError(
                503, f"NATS: {type(exc).__name__}: {exc}".strip(), code="nats_unavailable"
            )
        except TimeoutError:
            failure = APIError(
                504, f"The job did not finish within {cfg.request_timeout_s:g} s", code="timeout"
            )
        except Exception as exc:  # a bug: answer 500 rather than drop the connection
            narrate(
                "gateway_error",
                f"{type(exc).__name__}: {exc}",
                level="ERROR",
                job_id=job.job_id,
                exc_info=True,
            )
            failure = APIError(
                500, f"Internal gateway error: {type(exc).__name__}", code="internal"
            )
        finally:
            with anyio.CancelScope(shield=True):
                await events.aclose()
        if failure is None:
            return
        if relay.status is None:
            await relay.respond_error(failure)
        else:  # the stream has begun: OpenAI's SDKs raise an error chunk
            await self._stream_error(relay, failure)

    async def _stream_error(self, relay: _Relay, err: APIError) -> None:
        with contextlib.suppress(Exception):
            await relay.send_last(error_chunk(err.payload()))

    async def _stream(
        self,
        relay: _Relay,
        events: AsyncGenerator[Event, None],
        first: Event,
        fingerprint: str,
        created: int,
        include_usage: bool,
        ref: str,
        t0: float,
    ) -> None:
        assert relay.job_id is not None
        send = relay.send
        metrics = self.metrics
        tmpl = ChunkTemplate(relay.kind, relay.job_id, created, ref, fingerprint, include_usage)
        headers = [*_SSE, (b"x-orcd-job-id", relay.job_id.encode())]
        relay.status = 200
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        metrics.open_streams.inc()
        inter = metrics.inter_token
        last = 0.0
        texts: list[str] = []  # every token's text so far, by index
        replaying = False
        try:
            body = tmpl.opening()  # goes out with the first token
            ev: Event = first
            while True:
                if isinstance(ev, Token):
                    if replaying:
                        # a new attempt (the job's worker died; JetStream redelivered it)
                        # re-sends from token 0: skip what the client has, as long as it
                        # is the same text (greedy or seeded: it is); else give up
                        if ev.i < len(texts):
                            if ev.t != texts[ev.i]:
                                relay.cancel_job()
                                relay.finished = True
                                err = APIError(
                                    500,
                                    "the job was restarted on another worker and its output "
                                    "diverged from what was already streamed",
                                    code="internal",
                                )
                                await relay.send_last(body + error_chunk(err.payload()))
                                return
                            ev = await anext(events)
                            continue
                        replaying = False
                    text = ev.t
                    texts.append(text)
                    if text:  # an empty text (bytes of a split character held back): no chunk
                        if last:
                            await send(
                                {
                                    "type": "http.response.body",
                                    "body": tmpl.token(text),
                                    "more_body": True,
                                }
                            )
                            now = time.perf_counter()
                            inter.observe(now - last)
                        else:
                            await send(
                                {
                                    "type": "http.response.body",
                                    "body": body + tmpl.token(text),
                                    "more_body": True,
                                }
                            )
                            body = b""
                            now = time.perf_counter()
                            metrics.ttft.observe(now - t0)
                        last = now
                elif isinstance(ev, Started):
                    replaying = True
                elif handed_back(ev):
                    pass  # its next attempt follows (Started, then the tokens again)
                elif isinstance(ev, End):
                    relay.finished = True
                    await relay.send_last(body + tmpl.closing(ev))
                    return
                elif isinstance(ev, Error):
                    relay.finished = True
                    err = from_worker(ev.code, ev.message)
                    await relay.send_last(body + error_chunk(err.payload()))
                    return
                ev = await anext(events)
        finally:
            metrics.open_streams.dec()

    async def _collect(
        self,
        relay: _Relay,
        events: AsyncGenerator[Event, None],
        first: Event,
        fingerprint: str,
        created: int,
        ref: str,
    ) -> None:
        assert relay.job_id is not None
        parts: list[str] = []
        ev: Event = first
        while True:
            if isinstance(ev, Token):
                parts.append(ev.t)
            elif isinstance(ev, Started):  # a new attempt (redelivered) starts from scratch
                parts.clear()
            elif handed_back(ev):
                pass  # its next attempt follows
            elif isinstance(ev, End):
                relay.finished = True
                body = full_response(
                    relay.kind, relay.job_id, created, ref, fingerprint, "".join(parts), ev
                )
                relay.status = 200
                await _send_json(relay.send, 200, body, [(b"x-orcd-job-id", relay.job_id.encode())])
                return
            elif isinstance(ev, Error):
                relay.finished = True
                raise from_worker(ev.code, ev.message)
            ev = await anext(events)

    # ------------------------------------------------------------------ the rest

    def _model_entry(self, ref: str, workers: list[Health]) -> dict[str, Any]:
        oldest = max(h.uptime_seconds for h in workers)
        return {
            "id": ref,
            "object": "model",
            "created": int(time.time() - oldest),
            "owned_by": "worker-orcd",
            "context_length": max(h.context_length for h in workers),
            "workers": [
                {
                    "worker_id": h.worker_id,
                    "status": h.status,
                    "model": h.model,
                    "device": h.device,
                    "quant_kind": h.quant_kind,
                    "context_length": h.context_length,
                    "kv_capacity_tokens": h.kv_capacity_tokens,
                    "active_job_id": h.active_job_id,
                    "jobs_completed": h.jobs_completed,
                    "version": h.version,
                    "commit": h.commit,
                }
                for h in workers
            ],
        }

    async def list_models(self, request: Request) -> Response:
        denied = self._authorize_request(request, "/v1/models")
        if denied is not None:
            return denied
        models = self.directory.models()
        data = [self._model_entry(ref, ws) for ref, ws in sorted(models.items())]
        self.metrics.requests.labels("/v1/models", "200").inc()
        return Response(
            msgspec.json.encode({"object": "list", "data": data}), media_type="application/json"
        )

    async def get_model(self, request: Request) -> Response:
        denied = self._authorize_request(request, "/v1/models/{model}")
        if denied is not None:
            return denied
        ref = request.path_params["model"]
        workers = self.directory.serving(ref)
        if not workers:
            await self.directory.refresh(self.config.discovery_probe_s)
            workers = self.directory.serving(ref)
        if not workers:
            err = APIError(
                404,
                f"The model `{ref[:100]}` does not exist",
                param="model",
                code="model_not_found",
            )
            self.metrics.requests.labels("/v1/models/{model}", "404").inc()
            return Response(err.body(), status_code=404, media_type="application/json")
        self.metrics.requests.labels("/v1/models/{model}", "200").inc()
        return Response(
            msgspec.json.encode(self._model_entry(ref, workers)), media_type="application/json"
        )

    async def health(self, request: Request) -> Response:
        connected = self.client.connected
        models = self.directory.models()
        body = {
            "status": "ok" if connected else "unavailable",
            "nats_connected": connected,
            "workers": len(self.directory.live()),
            "models": {ref: len(ws) for ref, ws in sorted(models.items())},
            "version": self._own_fingerprint,
        }
        return JSONResponse(body, status_code=200 if connected else 503)

    async def prometheus(self, request: Request) -> Response:
        self.metrics.workers.clear()
        for ref, ws in self.directory.models().items():
            self.metrics.workers.labels(ref).set(len(ws))
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)


class _Endpoint:
    """A completion endpoint as a plain ASGI app (Starlette routes to it as one)."""

    def __init__(self, gw: Gateway, kind: Kind) -> None:
        self.gw = gw
        self.kind: Kind = kind

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.gw.completion(self.kind, scope, receive, send)
