"""The command line as a person meets it, run as real `worker-orcd` subprocesses against a real
nats-server and a real worker (CPU backend, tiny synthetic model): every client command fails
fast with one line (or one JSON object) when NATS is unreachable, when no worker serves the
model reference, and on malformed arguments; Ctrl-C never prints a traceback and cancels a
streaming job on the worker; `cancel` works; `serve` retries NATS and gives up in time."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tools.live import WorkerProc
from worker.nats.server import EmbeddedNatsServer

WORKER_ORCD = str(Path(sys.executable).parent / "worker-orcd")
REF = "cli-tiny"


def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def env() -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith("WORKER_ORCD_NATS")}
    out["PYTHONUNBUFFERED"] = "1"
    return out


def cli(*args: str, timeout: float = 60) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run `worker-orcd ARGS` to its end; (result, seconds it took)."""
    t0 = time.monotonic()
    out = subprocess.run(
        [WORKER_ORCD, *args], capture_output=True, text=True, timeout=timeout, env=env()
    )
    return out, time.monotonic() - t0


def one_line_failure(out: subprocess.CompletedProcess[str], rc: int = 1) -> str:
    """The command failed with `rc`, printed nothing on stdout and exactly one line on
    stderr, and no traceback; returns that line."""
    assert out.returncode == rc, (out.returncode, out.stdout, out.stderr)
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert out.stdout.strip() == "", out.stdout
    return lines[0]


def one_json_failure(out: subprocess.CompletedProcess[str], rc: int = 1) -> str:
    """As one_line_failure, for --json: one JSON object with `error` on stdout."""
    assert out.returncode == rc, (out.returncode, out.stdout, out.stderr)
    assert out.stderr.strip() == "", out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1, out.stdout
    error: str = json.loads(lines[0])["error"]
    return error


def wait_for_port_free(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) != 0:
                return
        assert time.monotonic() < deadline, f"something else listens on port {port}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNatsServer]:
    with EmbeddedNatsServer(store_dir=tmp_path_factory.mktemp("nats")) as srv:
        yield srv


@pytest.fixture(scope="module")
def worker(
    nats: EmbeddedNatsServer, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProc]:
    log = tmp_path_factory.mktemp("logs") / "worker.log"
    w = WorkerProc(tiny_model, nats.url, REF, log_path=log).wait_ready()
    yield w
    w.stop()


# --------------------------------------------------------------------- NATS unreachable


@pytest.mark.parametrize(
    "command",
    [["submit", "--model-ref", REF, "hello"], ["health"], ["cancel", "job-1"]],
    ids=["submit", "health", "cancel"],
)
def test_clients_fail_fast_when_nats_is_unreachable(command: list[str]) -> None:
    for url, reason in (
        (f"nats://127.0.0.1:{closed_port()}", "connection refused"),
        ("nats://no-such-host.invalid:4222", "unknown host"),
    ):
        out, took = cli(*command, "--nats-url", url, "--connect-timeout", "1.5")
        line = one_line_failure(out)
        assert took < 6, took
        assert line.startswith(f"worker-orcd {command[0]}: cannot reach NATS at {url}"), line
        assert reason in line, line
        out, _ = cli(*command, "--nats-url", url, "--connect-timeout", "1.5", "--json")
        assert "cannot reach NATS" in one_json_failure(out)


def test_health_timeout_bounds_the_connect_too() -> None:
    out, took = cli("health", "--timeout", "2", "--nats-url", f"nats://127.0.0.1:{closed_port()}")
    assert "within 2 s (connection refused)" in one_line_failure(out)
    assert took < 4.5, took


def test_default_url_and_default_timeout() -> None:
    """Nothing at the default URL: `submit` gives up after the default 5 s, naming it."""
    wait_for_port_free(4222)
    out, took = cli("submit", "--model-ref", REF, "hello")
    line = one_line_failure(out)
    assert 4.5 < took < 10, took
    assert "nats://127.0.0.1:4222 within 5 s (connection refused)" in line
    assert "worker-orcd serve" in line  # says how to get a server


# --------------------------------------------------------------------- no worker


def test_no_worker_for_the_model_ref(nats: EmbeddedNatsServer, worker: WorkerProc) -> None:
    out, took = cli("submit", "--nats-url", nats.url, "--model-ref", "no-such-model", "hi")
    line = one_line_failure(out)
    assert took < 5, took
    assert "no worker serves model ref 'no-such-model'" in line and REF in line
    out, _ = cli("health", "--nats-url", nats.url, "--model-ref", "no-such-model", "--json")
    assert "no worker serving 'no-such-model'" in one_json_failure(out)


