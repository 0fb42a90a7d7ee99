"""The performance suite (tools.suite) runs against a live worker and reports every
figure with its count; a small run on the tiny CPU model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tools.suite import run_suite
from worker.client import OrcdClient
from worker.nats.server import EmbeddedNatsServer


async def test_suite_against_a_live_worker(
    nats_server: EmbeddedNatsServer, client: OrcdClient, spawn_worker: Any, tiny_model: Path
) -> None:
    w = spawn_worker(tiny_model, nats_server.url, "tiny", "--ctx-size", "4096").wait_ready()
    out = await run_suite(
        client,
        "tiny",
        w.worker_id,
        jobs=3,
        max_tokens=8,
        health_requests=50,
        cancel_runs=2,
        vram_jobs=5,
    )
    print(json.dumps(out, indent=1))
    assert out["device"] == "cpu"
    assert out["ttft"]["n"] == 3 and out["inter_token"]["n"] == 3 * 7
    assert out["health"]["n"] == 50 and out["cancel"]["n"] == 2
    assert 0 < out["ttft"]["p50_ms"] <= out["ttft"]["p99_ms"]
    assert out["vram"] == {"baseline_bytes": 0, "after_bytes": 0, "jobs": 5}
    assert out["pass"]["vram_back_at_baseline"]
    assert set(out["pass"]) == {
        "ttft_p95_lt_20ms",
        "inter_token_p95_lt_1_5ms",
        "health_p99_lt_2ms",
        "cancel_p95_lt_10ms",
        "abandoned_p95_lt_1s",
        "vram_back_at_baseline",
    }
