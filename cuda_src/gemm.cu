// Prefill matrix products: Y[m] = W X[m] (+ bias) (+ residual[m]) for many tokens m, i.e.
// Y = X Wᵀ with X [M][K] fp32, W [N][K] in any ggml type of quant.cuh, Y [M][N] fp32.
//
// Tensor cores: mma.sync.m16n8k16 with fp16 operands and fp32 accumulation (sm_80 and sm_90).
// A block of 128 threads (4 warps, 2x2) computes a 64 (tokens) x 64 (weight rows) tile; per
// 32-wide K step it converts the X tile to fp16 and dequantizes the W tile (dequant8, straight
// from global memory, where L2 serves the other token tiles that read the same W tile) into
// shared memory, double-buffered with a register prefetch of the next step. Each warp holds a
// 32x32 accumulator (2x4 mma tiles). No split-K, no atomics: bit-identical run to run.
// Rounding: X and W are rounded to fp16 (relative 2^-11 each), products are exact in fp32 and
// the sums are fp32, so the error of a K-long dot is about 2^-11 * ||x|| ||w|| / sqrt(K)-ish
// relative to the inputs; |X| must stay below 65504 (fp16 range).
//
// Rows of the token tile are addressed through per-row offsets in shared memory (s_xoff,
// s_yoff; -1 = no row) so that moe.cu reuses the same core with gathered tokens.
#include "quant.cuh"

#define GEMM_BM 64
#define GEMM_BN 64
#define GEMM_BK 32
#define GEMM_LDA (GEMM_BK + 8)  // halves per smem row: 80 bytes, conflict-free fragment loads
#define GEMM_THREADS 128

__device__ __forceinline__ void mma16816(float c[4], const uint32_t a[4], const uint32_t b[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ uint32_t pack_h2(float a, float b) {
  __half2 h = __floats2half2_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&h);
}

// Called by all BM*2 threads after s_xoff/s_yoff (BM entries each) are set and a
// __syncthreads(). Computes rows n0..n0+63 of W for the (up to) BM token rows. BM = 64 (4
// warps) or 128 (8 warps: twice the tokens per dequantized W tile, half the dequant work per
// product; the warps are laid out (BM/32) x 2, each owning a 32x32 accumulator).
template <int T, int BM = GEMM_BM>
__device__ __forceinline__ void gemm_tile(const uint8_t* __restrict__ W, long long row_bytes,
                                          int N, int K, const float* __restrict__ X,
                                          const long long* s_xoff, const long long* s_yoff,
                                          float* Y, const float* __restrict__ bias,
                                          const float* residual, int n0) {
  constexpr int QK = QTraits<T>::QK, BYTES = QTraits<T>::BYTES, GPB = QK / 8;
  constexpr int NT = BM * 2;                    // threads
  constexpr int XL = BM * (GEMM_BK / 4) / NT;   // float4 X loads per thread (4)
  constexpr int WL = GEMM_BN * (GEMM_BK / 8) / NT;  // W groups per thread (2 or 1)
  __shared__ __align__(16) __half As[2][BM * GEMM_LDA];
  __shared__ __align__(16) __half Bs[2][GEMM_BN * GEMM_LDA];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp >> 1, wn = warp & 1, gq = lane >> 2, cq = lane & 3;
  const int nk = K / GEMM_BK;

  float acc[2][4][4];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

  float4 xr[XL];
  uint4 wr[WL];
  auto load = [&](int kt) {
#pragma unroll
    for (int i = 0; i < XL; ++i) {
      const int idx = tid + i * NT, row = idx >> 3, c = idx & 7;
      const long long off = s_xoff[row];
      xr[i] = off >= 0 ? __ldg(reinterpret_cast<const float4*>(X + off + kt * GEMM_BK + 4 * c))
                       : make_float4(0.f, 0.f, 0.f, 0.f);
    }
#pragma unroll
    for (int i = 0; i < WL; ++i) {
      const int idx = tid + i * NT, row = idx >> 2, gi = idx & 3;
      const int n = n0 + row;
      if (n < N) {
        const int kq = kt * (GEMM_BK / 8) + gi;
        float w[8];
        dequant8<T>(W + (long long)n * row_bytes + (long long)(kq / GPB) * BYTES, kq % GPB, w);
        wr[i] = make_uint4(pack_h2(w[0], w[1]), pack_h2(w[2], w[3]), pack_h2(w[4], w[5]),
                           pack_h2(w[6], w[7]));
      } else {
        wr[i] = make_uint4(0, 0, 0, 0);
      }
    }
  };
  auto stash = [&](int buf) {
#pragma unroll
    for (int i = 0; i < XL; ++i) {
      const int idx = tid + i * NT, row = idx >> 3, c = idx & 7;
      uint2 h = make_uint2(pack_h2(xr[i].x, xr[i].y), pack_h2(xr[i].z, xr[i].w));
      *reinterpret_cast<uint2*>(&As[buf][row * GEMM_LDA + 4 * c]) = h;
    }
#pragma unroll
    for (int i = 0; i < WL; ++i) {
      const int idx = tid + i * NT, row = idx >> 2, gi = idx & 3;
      *reinterpret_cast<uint4*>(&Bs[buf][row * GEMM_LDA + 8 * gi]) = wr[i];
    }
  };

  load(0);
  stash(0);
  __syncthreads();
  for (int kt = 0; kt < nk; ++kt) {
    const int buf = kt & 1;
    if (kt + 1 < nk) load(kt + 1);
#pragma unroll
    for (int ks = 0; ks < GEMM_BK; ks += 16) {
      uint32_t a[2][4], b[4][2];
#pragma unroll
      for (int mi = 0; mi < 2; ++mi) {
        const __half* base = &As[buf][(wm * 32 + mi * 16) * GEMM_LDA + ks];
        a[mi][0] = *reinterpret_cast<const uint32_t*>(base + gq * GEMM_LDA + 2 * cq);
        a[mi][1] = *reinterpret_cast<const uint32_t*>(base + (gq + 8) * GEMM_LDA + 2 * cq);
        a[mi][2] = *reinterpret_cast<const uint32_t*>(base + gq * GEMM_LDA + 2 * cq + 8);
        a[mi][3] = *reinterpret_cast<const uint32_t*>(base + (gq + 8) * GEMM_LDA + 2 * cq + 8);
      }
#pragma unroll
      for (int ni = 0; ni < 4; ++ni) {
        const __half* base = &Bs[buf][(wn * 32 + ni * 8) * GEMM_LDA + ks];
        b[ni][0] = *reinterpret_cast<const uint32_t*>(base + gq * GEMM_LDA + 2 * cq);
        b[ni][1] = *reinterpret_cast<const uint32_t*>(base + gq * GEMM_LDA + 2 * cq + 8);
      }
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) mma16816(acc[mi][ni], a[mi], b[ni]);
    }
    if (kt + 1 < nk) stash(buf ^ 1);
    __syncthreads();
  }

#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int m = wm * 32 + mi * 16 + gq + 8 * h;
      const long long yo = s_yoff[m];
      if (yo < 0) continue;
#pragma unroll
      for (int ni = 0; ni < 4; ++ni)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int n = n0 + wn * 32 + ni * 8 + 2 * cq + e;
          if (n < N) {
            float s = acc[mi][ni][2 * h + e];
            if (bias) s += bias[n];
            if (residual) s += residual[yo + n];
            Y[yo + n] = s;
          }
        }
    }
}

