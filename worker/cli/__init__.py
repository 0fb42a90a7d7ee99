"""The `worker-orcd` command. Each subcommand is a module here exposing `register(subparsers)`
(which adds its parser, built with worker/cli/_common.py, and sets `func(args) -> int`) and
optionally `ORDER` (its place in the help); modules starting with `_` are helpers."""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

from worker import __version__
from worker.cli._common import EXIT_INTERRUPTED, ArgumentParser, HelpFormatter

DESCRIPTION = """\
worker-orcd serves a GGUF language model (Qwen2.5, Phi-3, GPT-OSS, Llama, GPT-2) from one
NVIDIA GPU to generation jobs on NATS JetStream, streaming tokens back as they are made.
Run one `serve` per GPU; clients publish jobs and read token events (`submit`, or the Python
client worker.client). `--device cpu` runs the NumPy reference backend instead of the GPU."""

EPILOG = """\
quick start (no GPU needed):
  worker-orcd serve --device cpu --model MODEL.gguf    # ends with the command to try
  worker-orcd submit --model-ref REF --chat "Write a haiku about GPUs"
  worker-orcd generate --device cpu MODEL.gguf "def fibonacci(n):"   # one prompt, no NATS

`worker-orcd COMMAND --help` describes each command. Documentation: docs/ in the repository
(protocol.md: the NATS interface, configuration.md: every flag and environment variable,
operations.md: running, scaling, health and metrics)."""


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="worker-orcd",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"worker-orcd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = [
        importlib.import_module(f"{__name__}.{m.name}")
        for m in pkgutil.iter_modules(__path__)
        if not m.name.startswith("_")
    ]
    for module in sorted(modules, key=lambda m: (getattr(m, "ORDER", 100), m.__name__)):
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    command = "command"
    try:
        ArgumentParser.json_errors = "--json" in (sys.argv[1:] if argv is None else argv)
        args = build_parser().parse_args(argv)
        command = args.command
        rc: int = args.func(args)
    except KeyboardInterrupt:
        # Ctrl-C: one line, no traceback (commands that own a job cancel it themselves)
        print(f"\nworker-orcd {command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # the reader of our output left (e.g. `| head`): stop quietly; point stdout at
        # /dev/null so the interpreter's final flush does not fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
