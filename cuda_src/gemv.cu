// Decode matrix-vector products: y[b] = W x[b] (+ bias) (+ residual[b]) for b < ntok <= 8.
//
// W: N rows of K elements in any ggml type of quant.cuh, row-major, rows of row_bytes =
// K/QK*BYTES bytes, base 16-byte aligned. x, y, bias, residual: fp32. FP32 accumulation.
//
// Design (docs/kernels.md has the numbers): independent warps, each owning 1-4 rows, no block
// barriers (gemv_<type>_nb<NB>[_x|_a][_r2|_r4], below); moe.cu reuses the warp core with
// GEMV_CORE_ONLY for the routed experts of a decode step.
#include "quant.cuh"

// (Under tools/kernel_emu: an immediate copy, nothing to commit or wait for, a plain load.)
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int src_bytes) {
#ifdef KERNEL_EMU
  emu::copy16(smem, gmem, src_bytes);
#else
  const unsigned sa = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(sa), "l"(gmem),
               "r"(src_bytes));
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#ifndef KERNEL_EMU
  asm volatile("cp.async.commit_group;\n");
#endif
}
template <int N> __device__ __forceinline__ void cp_async_wait() {
#ifndef KERNEL_EMU
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// ---- one warp per RW rows, no block-wide barriers -------------------------------------------
//
// A block is GEMV4_WARPS independent warps; warp w of tile t owns rows
// (t*GEMV4_WARPS + w)*RW .. +RW. A warp walks its rows' quant blocks in chunks of CB whole
// blocks (at most 512*U bytes of 16-byte pieces per row once the chunk start is aligned
// down): every lane first issues its U 16-byte, L1-bypassing loads per row (RW*U loads, all
// independent, in flight together), then stores them to the warp's own shared-memory slice,
// __syncwarp, and decodes 8-element groups from there (lane l takes groups l, l+32, ...: the x
// reads of a warp are contiguous 16-byte vectors, each x value serves the RW rows).
// Integer codes become floats without I2F (q_int in quant.cuh).
// Reduction: a fixed xor-shuffle tree per row; lane 0 writes. No atomics, no cross-warp
// data: results are bit-identical run to run.
#define GEMV4_WARPS 4

__device__ __forceinline__ uint4 g4_ld16(const uint8_t* p) {
  uint4 v;
#ifdef KERNEL_EMU
  memcpy(&v, p, 16);
#else
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
#endif
  return v;
}
// The last 16-byte piece of the matrix when fewer than 16 bytes are left: byte loads, zeros
// after (never a read past the matrix; compute-sanitizer memcheck, docs/kernels.md).
__device__ __noinline__ uint4 g4_ld_tail(const uint8_t* p, int n) {
  uint32_t v[4] = {0, 0, 0, 0};
#pragma unroll
  for (int i = 0; i < 16; ++i)
    if (i < n) v[i >> 2] |= (uint32_t)p[i] << (8 * (i & 3));
  return make_uint4(v[0], v[1], v[2], v[3]);
}

// ---- G4<T>::dot: one 8-element group of one row into acc[NB] ------------------------------
// Default: decode8, then sum q*x, times d, plus m * sum x. For the K-quants (the bulk of
// Phi-3's and Qwen's ffn_down bytes) a cheaper form: a b-bit code c becomes the float
// 1 + c/2^b with one byte permute (bits 0x3F800000 | c << (23-b), exact), so
// sum c*x = 2^b * (sum (1 + c/2^b) x - sum x): per weight one PRMT and one FFMA, the shifts
// and masks done 4 codes at a time (bytes 0x80 | c << (7-b) built with one LOP3), and sum x
// shared by all rows. The cancellation costs a few float32 roundings of sum |x| per group
// (relative error ~1e-6 of the product, tests bound 2e-5).
template <int T> struct G4 {
  static constexpr bool NEED_SX = HasMin<T>::value;
  template <int NB>
  static __device__ __forceinline__ void dot(const uint8_t* blk, int g, const float (&xv)[NB][8],
                                             const float (&sx)[NB], float (&acc)[NB]) {
    float q[8], d, m;
    decode8<T>(blk, g, q, d, m);
#pragma unroll
    for (int b = 0; b < NB; ++b) {
      float dp = q[0] * xv[b][0];
#pragma unroll
      for (int i = 1; i < 8; ++i) dp = fmaf(q[i], xv[b][i], dp);
      acc[b] = fmaf(dp, d, acc[b]);
      if (HasMin<T>::value) acc[b] = fmaf(m, sx[b], acc[b]);
    }
  }
};

// byte i of t (0x80 | c << (7-b)) as the float 1 + c/2^b
__device__ __forceinline__ float g4_unit(uint32_t t, int i) {
  return __uint_as_float(__byte_perm(t, 0x3Fu, 0x4055u | (i << 8)));
}
// sum over 8 codes (bytes of t0, t1) of (1 + c/2^b) x, per token
template <int NB>
__device__ __forceinline__ void g4_unit_dot(uint32_t t0, uint32_t t1, const float (&xv)[NB][8],
                                            float (&dp)[NB]) {
  float f[8];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[i] = g4_unit(t0, i);
    f[4 + i] = g4_unit(t1, i);
  }
#pragma unroll
  for (int b = 0; b < NB; ++b) {
    float v = f[0] * xv[b][0];
#pragma unroll
    for (int i = 1; i < 8; ++i) v = fmaf(f[i], xv[b][i], v);
    dp[b] = v;
  }
}
// Q4_K/Q5_K 6-bit scale and min of sub-block s without a branch (lanes of a warp take
// different sub-blocks); blk 4-byte aligned (144/176-byte blocks of a 16-byte aligned row).
__device__ __forceinline__ void g4_scale_min_k4(const uint8_t* blk, int s, float& sc,
                                                float& mn) {
  const uint32_t w0 = ld_u32_a4(blk + 4), w1 = ld_u32_a4(blk + 8), w2 = ld_u32_a4(blk + 12);
  const int sh = 8 * (s & 3);
  const uint32_t a = w0 >> sh, bb = w1 >> sh, c = w2 >> sh;
  const uint32_t sc_lo = a & 63, mn_lo = bb & 63;
  const uint32_t sc_hi = (c & 15) | ((a >> 2) & 0x30), mn_hi = ((c >> 4) & 15) | ((bb >> 2) & 0x30);
  sc = q_int(s < 4 ? sc_lo : sc_hi);
  mn = q_int(s < 4 ? mn_lo : mn_hi);
}
template <> struct G4<QT_Q4_K> {
  static constexpr bool NEED_SX = true;
  template <int NB>
  static __device__ __forceinline__ void dot(const uint8_t* blk, int g, const float (&xv)[NB][8],
                                             const float (&sx)[NB], float (&acc)[NB]) {
    const int s = g >> 2, l0 = (g & 3) * 8;
    float sc, mn;
    g4_scale_min_k4(blk, s, sc, mn);
    const uint8_t* p = blk + 16 + 32 * (s >> 1) + l0;
    const int sh = (s & 1) * 4;
    const uint32_t w0 = ld_u32_a4(p) >> sh, w1 = ld_u32_a4(p + 4) >> sh;
    const uint32_t t0 = ((w0 << 3) & 0x78787878u) | 0x80808080u;
    const uint32_t t1 = ((w1 << 3) & 0x78787878u) | 0x80808080u;
    float dp[NB];
    g4_unit_dot<NB>(t0, t1, xv, dp);
    const float d = qf16(blk) * sc * 16.f, m = -(qf16(blk + 2) * mn);
#pragma unroll
    for (int b = 0; b < NB; ++b) {
      acc[b] = fmaf(dp[b] - sx[b], d, acc[b]);
      acc[b] = fmaf(m, sx[b], acc[b]);
    }
  }
};
template <> struct G4<QT_Q5_K> {
  static constexpr bool NEED_SX = true;
  template <int NB>
  static __device__ __forceinline__ void dot(const uint8_t* blk, int g, const float (&xv)[NB][8],
                                             const float (&sx)[NB], float (&acc)[NB]) {
    const int s = g >> 2, l0 = (g & 3) * 8;
    float sc, mn;
    g4_scale_min_k4(blk, s, sc, mn);
    const uint8_t* p = blk + 48 + 32 * (s >> 1) + l0;
    const int sh = (s & 1) * 4;
    const uint32_t w0 = ld_u32_a4(p) >> sh, w1 = ld_u32_a4(p + 4) >> sh;
    const uint32_t h0 = ld_u32_a4(blk + 16 + l0) >> s, h1 = ld_u32_a4(blk + 20 + l0) >> s;
    const uint32_t t0 = ((w0 << 2) & 0x3C3C3C3Cu) | ((h0 << 6) & 0x40404040u) | 0x80808080u;
    const uint32_t t1 = ((w1 << 2) & 0x3C3C3C3Cu) | ((h1 << 6) & 0x40404040u) | 0x80808080u;
    float dp[NB];
    g4_unit_dot<NB>(t0, t1, xv, dp);
    const float d = qf16(blk) * sc * 32.f, m = -(qf16(blk + 2) * mn);
#pragma unroll
    for (int b = 0; b < NB; ++b) {
      acc[b] = fmaf(dp[b] - sx[b], d, acc[b]);
      acc[b] = fmaf(m, sx[b], acc[b]);
    }
  }
};
template <> struct G4<QT_Q6_K> {
  static constexpr bool NEED_SX = true;
  template <int NB>
  static __device__ __forceinline__ void dot(const uint8_t* blk, int g, const float (&xv)[NB][8],
                                             const float (&sx)[NB], float (&acc)[NB]) {
    const int e0 = 8 * g, h = e0 >> 7, r = e0 & 127, k = r >> 5, l0 = r & 31;
    const uint8_t* pl = blk + 64 * h + 32 * (k & 1) + l0;
    const uint8_t* ph = blk + 128 + 32 * h + l0;
    const int sh = (k >> 1) * 4;
    const uint32_t w0 = ld_u32_a2(pl) >> sh, w1 = ld_u32_a2(pl + 4) >> sh;
    const uint32_t h0 = ld_u32_a2(ph) >> (2 * k), h1 = ld_u32_a2(ph + 4) >> (2 * k);
    const uint32_t t0 = ((w0 << 1) & 0x1E1E1E1Eu) | ((h0 << 5) & 0x60606060u) | 0x80808080u;
    const uint32_t t1 = ((w1 << 1) & 0x1E1E1E1Eu) | ((h1 << 5) & 0x60606060u) | 0x80808080u;
    float dp[NB];
    g4_unit_dot<NB>(t0, t1, xv, dp);
    const uint32_t scb = blk[192 + 8 * h + (l0 >> 4) + 2 * k] ^ 0x80u;  // int8 scale + 128
    const float dd = qf16(blk + 208) * q_int(scb, 128.f);
    // value = dd * (c - 32): sum = 64 dd (dp - sx) - 32 dd sx
    const float d = dd * 64.f, m = dd * -32.f;
#pragma unroll
    for (int b = 0; b < NB; ++b) {
      acc[b] = fmaf(dp[b] - sx[b], d, acc[b]);
      acc[b] = fmaf(m, sx[b], acc[b]);
    }
  }
};

