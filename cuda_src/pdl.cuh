// Programmatic dependent launch (sm_90). In a decode graph whose kernel-to-kernel edges are
// programmatic (worker/backends/cuda/context.py, GraphCapture), the next kernel is launched
// as soon as every block of this one has started, so its blocks are resident, and may read
// what does not depend on this kernel (the weights), while this one finishes.
//   pdl_trigger(): let the dependent kernel launch now (the default is when blocks exit).
//   pdl_wait(): wait until every kernel this one depends on has completed and its memory
//     is visible. It must come before the first read of an activation and before the first
//     global write. Without a programmatic edge (eager launches, sm_80) both are no-ops.
// A kernel gets a programmatic edge into it only if its name is listed as PDL-aware in
// context.py: every such kernel must call pdl_wait() in every block (a block that exits
// without waiting would let the grid complete before its prerequisite).
#pragma once

__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// The plain prologue: let the next kernel launch, then wait for the previous one.
__device__ __forceinline__ void pdl_start() {
  pdl_trigger();
  pdl_wait();
}
