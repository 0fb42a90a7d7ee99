"""`worker-orcd submit`: publish one job and stream its text as it arrives, then one summary
line. Ctrl-C (or --timeout) cancels the job on the worker."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from typing import Any

import msgspec

from worker.cli._common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    SubParsers,
    add_command,
    add_json_option,
    add_model_ref_option,
    add_nats_options,
    add_sampling_options,
    connect_client,
    fail,
    positive_float,
    run_client,
    sampling_fields,
)
from worker.protocol import End, Error, Job, Started, Token, handed_back

ORDER = 20


def register(subparsers: SubParsers) -> None:
    p = add_command(
        subparsers,
        "submit",
        summary="send a job to the workers and stream the reply",
        description="Publish one generation job to orcd.jobs.REF and print its text as the "
        "tokens arrive, then a one-line summary (stop reason, tokens, time to first token, "
        "speed). Fails at once, with one line, when NATS cannot be reached or no worker serves "
        "REF. Ctrl-C cancels the job on the worker. Exit status: 0 when the job ends normally, "
        "1 when it ends with an error or cannot be sent, 2 for bad arguments, 130 on Ctrl-C.",
        examples="""\
  worker-orcd submit --model-ref qwen --chat "Write a haiku about GPUs"
  worker-orcd submit --model-ref qwen --max-tokens 64 --temperature 0 "def fibonacci(n):"
  worker-orcd submit --model-ref qwen --messages '[{"role": "user", "content": "Hi"}]'
  worker-orcd submit --json "Hello" | jq -c .     # one JSON event per line""",
    )
    p.add_argument("prompt", nargs="?", metavar="PROMPT", help="prompt text ('-' reads stdin)")
    j = p.add_argument_group("job")
    add_model_ref_option(
        j, "model reference the job is for (default: the one every answering worker serves)"
    )
    j.add_argument(
        "--chat",
        action="store_true",
        help="send PROMPT as a user chat message, rendered with the model's chat template",
    )
    j.add_argument("--system", metavar="TEXT", help="system message (with --chat)")
    j.add_argument(
        "--messages",
        metavar="JSON",
        help='chat messages as a JSON list, e.g. \'[{"role": "user", "content": "Hi"}]\'',
    )
    j.add_argument("--job-id", metavar="ID", help="job id (default: random)")
    j.add_argument(
        "--timeout",
        type=positive_float,
        default=600.0,
        metavar="S",
        help="give up on the job (and cancel it) after this many seconds",
    )
    j.add_argument(
        "--allow-no-worker",
        action="store_true",
        help="publish even when no worker serves REF now; the job waits in the queue",
    )
    j.add_argument(
        "--lease-s",
        type=float,
        default=30.0,
        metavar="S",
        help="the job's lease, renewed while this command runs: if it dies, the worker ends "
        "the job (CANCELLED, client_gone) within a second of the lease running out; "
        "0: no lease (default 30)",
    )
    add_sampling_options(p, max_tokens=256, temperature=None)
    add_nats_options(p)
    add_json_option(p, "every event, one per line,")
    p.set_defaults(func=run_submit, parser=p)


def build_job(args: argparse.Namespace) -> Job:
    """The job the arguments describe; ValueError with a message for the user if they do not
    describe one."""
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    messages: Any = None
    if args.messages is not None:
        if prompt is not None or args.chat:
            raise ValueError("give PROMPT (with or without --chat) or --messages, not both")
        try:
            messages = json.loads(args.messages)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--messages is not valid JSON ({exc})") from None
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise ValueError(
                '--messages must be a JSON list of {"role": ..., "content": ...} objects, '
                f"not {_json_kind(messages)}"
            )
    elif prompt is None:
        raise ValueError("give a PROMPT (or --messages)")
    elif args.chat:
        messages = [{"role": "user", "content": prompt}]
        if args.system is not None:
            messages.insert(0, {"role": "system", "content": args.system})
        prompt = None
    if args.system is not None and not args.chat:
        raise ValueError("--system goes with --chat")
    from worker.client import OrcdClient

    try:
        lease = {"lease_s": args.lease_s} if args.lease_s else {}
        return OrcdClient.make_job(
            prompt=prompt,
            messages=messages,
            job_id=args.job_id,
            **lease,
            **sampling_fields(args),
        )
    except msgspec.ValidationError as exc:
        raise ValueError(f"invalid job: {exc}") from None