def test_no_worker_at_all(tmp_path: Path) -> None:
    with EmbeddedNatsServer(store_dir=tmp_path / "nats") as empty:
        out, took = cli("submit", "--nats-url", empty.url, "--model-ref", REF, "hi")
        assert "no worker serves model ref" in one_line_failure(out) and took < 5
        out, took = cli("submit", "--nats-url", empty.url, "hi")  # no ref to pick
        assert "no worker answered" in one_line_failure(out) and took < 5
        out, took = cli("health", "--nats-url", empty.url)
        assert "no worker answered" in one_line_failure(out) and took < 6
        out, took = cli("cancel", "--nats-url", empty.url, "job-1")
        assert "no worker answered the cancel of job-1" in one_line_failure(out) and took < 5
        # --allow-no-worker queues the job: nothing stores it before a worker made the stream
        out, _ = cli(
            "submit", "--nats-url", empty.url, "--model-ref", REF, "--allow-no-worker", "hi"
        )
        assert "no worker has created the ORCD_JOBS stream" in one_line_failure(out)


# --------------------------------------------------------------------- malformed arguments


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--messages", "not json"], "--messages is not valid JSON"),
        (["--messages", '{"role": "user", "content": "hi"}'], "not an object"),
        (["--messages", "[1, 2]"], "JSON list of"),
        (["--messages", '[{"role": "robot", "content": "hi"}]'], "invalid job"),
        (["--messages", '[{"role": "user"}]'], "invalid job"),
        (["--chat", "--messages", "[]", "hi"], "not both"),
        ([], "give a PROMPT"),
        (["--system", "x", "hi"], "--system goes with --chat"),
        (["--temperature", "3", "hi"], "invalid job"),
    ],
)
def test_malformed_submit_arguments(args: list[str], says: str) -> None:
    out, took = cli("submit", "--model-ref", REF, *args)  # fails before any connection
    assert says in one_line_failure(out, rc=2)
    assert took < 5
    out, _ = cli("submit", "--model-ref", REF, "--json", *args)
    assert says in one_json_failure(out, rc=2)


def test_usage_errors_are_json_in_json_modes() -> None:
    out, _ = cli("inspect", "--json")
    assert "a GGUF model file is required" in one_json_failure(out, rc=2)
    out, _ = cli("cancel", "--json", "not a job id")
    assert "is not a job id" in one_json_failure(out, rc=2)


# --------------------------------------------------------------------- jobs


