"""`worker-orcd bench --suite` as a user runs it: a real subprocess that starts its own
nats-server and `worker-orcd serve` children on the tiny CPU model, and prints one JSON
object with every figure of the suite."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def _check_percentiles(fig: dict[str, Any], n: int) -> None:
    assert fig["n"] == n, fig
    assert 0 < fig["p50_ms"] <= fig["p95_ms"] <= fig["p99_ms"], fig


def test_bench_suite_cpu(tiny_model: Path) -> None:
    cmd = [
        str(Path(sys.executable).parent / "worker-orcd"),
        "bench",
        "--suite",
        "--device",
        "cpu",
        "--model",
        str(tiny_model),
        "--jobs",
        "3",
        "--max-tokens",
        "8",
        "--prompt-tokens",
        "32",
        "--health-requests",
        "40",
        "--cancel-runs",
        "2",
        "--vram-jobs",
        "5",
        "--loads",
        "2",
        "--concurrency",
        "1,4",
        "--jobs-per-client",
        "2",
        "--prefix-tokens",
        "1100",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stdout  # one JSON object, nothing else on stdout
    out = json.loads(lines[0])
    print(json.dumps(out, indent=1))

    assert out["suite"] is True and out["device"] == "cpu" and out["gpu"] is None
    assert out["embedded_nats"] is True and out["nats_url"].startswith("nats://127.0.0.1:")
    assert out["model"] == str(tiny_model) and out["commit"]
    assert 0 < out["prompt_tokens"] <= 32
    assert out["job_errors"] == []

    _check_percentiles(out["load"]["warm"], 2)  # two starts on cpu, no cold-cache start
    assert "cold_kernel_cache" not in out["load"]
    _check_percentiles(out["ttft"], 3)
    _check_percentiles(out["inter_token"], 3 * 7)  # 8 tokens: 7 gaps per job
    _check_percentiles(out["health"], 40)
    _check_percentiles(out["cancel"], 2)
    assert out["abort"]["cancelled"] == out["cancel"]
    abandoned = out["abort"]["abandoned"]
    _check_percentiles(abandoned, 3)
    assert abandoned["lease_s"] == 1.0 and abandoned["p99_ms"] < 1000  # within 1 s of expiry
    assert not any(m.startswith("abandoned:") for m in out["missing"])

    # N closed-loop clients at once: every job answered, figures per phase
    phases = out["concurrency"]
    assert [p["clients"] for p in phases] == [1, 4] and [p["jobs"] for p in phases] == [2, 8]
    for p in phases:
        assert p["errors"] == [] and p["tokens"] > 0
        # tokens / wall, up to the rounding of both figures (wall_s to 1 ms: a phase of a
        # few tiny-model jobs lasts only tens of ms)
        lo, hi = p["wall_s"] - 0.0005, p["wall_s"] + 0.0005
        assert p["tokens"] / hi - 0.05 <= p["tokens_per_s"] <= p["tokens"] / lo + 0.05
        _check_percentiles(p["ttft"], p["jobs"])
        assert p["inter_token"]["n"] == p["tokens"] - p["jobs"]  # every token after the first
    assert out["vram"] == {"baseline_bytes": 0, "after_bytes": 0, "jobs": 5}

    shutdown = out["shutdown"]
    assert shutdown["exit_codes"] == [0, 0]
    _check_percentiles({k: v for k, v in shutdown.items() if k != "exit_codes"}, 2)
    assert shutdown["p99_ms"] < 30_000

    # a shared 1,100-token prefix is mapped from the cache, not computed: its jobs start
    # sooner (the CPU backend shares whole prefill chunks of 512: 1,024 of its tokens)
    pc = out["prefix_cache"]
    assert 1000 < pc["prefix_tokens"] <= 1100
    _check_percentiles(pc["shared_prefix"], 10)
    _check_percentiles(pc["no_shared_prefix"], 10)
    assert pc["shared_prefix"]["p50_ms"] < pc["no_shared_prefix"]["p50_ms"]

    passes = out["pass"]
    assert set(passes) == {
        "ttft_p95_lt_20ms",
        "inter_token_p95_lt_1_5ms",
        "health_p99_lt_2ms",
        "cancel_p95_lt_10ms",
        "abandoned_p95_lt_1s",
        "vram_back_at_baseline",
        "warm_load_lt_3s",
        "shutdown_lt_30s_exit_0",
    }
    assert all(isinstance(v, bool) for v in passes.values())
    # pass/fail follows the figures against the targets
    assert passes["ttft_p95_lt_20ms"] == (out["ttft"]["p95_ms"] < 20.0)
    assert passes["warm_load_lt_3s"] == (out["load"]["warm"]["p95_ms"] < 3000.0)
    assert passes["shutdown_lt_30s_exit_0"] and passes["vram_back_at_baseline"]
    assert out["pass_all"] == all(passes.values())


def test_bench_suite_and_gateway_bench_on_a_server_that_wants_a_token(
    tiny_model: Path, tmp_path: Path
) -> None:
    """Both benches against a nats-server that refuses connections without a token: their
    own clients and the workers (and gateway) they start all get it from --nats-token; a
    credential flag without --nats-url (their embedded server wants none) is a usage error."""
    from worker.nats.server import EmbeddedNatsServer

    exe = str(Path(sys.executable).parent / "worker-orcd")
    srv = EmbeddedNatsServer(store_dir=tmp_path / "nats", config='authorization { token: "s3c" }\n')
    srv.start()
    try:
        auth = ["--nats-url", srv.url, "--nats-token", "s3c"]
        suite = [exe, "bench", "--suite", "--device", "cpu", "--model", str(tiny_model)]
        small = ["--jobs", "2", "--max-tokens", "4", "--health-requests", "5"]
        small += ["--cancel-runs", "1", "--vram-jobs", "2", "--loads", "1"]
        proc = subprocess.run(
            suite + small + auth, cwd=REPO, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        out = json.loads(proc.stdout)
        assert out["embedded_nats"] is False and out["nats_url"] == srv.url
        assert out["job_errors"] == [] and out["ttft"]["n"] == 2

        gw = [exe, "gateway-bench", "--device", "cpu", "--model", str(tiny_model)]
        gw += ["--ctx-size", "256", "--jobs", "2", "--max-tokens", "4", "--streams", "4"]
        proc = subprocess.run(gw + auth, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert proc.returncode in (0, 1), proc.stdout + proc.stderr  # 1: a target missed
        out = json.loads(proc.stdout)
        assert out["direct"]["ttft_ms"]["n"] == 2 and out["gateway"]["ttft_ms"]["n"] == 2
        assert out["concurrent"]["errors"] == 0
        assert "nats: authorization violation" not in proc.stderr
    finally:
        srv.stop()
    for cmd in ([*suite, "--nats-token", "s3c"], [*gw, "--nats-token", "s3c"]):
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and "--nats-token" in proc.stdout + proc.stderr, proc


def test_bench_suite_ends_when_its_worker_dies(tiny_model: Path) -> None:
    """The measured worker fails a step the way a device fault does (WORKER_ORCD_FAIL_STEP:
    it fails its jobs, reports unhealthy and exits): the suite says so at once as its one
    JSON error, instead of its clients waiting minutes for a worker that is gone."""
    import os
    import time

    cmd = [str(Path(sys.executable).parent / "worker-orcd"), "bench", "--suite"]
    cmd += ["--device", "cpu", "--model", str(tiny_model), "--jobs", "20", "--max-tokens", "16"]
    cmd += ["--health-requests", "5", "--cancel-runs", "1", "--vram-jobs", "2", "--loads", "1"]
    env = dict(os.environ, WORKER_ORCD_FAIL_STEP="5")
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=180, env=env)
    took = time.monotonic() - t0
    assert proc.returncode == 1, proc.stdout + proc.stderr
    out = json.loads(proc.stdout)
    assert out["error"].startswith("WorkerExited: the worker exited with"), out
    assert took < 90, took
