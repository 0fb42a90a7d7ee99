"""Narration logging (docs/operations.md, Logs): loguru, one record per event of the worker's life.

Every record carries ``worker_id``, ``job_id``, ``model_ref``, ``gpu_device`` and ``event``
(``startup``, ``model_load_start``, ``model_load_progress``, ``model_load_complete``,
``ready``, ``execute_start``, ``execute_end``, ``error``, ``shutdown``, plus a few
operational ones such as ``nats_disconnected``). ``--log-format json`` writes one JSON object
per line; ``pretty`` writes coloured text for a terminal. Prompts and outputs are never
logged unless ``--log-prompts`` is set: `text_fields` gives their SHA-256 and length instead.
"""

from __future__ import annotations

import hashlib
import json
import sys
from typing import Any, TextIO

from loguru import logger

_CONTEXT: dict[str, Any] = {
    "worker_id": None,
    "model_ref": None,
    "gpu_device": None,
}
_LOG_PROMPTS = False
_CORE_KEYS = ("event", "worker_id", "job_id", "model_ref", "gpu_device")


def _json_sink(stream: TextIO) -> Any:
    def sink(message: Any) -> None:
        rec = message.record
        extra = rec["extra"]
        out: dict[str, Any] = {
            "ts": rec["time"].isoformat(timespec="microseconds"),
            "level": rec["level"].name,
        }
        for key in _CORE_KEYS:
            out[key] = extra.get(key)
        out["msg"] = rec["message"]
        for key, value in extra.items():
            if key not in out:
                out[key] = value
        if rec["exception"] is not None:
            exc = rec["exception"]
            out["exception"] = f"{getattr(exc.type, '__name__', exc.type)}: {exc.value}"
        stream.write(json.dumps(out, default=str) + "\n")
        stream.flush()

    return sink


def _pretty_format(record: Any) -> str:
    extra = record["extra"]
    job = " job={extra[job_id]}" if extra.get("job_id") else ""
    fields = [
        k for k in extra if k not in _CORE_KEYS and not k.startswith("_") and k != "gpu_device"
    ]
    tail = "".join(f" {k}={{extra[{k}]}}" for k in fields)
    pct = extra.get("percent")
    if extra.get("event") == "model_load_progress" and isinstance(pct, int):
        filled = max(0, min(20, pct // 5))
        bar = "[" + "#" * filled + "." * (20 - filled) + "] "
        return (
            "<green>{time:HH:mm:ss.SSS}</green> <level>{level: <7}</level> "
            "<cyan>{extra[event]}</cyan> " + bar + "{message}\n"
        )
    return (
        "<green>{time:HH:mm:ss.SSS}</green> <level>{level: <7}</level> "
        "<cyan>{extra[event]}</cyan>" + job + " {message}" + tail + "\n{exception}"
    )


def setup_logging(
    fmt: str = "pretty",
    *,
    worker_id: str | None = None,
    model_ref: str | None = None,
    gpu_device: int | None = None,
    log_prompts: bool = False,
    stream: TextIO | None = None,
    level: str = "INFO",
) -> None:
    """Install the single loguru sink for this process."""
    global _LOG_PROMPTS
    _CONTEXT.update(worker_id=worker_id, model_ref=model_ref, gpu_device=gpu_device)
    _LOG_PROMPTS = log_prompts
    out = stream if stream is not None else sys.stderr
    logger.remove()
    logger.configure(extra={"event": "log", "job_id": None, **_CONTEXT})
    if fmt == "json":
        logger.add(_json_sink(out), level=level, format="{message}", backtrace=False)
    else:
        logger.add(
            out,
            level=level,
            format=_pretty_format,
            colorize=out.isatty(),
            backtrace=False,
            diagnose=False,
        )


def log_prompts_enabled() -> bool:
    return _LOG_PROMPTS


def text_fields(name: str, text: str) -> dict[str, Any]:
    """Fields describing a prompt/output: the text itself only with --log-prompts."""
    digest = TextDigest()
    digest.add(text)
    return digest.fields(name)


class TextDigest:
    """A text that arrives in pieces (a job's output): SHA-256 and length always, the text
    itself only with --log-prompts (`text_fields` is the same for a whole text)."""

    __slots__ = ("_chars", "_hash", "_parts")

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._chars = 0
        self._parts: list[str] = []

    def add(self, piece: str) -> None:
        self._hash.update(piece.encode("utf-8", "surrogatepass"))
        self._chars += len(piece)
        if _LOG_PROMPTS:
            self._parts.append(piece)

    def fields(self, name: str) -> dict[str, Any]:
        fields: dict[str, Any] = {
            f"{name}_sha256": self._hash.hexdigest(),
            f"{name}_chars": self._chars,
        }
        if _LOG_PROMPTS:
            fields[name] = "".join(self._parts)
        return fields


def narrate(
    event: str,
    message: str = "",
    *,
    level: str = "INFO",
    job_id: str | None = None,
    exc_info: bool = False,
    **fields: Any,
) -> None:
    """Log one narration event with the process context and extra fields."""
    bound = logger.bind(event=event, job_id=job_id, **_CONTEXT, **fields)
    if exc_info:
        bound.opt(exception=True).log(level, message or event)
    else:
        bound.log(level, message or event)
