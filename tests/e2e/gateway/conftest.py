"""Gateway fixtures: `worker-orcd gateway` child processes and openai SDK clients of them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from worker.gateway.live import GatewayProc


@pytest.fixture
def spawn_gateway(tmp_path: Path) -> Iterator[Any]:
    """spawn_gateway(nats_url, *flags) -> a ready GatewayProc; every one stopped at the end."""
    procs: list[GatewayProc] = []

    def spawn(url: str, *extra: str, ready: bool = True, **kw: Any) -> GatewayProc:
        g = GatewayProc(url, *extra, log_path=tmp_path / f"gateway-{len(procs)}.log", **kw)
        procs.append(g)
        return g.wait_ready() if ready else g

    yield spawn
    for g in procs:
        g.stop()