#ifndef GEMM_CORE_ONLY
// gemm_<type> (BM=64, 128 threads) and gemm128_<type> (BM=128, 256 threads): grid
// (ceil(M/BM), ceil(N/64)). Blocks sharing a W tile are adjacent in launch order, so the W
// tile is read from DRAM about once.
template <int T, int BM>
__device__ __forceinline__ void gemm_entry(const uint8_t* W, long long row_bytes, int N, int K,
                                           const float* X, long long ldx, int M,
                                           const float* bias, const float* residual, float* Y,
                                           long long ldy) {
  __shared__ long long s_xoff[BM], s_yoff[BM];
  const int m0 = blockIdx.x * BM;
  if (threadIdx.x < BM) {
    const int m = m0 + threadIdx.x;
    s_xoff[threadIdx.x] = m < M ? (long long)m * ldx : -1;
    s_yoff[threadIdx.x] = m < M ? (long long)m * ldy : -1;
  }
  __syncthreads();
  gemm_tile<T, BM>(W, row_bytes, N, K, X, s_xoff, s_yoff, Y, bias, residual,
                   blockIdx.y * GEMM_BN);
}

#define GEMM_INST(TY, NAME)                                                                 \
  extern "C" __global__ void __launch_bounds__(128) gemm_##NAME(                           \
      const uint8_t* W, long long row_bytes, int N, int K, const float* X, long long ldx,  \
      int M, const float* bias, const float* residual, float* Y, long long ldy) {          \
    gemm_entry<TY, 64>(W, row_bytes, N, K, X, ldx, M, bias, residual, Y, ldy);              \
  }                                                                                         \
  extern "C" __global__ void __launch_bounds__(256) gemm128_##NAME(                        \
      const uint8_t* W, long long row_bytes, int N, int K, const float* X, long long ldx,  \
      int M, const float* bias, const float* residual, float* Y, long long ldy) {          \
    gemm_entry<TY, 128>(W, row_bytes, N, K, X, ldx, M, bias, residual, Y, ldy);             \
  }
FOR_EACH_QTYPE(GEMM_INST)
#endif
