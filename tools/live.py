"""A live `worker-orcd serve` child process, for the end-to-end tests and `bench --suite`.

`WorkerProc` starts the worker as a real subprocess (``python -m worker serve``) and collects
its JSON narration line by line on a reader thread, so callers can wait for an event
(`wait_event("ready")`), for the process to exit, or read its output afterwards.
`wait_healthy` polls the worker's health subject until it answers ``healthy``: the moment a
client can use it, which is what the suite's load time measures.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from worker.client import OrcdClient
from worker.protocol import Health

REPO = Path(__file__).resolve().parents[1]


class WorkerProc:
    """A `worker-orcd serve` child process whose JSON narration is collected line by line.

    `extra` flags go after the standard ones; `env` adds to (and overrides) this process's
    environment; `log_path` receives the whole output when the worker is stopped.
    """

    def __init__(
        self,
        model: Path,
        nats_url: str,
        model_ref: str,
        *extra: str,
        worker_id: str | None = None,
        log_path: Path | None = None,
        device: str = "cpu",
        env: Mapping[str, str] | None = None,
        module: str = "worker",
        module_args: Sequence[str] = (),
    ) -> None:
        self.worker_id = worker_id or str(uuid.uuid4())
        self.model_ref = model_ref
        cmd = [
            sys.executable,
            "-m",
            module,
            *module_args,
            "serve",
            "--device",
            device,
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
        child_env = dict(os.environ, PYTHONUNBUFFERED="1")
        if env:
            child_env.update(env)
        self.started_at = time.perf_counter()
        self.proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            env=child_env,
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

    def events(self, *names: str) -> list[dict[str, Any]]:
        """The log records of these events so far, in order."""
        with self._cond:
            return [r for r in self.records if r.get("event") in names]

    def wait_events(self, name: str, count: int, timeout: float = 30.0) -> list[dict[str, Any]]:
        """The records of `name` once there are at least `count` (a worker logs an event
        before it publishes what a client sees, but its line reaches this process's reader
        thread a moment later: wait for it rather than read too early)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                got = [r for r in self.records if r.get("event") == name]
                if len(got) >= count:
                    return got
                if self.proc.poll() is not None and not self._reader.is_alive():
                    raise AssertionError(
                        f"worker exited ({self.proc.returncode}) before {name!r}:\n"
                        + "".join(self.lines[-40:])
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"{len(got)} of {count} {name!r} events in {timeout} s:\n"
                        + "".join(self.lines[-40:])
                    )
                self._cond.wait(min(left, 0.5))

    def wait_event(self, name: str, timeout: float = 60.0) -> dict[str, Any]:
        return self.wait_events(name, 1, timeout)[0]

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
        """SIGTERM (then SIGKILL after 30 s) if still running; write the log if asked."""
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

    def tail(self, n: int = 40) -> str:
        with self._cond:
            return "".join(self.lines[-n:])


async def wait_healthy(
    client: OrcdClient, worker: WorkerProc, timeout: float = 300.0, poll_s: float = 0.005
) -> tuple[float, Health]:
    """Poll `worker`'s health subject until it answers ``healthy``; returns the seconds from
    the process's start to that reply, and the reply. Raises if the worker exits first, turns
    ``unhealthy``, or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while True:
        if worker.proc.poll() is not None:
            raise RuntimeError(
                f"worker exited ({worker.proc.returncode}) before it was healthy:\n" + worker.tail()
            )
        try:
            h = await client.health(worker.worker_id, timeout_s=0.5)
        except Exception:  # no responders yet / timeout while it starts: poll again
            h = None
        if h is not None:
            if h.status == "healthy":
                return time.perf_counter() - worker.started_at, h
            if h.status == "unhealthy":
                raise RuntimeError(f"worker turned unhealthy while loading:\n{worker.tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"worker not healthy in {timeout} s:\n{worker.tail()}")
        await asyncio.sleep(poll_s)


async def shutdown_and_wait(
    client: OrcdClient, worker: WorkerProc, timeout: float = 35.0
) -> tuple[float, int]:
    """Send the shutdown request (docs/operations.md) and wait for the process to exit; returns the
    seconds from the request to the exit, and the exit code."""
    t0 = time.perf_counter()
    with contextlib.suppress(Exception):  # the reply may race the exit; the exit is what counts
        await client.shutdown(worker.worker_id, timeout_s=min(timeout, 5.0))
    try:
        rc = await asyncio.to_thread(worker.proc.wait, timeout)
    except subprocess.TimeoutExpired:
        worker.stop()
        msg = f"worker did not exit {timeout} s after shutdown:\n{worker.tail()}"
        raise TimeoutError(msg) from None
    secs = time.perf_counter() - t0
    await asyncio.to_thread(worker.wait_exit, 5)  # exited already: collects the last lines
    return secs, rc
