"""`worker-orcd submit`: publish one job and print its stream (text as it arrives, then a
summary line). `worker-orcd health`: ask a worker (or any) for its health; exit 0 when it is
healthy - the compose healthcheck."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import anyio
import msgspec

from worker.nats.options import add_nats_connect_arguments, nats_connect_options
from worker.protocol import End, Error, Metrics, Started, Token


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("submit", help="publish a job and stream its tokens")
    p.add_argument("prompt", nargs="?", help="prompt text (or --messages)")
    p.add_argument("--nats-url", default="nats://127.0.0.1:4222")
    p.add_argument("--model-ref", required=True, help="model reference R (orcd.jobs.R)")
    p.add_argument("--subject-prefix", default="orcd")
    p.add_argument("--job-id", help="job id (default: random)")
    p.add_argument("--messages", help="chat messages as a JSON list of {role, content}")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--min-p", type=float)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--seed", type=int)
    p.add_argument("--timeout", type=float, default=600.0, help="give up after this long")
    p.add_argument(
        "--lease-s",
        type=float,
        default=30.0,
        help="the job's lease, renewed while this command runs: if it dies, the worker ends "
        "the job (CANCELLED, client_gone) within a second of the lease running out; "
        "0: no lease (default 30)",
    )
    p.add_argument("--json", action="store_true", help="print every event as a JSON line")
    add_nats_connect_arguments(p)
    p.set_defaults(func=run_submit)

    h = subparsers.add_parser("health", help="request a worker's health (exit 0 if healthy)")
    h.add_argument("--nats-url", default="nats://127.0.0.1:4222")
    h.add_argument("--worker-id", help="ask this worker (default: whichever answers)")
    h.add_argument(
        "--worker-id-file",
        help="read the worker id from this file (what `serve` writes to $WORKER_ORCD_ID_FILE)",
    )
    h.add_argument("--subject-prefix", default="orcd")
    h.add_argument("--timeout", type=float, default=2.0)
    add_nats_connect_arguments(h)
    h.set_defaults(func=run_health)


def _params(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"max_tokens": args.max_tokens}
    for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed"):
        value = getattr(args, name)
        if value is not None:
            out[name] = value
    if args.stop:
        out["stop"] = args.stop
    if args.lease_s:
        out["lease_s"] = args.lease_s
    return out


async def _submit(args: argparse.Namespace) -> int:
    from worker.client import OrcdClient

    messages = json.loads(args.messages) if args.messages else None
    if (args.prompt is None) == (messages is None):
        print("worker-orcd submit: give a prompt or --messages (not both)", file=sys.stderr)
        return 2
    try:
        job = OrcdClient.make_job(
            prompt=args.prompt, messages=messages, job_id=args.job_id, **_params(args)
        )
    except (msgspec.ValidationError, TypeError, ValueError) as exc:
        print(f"worker-orcd submit: invalid job: {exc}", file=sys.stderr)
        return 2
    try:
        options = nats_connect_options(args)
    except ValueError as exc:
        print(f"worker-orcd submit: {exc}", file=sys.stderr)
        return 2
    client = await OrcdClient.connect(args.nats_url, args.subject_prefix, options=options)
    rc = 1
    try:
        async for ev in client.run_job(args.model_ref, job, timeout_s=args.timeout):
            if args.json:
                print(msgspec.json.encode(ev).decode(), flush=True)
            elif isinstance(ev, Started):
                if ev.attempt > 1:
                    print(f"\n[attempt {ev.attempt}]", file=sys.stderr, flush=True)
            elif isinstance(ev, Token):
                sys.stdout.write(ev.t)
                sys.stdout.flush()
            elif isinstance(ev, Metrics):
                pass
            if isinstance(ev, End):
                if not args.json:
                    print(
                        f"\n[{ev.job_id}] {ev.stop_reason}: {ev.prompt_tokens} prompt tokens, "
                        f"{ev.tokens_out} out, TTFT {ev.ttft_ms:.1f} ms, "
                        f"{ev.tokens_per_s:.1f} tokens/s",
                        flush=True,
                    )
                rc = 0
            elif isinstance(ev, Error):
                if not args.json:
                    print(f"\n[{ev.job_id}] error {ev.code}: {ev.message}", flush=True)
                rc = 1
    except TimeoutError as exc:
        print(f"\nworker-orcd submit: {exc}", file=sys.stderr)
        rc = 1
    finally:
        await client.close()
    return rc


def run_submit(args: argparse.Namespace) -> int:
    rc: int = anyio.run(_submit, args)
    return rc


async def _health(args: argparse.Namespace) -> int:
    from worker.client import OrcdClient

    if args.worker_id_file:
        try:
            with open(args.worker_id_file) as f:
                args.worker_id = f.read().strip()
        except OSError as exc:
            print(f"worker-orcd health: {exc}", file=sys.stderr)
            return 1
    try:
        client = await OrcdClient.connect(
            args.nats_url, args.subject_prefix, args.timeout, options=nats_connect_options(args)
        )
    except Exception as exc:
        print(f"worker-orcd health: cannot connect: {exc}", file=sys.stderr)
        return 1
    try:
        health = await client.health(args.worker_id, timeout_s=args.timeout)
    except Exception as exc:
        print(f"worker-orcd health: no answer: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        await client.close()
    print(msgspec.json.encode(health).decode())
    return 0 if health.status == "healthy" else 1


def run_health(args: argparse.Namespace) -> int:
    rc: int = anyio.run(_health, args)
    return rc