// Modes of gemv4_run (docs/kernels.md, runs 4-6):
//   GEMV4_PLAIN: a warp loads its step's pieces to registers (RW*U 16-byte loads in flight),
//     stages them in shared memory, decodes; one row tile per block (grid = tiles).
//   GEMV4_XPF: the same, plus each lane's x of the next group requested before decoding the
//     current one (lone-warp latency on small matrices; 8 more registers).
//   GEMV4_ASYNC: the warp walks (tile, chunk) steps over a grid capped at the resident blocks,
//     two shared-memory stages filled by cp.async (no registers held): step s+1 is in flight
//     while step s is decoded.
#define GEMV4_PLAIN 0
#define GEMV4_XPF 1
#define GEMV4_ASYNC 2

template <int T, int NB, int RW, int U, int MODE>
__device__ __forceinline__ void gemv4_run(const uint8_t* __restrict__ W, long long row_bytes,
                                          int N, int K, const float* __restrict__ x,
                                          long long ldx, int ntok,
                                          const float* __restrict__ bias, const float* residual,
                                          float* y, long long ldy) {
  constexpr int BYTES = QTraits<T>::BYTES, QK = QTraits<T>::QK, GPB = QK / 8;
  constexpr int SPAN = 512 * U;            // bytes of one row's chunk in shared memory
  constexpr int CB = (SPAN - 15) / BYTES;  // whole blocks per chunk: start&15 <= 15
  constexpr int NSTAGE = MODE == GEMV4_ASYNC ? 2 : 1;
  static_assert(CB >= 1, "chunk too small for one block");
  __shared__ __align__(16) uint8_t sm[NSTAGE][GEMV4_WARPS][RW][SPAN];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nblk = K / QK;
  const int nch = (nblk + CB - 1) / CB;  // chunks per row
  const long long total = (long long)N * row_bytes;
  pdl_trigger();  // the weights below never depend on an earlier kernel: pdl.cuh

  auto load_x = [&](float (&xv)[NB][8], int j0, int qg) {
    const int jj = GPB == 32 ? qg >> 5 : qg / GPB, g = GPB == 32 ? lane : qg % GPB;
    const int k = (j0 + jj) * QK + 8 * g;
#pragma unroll
    for (int b = 0; b < NB; ++b) {
      if (b < ntok) {
        const float4 lo = __ldg(reinterpret_cast<const float4*>(x + b * ldx + k));
        const float4 hi = __ldg(reinterpret_cast<const float4*>(x + b * ldx + k + 4));
        xv[b][0] = lo.x; xv[b][1] = lo.y; xv[b][2] = lo.z; xv[b][3] = lo.w;
        xv[b][4] = hi.x; xv[b][5] = hi.y; xv[b][6] = hi.z; xv[b][7] = hi.w;
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) xv[b][i] = 0.f;
      }
    }
  };
  // the 16-byte pieces of step (ti, ci): row r's chunk starts at byte off(r) of its slice
  auto piece_count = [&](int r0, int nr, int r, int ci, int& off) {
    const int j0 = ci * CB, cb = min(CB, nblk - j0);
    const long long start = (long long)(r0 + r) * row_bytes + (long long)j0 * BYTES;
    off = (int)(start & 15);
    return r < nr ? (off + cb * BYTES + 15) >> 4 : 0;
  };
  auto piece_addr = [&](int r0, int r, int ci, int qp) {
    const long long start = (long long)(r0 + r) * row_bytes + (long long)ci * CB * BYTES;
    return (start & ~15LL) + 16LL * qp;
  };
  // decode step (r0, ci) from stage slice st; accumulate; write the rows after their last chunk
  auto decode = [&](uint8_t(*st)[SPAN], int r0, int ci, float (&acc)[RW][NB]) {
    const int nr = min(RW, N - r0);
    const int j0 = ci * CB, cb = min(CB, nblk - j0);
    const int ngroups = cb * GPB;
    int coff[RW];
#pragma unroll
    for (int r = 0; r < RW; ++r)
      coff[r] = (int)(((long long)(r0 + r) * row_bytes + (long long)j0 * BYTES) & 15);
    float xn[NB][8];
    if (MODE == GEMV4_XPF) load_x(xn, j0, lane < ngroups ? lane : 0);
    for (int qg = lane; qg < ngroups; qg += 32) {
      // K-quants (32 groups a block): lane l always takes group l, so its sub-block
      // constants stay in registers across iterations
      const int jj = GPB == 32 ? qg >> 5 : qg / GPB, g = GPB == 32 ? lane : qg % GPB;
      float xv[NB][8];
      if (MODE == GEMV4_XPF) {
#pragma unroll
        for (int b = 0; b < NB; ++b)
#pragma unroll
          for (int i = 0; i < 8; ++i) xv[b][i] = xn[b][i];
        if (qg + 32 < ngroups) load_x(xn, j0, qg + 32);
      } else {
        load_x(xv, j0, qg);
      }
      float sx[NB];
#pragma unroll
      for (int b = 0; b < NB; ++b) {
        sx[b] = 0.f;
        if (G4<T>::NEED_SX) {
#pragma unroll
          for (int i = 0; i < 8; ++i) sx[b] += xv[b][i];
        }
      }
#pragma unroll
      for (int r = 0; r < RW; ++r)
        if (r < nr) G4<T>::template dot<NB>(&st[r][coff[r] + jj * BYTES], g, xv, sx, acc[r]);
    }
    if (ci == nch - 1) {  // the warp's rows are done
#pragma unroll
      for (int r = 0; r < RW; ++r)
#pragma unroll
        for (int b = 0; b < NB; ++b) {
          float v = acc[r][b];
#pragma unroll
          for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
          if (lane == 0 && r < nr && b < ntok) {
            const int row = r0 + r;
            if (bias) v += bias[row];
            if (residual) v += residual[b * ldy + row];
            y[b * ldy + row] = v;
          }
          acc[r][b] = 0.f;
        }
    }
  };

  float acc[RW][NB];
