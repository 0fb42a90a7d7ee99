"""Prometheus metrics of one worker (docs/operations.md): served on
``orcd.metrics.<worker_id>`` and, with ``--metrics-port``, over HTTP. Each WorkerMetrics
owns its registry (no global state)."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)

_TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_ITL_BUCKETS = (0.0005, 0.001, 0.0015, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 5.0)


class WorkerMetrics:
    def __init__(self, worker_id: str, model_ref: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._start = time.monotonic()
        labels = {"worker_id": worker_id, "model_ref": model_ref}
        r = self.registry
        self.info = Gauge(
            "orcd_worker_info", "Constant 1 with the worker's identity", list(labels), registry=r
        )
        self.info.labels(**labels).set(1)
        self.vram_bytes = Gauge(
            "orcd_vram_bytes_used", "Device memory held by this worker", registry=r
        )
        self.requests = Counter(
            "orcd_requests", "Finished jobs by outcome (ok or error code)", ["outcome"], registry=r
        )
        self.tokens = Counter("orcd_tokens_generated", "Tokens generated", registry=r)
        self.ttft = Histogram(
            "orcd_time_to_first_token_seconds",
            "Job start to first token",
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.inter_token = Histogram(
            "orcd_inter_token_seconds",
            "Time between consecutive tokens",
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        self.uptime = Gauge("orcd_uptime_seconds", "Seconds since the worker started", registry=r)
        self.uptime.set_function(lambda: time.monotonic() - self._start)
        self.active = Gauge(
            "orcd_active_jobs", "Jobs held now (decoding, or waiting for a batch slot)", registry=r
        )
        self.step_sequences = Histogram(
            "orcd_step_sequences",
            "Sequences (jobs) computed together in one engine step",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self._http: Any = None

    def uptime_seconds(self) -> float:
        return time.monotonic() - self._start

    def outcome(self, outcome: str) -> None:
        self.requests.labels(outcome=outcome).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def serve_http(self, port: int, addr: str = "0.0.0.0") -> None:
        """Serve /metrics on a daemon thread (prometheus-client's own HTTP server)."""
        self._http = start_http_server(port, addr=addr, registry=self.registry)

    def close(self) -> None:
        if isinstance(self._http, tuple) and self._http:
            server = self._http[0]
            server.shutdown()
            server.server_close()
        self._http = None
