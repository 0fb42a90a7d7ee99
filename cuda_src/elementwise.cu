// Small elementwise pieces of the layer recipes: bias and residual adds, learned position
// embeddings read at device-held positions, the gpt-oss router (top-k + softmax), and the
// row gather that picks the rows whose logits a step needs, and the pending-token lookup of
// an overlapped step.
#include "common.cuh"

// A step launched before the one before it was collected feeds some decode rows the id their
// sequence drew there: the host writes ids[r] = -2 - j for row j of that step's sampler
// output (prev_out holds (id, NaN flag) per row, still in place: this runs first). grid
// ceil(n/256), block 256.
extern "C" __global__ void resolve_pending_ids(int* __restrict__ ids,
                                               const int* __restrict__ prev_out, int n) {
  pdl_start();
  const int r = blockIdx.x * blockDim.x + threadIdx.x;
  if (r >= n) return;
  const int id = ids[r];
  if (id <= -2) ids[r] = prev_out[2 * (-2 - id)];
}

// x[r][i] += y[r][i] (y_stride 0: broadcast one row, i.e. a bias). grid (ceil(n/256), rows).
extern "C" __global__ void add_f32(float* __restrict__ x, const float* __restrict__ y, int n,
                                   int x_stride, int y_stride) {
  pdl_start();
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const size_t r = blockIdx.y;
  x[r * x_stride + i] += y[r * y_stride + i];
}

// x[t][i] += pos_emb[pos[t]][i] (GPT-2 learned positions, float32 table of n_pos rows).
extern "C" __global__ void add_pos_embd_f32(float* __restrict__ x,
                                            const float* __restrict__ pos_emb,
                                            const int* __restrict__ pos, int n, int n_pos) {
  pdl_start();
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int t = blockIdx.y;
  const int p = pos[t];
  if (p < 0 || p >= n_pos) return;
  x[(size_t)t * n + i] += pos_emb[(size_t)p * n + i];
}

// Router: per row, the k largest logits (ties: lower expert index first), their softmax
// weights (over the chosen k only). One warp per row; n_exp <= 32 * 8, k <= 8.
// grid rows, block 32.
extern "C" __global__ void topk_softmax_f32(const float* __restrict__ logits, int n_exp, int k,
                                            int* __restrict__ out_idx,
                                            float* __restrict__ out_w) {
  pdl_start();
  const size_t r = blockIdx.x;
  const int lane = threadIdx.x;
  float v[8];
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    const int idx = lane + 32 * e;
    v[e] = idx < n_exp ? logits[r * n_exp + idx] : -CUDART_INF_F;
  }
  float chosen[8];
  int chosen_idx[8];
  for (int c = 0; c < k; ++c) {
    float best = -CUDART_INF_F;
    int bi = 0x7fffffff;
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const int idx = lane + 32 * e;
      if (idx < n_exp && (v[e] > best || (v[e] == best && idx < bi))) {
        best = v[e];
        bi = idx;
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float ob = __shfl_xor_sync(0xffffffffu, best, o);
      const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
      if (ob > best || (ob == best && oi < bi)) {
        best = ob;
        bi = oi;
      }
    }
    chosen[c] = best;
    chosen_idx[c] = bi;
#pragma unroll
    for (int e = 0; e < 8; ++e)
      if (lane + 32 * e == bi) v[e] = -CUDART_INF_F;
  }
  if (lane == 0) {
    const float mx = chosen[0];
    float z = 0.0f;
    for (int c = 0; c < k; ++c) z += expf(chosen[c] - mx);
    for (int c = 0; c < k; ++c) {
      out_idx[r * k + c] = chosen_idx[c];
      out_w[r * k + c] = expf(chosen[c] - mx) / z;
    }
  }
}

// MoE output: x[t][i] += sum over slots s < k (in order) of w[t*k+s] * y[t*k+s][i].
// grid (ceil(n/256), rows), block 256.
extern "C" __global__ void moe_combine_f32(float* __restrict__ x, const float* __restrict__ y,
                                           const float* __restrict__ w, int n, int k) {
  pdl_start();
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const size_t t = blockIdx.y;
  float acc = 0.0f;
  for (int s = 0; s < k; ++s) acc = fmaf(w[t * k + s], y[(t * k + s) * n + i], acc);
  x[t * n + i] += acc;
}

// out[r][i] = x[idx[r]][i] for r < rows, i < n (row strides in elements). grid
// (ceil(n/256), rows), block 256.
extern "C" __global__ void gather_rows_f32(const float* __restrict__ x, int x_stride,
                                           const int* __restrict__ idx, float* __restrict__ out,
                                           int out_stride, int n) {
  pdl_start();
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int r = blockIdx.y;
  out[(size_t)r * out_stride + i] = x[(size_t)idx[r] * x_stride + i];
}
