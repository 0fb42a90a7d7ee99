"""Run the gateway: connect to NATS (fail fast), follow the workers, serve HTTP with uvicorn.

uvicorn runs on uvloop with the httptools parser where they are installed (the ``gateway``
extra installs both; they are uvicorn's own fast paths), without an access log (a log line
per request is not free, and the metrics count requests).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import uvicorn

from worker.gateway.app import Gateway, GatewayConfig
from worker.gateway.auth import ApiKeys
from worker.narration import narrate


class _Server(uvicorn.Server):
    """uvicorn's server with SIGINT/SIGTERM handled on the event loop (`serve` installs the
    handlers): uvicorn's own handling re-raises the signal once it has shut down, which kills
    the process before the jobs of cut-off requests are cancelled and NATS is drained."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def serve(config: GatewayConfig, keys: ApiKeys | None = None) -> int:
    from worker.client import OrcdClient, WorkerDirectory

    try:
        client = await OrcdClient.connect(
            config.nats_url,
            config.subject_prefix,
            connect_timeout_s=config.connect_timeout_s,
            options=config.nats_options,
        )
    except Exception as exc:
        narrate(
            "nats_unreachable",
            f"cannot reach NATS at {config.nats_url} within {config.connect_timeout_s:g} s: "
            f"{type(exc).__name__}: {exc}",
            level="ERROR",
        )
        return 1
    directory = WorkerDirectory(client, ttl_s=config.worker_ttl_s)
    try:
        await directory.start(probe_s=config.discovery_probe_s)
        gateway = Gateway(client, directory, config, keys)
        try:
            import httptools  # noqa: F401

            http = "httptools"
        except ImportError:  # pragma: no cover - the gateway extra installs it
            http = "h11"
        server = _Server(
            uvicorn.Config(
                gateway.app,
                host=config.host,
                port=config.port,
                http=http,
                lifespan="off",
                access_log=False,
                log_config=None,
                timeout_keep_alive=30,
                # on SIGTERM: streams in progress get this long to finish, then their jobs
                # are cancelled like those of a client that went away
                timeout_graceful_shutdown=10,
                backlog=4096,
            )
        )
        narrate(
            "gateway_ready",
            f"OpenAI API on http://{config.host}:{config.port}/v1 over {config.nats_url}",
            host=config.host,
            port=config.port,
            nats_url=config.nats_url,
            api_keys=len(keys) if keys is not None else 0,
            workers=len(directory.live()),
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, server.handle_exit, sig, None)
        await server.serve()
        await gateway.drain()
        narrate("gateway_stopped", "HTTP server stopped; closing the NATS connection")
        return 0 if server.started else 1
    finally:
        await directory.stop()
        await client.close()


def run(config: GatewayConfig, keys: ApiKeys | None = None) -> int:
    runner: Callable[[Coroutine[Any, Any, int]], int] = asyncio.run
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - the gateway extra installs it
        pass
    if sys.platform == "win32":  # pragma: no cover
        runner = asyncio.run
    return runner(serve(config, keys))
