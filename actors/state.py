"""The worker's cached state: what health reports. The frontend owns it (other actors send
it `DeviceStatus` messages); health is answered from it without any device call."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from worker import __version__
from worker.backends.base import BackendInfo
from worker.buildinfo import commit
from worker.protocol import Health, HealthStatus, encode


@dataclass
class WorkerState:
    worker_id: str
    model: str
    model_ref: str
    device: str
    gpu_device: int | None
    status: HealthStatus = "starting"
    info: BackendInfo | None = None
    resident: bool = False
    quant_kind: str = ""
    tokenizer_kind: str = ""
    vocab_size: int = 0
    context_length: int = 0
    kv_capacity_tokens: int = 0
    active_job_id: str | None = None
    jobs_completed: int = 0
    running_jobs: int = 0
    max_batch: int = 0
    draining: bool = False
    unhealthy_reason: str | None = None
    started: float = field(default_factory=time.monotonic)

    def set_unhealthy(self, reason: str) -> None:
        self.unhealthy_reason = reason
        self.status = "unhealthy"

    def set_ready(self) -> None:
        if self.unhealthy_reason is None:
            self.status = "draining" if self.draining else "healthy"

    def set_draining(self) -> None:
        self.draining = True
        if self.status != "unhealthy":
            self.status = "draining"

    def health(self) -> Health:
        info = self.info
        return Health(
            status=self.status,
            worker_id=self.worker_id,
            model=self.model,
            model_ref=self.model_ref,
            device=self.device,
            gpu_device=self.gpu_device,
            resident=self.resident,
            quant_kind=self.quant_kind,
            vram_bytes_used=info.vram_bytes_used if info else 0,
            tokenizer_kind=self.tokenizer_kind,
            vocab_size=self.vocab_size,
            context_length=self.context_length,
            uptime_seconds=round(time.monotonic() - self.started, 3),
            sm=info.sm if info else None,
            cuda_runtime_version=info.cuda_runtime_version if info else None,
            active_job_id=self.active_job_id,
            jobs_completed=self.jobs_completed,
            version=__version__,
            running_jobs=self.running_jobs,
            max_batch=self.max_batch,
            kv_capacity_tokens=self.kv_capacity_tokens,
            commit=commit(),
        )

    def health_bytes(self) -> bytes:
        return encode(self.health())