#pragma unroll
  for (int r = 0; r < RW; ++r)
#pragma unroll
    for (int b = 0; b < NB; ++b) acc[r][b] = 0.f;

  if constexpr (MODE != GEMV4_ASYNC) {
    uint8_t(*mine)[SPAN] = sm[0][warp];
    bool waited = false;
    for (int r0 = (blockIdx.x * GEMV4_WARPS + warp) * RW; r0 < N;
         r0 += gridDim.x * GEMV4_WARPS * RW) {
      const int nr = min(RW, N - r0);
      for (int ci = 0; ci < nch; ++ci) {
        uint4 buf[RW][U];
        int n16[RW];
#pragma unroll
        for (int r = 0; r < RW; ++r) {
          int off;
          n16[r] = piece_count(r0, nr, r, ci, off);
#pragma unroll
          for (int u = 0; u < U; ++u) {
            const int qp = lane + 32 * u;
            if (qp < n16[r]) {
              const long long addr = piece_addr(r0, r, ci, qp);
              buf[r][u] = addr + 16 <= total ? g4_ld16(W + addr)
                                             : g4_ld_tail(W + addr, (int)(total - addr));
            }
          }
        }
        if (!waited) {  // the first weights are in flight: now wait for x (and for y's readers)
          pdl_wait();
          waited = true;
        }
        __syncwarp();  // every lane is done reading the previous chunk
#pragma unroll
        for (int r = 0; r < RW; ++r)
#pragma unroll
          for (int u = 0; u < U; ++u) {
            const int qp = lane + 32 * u;
            if (qp < n16[r]) *reinterpret_cast<uint4*>(&mine[r][16 * qp]) = buf[r][u];
          }
        __syncwarp();
        decode(mine, r0, ci, acc);
      }
    }
    if (!waited) pdl_wait();  // a warp with no rows: every block waits (pdl.cuh)
  } else {
    auto issue = [&](int ti, int ci, int stage) {
      const int r0 = (ti * GEMV4_WARPS + warp) * RW, nr = min(RW, N - r0);
      uint8_t(*dst)[SPAN] = sm[stage][warp];
#pragma unroll
      for (int r = 0; r < RW; ++r) {
        int off;
        const int n16 = piece_count(r0, nr, r, ci, off);
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int qp = lane + 32 * u;
          if (qp < n16) {
            const long long addr = piece_addr(r0, r, ci, qp);
            if (addr + 16 <= total) {
              cp_async16(&dst[r][16 * qp], W + addr, 16);
            } else {
              *reinterpret_cast<uint4*>(&dst[r][16 * qp]) =
                  g4_ld_tail(W + addr, (int)(total - addr));
            }
          }
        }
      }
      cp_async_commit();
    };
    int t = blockIdx.x, c = 0, stage = 0;
    if ((t * GEMV4_WARPS + warp) * RW >= N) {
      pdl_wait();
      return;
    }
    issue(t, c, 0);
    pdl_wait();  // the first step's weights are in flight
    while (true) {
      int nt = t, nc = c + 1;
      if (nc == nch) {
        nc = 0;
        nt = t + gridDim.x;
      }
      const bool more = (nt * GEMV4_WARPS + warp) * RW < N;
      if (more) {
        issue(nt, nc, stage ^ 1);
      } else {
        cp_async_commit();  // an empty group keeps "all but the newest" meaning step s
      }
      cp_async_wait<1>();
      __syncwarp();  // every lane's copies of step s are visible to the warp
      decode(sm[stage][warp], (t * GEMV4_WARPS + warp) * RW, c, acc);
      __syncwarp();  // step s's stage is read before step s+2 is issued into it
      if (!more) break;
      t = nt;
      c = nc;
      stage ^= 1;
    }
    cp_async_wait<0>();
  }
}

