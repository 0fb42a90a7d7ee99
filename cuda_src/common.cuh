// Shared helpers of the kernels: deterministic block reductions (fixed shape, fixed order),
// gpt-oss's SwiGLU, and the paged KV cache's block size.
#pragma once
#include <cuda_fp16.h>
#include "pdl.cuh"
#include <math_constants.h>

// Positions per KV-cache block (worker/backends/cuda/kv.py KV_BLOCK mirrors it; the
// tensor-core prefill attention streams one block per key tile).
#define KV_BLOCK 64

// gpt-oss's clamped SwiGLU: g = min(g, limit), u = clamp(u, -limit, limit),
// g * sigmoid(alpha * g) * (u + 1) (swiglu_oai_f32 and the integer MoE layer's moe15_glu).
__device__ __forceinline__ float swiglu_oai(float g, float u, float alpha, float limit) {
  g = fminf(g, limit);
  u = fminf(fmaxf(u, -limit), limit);
  return g / (1.0f + expf(-alpha * g)) * (u + 1.0f);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the block; every thread gets the result. `sh` needs 32 floats. The order of the
// additions depends only on blockDim, so the result is bit-identical run to run.
__device__ __forceinline__ float block_sum(float v, float* sh) {
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) sh[wid] = v;
  __syncthreads();
  v = (lane < nw) ? sh[lane] : 0.0f;
  v = warp_sum(v);
  return v;
}

__device__ __forceinline__ float block_max(float v, float* sh) {
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) sh[wid] = v;
  __syncthreads();
  v = (lane < nw) ? sh[lane] : -CUDART_INF_F;
  v = warp_max(v);
  return v;
}
