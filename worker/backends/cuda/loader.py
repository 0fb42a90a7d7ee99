"""Weights from the memory map into the arena (docs/design.md, Loading).

Bounded chunks (1 MiB default, `--h2d-chunk-mb`) through pinned staging buffers, two per copy
thread: while the GPU copies chunk i out of one buffer (async H2D on the context's stream, an
event recorded after it), copy threads fill the next chunks from the map into the others; a
buffer is refilled only after its event has completed. One host thread copies a warm map at
~6-8 GB/s (page faults and memcpy; H100 machine and the dev box alike) against ~55 GB/s for a
pinned H2D copy, so several threads fill buffers at once (NumPy releases the GIL while it
copies); CUDA calls stay on the calling thread. Progress is reported at 0, 25, 50, 75, 100 %.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from worker.backends.cuda.arena import MIB, ArenaPlan, DevBuf

Progress = Callable[[float], None]


@dataclass(frozen=True, slots=True)
class LoadStats:
    bytes: int
    seconds: float
    chunks: int

    @property
    def gb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


def plan_chunks(sizes: Sequence[int], chunk: int) -> list[tuple[int, int, int]]:
    """(item index, offset, length) of every copy, in order; each length <= chunk."""
    if chunk <= 0:
        raise ValueError(f"chunk size must be > 0, got {chunk}")
    out: list[tuple[int, int, int]] = []
    for i, n in enumerate(sizes):
        for off in range(0, n, chunk):
            out.append((i, off, min(chunk, n - off)))
    return out


def progress_marks(total: int, done_before: int, done_after: int) -> list[float]:
    """The 25/50/75 % marks crossed by moving from done_before to done_after bytes."""
    marks = []
    for q in (0.25, 0.5, 0.75):
        edge = q * total
        if done_before < edge <= done_after:
            marks.append(q)
    return marks


def upload(
    ctx: Any,
    arena: DevBuf,
    plan: ArenaPlan,
    sources: Mapping[str, np.ndarray],
    *,
    chunk_bytes: int = MIB,
    progress: Progress | None = None,
    threads: int | None = None,
) -> LoadStats:
    """Copy every source (uint8 host array) to arena + plan.offsets[name]. `threads`: host
    copy threads (default min(4, CPUs)); 2 x threads staging buffers of chunk_bytes."""
    drv = ctx.drv
    names = list(sources)
    for name in names:
        if sources[name].nbytes != plan.sizes[name]:
            raise ValueError(f"{name}: {sources[name].nbytes} bytes, planned {plan.sizes[name]}")
        if plan.offsets[name] + plan.sizes[name] > arena.nbytes:
            raise ValueError(f"{name}: outside the arena")
    sizes = [plan.sizes[n] for n in names]
    total = sum(sizes)
    chunks = plan_chunks(sizes, chunk_bytes)
    nthreads = max(1, threads if threads is not None else min(4, os.cpu_count() or 1))
    nbuf = 2 * nthreads
    staging = [drv.pagelocked_empty(chunk_bytes, np.uint8) for _ in range(nbuf)]
    events = [drv.Event() for _ in range(nbuf)]
    in_flight = [False] * nbuf
    flat = {name: sources[name].reshape(-1) for name in names}

    def fill(slot: int, name: str, off: int, n: int) -> None:
        np.copyto(staging[slot][:n], flat[name][off : off + n])

    if progress:
        progress(0.0)
    t0 = time.perf_counter()
    done = 0
    # filled or being filled, not yet sent: (slot, name, off, n, future), in chunk order
    pending: deque[tuple[int, str, int, int, Future[None]]] = deque()

    def send_oldest() -> None:
        nonlocal done
        slot, name, off, n, fut = pending.popleft()
        fut.result()
        drv.memcpy_htod_async(arena.ptr + plan.offsets[name] + off, staging[slot][:n], ctx.stream)
        events[slot].record(ctx.stream)
        in_flight[slot] = True
        before, done = done, done + n
        if progress:
            for q in progress_marks(total, before, done):
                progress(q)

    try:
        with ThreadPoolExecutor(nthreads, thread_name_prefix="h2d-fill") as pool:
            try:
                for i, (item, off, n) in enumerate(chunks):
                    slot = i % nbuf
                    # chunk i - nbuf used this buffer: sent (at most nthreads are pending)
                    # and now waited for
                    if in_flight[slot]:
                        events[slot].synchronize()
                        in_flight[slot] = False
                    name = names[item]
                    pending.append((slot, name, off, n, pool.submit(fill, slot, name, off, n)))
                    while len(pending) >= nthreads:
                        send_oldest()
                while pending:
                    send_oldest()
            finally:
                for *_, fut in pending:  # an error: let no copy thread touch freed buffers
                    fut.cancel()
        ctx.sync("weights upload")
    finally:
        for e, f in zip(events, in_flight, strict=True):
            if f:
                e.synchronize()
        for b in staging:
            _free_pinned(b)
    secs = time.perf_counter() - t0
    if progress:
        progress(1.0)
    return LoadStats(total, secs, len(chunks))


def measure_h2d(ctx: Any, nbytes: int = 256 * MIB, repeats: int = 3) -> float:
    """GB/s of one plain large pinned host-to-device copy (best of `repeats`)."""
    drv = ctx.drv
    host = drv.pagelocked_empty(nbytes, np.uint8)
    host[:] = 1
    dev = ctx.alloc(nbytes, "h2d probe")
    try:
        best = 0.0
        start, stop = drv.Event(), drv.Event()
        for _ in range(repeats):
            start.record(ctx.stream)
            drv.memcpy_htod_async(dev.ptr, host, ctx.stream)
            stop.record(ctx.stream)
            stop.synchronize()
            ms = stop.time_since(start)
            best = max(best, nbytes / (ms / 1e3) / 1e9)
        return best
    finally:
        ctx.free(dev)
        _free_pinned(host)


def _free_pinned(arr: np.ndarray) -> None:
    """Release a pagelocked_empty array's pinned memory now (not at garbage collection)."""
    free = getattr(arr.base, "free", None)
    if free is not None:
        free()
