// Mixture-of-experts matmuls (gpt-oss): experts stored as one tensor W [n_expert][N][K]
// (ggml layout, expert e at W + e*expert_bytes), biases B [n_expert][N] fp32 (optional).
// Routing: ids [n_assign] int32, assignment a = t*topk + slot is token t's slot-th expert.
// Input of assignment a: X + t*ldx_tok + slot*ldx_slot (ldx_slot = 0: every slot reads the
// token's hidden state, as for gate/up; ldx_slot = K: per-slot inputs, as for down).
// Output of assignment a: Y + a*ldy.
//
// moe_gemv_<type>: decode form, grid (G, n_assign), G <= ceil(N/GEMV_R): the blocks of column a
//   run the persistent gemv core over assignment a's expert matrix. An id outside [0, n_expert) writes NaN rows.
// moe_gemm_<type>: prefill form, grid (ceil(n_assign/64), ceil(N/64), n_expert): block
//   (z, y, e) collects, in assignment order, the z-th group of 64 assignments routed to expert
//   e (a block-wide ballot scan of ids; blocks past the expert's count exit) and runs the
//   tensor-core gemm core on them. Assignments with an id outside [0, n_expert) are left
//   unwritten by this form (the caller validated routing on the device: ids come from top-k).
#define GEMV_CORE_ONLY
#define GEMM_CORE_ONLY
#include "gemv.cu"
#include "gemm.cu"

template <int T>
__device__ __forceinline__ void moe_gemv_entry(const uint8_t* W, long long expert_bytes,
                                               long long row_bytes, int N, int K, int n_expert,
                                               const int* ids, int topk, const float* X,
                                               long long ldx_tok, long long ldx_slot,
                                               const float* B, float* Y, long long ldy) {
  const int a = blockIdx.y;
  const int e = ids[a];
  float* y = Y + (long long)a * ldy;
  if (e < 0 || e >= n_expert) {
    for (int r = blockIdx.x * blockDim.x + threadIdx.x; r < N; r += gridDim.x * blockDim.x)
      y[r] = __int_as_float(0x7fc00000);
    return;
  }
  const int t = a / topk, slot = a % topk;
  gemv_run<T, 1>(W, (long long)e * expert_bytes, row_bytes, N, K,
                 X + (long long)t * ldx_tok + (long long)slot * ldx_slot, 0, 1,
                 B ? B + (long long)e * N : nullptr, nullptr, y, 0, blockIdx.x, gridDim.x);
}

template <int T>
__device__ __forceinline__ void moe_gemm_entry(const uint8_t* W, long long expert_bytes,
                                               long long row_bytes, int N, int K,
                                               const int* ids, int n_assign, int topk,
                                               const float* X, long long ldx_tok,
                                               long long ldx_slot, const float* B, float* Y,
                                               long long ldy) {
  __shared__ long long s_xoff[GEMM_BM], s_yoff[GEMM_BM];
  __shared__ int warp_cnt[GEMM_THREADS / 32];
  const int e = blockIdx.z, z0 = blockIdx.x * GEMM_BM;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  if (tid < GEMM_BM) s_xoff[tid] = s_yoff[tid] = -1;
  int base = 0;  // assignments of expert e seen before this chunk (same in every thread)
  for (int c0 = 0; c0 < n_assign; c0 += GEMM_THREADS) {
    const int a = c0 + tid;
    const bool hit = a < n_assign && ids[a] == e;
    const unsigned bal = __ballot_sync(0xffffffffu, hit);
    if (lane == 0) warp_cnt[warp] = __popc(bal);
    __syncthreads();
    int pos = base + __popc(bal & ((1u << lane) - 1u)), total = 0;
#pragma unroll
    for (int w = 0; w < GEMM_THREADS / 32; ++w) {
      if (w < warp) pos += warp_cnt[w];
      total += warp_cnt[w];
    }
    if (hit && pos >= z0 && pos < z0 + GEMM_BM) {
      const int t = a / topk, slot = a % topk;
      s_xoff[pos - z0] = (long long)t * ldx_tok + (long long)slot * ldx_slot;
      s_yoff[pos - z0] = (long long)a * ldy;
    }
    base += total;
    __syncthreads();
    if (base >= z0 + GEMM_BM) break;  // uniform: this block's group is complete
  }
  if (base <= z0) return;  // uniform: expert e has no z-th group
  gemm_tile<T>(W + (long long)e * expert_bytes, row_bytes, N, K, X, s_xoff, s_yoff, Y,
               B ? B + (long long)e * N : nullptr, nullptr, blockIdx.y * GEMM_BN);
}

#define MOE_INST(TY, NAME)                                                                     \
  extern "C" __global__ void __launch_bounds__(GEMV_THREADS) moe_gemv_##NAME(                 \
      const uint8_t* W, long long expert_bytes, long long row_bytes, int N, int K,            \
      int n_expert, const int* ids, int topk, const float* X, long long ldx_tok,              \
      long long ldx_slot, const float* B, float* Y, long long ldy) {                          \
    moe_gemv_entry<TY>(W, expert_bytes, row_bytes, N, K, n_expert, ids, topk, X, ldx_tok,     \
                       ldx_slot, B, Y, ldy);                                                  \
  }                                                                                           \
  extern "C" __global__ void __launch_bounds__(GEMM_THREADS) moe_gemm_##NAME(                 \
      const uint8_t* W, long long expert_bytes, long long row_bytes, int N, int K,            \
      const int* ids, int n_assign, int topk, const float* X, long long ldx_tok,              \
      long long ldx_slot, const float* B, float* Y, long long ldy) {                          \
    moe_gemm_entry<TY>(W, expert_bytes, row_bytes, N, K, ids, n_assign, topk, X, ldx_tok,     \
                       ldx_slot, B, Y, ldy);                                                  \
  }
FOR_EACH_QTYPE(MOE_INST)
