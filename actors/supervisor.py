"""Supervisor: one anyio task group, and every channel between the actors, in one place.

    frontend ──jobs──────────────► inference ──engine (thread bridge)──► engine thread
    cancellation ──cancels───────► inference                             (scheduler, backend)
    vram_monitor ──checks────────► inference
    frontend ◄──outbox (events, replies, device status)── inference, cancellation, vram_monitor
    frontend ──cancel payloads──► cancellation

The model is loaded on the engine thread (inside the inference actor) before the frontend
pulls any job.

Exit codes: 0 after a clean shutdown (SIGTERM/SIGINT or the shutdown request: stop pulling,
finish the running jobs, free the device, exit within 30 s); 1 when the model cannot be
loaded (message with the reason); 2 when an actor crashed or the worker cannot start, e.g.
NATS unreachable for --nats-connect-timeout (logged, then a clean shutdown); 3 after a device
failure (every job it held was reported CUDA_ERROR and handed back for redelivery; a
supervisor should restart the worker).
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import anyio

from actors.cancellation import cancellation_actor
from actors.frontend import Frontend
from actors.inference import ModelSummary, inference_actor
from actors.messages import CancelPayload, EngineIn, InferenceIn, Outgoing
from actors.state import WorkerState
from actors.vram_monitor import check_once, vram_monitor_actor
from worker import __version__
from worker.config import WorkerConfig
from worker.errors import WorkerError
from worker.metrics import WorkerMetrics
from worker.narration import narrate
from worker.nats.jetstream import NatsUnavailable
from worker.nats.server import EmbeddedNatsServer

EXIT_OK = 0
EXIT_LOAD_FAILED = 1
EXIT_ACTOR_CRASHED = 2
EXIT_DEVICE_FAILED = 3

# The embedded nats-server listens where clients look by default, when that port is free.
DEFAULT_NATS_PORT = 4222

# The outbox carries one message per engine step (all of its events) plus replies and
# status; a bounded buffer lets the engine run ahead of publishing without waiting.
OUTBOX_CAPACITY = 256
INBOX_CAPACITY = 1024
CANCELS_CAPACITY = 256


class Supervisor:
    def __init__(self, cfg: WorkerConfig) -> None:
        self.cfg = cfg
        self.state = WorkerState(
            worker_id=cfg.worker_id,
            model=cfg.model.name,
            model_ref=cfg.model_ref,
            device=cfg.device,
            gpu_device=cfg.gpu_device if cfg.device == "cuda" else None,
        )
        self.metrics = WorkerMetrics(cfg.worker_id, cfg.model_ref)
        self.shutdown = anyio.Event()
        self.frontend = Frontend(cfg, self.state, self.metrics, self.shutdown)
        self.model: ModelSummary | None = None
        self.embedded: EmbeddedNatsServer | None = None
        self.exit_code = EXIT_OK

    async def run(self) -> int:
        cfg = self.cfg
        narrate(
            "startup",
            f"worker-orcd {__version__} starting",
            version=__version__,
            device=cfg.device,
            model=str(cfg.model),
            pid=os.getpid(),
        )
        try:
            url = self._start_nats()
            if cfg.metrics_port is not None:
                self.metrics.serve_http(cfg.metrics_port)
                narrate(
                    "metrics_http", f"metrics on :{cfg.metrics_port}/metrics", port=cfg.metrics_port
                )
            await self.frontend.connect(url)
            try:
                await self._serve()
            except BaseExceptionGroup as group:
                raise _first(group) from None
            if self.frontend.failed:
                self.exit_code = EXIT_DEVICE_FAILED
        except NatsUnavailable as exc:
            narrate("error", str(exc), level="ERROR")
            print(f"worker-orcd serve: {exc}", file=sys.stderr)
            self.exit_code = EXIT_ACTOR_CRASHED
        except WorkerError as exc:  # model load failure, insufficient VRAM
            narrate("error", exc.message, level="ERROR", code=exc.code.value)
            print(f"worker-orcd: {exc.code}: {exc.message}", file=sys.stderr)
            self.exit_code = EXIT_LOAD_FAILED
        except Exception as exc:
            narrate(
                "error",
                f"fatal: {type(exc).__name__}: {exc}; shutting down",
                level="CRITICAL",
                exc_info=True,
            )
            print(f"worker-orcd: fatal: {type(exc).__name__}: {exc}", file=sys.stderr)
            self.exit_code = EXIT_ACTOR_CRASHED
        finally:
            await self._cleanup()
        return self.exit_code

    def _start_nats(self) -> str:
        if self.cfg.nats_url is not None:
            return self.cfg.nats_url
        port = DEFAULT_NATS_PORT if _port_free(DEFAULT_NATS_PORT) else None
        self.embedded = EmbeddedNatsServer(port=port, store_dir=self.cfg.nats_store_dir)
        try:
            self.embedded.start()
        except (RuntimeError, TimeoutError):
            if port is None:
                raise
            # 4222 was taken between the check and the start: any free port will do
            self.embedded.cleanup()
            port = None
            self.embedded = EmbeddedNatsServer(store_dir=self.cfg.nats_store_dir)
            self.embedded.start()
        url = self.embedded.url
        taken = "" if port else f" (port {DEFAULT_NATS_PORT} is taken)"
        narrate(
            "nats_embedded",
            f"started embedded nats-server with JetStream at {url}{taken} "
            f"(store {self.embedded.store_dir})",
            nats_url=url,
            store_dir=str(self.embedded.store_dir),
        )
        return url

    async def _serve(self) -> None:
        cfg = self.cfg
        # ---- every channel of the process ------------------------------------------------
        jobs_tx, jobs_rx = anyio.create_memory_object_stream[InferenceIn](INBOX_CAPACITY)
        engine_tx, engine_rx = anyio.create_memory_object_stream[EngineIn](INBOX_CAPACITY)
        outbox_tx, outbox_rx = anyio.create_memory_object_stream[Outgoing](OUTBOX_CAPACITY)
        cancels_tx, cancels_rx = anyio.create_memory_object_stream[CancelPayload](CANCELS_CAPACITY)
        loaded_tx, loaded_rx = anyio.create_memory_object_stream[ModelSummary](1)
        # ----------------------------------------------------------------------------------
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._signals, tg.cancel_scope)
            await self.frontend.subscribe_control(cancels_tx)
            tg.start_soon(self.frontend.heartbeat)
            tg.start_soon(self.frontend.lease_watch, cancels_tx.clone())
            tg.start_soon(cancellation_actor, cancels_rx, jobs_tx.clone(), outbox_tx.clone())
            tg.start_soon(
                inference_actor,
                cfg,
                jobs_rx,
                engine_tx,
                engine_rx,
                outbox_tx.clone(),
                loaded_tx,
                self.metrics,
            )
            async with loaded_rx:
                try:
                    self.model = model = await loaded_rx.receive()
                except anyio.EndOfStream:
                    return  # the load failed: the inference actor's error ends the group
            st = self.state
            st.model = model.model_name
            st.info = model.info
            st.quant_kind = model.quant_kind
            st.tokenizer_kind = model.tokenizer_kind
            st.vocab_size = model.vocab_size
            st.context_length = model.context_length
            st.kv_capacity_tokens = model.kv_capacity_tokens
            st.max_batch = model.max_batch
            await check_once(jobs_tx, outbox_tx)  # answered before any job; status queued
            if self.shutdown.is_set():
                tg.cancel_scope.cancel()
                return
            tg.start_soon(
                vram_monitor_actor, jobs_tx.clone(), outbox_tx.clone(), cfg.residency_interval_s
            )
            self.state.set_ready()
            self.frontend.on_ready = self._say_how_to_try
            await self.frontend.serve(jobs_tx, outbox_rx, model.max_batch)
            # drained (shutdown): stop the other actors
            tg.cancel_scope.cancel()

    def _say_how_to_try(self) -> None:
        """The last start-up line: the exact command that sends this worker a job."""
        chat = self.model is not None and self.model.has_chat_template
        cmd = try_command(self.frontend.url, self.cfg, chat=chat)
        if self.cfg.log_format == "json":
            narrate("try", f"from another terminal: {cmd}", command=cmd)
        else:
            print(f"\nReady. From another terminal, try:\n\n    {cmd}\n", file=sys.stderr)

    async def _signals(self, scope: anyio.CancelScope) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
            async for sig in sigs:
                if self.shutdown.is_set():
                    narrate(
                        "shutdown",
                        f"second {signal.Signals(sig).name}: stopping now",
                        level="WARNING",
                    )
                    scope.cancel()
                    return
                narrate("shutdown_requested", f"{signal.Signals(sig).name} received")
                self.begin_shutdown()
                if self.model is None:
                    scope.cancel()  # still loading: nothing to finish

    def begin_shutdown(self) -> None:
        self.state.set_draining()
        self.shutdown.set()

    async def _cleanup(self) -> None:
        t0 = time.monotonic()
        self.state.set_draining()
        with anyio.CancelScope(shield=True):
            await self.frontend.close()
            self.metrics.close()
            if self.embedded is not None:
                self.embedded.cleanup()
        narrate("shutdown", f"stopped in {time.monotonic() - t0:.2f} s", exit_code=self.exit_code)


def _port_free(port: int) -> bool:
    """Nothing listens on 127.0.0.1:`port` and it can be bound now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def try_command(url: str, cfg: WorkerConfig, *, chat: bool) -> str:
    """`worker-orcd submit` with the URL, prefix and model reference this worker serves,
    spelled the way this process was started (the venv's script, or `python -m worker`)."""
    argv0 = sys.argv[0] if sys.argv else ""
    exe = [argv0] if Path(argv0).name == "worker-orcd" else [sys.executable, "-m", "worker"]
    parts = [*exe, "submit", "--nats-url", url, "--model-ref", cfg.model_ref]
    if cfg.subject_prefix != "orcd":
        parts += ["--subject-prefix", cfg.subject_prefix]
    if chat:
        parts += ["--chat", "Write a haiku about GPUs"]
    else:
        parts += ["def fibonacci(n):"]
    return shlex.join(parts)


def _first(group: BaseExceptionGroup[Any]) -> BaseException:
    """The first leaf exception of a (nested) exception group."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


async def run_worker(cfg: WorkerConfig) -> int:
    sup = Supervisor(cfg)
    return await sup.run()
