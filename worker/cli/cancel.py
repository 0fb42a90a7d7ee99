"""`worker-orcd cancel JOB_ID`: cancel a job, running or queued, on whichever worker has it."""

from __future__ import annotations

import argparse

import msgspec

from worker.cli._common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    SubParsers,
    add_command,
    add_json_option,
    add_nats_options,
    connect_client,
    fail,
    positive_float,
    run_client,
)
from worker.protocol import CancelReply, is_valid_job_id

ORDER = 30

_SAYS = {
    "cancelling": "running there; it stops within one decode step and ends CANCELLED",
    "already_cancelling": "already being cancelled there",
    "recorded": "not running there; it ends CANCELLED if that worker reaches it",
    "already_recorded": "already recorded as cancelled there",
    "already_finished": "already finished there; nothing to cancel",
}


def register(subparsers: SubParsers) -> None:
    p = add_command(
        subparsers,
        "cancel",
        summary="cancel a job (running or queued)",
        description="Send a cancel for JOB_ID on orcd.cancel and print what each worker "
        "answered. The worker running the job stops it within one decode step (it ends with "
        "an `error` event, code CANCELLED); workers not running it remember the id, so a "
        "queued job ends CANCELLED when it is reached. Exit status 0 when a worker took the "
        "cancel, 1 when none answered within --timeout.",
        examples="""\
  worker-orcd cancel 3f2a9c0d1e                 # the id from submit's summary or --job-id
  worker-orcd cancel my-job-1 --json""",
    )
    p.add_argument("job_id", metavar="JOB_ID", help="id of the job to cancel")
    p.add_argument(
        "--timeout",
        type=positive_float,
        default=1.0,
        metavar="S",
        help="seconds to wait for the workers' answers",
    )
    add_nats_options(p)
    add_json_option(p, "each worker's answer")
    p.set_defaults(func=run_cancel)


def run_cancel(args: argparse.Namespace) -> int:
    if not is_valid_job_id(args.job_id):
        return fail(args, f"{args.job_id!r} is not a job id (1-128 of [A-Za-z0-9_-])", EXIT_USAGE)
    return run_client(args, _cancel)


async def _cancel(args: argparse.Namespace) -> int:

    client = await connect_client(args)
    try:
        replies: list[CancelReply] = await client.cancel(args.job_id, timeout_s=args.timeout)
        url = client.url
    finally:
        await client.close()
    if not replies:
        return fail(
            args,
            f"no worker answered the cancel of {args.job_id} on {url} within "
            f"{args.timeout:g} s (is a worker running?)",
        )
    for r in replies:
        if args.json:
            print(msgspec.json.encode(r).decode(), flush=True)
        else:
            print(f"job {r.job_id}: worker {r.worker_id}: {_SAYS.get(r.status, r.status)}")
    return EXIT_OK if replies else EXIT_FAILED
