"""`worker-orcd gateway`: the OpenAI-compatible HTTP gateway over the NATS interface
(docs/gateway.md); `worker-orcd gateway-bench`: its overhead against NATS directly."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from worker.cli._common import add_nats_options


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "gateway",
        help="serve the OpenAI HTTP API (/v1/chat/completions, /v1/completions, /v1/models)",
        description="A stateless HTTP gateway: OpenAI requests become jobs on orcd.jobs.<model>, "
        "their events come back as responses or Server-Sent Events. Run any number of them.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (8000)")
    p.add_argument(
        "--api-key-file",
        type=Path,
        metavar="F",
        help="require 'Authorization: Bearer <key>' with one of the keys in F (one per line)",
    )
    p.add_argument(
        "--max-body-bytes", type=int, default=1 << 20, help="larger bodies get 413 (1 MiB)"
    )
    p.add_argument(
        "--first-event-timeout-s",
        type=float,
        default=60.0,
        help="504 when no worker starts a job within this long (60)",
    )
    p.add_argument(
        "--request-timeout-s",
        type=float,
        default=900.0,
        help="cancel a job not finished within this long (900)",
    )
    p.add_argument(
        "--worker-ttl-s",
        type=float,
        default=15.0,
        help="forget a worker not heard from for this long (15; heartbeats come every 5 s)",
    )
    p.add_argument("--log-format", choices=["json", "pretty"], default="pretty")
    add_nats_options(p, connect_timeout=10.0, connect_timeout_help="10; then exit 1")
    p.set_defaults(func=run_gateway)

    b = subparsers.add_parser(
        "gateway-bench",
        help="measure the gateway's added TTFT and inter-token latency against NATS directly",
        description="Start nats-server (unless --nats-url), workers and a gateway; run the same "
        "jobs through NATS and through the gateway; print one JSON object.",
    )
    from worker.gateway.bench import add_arguments

    add_arguments(b)
    b.set_defaults(func=run_bench)


def run_gateway(args: argparse.Namespace) -> int:
    from worker.narration import setup_logging

    setup_logging(args.log_format)
    try:
        from worker.gateway.app import GatewayConfig
        from worker.gateway.auth import ApiKeys
        from worker.gateway.server import run
        from worker.nats.options import nats_connect_options
    except ImportError as exc:
        print(
            f"worker-orcd gateway: {exc}; install the gateway extra "
            "(pip install 'worker-orcd[gateway]')",
            file=sys.stderr,
        )
        return 2
    try:
        config = GatewayConfig(
            nats_url=args.nats_url,
            host=args.host,
            port=args.port,
            api_key_file=args.api_key_file,
            subject_prefix=args.subject_prefix,
            max_body_bytes=args.max_body_bytes,
            first_event_timeout_s=args.first_event_timeout_s,
            request_timeout_s=args.request_timeout_s,
            worker_ttl_s=args.worker_ttl_s,
            connect_timeout_s=args.connect_timeout,
            nats_options=nats_connect_options(args),
        )
        keys = ApiKeys.from_file(args.api_key_file) if args.api_key_file else None
    except (OSError, ValueError) as exc:
        print(f"worker-orcd gateway: {exc}", file=sys.stderr)
        return 2
    return run(config, keys)


def run_bench(args: argparse.Namespace) -> int:
    from worker.gateway.bench import main

    return main(args)
