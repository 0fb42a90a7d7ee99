"""The weights upload's staging ring (worker/backends/cuda/loader.py) against a stand-in for
PyCUDA's driver whose host-to-device copies really are asynchronous: a copy reads its pinned
buffer only when the stream reaches it (an event's synchronize or the final sync). A buffer
refilled before its copy ran would put the wrong bytes on the "device"."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from worker.backends.cuda.arena import DevBuf, plan_arena
from worker.backends.cuda.loader import upload

BASE = 1 << 20


class _Stream:
    def __init__(self, device: bytearray) -> None:
        self.device = device
        self.queue: list[Callable[[], None]] = []
        self.copies = 0

    def run_to(self, marker: object | None) -> None:
        while self.queue:
            op = self.queue.pop(0)
            if op is marker:
                return
            op()


class _Event:
    def __init__(self, stream: _Stream) -> None:
        self.stream = stream
        self.marker: Any = None

    def record(self, stream: _Stream) -> None:
        self.marker = lambda: None
        stream.queue.append(self.marker)

    def synchronize(self) -> None:
        if self.marker is not None and self.marker in self.stream.queue:
            self.stream.run_to(self.marker)


class _Drv:
    def __init__(self, stream: _Stream) -> None:
        self.stream = stream

    def pagelocked_empty(self, n: int, dtype: Any) -> np.ndarray:
        return np.full(n, 0xEE, dtype)  # garbage until filled

    def Event(self) -> _Event:
        return _Event(self.stream)

    def memcpy_htod_async(self, dst: int, src: np.ndarray, stream: _Stream) -> None:
        def op() -> None:  # reads the staging buffer when the stream gets here
            data = bytes(src)
            self.stream.device[dst - BASE : dst - BASE + len(data)] = data
            self.stream.copies += 1

        stream.queue.append(op)


class _Ctx:
    def __init__(self, nbytes: int) -> None:
        self.device = bytearray(nbytes)
        self.stream = _Stream(self.device)
        self.drv = _Drv(self.stream)

    def sync(self, what: str) -> None:
        self.stream.run_to(None)


@pytest.mark.parametrize("threads", [1, 2, 4])
@pytest.mark.parametrize("chunk", [1000, 4096, 1 << 16])
def test_every_byte_lands_where_planned(threads: int, chunk: int) -> None:
    rng = np.random.default_rng(threads * 7 + chunk)
    sizes = {"a": 70_001, "b": 3, "c": 250_000, "d": 4096}
    sources = {k: rng.integers(0, 256, n, dtype=np.uint8) for k, n in sizes.items()}
    plan = plan_arena(sizes.items())
    ctx = _Ctx(plan.total)
    marks: list[float] = []
    stats = upload(
        ctx,
        DevBuf(BASE, plan.total, "arena"),
        plan,
        sources,
        chunk_bytes=chunk,
        progress=marks.append,
        threads=threads,
    )
    for name, arr in sources.items():
        o = plan.offsets[name]
        assert bytes(ctx.device[o : o + arr.nbytes]) == arr.tobytes(), name
    assert stats.bytes == sum(sizes.values())
    assert ctx.stream.copies == stats.chunks
    assert marks == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_size_mismatch_is_refused() -> None:
    plan = plan_arena([("a", 10)])
    with pytest.raises(ValueError, match="planned"):
        upload(
            _Ctx(plan.total), DevBuf(BASE, plan.total, "arena"), plan, {"a": np.zeros(9, np.uint8)}
        )
