"""WorkerConfig: every setting of `worker-orcd serve`, from flags with environment fallbacks.

Precedence: command-line flag > environment variable (``WORKER_ORCD_<NAME>``) > default.
"""

from __future__ import annotations

import argparse
import os
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

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
    # continuous batching: most jobs in the running batch (None: the backend's default,
    # from its KV budget), prompt tokens prefilled per step, how long new prompts may wait
    # to share a prefill step while jobs decode, prompt-prefix sharing
    max_batch: int | None = None
    prefill_chunk: int = 256
    prefill_wait_ms: float = 50.0
    prefix_cache: bool = True
    # every job's bits independent of the rest of the batch (the CUDA backend; the NumPy one
    # is invariant whatever this says); off: steps of 1-8 rows take the faster decode kernels
    batch_invariant: bool = True
    nats_connect_timeout_s: float = 60.0  # give up (exit 2) if NATS cannot be reached
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
        if self.max_batch is not None and not 1 <= self.max_batch <= 256:
            raise ValueError("--max-batch must be 1-256")
        if self.prefill_chunk < 1:
            raise ValueError("--prefill-chunk must be positive")
        if not 0 <= self.prefill_wait_ms <= 10_000:
            raise ValueError("--prefill-wait-ms must be 0-10000")
        if self.log_format not in ("json", "pretty"):
            raise ValueError("--log-format must be json or pretty")
        if self.nats_connect_timeout_s <= 0:
            raise ValueError("--nats-connect-timeout must be positive")

    @property
    def subjects(self) -> Subjects:
        return Subjects(self.subject_prefix)


def gpu_device_arg(text: str) -> int | str:
    """--gpu-device: a device ordinal >= 0, or "auto" (resolved by `serve` at start)."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a GPU index or auto: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"GPU index must be >= 0: {value}")
    return value


# (flag dest, env name, type) for every setting that may come from the environment
_ENV_SETTINGS: tuple[tuple[str, Callable[[str], object]], ...] = (
    ("model", Path),
    ("worker_id", str),
    ("gpu_device", gpu_device_arg),
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
    ("max_batch", int),
    ("prefill_chunk", int),
    ("prefill_wait_ms", float),
    ("nats_connect_timeout_s", float),
)


# settings whose flag stores under another name (a flag shared with the client commands)
_FLAG_DEST = {"nats_connect_timeout_s": "connect_timeout"}


def env_name(dest: str) -> str:
    """The environment variable of a serve setting: WORKER_ORCD_<DEST>."""
    return ENV_PREFIX + dest.upper()


def env_switch(env: Mapping[str, str], name: str, default: bool) -> bool:
    """An on/off setting from the environment: when on by default, anything but 0 / false /
    no (any case) keeps it on; when off by default, only 1 / true / yes turns it on."""
    raw = env.get(name, "").lower()
    return raw not in ("0", "false", "no") if default else raw in ("1", "true", "yes")


def _switch(args: argparse.Namespace, env: Mapping[str, str], dest: str, default: bool) -> bool:
    """A serve on/off setting: its flag when given, else its environment variable."""
    flag = getattr(args, dest, None)
    return bool(flag) if flag is not None else env_switch(env, env_name(dest), default)


def _default_of(dest: str) -> object:
    return WorkerConfig.__dataclass_fields__[dest].default


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `worker-orcd serve` (docs/configuration.md). Every one may come from
    WORKER_ORCD_<NAME> instead; the parser's defaults are None so that the environment and
    then WorkerConfig's defaults apply when a flag is absent. Each help line says both."""
    from worker.cli._common import add_connect_timeout

    def opt(
        group: argparse._ArgumentGroup, flag: str, text: str, default: object = None, **kw: Any
    ) -> None:
        dest = flag.lstrip("-").replace("-", "_")
        if default is None:
            default = _default_of(dest)
        group.add_argument(
            flag, dest=dest, help=f"{text} (default: {default}; env {env_name(dest)})", **kw
        )

    m = p.add_argument_group("model and device")
    m.add_argument(
        "--model",
        type=Path,
        metavar="PATH",
        help=f"GGUF model file to serve (required; env {env_name('model')})",
    )
    opt(
        m,
        "--device",
        "cuda: the GPU; cpu: the NumPy reference backend (no GPU)",
        choices=["cuda", "cpu"],
    )
    opt(
        m,
        "--gpu-device",
        "CUDA device ordinal, or auto: the first GPU no other worker on this host holds "
        "(a lock in $WORKER_ORCD_GPU_LOCK_DIR; for replicas that see every GPU)",
        type=gpu_device_arg,
        metavar="N|auto",
    )
    opt(
        m,
        "--ctx-size",
        "context length in tokens a job may use (prompt + generated tokens); a job that may "
        "need more KV than the cache can give it gets VRAM_OOM",
        default="the model's training context",
        type=int,
        metavar="N",
    )
    opt(
        m,
        "--kv-cache-size-mb",
        "cap on the KV cache of all jobs together, MiB",
        default="on the GPU the memory left after the weights and step buffers, less 512 MiB; "
        "on the CPU --max-batch x the context",
        type=int,
        metavar="MIB",
    )
    opt(
        m,
        "--tokenizer",
        "a tokenizer.json to use instead of the GGUF vocabulary",
        default="the GGUF metadata's",
        type=Path,
        metavar="PATH",
    )
    opt(
        m, "--h2d-chunk-mb", "host-to-device copy chunk while loading, MiB", type=int, metavar="MIB"
    )
    opt(
        m,
        "--residency-interval-s",
        "seconds between VRAM residency checks",
        type=float,
        metavar="S",
    )

    j = p.add_argument_group("jobs")
    opt(
        j,
        "--model-ref",
        "model reference REF: jobs are taken from orcd.jobs.REF",
        default="derived from the model file name",
        metavar="REF",
    )
    opt(j, "--max-tokens-out", "cap on any job's max_tokens (1-2048)", type=int, metavar="N")
    opt(
        j,
        "--inference-timeout-sec",
        "time limit of one job (INFERENCE_TIMEOUT)",
        type=float,
        metavar="S",
    )
    opt(
        j,
        "--ack-wait-s",
        "JetStream redelivers a job after this long without progress",
        type=float,
        metavar="S",
    )
    opt(
        j,
        "--max-deliver",
        "deliveries of a job before it is ended with an error",
        type=int,
        metavar="N",
    )

    n = p.add_argument_group("NATS")
    opt(
        n,
        "--nats-url",
        "NATS server to use",
        metavar="URL",
        default="start an embedded nats-server with JetStream on 127.0.0.1:4222, or another "
        "port if 4222 is taken",
    )
    add_connect_timeout(
        n,
        None,
        f"default: {_default_of('nats_connect_timeout_s')}; "
        f"env {env_name('nats_connect_timeout_s')}",
        server=True,
    )
    opt(n, "--subject-prefix", "first token of every subject", metavar="PREFIX")
    opt(
        n,
        "--worker-id",
        "this worker's id in subjects and logs ([A-Za-z0-9_-])",
        default="a random UUID",
        metavar="ID",
    )
    opt(n, "--heartbeat-interval-s", "seconds between health heartbeats", type=float, metavar="S")
    opt(
        n,
        "--events-max-age-s",
        "how long ORCD_EVENTS keeps events (stream created here)",
        type=float,
        metavar="S",
    )
    opt(
        n,
        "--stream-replicas",
        "replicas of streams created here (3 on a cluster)",
        type=int,
        metavar="N",
    )

    o = p.add_argument_group("logs and metrics")
    opt(
        o,
        "--log-format",
        "json: one object per line; pretty: text for a terminal",
        choices=["json", "pretty"],
    )
    o.add_argument(
        "--log-prompts",
        action="store_true",
        default=None,
        help="log prompts and outputs (default: only their SHA-256 and length; "
        f"env {env_name('log_prompts')}=1)",
    )
    opt(
        o,
        "--metrics-port",
        "also serve Prometheus metrics on http://0.0.0.0:PORT/metrics",
        default="off",
        type=int,
        metavar="PORT",
    )

    b = p.add_argument_group("batching")
    opt(
        b,
        "--max-batch",
        "most jobs decoded together, 1-256",
        default="the backend's, from the KV budget",
        type=int,
        metavar="N",
    )
    opt(
        b,
        "--prefill-chunk",
        "prompt tokens prefilled per step beside the running jobs",
        type=int,
        metavar="N",
    )
    opt(
        b,
        "--prefill-wait-ms",
        "while jobs decode, how long a new job's prompt may wait for others to share its "
        "prefill step (a step with prompt tokens costs several decode steps); 0: never waits",
        type=float,
        metavar="MS",
    )
    b.add_argument(
        "--no-prefix-cache",
        dest="prefix_cache",
        action="store_false",
        default=None,
        help="do not share KV blocks of identical prompt prefixes between jobs "
        f"(env {env_name('prefix_cache')}=0)",
    )
    b.add_argument(
        "--no-batch-invariance",
        dest="batch_invariant",
        action="store_false",
        default=None,
        help="let a job's bits depend on what runs beside it: steps of 1-8 jobs take the "
        "decode matrix-vector kernels, faster at one or a few streams (GPU; "
        f"env {env_name('batch_invariant')}=0)",
    )
    add_nats_connect_arguments(p)