def _json_kind(value: object) -> str:
    kinds = {dict: "an object", str: "a string", int: "a number", float: "a number"}
    for typ, name in kinds.items():
        if isinstance(value, typ):
            return name
    if isinstance(value, list):
        return "a list with other things than objects"
    return "null" if value is None else type(value).__name__


def run_submit(args: argparse.Namespace) -> int:
    try:
        job = build_job(args)
    except ValueError as exc:
        return fail(args, str(exc), EXIT_USAGE)
    args.job = job
    return run_client(args, _submit)


async def _submit(args: argparse.Namespace) -> int:
    import anyio

    job: Job = args.job
    client = await connect_client(args)
    try:
        if args.model_ref:
            ref = args.model_ref
            if not args.allow_no_worker:
                await client.require_worker(ref)
        else:  # the one reference the workers that answered serve
            ref = await _only_ref(client)
        rc = EXIT_FAILED
        interrupted = False
        error: Exception | None = None
        async with anyio.create_task_group() as tg:

            async def on_signal() -> None:
                nonlocal interrupted
                with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for _ in signals:
                        interrupted = True  # leaving the job's stream cancels the job
                        tg.cancel_scope.cancel()
                        return

            tg.start_soon(on_signal)
            try:
                rc = await _stream(client, ref, job, args)
            except Exception as exc:  # raised below, outside the task group's wrapping
                error = exc
            tg.cancel_scope.cancel()
        if error is not None:
            raise error
        if interrupted:
            sys.stdout.write("\n")
            msg = f"interrupted: cancelled job {job.job_id}"
            return fail(args, msg, EXIT_INTERRUPTED)
        return rc
    finally:
        await client.close()  # also sends the cancel of a job left unfinished


async def _only_ref(client: Any) -> str:
    """The model reference to use without --model-ref: the one the answering workers serve."""
    served = await client.served_refs()
    if len(served) == 1:
        ref: str = next(iter(served))
        return ref
    from worker.client import NoWorker

    if not served:
        raise NoWorker(f"no worker answered on {client.subjects.health_all} at {client.url}")
    raise NoWorker(
        f"workers at {client.url} serve several model refs ({', '.join(sorted(served))}); "
        "choose one with --model-ref"
    )


async def _stream(client: Any, ref: str, job: Job, args: argparse.Namespace) -> int:
    rc = EXIT_FAILED
    async for ev in client.run_job(ref, job, timeout_s=args.timeout):
        if args.json:
            print(msgspec.json.encode(ev).decode(), flush=True)
        elif isinstance(ev, Started):
            if ev.attempt > 1:
                print(f"\n[attempt {ev.attempt}]", file=sys.stderr, flush=True)
        elif isinstance(ev, Token):
            sys.stdout.write(ev.t)
            sys.stdout.flush()
        if isinstance(ev, End):
            rc = EXIT_OK
            if not args.json:
                print(
                    f"\n[{ev.job_id}] {ev.stop_reason}: {ev.prompt_tokens} prompt tokens, "
                    f"{ev.tokens_out} out, TTFT {ev.ttft_ms:.1f} ms, "
                    f"{ev.tokens_per_s:.1f} tokens/s",
                    flush=True,
                )
        elif handed_back(ev):
            if not args.json:
                print(
                    f"\n[attempt failed: {ev.code}: {ev.message}; the job was handed back]",
                    file=sys.stderr,
                    flush=True,
                )
        elif isinstance(ev, Error):
            rc = EXIT_FAILED
            if not args.json:
                sys.stdout.write("\n")
                sys.stdout.flush()
                print(
                    f"worker-orcd submit: job {ev.job_id} failed: {ev.code}: {ev.message}"
                    + (" (retriable)" if ev.retriable else ""),
                    file=sys.stderr,
                    flush=True,
                )
    return rc
