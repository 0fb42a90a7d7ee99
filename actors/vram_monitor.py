"""VRAM monitor actor: every --residency-interval-s, has the engine thread check residency
(weights and KV verified in device memory, between two steps) and sends the refreshed device
info to the frontend, which caches what health and metrics report. A failed check logs a
critical event and turns health ``unhealthy``."""

from __future__ import annotations

from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectSendStream

from actors.messages import DeviceStatus, InferenceIn, Outgoing, ResidencyCheck
from worker.backends.base import BackendInfo, ResidencyReport
from worker.narration import narrate


async def check_once(
    inference: MemoryObjectSendStream[InferenceIn],
    status: MemoryObjectSendStream[Outgoing],
) -> ResidencyReport:
    """One check, answered by the engine thread; the result goes to the frontend."""
    tx, rx = anyio.create_memory_object_stream[Any](1)
    async with rx:
        await inference.send(ResidencyCheck(tx))
        result = await rx.receive()
    if isinstance(result, BaseException):
        raise result
    report, info = result
    assert isinstance(report, ResidencyReport) and isinstance(info, BackendInfo)
    reason = None
    if not report.ok:
        narrate(
            "residency_failed",
            f"{len(report.failures)} of {report.checked} allocations not resident",
            level="CRITICAL",
            failures=report.failures[:10],
        )
        reason = "VRAM residency check failed"
    await status.send(
        DeviceStatus(info=info, resident=info.resident and report.ok, unhealthy_reason=reason)
    )
    return report


async def vram_monitor_actor(
    inference: MemoryObjectSendStream[InferenceIn],
    status: MemoryObjectSendStream[Outgoing],
    interval_s: float,
) -> None:
    async with inference, status:
        while True:
            await anyio.sleep(interval_s)
            await check_once(inference, status)
