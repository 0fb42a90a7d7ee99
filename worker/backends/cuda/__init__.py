"""CUDA backend: context, weights arena, kernel registry compiled from cuda_src/, graphs, runner."""
