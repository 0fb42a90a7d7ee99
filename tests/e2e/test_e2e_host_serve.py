"""tools.host_serve: the serving path (a real `serve` subprocess, nats-server, clients) on an
emulated device; every job completes, no token arrives faster than the device allows, and the
worker's own CPU time and first-token time are reported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_host_serve_runs_every_job_at_the_emulated_device_pace(tiny_model: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "tools.host_serve",
        "--model",
        str(tiny_model),
        "--concurrency",
        "4",
        "--jobs-per-client",
        "2",
        "--max-tokens",
        "8",
        "--step-ms",
        "3",
        "--row-us",
        "0",
    ]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, check=True)
    result = json.loads(out.stdout)
    (phase,) = result["phases"]
    assert phase["errors"] == []
    assert phase["jobs"] == 8 and phase["tokens"] == 8 * 8
    assert phase["ttft"]["n"] == 8 and phase["inter_token"]["n"] == 8 * 7
    # one token a job a step, each step 3 ms on the emulated device: no gap is shorter
    # than a step by more than the clients' own timing jitter
    assert phase["inter_token"]["p50_ms"] >= 2.0
    assert phase["tokens_per_s"] <= 4 / 0.003
    # the worker's CPU over the phases (both busy threads) and its receipt-to-first-token
    # time, which is part of the clients' TTFT and at least one emulated step
    assert 0 < result["worker_cpu_us_a_token"] < 1e6
    assert len(result["worker_cpu_s"]) >= 2
    wt = result["worker_ttft_ms"]
    assert 3.0 <= wt["p50"] <= wt["p95"] <= phase["ttft"]["p99_ms"]
