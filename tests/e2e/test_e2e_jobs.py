"""A real worker subprocess (CPU backend, tiny synthetic model) behind a real nats-server:
the event stream, validation of every job field, context length, health, heartbeat, metrics,
load failure and the no-silent-CPU rule."""

from __future__ import annotations

import asyncio
import json
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from worker.client import OrcdClient
from worker.errors import ErrorCode
from worker.nats.server import EmbeddedNatsServer, free_port
from worker.protocol import End, Error, Started, Token, decode_event, decode_health

REF = "tiny"


def check_stream(events: list[Any], job_id: str) -> End:
    """started -> token* (i = 0, 1, ...) -> end, every event for job_id."""
    assert isinstance(events[0], Started), events[:2]
    assert isinstance(events[-1], End), events[-2:]
    tokens = [e for e in events if isinstance(e, Token)]
    assert [t.i for t in tokens] == list(range(len(tokens)))
    assert all(e.job_id == job_id for e in events)
    end = events[-1]
    assert end.tokens_out == len(tokens)
    assert end.prompt_tokens == events[0].prompt_tokens
    return end


def run_serve(*args: str) -> subprocess.CompletedProcess[str]:
    """`python -m worker serve ARGS --log-format json` run to its exit (60 s at most), its
    output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "worker", "serve", *args, "--log-format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_job_stream_and_determinism(
    nats_server: EmbeddedNatsServer,
    client: OrcdClient,
    spawn_worker: Any,
    tiny_model: Path,
    gather: Any,
) -> None:
    w = spawn_worker(tiny_model, nats_server.url, REF, "--ctx-size", "512").wait_ready()
    runs = []
    for k in range(2):
        evs = await gather(
            client.generate(
                REF,
                prompt="Hello there",
                job_id=f"det-{k}",
                max_tokens=24,
                temperature=0.7,
                seed=1234,
                timeout_s=60,
            )
        )
        check_stream(evs, f"det-{k}")
        assert evs[0].seed == 1234 and evs[0].attempt == 1 and evs[0].worker_id == w.worker_id
        runs.append([e.id for e in evs if isinstance(e, Token)])
    assert runs[0] == runs[1] and len(runs[0]) > 0
    # no seed: one is generated and reported
    evs = await gather(client.generate(REF, prompt="Hi", max_tokens=3, timeout_s=60))
    assert isinstance(evs[0], Started) and 0 <= evs[0].seed < 2**64
    # chat messages through the model's template
    evs = await gather(
        client.generate(
            REF,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=3,
            temperature=0,
            timeout_s=60,
        )
    )
    assert isinstance(evs[-1], End)
    # replay from ORCD_EVENTS gives the same stream
    stored = await client.replay("det-1")
    check_stream(stored, "det-1")
    assert [e.id for e in stored if isinstance(e, Token)] == runs[1]
    # narration: every lifecycle event, each with the worker's context fields
    for name in (
        "startup",
        "model_load_start",
        "model_load_complete",
        "ready",
        "execute_start",
        "execute_end",
    ):
        rec = w.events(name)[0]
        assert rec["worker_id"] == w.worker_id and rec["model_ref"] == REF, rec
        assert "gpu_device" in rec and "job_id" in rec
    assert [r["percent"] for r in w.events("model_load_progress")] == [0, 25, 50, 75, 100]
    assert w.events("execute_end")[0]["job_id"] == "det-0"
    # the prompt itself is never logged without --log-prompts
    assert "Hello there" not in w.output()
    start = w.events("execute_start")[0]
    assert len(start["prompt_sha256"]) == 64 and start["prompt_chars"] == len("Hello there")


async def queue_drains(client: OrcdClient, timeout: float = 10.0) -> bool:
    """The work queue becomes empty (the last job's ack follows its terminal event)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (await client.js.stream_info("ORCD_JOBS")).state.messages == 0:
            return True
        await asyncio.sleep(0.05)
    return False


INVALID_JOBS: list[tuple[str, dict[str, Any]]] = [
    ("max_tokens", {"max_tokens": 0}),
    ("max_tokens", {"max_tokens": 2049}),
    ("temperature", {"temperature": -1}),
    ("temperature", {"temperature": 2.5}),
    ("top_p", {"top_p": 1.5}),
    ("top_k", {"top_k": -3}),
    ("min_p", {"min_p": -0.1}),
    ("repetition_penalty", {"repetition_penalty": 3}),
    ("stop", {"stop": ["a", "b", "c", "d", "e"]}),
    ("seed", {"seed": -5}),
    ("seed", {"seed": 2**64}),
    ("prompt", {"prompt": ""}),
    ("prompt", {"prompt": "x" * 40000}),
    ("unknown field", {"colour": "blue"}),
    ("exactly one", {"messages": [{"role": "user", "content": "hi"}]}),
    ("exactly one", {"prompt": None}),
    ("role", {"prompt": None, "messages": [{"role": "wizard", "content": "x"}]}),
]


async def test_every_invalid_job_is_rejected_and_the_worker_goes_on(
    nats_server: EmbeddedNatsServer,
    client: OrcdClient,
    spawn_worker: Any,
    tiny_model: Path,
    gather: Any,
) -> None:
    w = spawn_worker(tiny_model, nats_server.url, REF, "--ctx-size", "64").wait_ready()
    for k, (needle, fields) in enumerate(INVALID_JOBS):
        job: dict[str, Any] = {"job_id": f"bad-{k}", "prompt": "hello", **fields}
        job = {key: v for key, v in job.items() if v is not None}
        evs = await gather(
            client.run_job(REF, json.dumps(job).encode(), job_id=f"bad-{k}", timeout_s=30)
        )
        assert len(evs) == 1 and isinstance(evs[0], Error), (needle, evs)
        assert evs[0].code is ErrorCode.INVALID_REQUEST and not evs[0].retriable
        assert needle in evs[0].message, (needle, evs[0].message)

    # a stop string longer than 32 tokens (needs the tokenizer)
    evs = await gather(
        client.generate(
            REF,
            prompt="hi",
            stop=["a b c d e f g h " * 8],
            job_id="bad-stop",
            max_tokens=4,
            timeout_s=30,
        )
    )
    assert isinstance(evs[-1], Error) and evs[-1].code is ErrorCode.INVALID_REQUEST
    assert "tokens" in evs[-1].message

    # prompt longer than the context (64): CONTEXT_LENGTH_EXCEEDED, not retriable
    evs = await gather(
        client.generate(REF, prompt="word " * 300, job_id="too-long", max_tokens=4, timeout_s=30)
    )
    assert isinstance(evs[-1], Error) and evs[-1].code is ErrorCode.CONTEXT_LENGTH_EXCEEDED

    # payloads without a readable job_id: the error goes to orcd.rejected
    rejected: asyncio.Queue[Any] = asyncio.Queue()

    async def on_rejected(msg: Any) -> None:
        rejected.put_nowait(decode_event(msg.data))

    await client.nc.subscribe(client.subjects.rejected, cb=on_rejected)
    await client.nc.flush()
    for payload in (
        b"not json",
        b"[1, 2]",
        b'{"job_id": "bad id!", "prompt": "x"}',
        b'{"prompt": "no id"}',
        b"\xff\xfe",
    ):
        await client.submit(REF, payload)
        err = await asyncio.wait_for(rejected.get(), 30)
        assert isinstance(err, Error) and err.code is ErrorCode.INVALID_REQUEST

    # the worker is alive and serves the next job
    evs = await gather(
        client.generate(REF, prompt="hello", job_id="good", max_tokens=4, timeout_s=30)
    )
    check_stream(evs, "good")
    assert w.proc.poll() is None
    # every job was terminated or acked: the work queue is empty
    assert await queue_drains(client)
    health = await client.health(w.worker_id)
    assert health.status == "healthy"


async def test_health_heartbeat_metrics(
    nats_server: EmbeddedNatsServer,
    client: OrcdClient,
    spawn_worker: Any,
    tiny_model: Path,
    gather: Any,
) -> None:
    port = free_port()
    w = spawn_worker(
        tiny_model,
        nats_server.url,
        REF,
        "--ctx-size",
        "256",
        "--metrics-port",
        str(port),
        "--heartbeat-interval-s",
        "0.5",
    ).wait_ready()
    beats: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_beat(msg: Any) -> None:
        beats.put_nowait(msg.data)

    await client.nc.subscribe(client.subjects.heartbeat(w.worker_id), cb=on_beat)
    beat = decode_health(await asyncio.wait_for(beats.get(), 5))
    assert beat.worker_id == w.worker_id

    h = await client.health(w.worker_id)
    assert (h.status, h.device, h.resident, h.model_ref) == ("healthy", "cpu", False, REF)
    assert h.gpu_device is None and h.context_length == 256 and h.vocab_size > 0
    assert h.tokenizer_kind == "gguf-bpe" and h.quant_kind and h.version
    assert (await client.health()).worker_id == w.worker_id  # orcd.health: any worker

    # health reply latency over NATS (request-reply round trip)
    lat = []
    for _ in range(300):
        t0 = time.perf_counter()
        await client.health(w.worker_id)
        lat.append(time.perf_counter() - t0)
    lat.sort()
    p50, p99 = lat[150] * 1e3, lat[296] * 1e3
    print(f"health reply latency: p50 {p50:.3f} ms, p99 {p99:.3f} ms")
    assert statistics.median(lat) < 0.05

    # greedy: a sampled job may draw the end-of-text token before its 5th token
    evs = await gather(
        client.generate(REF, prompt="hi", max_tokens=5, temperature=0.0, timeout_s=30)
    )
    assert isinstance(evs[-1], End) and evs[-1].tokens_out == 5, evs[-1]
    text = await client.metrics(w.worker_id)
    assert 'orcd_requests_total{outcome="ok"} 1.0' in text
    assert "orcd_tokens_generated_total 5.0" in text
    assert "orcd_time_to_first_token_seconds_count 1.0" in text
    assert "orcd_inter_token_seconds_count 4.0" in text
    assert "orcd_uptime_seconds" in text and "orcd_vram_bytes_used" in text
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        assert b'orcd_requests_total{outcome="ok"} 1.0' in resp.read()
    for _ in range(100):  # counted once the job is acked, just after its terminal event
        if (await client.health(w.worker_id)).jobs_completed == 1:
            break
        await asyncio.sleep(0.05)
    assert (await client.health(w.worker_id)).jobs_completed == 1


async def test_inference_timeout_ends_the_job_and_the_worker_goes_on(
    nats_server: EmbeddedNatsServer,
    client: OrcdClient,
    spawn_worker: Any,
    tiny_model: Path,
    gather: Any,
) -> None:
    w = spawn_worker(
        tiny_model, nats_server.url, REF, "--ctx-size", "4096", "--inference-timeout-sec", "0.3"
    ).wait_ready()
    evs = await gather(
        client.generate(REF, prompt="x", max_tokens=2048, temperature=0.0, timeout_s=60)
    )
    assert isinstance(evs[0], Started) and isinstance(evs[-1], Error)
    assert evs[-1].code is ErrorCode.INFERENCE_TIMEOUT and evs[-1].retriable
    evs = await gather(client.generate(REF, prompt="hi", max_tokens=2, timeout_s=60))
    assert isinstance(evs[-1], End)
    assert (await client.health(w.worker_id)).status == "healthy"
    assert 'outcome="INFERENCE_TIMEOUT"} 1.0' in await client.metrics(w.worker_id)


def test_bad_model_file_exits_1_with_the_reason(tmp_path: Path) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)
    srv = EmbeddedNatsServer(store_dir=tmp_path / "nats")
    with srv:
        proc = run_serve("--device", "cpu", "--model", str(bad), "--nats-url", srv.url)
    assert proc.returncode == 1, proc.stderr
    assert "MODEL_LOAD_FAILED" in proc.stderr and str(bad) in proc.stderr


