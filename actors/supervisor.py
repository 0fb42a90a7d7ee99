"""Supervisor: one anyio task group, and every channel between the actors, in one place.

    frontend ──tickets (0: one job at a time)──► inference ──► backend thread (engine)
    frontend ◄──events (bounded)────────────────  inference
    frontend ──cancels (bounded)──► cancellation ── sets the running job's flag
    vram_monitor ── residency checks on the backend thread ── cached health state
    loader ── runs once on the backend thread before the job loop starts

Exit codes: 0 after a clean shutdown (SIGTERM/SIGINT or the shutdown request: stop pulling,
finish the active job, free the device, exit within 30 s); 1 when the model cannot be
loaded (message with the reason); 2 when an actor crashed or the worker cannot start
(logged, then a clean shutdown).
"""

from __future__ import annotations

import signal
import sys
import time
from typing import Any

import anyio

from actors.backend_thread import BackendThread
from actors.cancellation import CancelMsg, CancelRegistry, cancellation_actor
from actors.frontend import Frontend, FrontendLinks
from actors.inference import JobLimits, Ticket, inference_actor
from actors.loader import LoadedModel, load
from actors.state import WorkerState
from actors.vram_monitor import check_once, vram_monitor_actor
from worker import __version__
from worker.config import WorkerConfig
from worker.errors import WorkerError
from worker.metrics import WorkerMetrics
from worker.narration import narrate
from worker.nats.server import EmbeddedNatsServer
from worker.protocol import Event

EXIT_OK = 0
EXIT_LOAD_FAILED = 1
EXIT_ACTOR_CRASHED = 2

# The events channel holds at most one job's events: max_tokens (2048) tokens, one metrics
# event per second, started and the terminal event.
EVENTS_CAPACITY = 4096 + 256
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
        self.registry = CancelRegistry()
        self.thread = BackendThread()
        self.shutdown = anyio.Event()
        self.frontend = Frontend(cfg, self.state, self.metrics, self.registry, self.shutdown)
        self.model: LoadedModel | None = None
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
            pid=__import__("os").getpid(),
        )
        try:
            url = self._start_nats()
            if cfg.metrics_port is not None:
                self.metrics.serve_http(cfg.metrics_port)
                narrate(
                    "metrics_http", f"metrics on :{cfg.metrics_port}/metrics", port=cfg.metrics_port
                )
            self.thread.start()
            await self.frontend.connect(url)
            try:
                await self._serve()
            except BaseExceptionGroup as group:
                raise _first(group) from None
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
        self.embedded = EmbeddedNatsServer(store_dir=self.cfg.nats_store_dir)
        self.embedded.start()
        url = self.embedded.url
        narrate(
            "nats_embedded",
            f"started embedded nats-server with JetStream at {url} "
            f"(store {self.embedded.store_dir})",
            nats_url=url,
            store_dir=str(self.embedded.store_dir),
        )
        return url

    async def _serve(self) -> None:
        cfg = self.cfg
        # ---- every channel of the process ------------------------------------------------
        tickets_tx, tickets_rx = anyio.create_memory_object_stream[Ticket](0)
        events_tx, events_rx = anyio.create_memory_object_stream[Event](EVENTS_CAPACITY)
        cancels_tx, cancels_rx = anyio.create_memory_object_stream[CancelMsg](CANCELS_CAPACITY)
        # ----------------------------------------------------------------------------------
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._signals, tg.cancel_scope)
            await self.frontend.subscribe_control(cancels_tx)
            tg.start_soon(self.frontend.heartbeat)
            tg.start_soon(self.frontend.lease_watch, cancels_tx)  # leases: actors/leases.py
            tg.start_soon(
                cancellation_actor,
                cancels_rx,
                self.registry,
                cfg.worker_id,
                self.frontend._reply,
            )
            self.model = model = await self._load()
            if self.shutdown.is_set():
                tg.cancel_scope.cancel()
                return
            tg.start_soon(
                inference_actor,
                tickets_rx,
                events_tx,
                self.thread,
                model,
                JobLimits(cfg.max_tokens_out, cfg.inference_timeout_sec),
                cfg.worker_id,
                self.metrics,
                self._on_busy,
            )
            tg.start_soon(
                vram_monitor_actor,
                self.thread,
                model,
                self.state,
                self.metrics,
                cfg.residency_interval_s,
            )
            self.state.set_ready()
            links = FrontendLinks(tickets=tickets_tx, events=events_rx, cancels=cancels_tx)
            await self.frontend.job_loop(links)
            # drained (shutdown): stop the other actors
            tg.cancel_scope.cancel()

    def _on_busy(self, busy: bool) -> None:
        """After each job: refresh the cached device info health reports (an attribute the
        backend keeps current; no device call here)."""
        if not busy and self.model is not None:
            self.state.info = self.model.backend.info
            self.metrics.vram_bytes.set(self.state.info.vram_bytes_used)

    async def _load(self) -> LoadedModel:
        model = await load(self.thread, self.cfg)
        st = self.state
        st.model = model.model_name
        st.info = model.backend.info
        st.quant_kind = model.quant_kind
        st.tokenizer_kind = model.tokenizer.kind
        st.vocab_size = model.backend.vocab_size
        st.context_length = model.context_length  # job-facing; KV capacity may be less
        await check_once(self.thread, model, st, self.metrics)
        return model

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
            if self.model is not None:
                model = self.model
                try:
                    await self.thread.call(model.backend.close)
                except Exception as exc:
                    narrate("error", f"backend close failed: {exc}", level="ERROR")
            self.thread.stop()
            self.metrics.close()
            if self.embedded is not None:
                self.embedded.cleanup()
        narrate("shutdown", f"stopped in {time.monotonic() - t0:.2f} s", exit_code=self.exit_code)


def _first(group: BaseExceptionGroup[Any]) -> BaseException:
    """The first leaf exception of a (nested) exception group."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


async def run_worker(cfg: WorkerConfig) -> int:
    sup = Supervisor(cfg)
    return await sup.run()
