"""Array helpers shared by the PyCUDA matmul, embedding and MoE tests (test_matmul.py,
test_embed_moe.py); their `gpu` and `mm` fixtures are in conftest.py."""

from __future__ import annotations

from typing import Any

import numpy as np


def upload(a: np.ndarray) -> Any:
    import pycuda.gpuarray as ga

    return ga.to_gpu(np.ascontiguousarray(a))


def poisoned(shape: tuple[int, ...]) -> Any:
    import pycuda.gpuarray as ga

    y = ga.empty(shape, np.float32)
    y.fill(np.float32(np.nan))
    return y


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    assert np.isfinite(got).all(), "output has NaN/inf: not every element was written"
    return float(np.linalg.norm(got.astype(np.float64) - ref) / np.linalg.norm(ref))
