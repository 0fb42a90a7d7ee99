"""`worker-orcd serve`: run the worker (docs/operations.md)."""

from __future__ import annotations

import argparse
import os
import sys

import anyio

from worker.cli._common import EXIT_INTERRUPTED, SubParsers, add_command
from worker.config import add_serve_arguments, config_from_args
from worker.narration import setup_logging

ORDER = 10


def register(subparsers: SubParsers) -> None:
    p = add_command(
        subparsers,
        "serve",
        summary="serve a GGUF model to jobs on NATS (one process per GPU)",
        description="Load one GGUF model and serve generation jobs from NATS JetStream until "
        "SIGTERM, SIGINT (Ctrl-C) or a shutdown request; the active job is finished first. "
        "Without --nats-url an embedded nats-server is started. Start-up ends with the exact "
        "`worker-orcd submit` command that reaches this worker. Every flag can also come from "
        "the environment variable named in its help.",
        examples="""\
  worker-orcd serve --device cpu --model qwen2.5-0.5b-instruct-q4_k_m.gguf
  worker-orcd serve --model qwen.gguf --nats-url nats://nats:4222 --model-ref qwen
  WORKER_ORCD_MODEL=qwen.gguf WORKER_ORCD_LOG_FORMAT=json worker-orcd serve""",
    )
    add_serve_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)
    except ValueError as exc:
        print(f"worker-orcd serve: {exc}", file=sys.stderr)
        return 2
    if not cfg.model.is_file():
        print(f"worker-orcd serve: no such model file: {cfg.model}", file=sys.stderr)
        return 1
    setup_logging(
        cfg.log_format,
        worker_id=cfg.worker_id,
        model_ref=cfg.model_ref,
        gpu_device=cfg.gpu_device if cfg.device == "cuda" else None,
        log_prompts=cfg.log_prompts,
    )
    from actors.supervisor import run_worker

    id_file = os.environ.get("WORKER_ORCD_ID_FILE")
    if id_file:  # lets a container healthcheck ask this worker's own health subject
        with open(id_file, "w") as f:
            f.write(cfg.worker_id + "\n")

    try:
        rc: int = anyio.run(run_worker, cfg)
    except KeyboardInterrupt:
        # Ctrl-C before the worker's own signal handling is up (starting NATS, connecting):
        # the supervisor has cleaned up on the way out
        print("\nworker-orcd serve: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return rc