def test_submit_streams_then_summarises_and_chat_applies_the_template(
    nats: EmbeddedNatsServer, worker: WorkerProc, tiny_model: Path
) -> None:
    out, _ = cli(
        "submit", "--nats-url", nats.url, "--model-ref", REF, "--max-tokens", "6",
        "--temperature", "0", "hello",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    summary = out.stdout.rstrip("\n").splitlines()[-1]
    assert summary.startswith("[") and "max_tokens: " in summary and "6 out" in summary
    assert "TTFT" in summary and "tokens/s" in summary

    from worker.engine.generate import prepare_prompt
    from worker.gguf.reader import open_gguf
    from worker.tokenizer.loader import load_tokenizer

    with open_gguf(tiny_model) as gf:
        tok = load_tokenizer(gf.metadata, model_path=tiny_model)
        chat_ids = prepare_prompt(tok, messages=[{"role": "user", "content": "hello"}])
        plain_ids = prepare_prompt(tok, prompt="hello")
    for flags, expected in (([], plain_ids), (["--chat"], chat_ids)):
        out, _ = cli(
            "submit", "--nats-url", nats.url, "--model-ref", REF, "--max-tokens", "2",
            "--json", *flags, "hello",
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        events = [json.loads(line) for line in out.stdout.splitlines()]
        assert events[0]["event"] == "started" and events[-1]["event"] == "end"
        assert events[0]["prompt_tokens"] == len(expected)
    assert len(chat_ids) > len(plain_ids)  # the template wrapped the message


def _replay_last(nats_url: str, job_id: str) -> dict[str, Any]:
    """The last stored event of `job_id`, read back with the Python client."""
    import asyncio

    import msgspec

    from worker.client import OrcdClient

    async def read() -> dict[str, Any]:
        async with await OrcdClient.connect(nats_url) as c:
            for _ in range(50):
                events = await c.replay(job_id)
                if events and events[-1].__struct_config__.tag in ("end", "error"):
                    break
                await asyncio.sleep(0.1)
            last: dict[str, Any] = msgspec.to_builtins(events[-1])
            last["event"] = events[-1].__struct_config__.tag
            return last

    return asyncio.run(read())


def test_ctrl_c_on_submit_cancels_the_job_on_the_worker(
    nats: EmbeddedNatsServer, worker: WorkerProc
) -> None:
    job_id = f"ctrl-c-{time.monotonic_ns()}"
    proc = subprocess.Popen(
        [WORKER_ORCD, "submit", "--nats-url", nats.url, "--model-ref", REF, "--job-id", job_id,
         "--max-tokens", "2048", "--temperature", "0", "Once upon a time"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(),
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.read(1)  # text arrives while the job runs
    assert first and proc.poll() is None
    proc.send_signal(signal.SIGINT)
    rc = proc.wait(15)
    err = proc.stderr.read()
    assert rc == 130 and "Traceback" not in err, err
    assert (
        err.strip().splitlines()[-1] == f"worker-orcd submit: interrupted: cancelled job {job_id}"
    )
    last = _replay_last(nats.url, job_id)
    assert last["event"] == "error" and last["code"] == "CANCELLED", last


def test_cancel_command_stops_a_running_job(nats: EmbeddedNatsServer, worker: WorkerProc) -> None:
    job_id = f"cancel-cmd-{time.monotonic_ns()}"
    proc = subprocess.Popen(
        [WORKER_ORCD, "submit", "--nats-url", nats.url, "--model-ref", REF, "--job-id", job_id,
         "--max-tokens", "2048", "--temperature", "0", "Once upon a time"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(),
    )  # fmt: skip
    assert proc.stdout is not None
    assert proc.stdout.read(1)
    out, _ = cli("cancel", "--nats-url", nats.url, job_id, "--json")
    assert out.returncode == 0, out.stderr
    replies = [json.loads(line) for line in out.stdout.splitlines()]
    assert {r["status"] for r in replies} == {"cancelling"}
    assert replies[0]["worker_id"] == worker.worker_id
    rc = proc.wait(15)
    assert rc == 1  # the job ended with an error event: CANCELLED
    assert "CANCELLED" in (proc.stderr.read() if proc.stderr else "")
    out, _ = cli("cancel", "--nats-url", nats.url, job_id)  # idempotent: finished now
    assert out.returncode == 0 and "already finished" in out.stdout


def test_health_and_the_model_ref_default(nats: EmbeddedNatsServer, worker: WorkerProc) -> None:
    out, _ = cli("health", "--nats-url", nats.url, "--model-ref", REF)
    assert out.returncode == 0, out.stderr
    health = json.loads(out.stdout)  # not a terminal: the JSON line
    assert health["status"] == "healthy" and health["worker_id"] == worker.worker_id
    out, _ = cli("submit", "--nats-url", nats.url, "--max-tokens", "3", "hi")  # one ref served
    assert out.returncode == 0, out.stderr
    assert " out, TTFT " in out.stdout.splitlines()[-1]


# --------------------------------------------------------------------- Ctrl-C elsewhere


def _interrupt(args: list[str], after: float) -> tuple[int, str, str]:
    proc = subprocess.Popen(
        [WORKER_ORCD, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env(),
    )  # fmt: skip
    time.sleep(after)
    assert proc.poll() is None, "finished before the interrupt"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    return proc.returncode, out, err


def test_ctrl_c_never_prints_a_traceback(tiny_model: Path, real_qwen: Path) -> None:
    unreachable = f"nats://127.0.0.1:{closed_port()}"
    for args in (
        ["health", "--nats-url", unreachable, "--connect-timeout", "30"],
        ["serve", "--device", "cpu", "--model", str(tiny_model), "--nats-url", unreachable],
        ["generate", "--device", "cpu", str(real_qwen), "hello"],  # a few seconds of loading
        ["bench", "--suite", "--device", "cpu", "--model", str(tiny_model), "--jobs", "50"],
    ):
        rc, out, err = _interrupt(args, after=2.0)
        assert rc == 130, (args[0], rc, err[-2000:])
        assert "Traceback" not in err and "KeyboardInterrupt" not in err, (args[0], err)
        if args[0] == "bench":  # bench prints JSON, its errors too
            assert json.loads(out.strip().splitlines()[-1]) == {"error": "interrupted"}
        else:
            assert err.strip().splitlines()[-1] == f"worker-orcd {args[0]}: interrupted", err


# --------------------------------------------------------------------- serve


def test_serve_retries_nats_then_gives_up(tiny_model: Path) -> None:
    url = f"nats://127.0.0.1:{closed_port()}"
    out, took = cli(
        "serve", "--device", "cpu", "--model", str(tiny_model), "--nats-url", url,
        "--nats-connect-timeout", "3", "--log-format", "json",
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert 2.5 < took < 10, took
    records = [json.loads(line) for line in out.stderr.splitlines() if line.startswith("{")]
    retries = [r for r in records if r["event"] == "nats_connect_retry"]
    assert len(retries) >= 2  # 0.5 s, 1 s, ... pauses within 3 s
    assert [r["attempt"] for r in retries] == list(range(1, len(retries) + 1))  # once each
    assert all("connection refused" in r["msg"] for r in retries)
    plain = [line for line in out.stderr.splitlines() if not line.startswith("{")]
    assert plain == [
        f"worker-orcd serve: cannot reach NATS at {url} within 3 s (connection refused)"
    ]


def test_serve_embedded_on_4222_ends_with_the_command_to_try(tiny_model: Path) -> None:
    """Without --nats-url the embedded server takes the clients' default port, and the last
    start-up lines are a command that, run as printed, gets an answer."""
    wait_for_port_free(4222)
    proc = subprocess.Popen(
        [WORKER_ORCD, "serve", "--device", "cpu", "--model", str(tiny_model)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env(),
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        lines: list[str] = []
        deadline = time.monotonic() + 120
        while not (lines and lines[-1].strip().startswith(WORKER_ORCD)):
            line = proc.stderr.readline()
            assert line and time.monotonic() < deadline, "".join(lines[-30:])
            lines.append(line)
        assert any("nats://127.0.0.1:4222" in ln for ln in lines if "nats_embedded" in ln)
        command = shlex.split(lines[-1])
        assert command[:5] == [WORKER_ORCD, "submit", "--nats-url", "nats://127.0.0.1:4222",
                               "--model-ref"]  # fmt: skip
        assert command[5] == tiny_model.stem.lower() and "--chat" in command
        out = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env())
        assert out.returncode == 0, out.stderr
        assert " out, TTFT " in out.stdout.splitlines()[-1]
        # and the defaults meet: no URL, no model ref
        out, _ = cli("submit", "--max-tokens", "3", "hello")
        assert out.returncode == 0, out.stderr
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
    assert proc.returncode == 0


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--batch", "1,,8"], "not a comma list of integers"),
        (["--batch", "0,8"], "must be positive: 0"),
        (["--suite", "--device", "cpu", "--concurrency", "8,x"], "not an integer: 'x'"),
        (["--device", "cpu"], "--device: only for --suite"),
    ],
)
def test_bench_refuses_bad_lists_and_a_stray_device_before_loading(
    real_qwen: Path, args: list[str], says: str
) -> None:
    """A wrong `--batch` list used to surface only after the model had loaded on the GPU."""
    out, took = cli("bench", *args, str(real_qwen))
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert says in out.stderr and "Traceback" not in out.stderr
    assert took < 10


def test_bench_without_the_gpu_stack_says_so_in_one_json_line(
    real_qwen: Path, tmp_path: Path
) -> None:
    """Where PyCUDA cannot be imported (here: made so by a shadowing package), the in-process
    bench answers one JSON error that names the way out, not a bare ModuleNotFoundError."""
    shadow = tmp_path / "pycuda"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise ImportError('No module named pycuda (shadowed)')\n")
    e = env()
    e["PYTHONPATH"] = os.pathsep.join([str(tmp_path), e.get("PYTHONPATH", "")])
    out = subprocess.run(
        [WORKER_ORCD, "bench", "--no-cold", "--batch", "1", str(real_qwen)],
        capture_output=True,
        text=True,
        timeout=60,
        env=e,
    )
    error = one_json_failure(out)
    assert error.startswith("the CUDA backend cannot start (No module named pycuda")
    assert "bench --suite --device cpu" in error
