// Attention input stage, fused: bias add on q/k/v, rotary embedding of q and k, and the FP16
// store of k and v into the paged KV cache; every token's position and pool row are read
// from device memory (so a captured step graph replays for every step).
//
// Rotation: angle(pos, i) = pos * inv_freq[i] for pair i < n_rot/2, computed in double;
// inv_freq is prepared by the host and already folds in the base, linear scaling, Phi-3
// long/short factors and the YaRN ramp (all linear in pos); `mscale` multiplies cos and sin
// (YaRN attention factor). mode 0: no rotation (learned positions), 1: normal (adjacent
// pairs 2i, 2i+1), 2: NeoX (pairs i, i + n_rot/2). Dims at or past n_rot pass through.
#include "rope.cuh"

// grid (n_tokens, n_head + n_kv); block >= 32 threads; head_dim <= 256.
// q rows: q + t * q_stride (rotated in place); k, v rows: k + t * kv_stride.
// Token t is at position pos[t]; its k and v go to pool row kvrow[t] of this layer's
// kcache/vcache ([n_rows][n_kv][head_dim] half; a row outside 0..n_rows-1 stores nothing).
extern "C" __global__ void qkv_rope_store(
    float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
    const float* __restrict__ bq, const float* __restrict__ bk, const float* __restrict__ bv,
    __half* __restrict__ kcache, __half* __restrict__ vcache, const int* __restrict__ pos,
    const int* __restrict__ kvrow, int n_head, int n_kv, int head_dim, int n_rot,
    int q_stride, int kv_stride, const double* __restrict__ inv_freq, float mscale, int mode,
    int n_rows) {
  __shared__ float sv[256];
  pdl_start();
  const int t = blockIdx.x, h = blockIdx.y;
  const double dpos = (double)pos[t];
  if (h < n_head) {
    float* qr = q + (size_t)t * q_stride + (size_t)h * head_dim;
    const float* b = bq ? bq + (size_t)h * head_dim : nullptr;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) sv[d] = qr[d] + (b ? b[d] : 0.0f);
    __syncthreads();
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x)
      qr[d] = rope_elem(sv, d, n_rot, mode, dpos, inv_freq, mscale);
    return;
  }
  const int row = kvrow[t];
  if (row < 0 || row >= n_rows) return;  // padding; never written out of bounds
  const int kh = h - n_head;
  const float* kr = k + (size_t)t * kv_stride + (size_t)kh * head_dim;
  const float* vr = v + (size_t)t * kv_stride + (size_t)kh * head_dim;
  const float* b = bk ? bk + (size_t)kh * head_dim : nullptr;
  const float* bvv = bv ? bv + (size_t)kh * head_dim : nullptr;
  const size_t crow = ((size_t)row * n_kv + kh) * head_dim;
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    sv[d] = kr[d] + (b ? b[d] : 0.0f);
    vcache[crow + d] = __float2half_rn(vr[d] + (bvv ? bvv[d] : 0.0f));
  }
  __syncthreads();
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x)
    kcache[crow + d] = __float2half_rn(rope_elem(sv, d, n_rot, mode, dpos, inv_freq, mscale));
}