def test_device_defaults_to_cuda_never_silently_cpu(tmp_path: Path, tiny_model: Path) -> None:
    """Without --device the worker wants CUDA; on a machine without it, it fails (exit 1)
    instead of falling back to the CPU."""
    try:
        has_gpu = subprocess.run(["nvidia-smi"], capture_output=True).returncode == 0
    except FileNotFoundError:
        has_gpu = False
    if has_gpu:
        pytest.skip("a GPU is present: the CUDA path is covered by the gpu tests")
    with EmbeddedNatsServer(store_dir=tmp_path / "nats") as srv:
        proc = run_serve("--model", str(tiny_model), "--nats-url", srv.url)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert '"device": "cpu"' not in proc.stderr
    assert "CUDA" in proc.stderr


async def test_embedded_server_submit_and_health_cli(
    tmp_path: Path, spawn_worker: Any, tiny_model: Path
) -> None:
    """`serve` without --nats-url starts its own nats-server and says where; `submit` prints
    the text, then a summary line; `health` exits 0 for a healthy worker."""
    w = spawn_worker(tiny_model, "", REF, "--ctx-size", "128")  # no --nats-url
    try:
        rec = w.wait_event("nats_embedded", 60)
        url = rec["nats_url"]
        assert url.startswith("nats://127.0.0.1:")
        w.wait_ready()
        cli = [sys.executable, "-m", "worker"]
        out = subprocess.run(
            [
                *cli,
                "submit",
                "--nats-url",
                url,
                "--model-ref",
                REF,
                "--max-tokens",
                "6",
                "--seed",
                "9",
                "--temperature",
                "0",
                "hello",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        summary = out.stdout.strip().splitlines()[-1]
        assert "6 out" in summary and "max_tokens" in summary, out.stdout
        health = subprocess.run(
            [*cli, "health", "--nats-url", url, "--worker-id", w.worker_id],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert health.returncode == 0 and '"status":"healthy"' in health.stdout
    finally:
        w.stop()
    assert w.proc.returncode == 0
    # the embedded server went away with the worker
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=1).close()


def test_fatal_startup_error_is_logged_cleaned_up_and_exits_nonzero(
    tmp_path: Path, tiny_model: Path
) -> None:
    """A failure outside any job (here: the metrics port is taken) is logged, the worker
    cleans up (its embedded nats-server is stopped) and exits 2 - it does not hang."""
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run_serve("--device", "cpu", "--model", str(tiny_model), "--metrics-port", str(port))
    assert proc.returncode == 2, proc.stderr[-2000:]
    records = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    fatal = [r for r in records if r["event"] == "error" and r["level"] == "CRITICAL"]
    assert fatal and "Address already in use" in fatal[0]["msg"]
    assert records[-1]["event"] == "shutdown" and records[-1]["exit_code"] == 2
    url = next(r["nats_url"] for r in records if r["event"] == "nats_embedded")
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=1).close()
