"""VRAM monitor actor: every --residency-interval-s, asks the backend thread for a residency
check (weights and KV verified in device memory) and refreshes the cached device info that
health and metrics report. A failed check logs a critical event and turns health
``unhealthy`` (docs/design.md, residency)."""

from __future__ import annotations

import anyio

from actors.backend_thread import BackendThread
from actors.loader import LoadedModel
from actors.state import WorkerState
from worker.backends.base import ResidencyReport
from worker.metrics import WorkerMetrics
from worker.narration import narrate


async def check_once(
    thread: BackendThread, model: LoadedModel, state: WorkerState, metrics: WorkerMetrics
) -> ResidencyReport:
    report: ResidencyReport = await thread.call(model.backend.check_residency)
    state.info = model.backend.info  # refreshed by the backend on its thread
    metrics.vram_bytes.set(state.info.vram_bytes_used)
    state.resident = state.info.resident and report.ok
    if not report.ok:
        narrate(
            "residency_failed",
            f"{len(report.failures)} of {report.checked} allocations not resident",
            level="CRITICAL",
            failures=report.failures[:10],
        )
        state.set_unhealthy("VRAM residency check failed")
    return report


async def vram_monitor_actor(
    thread: BackendThread,
    model: LoadedModel,
    state: WorkerState,
    metrics: WorkerMetrics,
    interval_s: float,
) -> None:
    while True:
        await anyio.sleep(interval_s)
        await check_once(thread, model, state, metrics)
