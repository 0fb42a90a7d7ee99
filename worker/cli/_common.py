"""What the subcommands share: the help layout, the flags that mean the same thing in every
command (NATS connection, model, sampling, stop strings, JSON output), error lines (plain or
JSON) and the run wrapper of the NATS clients (`submit`, `health`, `cancel`).

A new subcommand module adds its parser with `add_command` and takes its common flags from
here, so `--nats-url`, `--connect-timeout`, `--model-ref`, `--stop`... read and behave alike
everywhere. docs/configuration.md lists every flag.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NoReturn

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
NATS_URL_ENV = "WORKER_ORCD_NATS_URL"
DEFAULT_CLIENT_CONNECT_TIMEOUT_S = 5.0

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

SubParsers = argparse._SubParsersAction


class HelpFormatter(argparse.HelpFormatter):
    """Descriptions and epilogs wrapped by paragraph, except paragraphs with indented lines
    (examples), which keep their lines; every option with a real default shows it, as
    ArgumentDefaultsHelpFormatter does, but not `None`/`False` (options without a default
    say what happens instead)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paragraphs = []
        for para in text.split("\n\n"):
            if any(line.startswith(" ") for line in para.splitlines()):
                paragraphs.append("\n".join(indent + line for line in para.splitlines()))
            else:
                paragraphs.append(
                    textwrap.fill(
                        " ".join(para.split()),
                        width,
                        initial_indent=indent,
                        subsequent_indent=indent,
                    )
                )
        return "\n\n".join(paragraphs)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            "%(default)" in text
            or "default:" in text
            or default is None
            or default is False
            or default is argparse.SUPPRESS
            or default in ([], "")
            or not action.option_strings
        ):
            return text
        return f"{text} (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """argparse, except that a usage error of a command run with --json is a JSON object
    on stdout like every other error of a JSON output mode."""

    json_errors = False  # set by worker.cli.main when the command line holds --json

    def error(self, message: str) -> NoReturn:
        if ArgumentParser.json_errors:
            print(json.dumps({"error": f"{self.prog}: {message}"}), flush=True)
            self.exit(EXIT_USAGE)
        super().error(message)


def add_command(
    subparsers: SubParsers,
    name: str,
    *,
    summary: str,
    description: str,
    examples: str = "",
) -> argparse.ArgumentParser:
    """A subcommand parser with the shared help layout; `examples` become the epilog."""
    epilog = "examples:\n" + examples.rstrip() if examples else None
    parser: argparse.ArgumentParser = subparsers.add_parser(
        name,
        help=summary,
        description=description,
        epilog=epilog,
        formatter_class=HelpFormatter,
    )
    return parser


# ---------------------------------------------------------------------------------- flags


def default_nats_url() -> str:
    return os.environ.get(NATS_URL_ENV) or DEFAULT_NATS_URL


def add_nats_options(
    p: argparse.ArgumentParser,
    *,
    connect_timeout: float | None = DEFAULT_CLIENT_CONNECT_TIMEOUT_S,
    connect_timeout_help: str = "",
) -> argparse._ArgumentGroup:
    """--nats-url, --connect-timeout and --subject-prefix for a command that talks to NATS
    (`connect_timeout=None`: the command decides, and `connect_timeout_help` says how)."""
    g = p.add_argument_group("NATS")
    g.add_argument(
        "--nats-url",
        default=default_nats_url(),
        metavar="URL",
        help=f"NATS server to use; env {NATS_URL_ENV}",
    )
    add_connect_timeout(g, connect_timeout, connect_timeout_help)
    g.add_argument(
        "--subject-prefix",
        default="orcd",
        metavar="PREFIX",
        help="first token of every subject; the worker's --subject-prefix",
    )
    from worker.nats.options import add_nats_connect_arguments

    add_nats_connect_arguments(p)
    return g


class BadOption(ValueError):
    """A flag's value that cannot be used (exit 2, one line)."""


async def connect_client(args: argparse.Namespace) -> Any:
    """An OrcdClient for the flags of `add_nats_options`: URL, connect timeout, prefix,
    credentials and TLS."""
    from worker.client import OrcdClient
    from worker.nats.options import nats_connect_options

    try:
        options = nats_connect_options(args)
    except ValueError as exc:
        raise BadOption(str(exc)) from None
    return await OrcdClient.connect(
        args.nats_url, args.subject_prefix, args.connect_timeout, options=options
    )


def add_connect_timeout(
    g: Any, default: float | None, help_default: str = "", *, server: bool = False
) -> None:
    """--connect-timeout, also spelled --nats-connect-timeout (the spelling `serve` shows):
    how long to keep trying to reach NATS before giving up with one line and a non-zero
    exit."""
    text = "seconds to keep trying to reach NATS before giving up"
    names = ("--connect-timeout", "--nats-connect-timeout")
    g.add_argument(
        *(names[::-1] if server else names),
        dest="connect_timeout",
        type=positive_float,
        default=default,
        metavar="S",
        help=text + (f" ({help_default})" if help_default else ""),
    )


def add_model_ref_option(p: Any, help_text: str) -> None:
    p.add_argument("--model-ref", metavar="REF", default=None, help=help_text)


