"""A live `worker-orcd gateway` child process, for the end-to-end tests and gateway-bench.

`GatewayProc` starts the gateway as a real subprocess on a free port and `wait_ready` polls
``GET /health`` until it answers 200 (NATS connected, HTTP up).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from worker.nats.server import free_port

REPO = Path(__file__).resolve().parents[2]


class GatewayProc:
    """``python -m worker gateway --nats-url URL --port P --log-format json [extra...]``."""

    def __init__(
        self,
        nats_url: str,
        *extra: str,
        port: int | None = None,
        log_path: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [
            sys.executable,
            "-m",
            "worker",
            "gateway",
            "--nats-url",
            nats_url,
            "--port",
            str(self.port),
            "--log-format",
            "json",
            *extra,
        ]
        child_env = dict(os.environ, PYTHONUNBUFFERED="1")
        if env:
            child_env.update(env)
        self.proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            env=child_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._log = log_path
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._lock:
                self.lines.append(line)

    def records(self, event: str | None = None) -> list[dict[str, Any]]:
        out = []
        with self._lock:
            lines = list(self.lines)
        for line in lines:
            if line.startswith("{"):
                with contextlib.suppress(json.JSONDecodeError):
                    rec = json.loads(line)
                    if event is None or rec.get("event") == event:
                        out.append(rec)
        return out

    def output(self) -> str:
        with self._lock:
            return "".join(self.lines)

    def wait_ready(self, timeout: float = 60.0) -> GatewayProc:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                self._reader.join(5)
                raise RuntimeError(
                    f"gateway exited ({self.proc.returncode}) before it was ready:\n"
                    + self.output()[-4000:]
                )
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1.0) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"gateway not ready in {timeout} s:\n{self.output()[-4000:]}")
            time.sleep(0.05)

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)
        if self._log is not None:
            self._log.write_text(self.output())
        return self.proc.returncode
