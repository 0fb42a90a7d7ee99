"""Checked launch plans of the matrix-product kernels, computed without a GPU: each `plan_*`
checks every argument and buffer range and returns the `Launch` that
`worker.backends.cuda.matmul.MatmulKernels.run` queues (base: the shared types and checks;
dense, moe, i15: the kernel families)."""