def add_model_options(p: argparse.ArgumentParser, *, positional: bool) -> None:
    """--model PATH, and (where the usage shows it) a positional MODEL meaning the same;
    `model_path(args)` reads whichever was given."""
    if positional:
        p.add_argument(
            "model_pos",
            metavar="MODEL",
            nargs="?",
            type=Path,
            help="GGUF model file (or --model)",
        )
    p.add_argument("--model", type=Path, metavar="PATH", default=None, help="GGUF model file")


def model_path(p: argparse.ArgumentParser, args: argparse.Namespace) -> Path:
    """The model of `add_model_options` (a usage error if none or two were given)."""
    pos = getattr(args, "model_pos", None)
    if pos is not None and args.model is not None and pos != args.model:
        p.error("give the model once: MODEL or --model")
    model: Path | None = args.model if args.model is not None else pos
    if model is None:
        p.error("a GGUF model file is required: MODEL or --model PATH")
    return model


def add_sampling_options(
    p: argparse.ArgumentParser,
    *,
    max_tokens: int,
    temperature: float | None,
) -> None:
    """The job fields of docs/protocol.md as flags; `temperature=None` leaves it to the
    worker (1.0)."""
    g = p.add_argument_group("sampling")
    g.add_argument(
        "--max-tokens",
        type=positive_int,
        default=max_tokens,
        metavar="N",
        help="tokens to generate",
    )
    g.add_argument(
        "--temperature",
        type=float,
        default=temperature,
        metavar="T",
        help="0 is greedy" + ("" if temperature is not None else " (default: the worker's, 1.0)"),
    )
    g.add_argument("--top-p", type=float, default=None, metavar="P", help="nucleus; 1 is off")
    g.add_argument("--top-k", type=int, default=None, metavar="K", help="0 is off")
    g.add_argument("--min-p", type=float, default=None, metavar="P", help="0 is off")
    g.add_argument("--repetition-penalty", type=float, default=None, metavar="R", help="1 is off")
    g.add_argument(
        "--seed", type=seed_value, default=None, metavar="S", help="uint64 (default: random)"
    )
    add_stop_option(g)


def add_stop_option(g: Any) -> None:
    g.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="TEXT",
        help="stop when the output contains TEXT (repeat for up to 4)",
    )


def add_json_option(p: Any, what: str) -> None:
    p.add_argument(
        "--json", action="store_true", help=f"print {what} as JSON (errors too: {{'error': ...}})"
    )


# ---------------------------------------------------------------------------------- types


def positive_int(text: str) -> int:
    """A decimal integer > 0; anything else is a usage error."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {value}")
    return value


def positive_int_list(text: str) -> list[int]:
    """A comma list of decimal integers > 0 (e.g. 1,8,32); anything else is a usage error."""
    parts = [p.strip() for p in text.split(",")]
    if not text.strip() or not all(parts):
        raise argparse.ArgumentTypeError(f"not a comma list of integers: {text!r}")
    return [positive_int(p) for p in parts]


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text}")
    return value


def seed_value(text: str) -> int:
    """A uint64 seed (decimal or 0x hex)."""
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 0 <= value < 1 << 64:
        raise argparse.ArgumentTypeError(f"seed must be a uint64: {value}")
    return value


def sampling_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The job fields set on the command line (unset ones keep the worker's defaults)."""
    out: dict[str, Any] = {"max_tokens": args.max_tokens}
    for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed"):
        value = getattr(args, name)
        if value is not None:
            out[name] = value
    if args.stop:
        out["stop"] = list(args.stop)
    return out


# ---------------------------------------------------------------------------------- output


def fail(args: argparse.Namespace, message: str, code: int = EXIT_FAILED) -> int:
    """Report a failure as one line (a JSON object under --json) and return `code`."""
    emit_error(args.command, message, as_json=bool(getattr(args, "json", False)))
    return code


def emit_error(command: str, message: str, *, as_json: bool) -> None:
    message = " ".join(message.split())  # one line, whatever the exception text held
    if as_json:
        print(json.dumps({"error": message}), flush=True)
    else:
        print(f"worker-orcd {command}: {message}", file=sys.stderr, flush=True)


def run_client(
    args: argparse.Namespace, main: Callable[[argparse.Namespace], Awaitable[int]]
) -> int:
    """Run a NATS client command: unreachable NATS, no worker for the model reference and
    NATS errors end as one line and exit 1, never a traceback."""
    import anyio

    from worker.client import NatsUnavailable, NoWorker

    try:
        rc: int = anyio.run(main, args)
    except BadOption as exc:
        return fail(args, str(exc), EXIT_USAGE)
    except NatsUnavailable as exc:
        hint = " Is a worker running? `worker-orcd serve` starts its own nats-server."
        return fail(args, f"{exc}.{hint if args.nats_url == DEFAULT_NATS_URL else ''}")
    except NoWorker as exc:
        return fail(args, f"{exc}. Check --model-ref (`worker-orcd health --all` lists workers).")
    except TimeoutError as exc:
        return fail(args, str(exc) or "timed out")
    except Exception as exc:
        import nats.errors

        if isinstance(exc, nats.errors.Error | OSError):
            return fail(args, f"NATS error: {type(exc).__name__}: {exc}")
        raise
    return rc
