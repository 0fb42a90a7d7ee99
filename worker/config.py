"""WorkerConfig: every setting of `worker-orcd serve`, from flags with environment fallbacks.

Precedence: command-line flag > environment variable (``WORKER_ORCD_<NAME>``) > default.
"""

from __future__ import annotations

import argparse
import os
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from worker.nats.options import (
    NatsConnectOptions,
    add_nats_connect_arguments,
    nats_connect_options,
)
from worker.protocol import Subjects, model_ref_from_name, validate_model_ref

ENV_PREFIX = "WORKER_ORCD_"


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    model: Path
    worker_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    gpu_device: int = 0
    device: Literal["cuda", "cpu"] = "cuda"
    nats_url: str | None = None  # None: start an embedded nats-server
    model_ref: str = ""
    ctx_size: int | None = None
    max_tokens_out: int = 2048
    inference_timeout_sec: float = 300.0
    kv_cache_size_mb: int | None = None
    metrics_port: int | None = None
    log_format: Literal["json", "pretty"] = "pretty"
    log_prompts: bool = False
    tokenizer: Path | None = None
    subject_prefix: str = "orcd"
    events_max_age_s: float = 24 * 3600.0
    stream_replicas: int = 1  # 3 on a nats-server cluster (R3)
    heartbeat_interval_s: float = 5.0
    residency_interval_s: float = 60.0
    ack_wait_s: float = 30.0  # JetStream redelivers a job after this long without progress
    max_deliver: int = 5
    h2d_chunk_mb: int = 1
    shutdown_grace_s: float = 25.0
    nats_store_dir: Path | None = None  # embedded server's JetStream directory
    # credentials and TLS for --nats-url (worker/nats/options.py)
    nats_options: NatsConnectOptions = field(default_factory=NatsConnectOptions)

    def __post_init__(self) -> None:
        if not self.model_ref:
            object.__setattr__(self, "model_ref", model_ref_from_name(self.model.name))
        validate_model_ref(self.model_ref)
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,128}", self.worker_id):
            raise ValueError(
                f"--worker-id {self.worker_id!r} must be 1-128 characters of [A-Za-z0-9_-] "
                "(a UUID is); it is part of NATS subjects"
            )
        Subjects(self.subject_prefix)  # validates
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"--device must be cuda or cpu, not {self.device!r}")
        if not 1 <= self.max_tokens_out <= 2048:
            raise ValueError("--max-tokens-out must be 1-2048")
        if self.ctx_size is not None and self.ctx_size < 1:
            raise ValueError("--ctx-size must be positive")
        if self.inference_timeout_sec <= 0:
            raise ValueError("--inference-timeout-sec must be positive")
        if self.heartbeat_interval_s <= 0 or self.ack_wait_s < 1:
            raise ValueError("heartbeat interval must be > 0 and ack wait >= 1 s")
        if self.max_deliver < 1:
            raise ValueError("--max-deliver must be at least 1")
        if not 1 <= self.stream_replicas <= 5:
            raise ValueError("--stream-replicas must be 1-5")
        if self.log_format not in ("json", "pretty"):
            raise ValueError("--log-format must be json or pretty")

    @property
    def subjects(self) -> Subjects:
        return Subjects(self.subject_prefix)


# (flag dest, env name, type) for every setting that may come from the environment
_ENV_SETTINGS: tuple[tuple[str, type], ...] = (
    ("model", Path),
    ("worker_id", str),
    ("gpu_device", int),
    ("device", str),
    ("nats_url", str),
    ("model_ref", str),
    ("ctx_size", int),
    ("max_tokens_out", int),
    ("inference_timeout_sec", float),
    ("kv_cache_size_mb", int),
    ("metrics_port", int),
    ("log_format", str),
    ("tokenizer", Path),
    ("subject_prefix", str),
    ("events_max_age_s", float),
    ("stream_replicas", int),
    ("heartbeat_interval_s", float),
    ("residency_interval_s", float),
    ("ack_wait_s", float),
    ("max_deliver", int),
    ("h2d_chunk_mb", int),
)


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `worker-orcd serve` (SPEC §5). Defaults are None so the environment and
    WorkerConfig's defaults apply when a flag is absent."""
    p.add_argument("--model", type=Path, help="GGUF model file (env WORKER_ORCD_MODEL)")
    p.add_argument("--worker-id", help="worker UUID (default: random)")
    p.add_argument("--gpu-device", type=int, help="CUDA device ordinal (default 0)")
    p.add_argument("--device", choices=["cuda", "cpu"], help="compute backend (default cuda)")
    p.add_argument("--nats-url", help="NATS server URL (default: start an embedded nats-server)")
    p.add_argument("--model-ref", help="model reference R: jobs come from orcd.jobs.R")
    p.add_argument(
        "--ctx-size",
        type=int,
        help="context in tokens (default: the model's); the KV cache is sized for it, capped "
        "to fit --kv-cache-size-mb / VRAM (a job needing more KV gets VRAM_OOM)",
    )
    p.add_argument("--max-tokens-out", type=int, help="cap on max_tokens per job (<= 2048)")
    p.add_argument("--inference-timeout-sec", type=float, help="per-job time limit")
    p.add_argument("--kv-cache-size-mb", type=int, help="KV cache budget in MiB")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics over HTTP")
    p.add_argument("--log-format", choices=["json", "pretty"], help="log format")
    p.add_argument(
        "--log-prompts",
        action="store_true",
        default=None,
        help="log prompts and outputs (default: SHA-256 and length only)",
    )
    p.add_argument("--tokenizer", type=Path, help="tokenizer.json to use (hf-json)")
    p.add_argument("--subject-prefix", help="NATS subject prefix (default orcd)")
    p.add_argument("--events-max-age-s", type=float, help="ORCD_EVENTS max age (default 24 h)")
    p.add_argument(
        "--stream-replicas", type=int, help="replicas of streams created here (3 on a cluster)"
    )
    p.add_argument("--heartbeat-interval-s", type=float, help="heartbeat period (default 5 s)")
    p.add_argument("--residency-interval-s", type=float, help="VRAM residency check period")
    p.add_argument("--ack-wait-s", type=float, help="JetStream ack wait (default 30 s)")
    p.add_argument(
        "--max-deliver", type=int, help="deliveries of a job before it is given up (default 5)"
    )
    p.add_argument("--h2d-chunk-mb", type=int, help="host-to-device copy chunk (default 1)")
    add_nats_connect_arguments(p)


def config_from_args(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> WorkerConfig:
    env = os.environ if environ is None else environ
    values: dict[str, object] = {}
    for name, typ in _ENV_SETTINGS:
        flag = getattr(args, name, None)
        if flag is not None:
            values[name] = flag
            continue
        raw = env.get(ENV_PREFIX + name.upper())
        if raw is not None and raw != "":
            try:
                values[name] = typ(raw)
            except ValueError as exc:
                raise ValueError(f"{ENV_PREFIX + name.upper()}={raw!r}: {exc}") from None
    lp = getattr(args, "log_prompts", None)
    if lp is None:
        lp = env.get(ENV_PREFIX + "LOG_PROMPTS", "").lower() in ("1", "true", "yes")
    values["log_prompts"] = bool(lp)
    values["nats_options"] = nats_connect_options(args, env)
    if "model" not in values:
        raise ValueError("--model is required (or WORKER_ORCD_MODEL)")
    return WorkerConfig(**values)  # type: ignore[arg-type]
