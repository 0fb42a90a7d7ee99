"""`worker-orcd health`: ask workers for their health over NATS; exit 0 when healthy (the
container healthcheck of compose.yaml)."""

from __future__ import annotations

import argparse
import sys

import msgspec

from worker.cli._common import (
    DEFAULT_CLIENT_CONNECT_TIMEOUT_S,
    EXIT_FAILED,
    EXIT_OK,
    SubParsers,
    add_command,
    add_json_option,
    add_model_ref_option,
    add_nats_options,
    connect_client,
    fail,
    positive_float,
    run_client,
)
from worker.protocol import Health

ORDER = 40


def register(subparsers: SubParsers) -> None:
    p = add_command(
        subparsers,
        "health",
        summary="ask workers for their health (exit 0 if healthy)",
        description="Request the health of one worker (--worker-id), of the workers serving a "
        "model reference (--model-ref), or of every worker (--all), and print one line per "
        "worker: a sentence on a terminal, the health JSON object otherwise (or with --json, "
        "which also makes errors JSON). Exit status 0 when every worker shown is healthy, "
        "1 when one is not or none answers within --timeout.",
        examples="""\
  worker-orcd health --all
  worker-orcd health --model-ref qwen --json
  worker-orcd health --worker-id-file /tmp/worker-orcd.id --timeout 2   # container check""",
    )
    w = p.add_argument_group("which workers")
    w.add_argument("--worker-id", metavar="ID", help="this worker (default: the first to answer)")
    w.add_argument(
        "--worker-id-file",
        metavar="PATH",
        help="read the worker id from this file (what serve writes to $WORKER_ORCD_ID_FILE)",
    )
    add_model_ref_option(w, "a worker serving this model reference (with --all: every one)")
    w.add_argument("--all", action="store_true", help="every worker that answers within --timeout")
    p.add_argument(
        "--timeout",
        type=positive_float,
        default=2.0,
        metavar="S",
        help="seconds to wait for answers",
    )
    add_nats_options(
        p, connect_timeout=None, connect_timeout_help="default: --timeout, at most 5 s"
    )
    add_json_option(p, "each worker's health")
    p.set_defaults(func=run_health)


def run_health(args: argparse.Namespace) -> int:
    if args.connect_timeout is None:  # a health check's --timeout bounds the connect too
        args.connect_timeout = min(DEFAULT_CLIENT_CONNECT_TIMEOUT_S, args.timeout)
    if args.worker_id_file:
        try:
            with open(args.worker_id_file) as f:
                args.worker_id = f.read().strip()
        except OSError as exc:
            return fail(args, f"cannot read --worker-id-file: {exc}")
    return run_client(args, _health)


async def _health(args: argparse.Namespace) -> int:
    import nats.errors

    client = await connect_client(args)
    try:
        subject = client.subjects.health(args.worker_id) if args.worker_id else None
        if args.all:
            found = await client.health_all(args.timeout)
        elif args.model_ref:
            found = await client.health_all(args.timeout, until_model_ref=args.model_ref)
        else:
            try:
                found = [await client.health(args.worker_id, timeout_s=args.timeout)]
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                found = []
        if args.model_ref:
            found = [h for h in found if h.model_ref == args.model_ref]
        if not found:
            who = f"worker {args.worker_id}" if args.worker_id else "no worker"
            which = f" serving {args.model_ref!r}" if args.model_ref else ""
            where = subject or client.subjects.health_all
            return fail(
                args,
                f"{who}{which} answered on {where} at {client.url} within {args.timeout:g} s"
                if not args.worker_id
                else f"{who} did not answer on {where} at {client.url} within {args.timeout:g} s",
            )
    finally:
        await client.close()
    # a person at a terminal gets a sentence; a script or a pipe gets the JSON it parses
    as_json = args.json or not sys.stdout.isatty()
    for h in sorted(found, key=lambda h: (h.model_ref, h.worker_id)):
        print(msgspec.json.encode(h).decode() if as_json else describe(h), flush=True)
    return EXIT_OK if all(h.status == "healthy" for h in found) else EXIT_FAILED


def describe(h: Health) -> str:
    """One line for a person: status first, then what and where."""
    where = h.device if h.gpu_device is None else f"{h.device}:{h.gpu_device}"
    active = f", running {h.active_job_id}" if h.active_job_id else ""
    return (
        f"{h.status}: worker {h.worker_id} serves {h.model_ref} ({h.model}, {h.quant_kind}) on "
        f"{where}, {h.jobs_completed} jobs done{active}, up {h.uptime_seconds:.0f} s"
    )
