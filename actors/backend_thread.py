"""The one OS thread that owns the compute backend (for CUDA: the thread of the context).

anyio's worker threads are pooled, so a CUDA context cannot live there; this is a plain
`threading.Thread` with a job queue. `await thread.call(fn, *args)` runs `fn` on it and
returns its result (or raises its exception) in the event loop. Results come back through
``loop.call_soon_threadsafe``, which never blocks the backend thread.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_STOP = object()


class BackendThread:
    def __init__(self, name: str = "orcd-backend") -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._started = False
        self.ident: int | None = None

    def start(self) -> None:
        if not self._started:
            self._started = True
            self._thread.start()

    def _run(self) -> None:
        self.ident = threading.get_ident()
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            fn, args, loop, fut = item
            try:
                result = fn(*args)
            except BaseException as exc:
                loop.call_soon_threadsafe(_set_exception, fut, exc)
            else:
                loop.call_soon_threadsafe(_set_result, fut, result)

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on the backend thread. If the caller is cancelled the call still
        runs to completion on the thread (a backend call cannot be interrupted midway)."""
        if not self._started:
            raise RuntimeError("backend thread not started")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._queue.put((fn, args, loop, fut))
        return await asyncio.shield(fut)

    def on_thread(self) -> bool:
        return threading.get_ident() == self.ident

    def stop(self, timeout: float | None = 10.0) -> None:
        if self._started and self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(timeout)


def _set_result(fut: asyncio.Future[Any], result: Any) -> None:
    if not fut.done():
        fut.set_result(result)


def _set_exception(fut: asyncio.Future[Any], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