// gemv_<type>_nb<NB>[_x|_a][_r<RW>]: grid (G), block 32*GEMV4_WARPS, G <= ceil(N / (4*RW)):
// block b takes row tiles b, b+G, ... of 4*RW rows. Plain and _x (x prefetch): the wrapper
// launches one block per tile; _a (cp.async walk): capped at the blocks resident at once.
#ifndef GEMV_CORE_ONLY
#define GEMV4_INST(TY, NAME, NB, RW, U, MODE, SUFFIX)                                         \
  extern "C" __global__ void __launch_bounds__(32 * GEMV4_WARPS)                              \
      gemv_##NAME##_nb##NB##SUFFIX(const uint8_t* W, long long row_bytes, int N, int K,       \
                                   const float* x, long long ldx, int ntok, const float* bias, \
                                   const float* residual, float* y, long long ldy) {          \
    gemv4_run<TY, NB, RW, U, MODE>(W, row_bytes, N, K, x, ldx, ntok, bias, residual, y, ldy); \
  }
#define GEMV4_ALL(TY, NAME)                              \
  GEMV4_INST(TY, NAME, 1, 1, 8, GEMV4_PLAIN, )           \
  GEMV4_INST(TY, NAME, 2, 1, 8, GEMV4_PLAIN, )           \
  GEMV4_INST(TY, NAME, 4, 1, 8, GEMV4_PLAIN, )           \
  GEMV4_INST(TY, NAME, 8, 1, 8, GEMV4_PLAIN, )           \
  GEMV4_INST(TY, NAME, 1, 2, 4, GEMV4_PLAIN, _r2)        \
  GEMV4_INST(TY, NAME, 2, 2, 4, GEMV4_PLAIN, _r2)        \
  GEMV4_INST(TY, NAME, 4, 2, 4, GEMV4_PLAIN, _r2)        \
  GEMV4_INST(TY, NAME, 8, 2, 4, GEMV4_PLAIN, _r2)        \
  GEMV4_INST(TY, NAME, 1, 4, 2, GEMV4_PLAIN, _r4)        \
  GEMV4_INST(TY, NAME, 2, 4, 2, GEMV4_PLAIN, _r4)        \
  GEMV4_INST(TY, NAME, 1, 1, 8, GEMV4_XPF, _x)           \
  GEMV4_INST(TY, NAME, 1, 1, 4, GEMV4_ASYNC, _a)         \
  GEMV4_INST(TY, NAME, 1, 2, 2, GEMV4_ASYNC, _a_r2)      \
  GEMV4_INST(TY, NAME, 1, 4, 1, GEMV4_ASYNC, _a_r4)
FOR_EACH_QTYPE(GEMV4_ALL)
#endif
