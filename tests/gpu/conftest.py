"""Fixtures for the GPU tests (marker gpu; they run on the device machine only)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from worker.backends.cuda.arena import DevBuf
from worker.backends.cuda.matmul import MatmulKernels


@pytest.fixture(scope="session")
def cuda_ctx() -> Iterator[Any]:
    from worker.backends.cuda.context import CudaContext

    ctx = CudaContext(0)
    yield ctx
    ctx.close()


@pytest.fixture(scope="module")
def gpu() -> Iterator[Any]:
    """PyCUDA's driver module with the device's primary context current (matmul, embedding
    and MoE tests), one per test module."""
    import pycuda.driver as drv

    drv.init()
    ctx = drv.Device(0).retain_primary_context()
    ctx.push()
    try:
        yield drv
    finally:
        drv.Context.synchronize()
        ctx.pop()


@pytest.fixture(scope="module")
def mm(gpu: Any) -> MatmulKernels:
    return MatmulKernels()


@pytest.fixture(scope="session")
def kern(cuda_ctx: Any) -> Any:
    from worker.backends.cuda.kernels import Kernels

    return Kernels(cuda_ctx, sync_each=True)


class Dev:
    """Upload / download helpers that poison fresh outputs (NaN) so unwritten results show."""

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        self.bufs: list[DevBuf] = []

    def put(self, arr: np.ndarray, name: str = "buf") -> DevBuf:
        a = np.ascontiguousarray(arr)
        b = self.ctx.alloc(max(a.nbytes, 16), name)
        self.bufs.append(b)
        self.ctx.htod(b, a)
        return b

    def poison(self, nbytes: int, name: str = "out") -> DevBuf:
        return self.put(np.full(max(1, nbytes // 4), np.nan, np.float32), name)

    def get(self, b: DevBuf, shape: tuple[int, ...], dtype: Any = np.float32) -> np.ndarray:
        out = np.empty(shape, dtype)
        self.ctx.dtoh(out, b)
        return out

    def free(self) -> None:
        for b in self.bufs:
            self.ctx.free(b)
        self.bufs.clear()


@pytest.fixture
def dev(cuda_ctx: Any) -> Iterator[Dev]:
    d = Dev(cuda_ctx)
    yield d
    d.free()
