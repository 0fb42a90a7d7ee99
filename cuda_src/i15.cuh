// 15-bit activations (docs/kernels.md, "Integer products"): the rounding every producer of
// them shares, so quant_x15 (i15.cu) and the producers that quantize their own output
// (rmsnorm_f32, swiglu_f32 with planes) give the same bits.
//
// A group of `blk` elements (256 for the K-quants' super-blocks, 32 for the legacy blocks)
// becomes d = max|x| / 16256 (fp32) and codes q = rint(x / d) in [-16256, 16256] split into
// two int8 planes, q = 128 hi + lo (hi = rint(q / 128), |lo| <= 64); sq = the sum of q of every
// 32 elements (int32).
#pragma once
#include "common.cuh"

constexpr int I15_STEPS = 16256;  // 127 * 128

__device__ __forceinline__ float i15_scale(float amax) {
  return __fdiv_rn(amax, (float)I15_STEPS);
}

// q for v at step dd, split into the planes; returns q
__device__ __forceinline__ int i15_code(float v, float dd, int8_t& hi, int8_t& lo) {
  int q = 0;
  if (dd > 0.f) q = __float2int_rn(__fdiv_rn(v, dd));
  q = max(-I15_STEPS, min(I15_STEPS, q));
  const int h = __float2int_rn(__fmul_rn((float)q, 1.f / 128.f));
  hi = (int8_t)h;
  lo = (int8_t)(q - 128 * h);
  return q;
}

// A warp's codes of one group of 32 at step dd, a value v a lane (into hi, lo); returns
// the group's sq (every lane).
__device__ __forceinline__ int i15_codes32(float v, float dd, int8_t& hi, int8_t& lo) {
  int s = i15_code(v, dd, hi, lo);
#pragma unroll
  for (int o = 16; o; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  return s;
}

// The calling block quantizes x[0 .. len) (len a multiple of blk, the first element
// at the start of a group): its warps take groups in turn, a lane 1 or 8 elements of
// each. Writes hi[i], lo[i], d[group], sq[i / 32]. Every thread of the block must call it.
__device__ __forceinline__ void i15_quant_span(const float* x, int len, int blk,
                                               int8_t* __restrict__ hi, int8_t* __restrict__ lo,
                                               float* __restrict__ d, int* __restrict__ sq) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  const int per = blk / 32;  // sub-blocks of 32 a group: 1 or 8
  for (int g = warp; g * blk < len; g += nw) {
    const float* xg = x + (size_t)g * blk;
    float a = 0.f;
    for (int j = 0; j < per; ++j) a = fmaxf(a, fabsf(xg[32 * j + lane]));
    const float dd = i15_scale(warp_max(a));
    for (int j = 0; j < per; ++j) {
      const size_t i = (size_t)g * blk + 32 * j + lane;
      const int s = i15_codes32(xg[32 * j + lane], dd, hi[i], lo[i]);
      if (lane == 0) sq[(size_t)g * per + j] = s;
    }
    if (lane == 0) d[g] = dd;
  }
}