def config_from_args(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> WorkerConfig:
    env = os.environ if environ is None else environ
    values: dict[str, object] = {}
    for name, typ in _ENV_SETTINGS:
        flag = getattr(args, _FLAG_DEST.get(name, name), None)
        if flag is not None:
            values[name] = flag
            continue
        raw = env.get(ENV_PREFIX + name.upper())
        if raw is not None and raw != "":
            try:
                values[name] = typ(raw)
            except (ValueError, argparse.ArgumentTypeError) as exc:
                raise ValueError(f"{ENV_PREFIX + name.upper()}={raw!r}: {exc}") from None
    values["log_prompts"] = _switch(args, env, "log_prompts", False)
    values["prefix_cache"] = _switch(args, env, "prefix_cache", True)
    values["batch_invariant"] = _switch(args, env, "batch_invariant", True)
    values["nats_options"] = nats_connect_options(args, env)
    if "model" not in values:
        raise ValueError("--model is required (or WORKER_ORCD_MODEL)")
    if values.get("gpu_device") == "auto":
        # claimed here, once the rest is known to be valid; held until the process exits
        values["gpu_device"] = 0 if values.get("device") == "cpu" else _claim_gpu()
    return WorkerConfig(**values)  # type: ignore[arg-type]


def _claim_gpu() -> int:
    from worker.gpu_select import NoFreeGpu, claim_gpu

    try:
        return claim_gpu()
    except NoFreeGpu as exc:
        raise ValueError(str(exc)) from None
    except Exception as exc:  # no driver, pycuda missing: the GPUs cannot even be counted
        raise ValueError(
            f"--gpu-device auto: cannot count the GPUs ({type(exc).__name__}: {exc})"
        ) from None
