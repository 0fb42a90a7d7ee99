"""CUDA backend: context, weights arena, kernel registry compiled from cuda_src/, graphs, runner."""

from worker.backends.cuda.backend import CudaBackend

__all__ = ["CudaBackend"]
