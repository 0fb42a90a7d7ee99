"""`worker-orcd serve`: run the worker (SPEC §5)."""

from __future__ import annotations

import argparse
import os
import sys

import anyio

from worker.config import add_serve_arguments, config_from_args
from worker.narration import setup_logging


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve a GGUF model to NATS jobs",
        description="Load one GGUF model and serve generation jobs from NATS JetStream. "
        "Every flag can also come from WORKER_ORCD_<FLAG> in the environment.",
    )
    add_serve_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)
    except ValueError as exc:
        print(f"worker-orcd serve: {exc}", file=sys.stderr)
        return 2
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

    return anyio.run(run_worker, cfg)
