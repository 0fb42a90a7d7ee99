// RMSNorm and LayerNorm over rows of float32, optionally fused with the residual add that
// precedes them (x += delta; out = norm(x) * w [+ b]). One block per row, FP32 throughout.
// rmsnorm_f32 with planes (hi non-null) also writes out's 15-bit codes, scaled per `blk`
// (i15.cuh), for the integer products that read it: no separate quant_x15 launch.
#include "common.cuh"
#include "i15.cuh"

extern "C" __global__ void rmsnorm_f32(float* __restrict__ x, const float* __restrict__ delta,
                                       const float* __restrict__ w, float* __restrict__ out,
                                       int n, float eps, int8_t* __restrict__ hi,
                                       int8_t* __restrict__ lo, float* __restrict__ qd,
                                       int* __restrict__ sq, int blk) {
  __shared__ float sh[32];
  pdl_start();
  const size_t row = blockIdx.x;
  float* xr = x + row * n;
  const float* dr = delta ? delta + row * n : nullptr;
  float ss = 0.0f;
#pragma unroll 4
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    float v = xr[i];
    if (dr) {
      v += dr[i];
      xr[i] = v;  // fused residual: x now holds the sum
    }
    ss += v * v;
  }
  ss = block_sum(ss, sh);
  const float r = rsqrtf(ss / (float)n + eps);
  float* o = out + row * n;
#pragma unroll 4
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const float v = xr[i] * r;
    o[i] = w ? v * w[i] : v;
  }
  if (hi) {
    __syncthreads();  // the row's outputs, written by other threads, are visible
    i15_quant_span(o, n, blk, hi + row * n, lo + row * n, qd + row * (n / blk), sq + row * (n / 32));
  }
}

extern "C" __global__ void layernorm_f32(float* __restrict__ x, const float* __restrict__ delta,
                                         const float* __restrict__ w, const float* __restrict__ b,
                                         float* __restrict__ out, int n, float eps) {
  __shared__ float sh[32];
  pdl_start();
  const size_t row = blockIdx.x;
  float* xr = x + row * n;
  const float* dr = delta ? delta + row * n : nullptr;
  float s = 0.0f;
#pragma unroll 4
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    float v = xr[i];
    if (dr) {
      v += dr[i];
      xr[i] = v;
    }
    s += v;
  }
  const float mean = block_sum(s, sh) / (float)n;
  float ss = 0.0f;
#pragma unroll 4
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const float d = xr[i] - mean;
    ss += d * d;
  }
  const float r = rsqrtf(block_sum(ss, sh) / (float)n + eps);
  float* o = out + row * n;
#pragma unroll 4
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    float v = (xr[i] - mean) * r;
    if (w) v *= w[i];
    if (b) v += b[i];
    o[i] = v;
  }
}
