// Products on 15-bit activations against quantized weight codes (docs/kernels.md, "Integer
// products"): int8 tensor-core cores with 8 or 32 rows of X a block (and a routed form for MoE
// experts with 16 or 64), all giving the same bits whatever the row count. Formats:
// Q4_K, Q5_K, Q6_K (a float step a super-block, below) and Q4_0, Q5_0, Q8_0, MXFP4 (a float
// step a block of 32, further down).
//
// quant_x15: each block of `blk` elements (256 for the K-quants, 32 otherwise) of a row of X
// (row stride ldx) becomes its 15-bit codes (i15.cuh: d, the planes hi and lo, sq).
//
// Q4_K / Q5_K products, per (row t, weight row n) and super-block of 256 (sub-blocks s of 32
// with 6-bit scale sc_s and min m_s, 4- or 5-bit codes c):
//   S_hi = sum(hi * c), S_lo = sum(lo * c) over sub-block s         (exact int32)
//   T_hi += sc_s * S_hi, T_lo += sc_s * S_lo, U += m_s * sq_s        (exact int32, < 2^28)
//   y += d_x * (d * (128 * float(T_hi) + float(T_lo)) - dmin * float(U))
// the last line as separately rounded float steps, super-blocks in K order within a split,
// splits added in order by i15_reduce. Integer sums are exact in any order, so every core that
// takes these float steps gives the same bits whatever the row count (batch invariance), and
// NumPy float32 reproduces them (tools/i15.py).
#include "quant.cuh"
#include "i15.cuh"

constexpr int G15_PAD = 272;      // shared bytes a staged row of a plane (256 + 16: no bank
                                  // conflicts between the 8 rows an n8 fragment reads)

extern "C" __global__ void __launch_bounds__(256) quant_x15(
    const float* __restrict__ x, long long ldx, int M, int K, int blk, int8_t* __restrict__ hi,
    int8_t* __restrict__ lo, float* __restrict__ d, int* __restrict__ sq) {
  pdl_start();  // PDL-aware (worker/backends/cuda/context.py)
  __shared__ float wmax[8];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nb = K / 32;
  const int b = blockIdx.x * 8 + warp, t = blockIdx.y;  // this warp's 32 elements
  const bool live = b < nb;
  const size_t i = (size_t)t * K + (size_t)b * 32 + lane;
  const float v = live ? x[(size_t)t * ldx + (size_t)b * 32 + lane] : 0.f;
  float a = fabsf(v);
#pragma unroll
  for (int o = 16; o; o >>= 1) a = fmaxf(a, __shfl_xor_sync(0xffffffffu, a, o));
  if (blk == 256) {  // the block of 256 is this thread block's (K a multiple of 256)
    if (lane == 0) wmax[warp] = a;
    __syncthreads();
#pragma unroll
    for (int w = 0; w < 8; ++w) a = fmaxf(a, wmax[w]);
  }
  if (!live) return;
  const float dd = i15_scale(a);
  int s = i15_code(v, dd, hi[i], lo[i]);
#pragma unroll
  for (int o = 16; o; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  if (lane == 0) {
    sq[(size_t)t * nb + b] = s;
    if (blk == 32) d[(size_t)t * nb + b] = dd;
    else if (warp == 0) d[(size_t)t * (K / 256) + blockIdx.x] = dd;
  }
}

// The float steps of one super-block (the same expression in every core).
__device__ __forceinline__ float i15_step(float y, float dx, float dsup, float dmin, int th,
                                          int tl, int u) {
  const float v = __fadd_rn(__fmul_rn(128.f, __int2float_rn(th)), __int2float_rn(tl));
  const float w = __fsub_rn(__fmul_rn(dsup, v), __fmul_rn(dmin, __int2float_rn(u)));
  return __fadd_rn(y, __fmul_rn(dx, w));
}

// Where a core's results go. Without y (tools/i15.py): split z's partials into part
// [splits][M][N], summed by i15_reduce or gemm_splitk_reduce. With y (the worker): y[t * ldy
// + n] = (the sum + bias[n]) + res[t * ldy + n] (bias, res optional; res may be y), with
// gemm_splitk_reduce's steps: one split writes y at once; with several, each writes its
// partials and the last block of a tile to finish (a ticket per tile, zero between launches)
// adds the tile's partials in split order. No second launch either way.
struct I15Out {
  float* part;
  float* y;
  const float* bias;
  const float* res;
  long long ldy;
  int* tickets;
};

__device__ __forceinline__ void i15_put(const I15Out& o, int splits, int z, int M, int N, int t,
                                        int n, float v) {
  if (o.y && splits == 1) {
    if (o.bias) v = __fadd_rn(v, o.bias[n]);
    const size_t yo = (size_t)t * o.ldy + n;
    if (o.res) v = __fadd_rn(v, o.res[yo]);
    o.y[yo] = v;
  } else {
    o.part[((size_t)z * M + t) * N + n] = v;
  }
}

// After every thread of the block has put its results: the tile [t0, t0 + nt) x [n0, n0 + nn)
// (ticket `tile`) is finished by its last block. Every thread of the block must call it.
__device__ __forceinline__ void i15_finish(const I15Out& o, int splits, int tile, int M, int N,
                                           int t0, int nt, int n0, int nn) {
  if (!o.y || splits == 1) return;
  __shared__ int i15_last;
  __threadfence();  // this thread's partials are visible to the device
  __syncthreads();  // every thread's
  if (threadIdx.x == 0) {
    i15_last = atomicAdd(o.tickets + tile, 1) == splits - 1;
    if (i15_last) o.tickets[tile] = 0;  // every split of the tile has counted
  }
  __syncthreads();
  if (!i15_last) return;
  __threadfence();
  for (int i = threadIdx.x; i < nt * nn; i += blockDim.x) {
    const int t = t0 + i / nn, n = n0 + i % nn;
    if (t >= M || n >= N) continue;
    const float* p = o.part + (size_t)t * N + n;
    float v = __ldcg(p);
    for (int z = 1; z < splits; ++z) v = __fadd_rn(v, __ldcg(p + (size_t)z * M * N));
    if (o.bias) v = __fadd_rn(v, o.bias[n]);
    const size_t yo = (size_t)t * o.ldy + n;
    if (o.res) v = __fadd_rn(v, o.res[yo]);
    o.y[yo] = v;
  }
}

// Splits folded in one block: launched with grid z 1 and splits > 1, a core walks all of K
// and at the end of each split's units adds that split's sum to a running total in split
// order (v = p0, v += p1, ..., + 0 for each empty split), the steps the split sum takes on the
// partials: the same bits as `splits` blocks and their sum, without the partials' memory
// traffic or the tickets. The host folds steps with enough output tiles to fill the GPU.
template <int NT>
__device__ __forceinline__ void i15_fold(float (&v)[NT][4], float (&y)[NT][4], bool first) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      v[nt][e] = first ? y[nt][e] : __fadd_rn(v[nt][e], y[nt][e]);
      y[nt][e] = 0.f;
    }
}
// after the last unit: y = the fold of every split (`folded`: one split's end was folded
// before), then `empty` empty splits' zeros
template <int NT>
__device__ __forceinline__ void i15_fold_end(const float (&v)[NT][4], float (&y)[NT][4],
                                             bool folded, int empty) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      float r = folded ? __fadd_rn(v[nt][e], y[nt][e]) : y[nt][e];
      for (int k = 0; k < empty; ++k) r = __fadd_rn(r, 0.f);
      y[nt][e] = r;
    }
}

// The weight formats: a super-block's bytes, where its 4-bit codes start, and the codes of
// sub-block s as bytes (k = 4i .. 4i + 3 of the sub-block in word i): Q4_K keeps sub-blocks
// 2p and 2p + 1 in the low and high nibbles of qs[32p ..]; Q5_K adds bit s of qh[k] as the
// fifth bit.
template <int T> struct I15Fmt;
template <> struct I15Fmt<QT_Q4_K> {
  static constexpr int BYTES = 144, QS = 16;
  // word i of sub-block s from the nibble word q (qs bytes 32 (s / 2) + 4i ..) and the qh word
  // h (qh bytes 4i .. + 3; unused)
  static __device__ __forceinline__ uint32_t code(uint32_t q, uint32_t, int s) {
    return (q >> ((s & 1) * 4)) & 0x0F0F0F0Fu;
  }
};
template <> struct I15Fmt<QT_Q5_K> {
  static constexpr int BYTES = 176, QS = 48;
  static __device__ __forceinline__ uint32_t code(uint32_t q, uint32_t h, int s) {
    return ((q >> ((s & 1) * 4)) & 0x0F0F0F0Fu) | (((h >> s) & 0x01010101u) << 4);
  }
};

// D = A (16 x 32 weight codes: s8 when SA, else u8) . B (32 x 8 s8, a plane of X), int32,
// from zero.
template <bool SA>
__device__ __forceinline__ void mma_k32(int d[4], const uint32_t a[4], const uint32_t b[2]) {
#ifdef KERNEL_EMU
  const int c[4] = {0, 0, 0, 0};
  emu::mma_m16n8k32<SA, true>(d, a, b, c);
#else
  if constexpr (SA)
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%10,%10,%10,%10};"
        : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(0));
  else
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%10,%10,%10,%10};"
        : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(0));
#endif
}

// The B fragments of one n8 tile and sub-block for both planes (hi: b[0], b[1]; lo: b[2],
// b[3]) in one ldmatrix.x4: lanes 0-7 / 8-15 address rows n of hi at k 0 / 16, lanes 16-31
// the same rows of lo.
__device__ __forceinline__ void ldsm_x4(uint32_t b[4], const int8_t* row) {
#ifdef KERNEL_EMU
  emu::ldmatrix_x4(b, row);
#else
  const unsigned a = (unsigned)__cvta_generic_to_shared(row);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(b[0]), "=r"(b[1]), "=r"(b[2]), "=r"(b[3])
               : "r"(a));
#endif
}

// gemm15p (Q4_K, Q5_K): a block of W warps takes 16 W weight rows (a warp's m16 tile: rows g
// and g + 8 of its 16, g = lane / 4) by 8 NT rows of X (NT n8 tiles) over one split. Each
// super-block of the split is staged by i15_ring: the planes, d and sq of the block's rows of
// X (rows past M as zeros) and the raw super-blocks of its weight rows go to a slot of dynamic
// shared memory by cp.async. Per staged super-block each lane reads its two weight rows'
// scales and the code words its A fragments need (Q4_K keeps sub-blocks 2p and 2p + 1 in the
// low and high nibbles of the same 32 bytes: one word gives both), and per sub-block every
// n8 tile takes two mma (hi and lo) whose sums fold into T_hi, T_lo. The host gives min(per,
// 3) slots of G15P(R).SLOT bytes.
template <int T, int TOK> struct G15P {
  static constexpr int W = I15Fmt<T>::BYTES;
  static constexpr int XH = 0, XL = TOK * G15_PAD, WQ = 2 * TOK * G15_PAD;
  int DX, SQ, SLOT;  // for R weight rows a block (multiples of 16)
  __device__ explicit G15P(int R) : DX(WQ + R * W), SQ(DX + TOK * 4), SLOT(SQ + TOK * 8 * 4) {}
};

// 16 bytes to shared memory by cp.async, of which the first n are read (the rest zeros)
__device__ __forceinline__ void i15_cpn(void* dst, const void* src, int n) {
#ifdef KERNEL_EMU
  emu::copy16(dst, src, n);
#else
  const unsigned a = (unsigned)__cvta_generic_to_shared(dst);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(a), "l"(src), "r"(n)
               : "memory");
#endif
}
__device__ __forceinline__ void i15_cp16(void* dst, const void* src, bool valid) {
  i15_cpn(dst, src, valid ? 16 : 0);
}
// 4 bytes to shared memory by cp.async (zeros when !valid, nothing read)
__device__ __forceinline__ void i15_cp4(void* dst, const void* src, bool valid) {
#ifdef KERNEL_EMU
  emu::copy4(dst, src, valid ? 4 : 0);
#else
  const unsigned a = (unsigned)__cvta_generic_to_shared(dst);
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(a), "l"(src),
               "r"(valid ? 4 : 0)
               : "memory");
#endif
}
__device__ __forceinline__ void i15_cp_commit() {
#ifndef KERNEL_EMU
  asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}
// this thread's cp.async groups but the newest n (0-2) have landed
__device__ __forceinline__ void i15_cp_wait(int n) {
#ifndef KERNEL_EMU
  if (n >= 2)
    asm volatile("cp.async.wait_group 2;" ::: "memory");
  else if (n == 1)
    asm volatile("cp.async.wait_group 1;" ::: "memory");
  else
    asm volatile("cp.async.wait_group 0;" ::: "memory");
#endif
}

// The staged cores' pipeline over their units [u0, u1) (super-blocks, or chunks of 8 blocks)
// in `slots` (1-3) slots of shared memory: unit u goes to slot (u - u0) % slots, requested
// slots - 1 units ahead of the one computed (a cp.async group a unit; empty groups past u1
// keep the count fixed). A unit is computed once its group has landed for every thread; its
// slot is staged again only after every thread is done with it. stage(u, slot) issues unit
// u's reads; compute(u, slot) reads only that slot.
template <class Stage, class Compute>
__device__ __forceinline__ void i15_ring(int u0, int u1, int slots, Stage&& stage,
                                         Compute&& compute) {
  const int ahead = min(slots, 3) - 1;
  for (int p = 0; p < ahead; ++p) {
    if (u0 + p < u1) stage(u0 + p, p);
    i15_cp_commit();
  }
  // unit u computes in slot cs = (u - u0) % (ahead + 1) and stages unit u + ahead in ss, the
  // slot before it (counted: the modulo's division took ~25 instructions a unit)
  int cs = 0, ss = ahead;
  for (int u = u0; u < u1; ++u) {
    if (u + ahead < u1) stage(u + ahead, ss);  // unit u - 1's slot
    i15_cp_commit();
    i15_cp_wait(ahead);  // unit u's group (the ahead newer ones may still be in flight)
    __syncthreads();     // ... for every thread
    compute(u, cs);
    __syncthreads();  // the slot is read before it is staged again
    ss = cs;
    cs = cs == ahead ? 0 : cs + 1;
  }
}
__device__ __forceinline__ unsigned i15_dyn_smem() {
#ifdef KERNEL_EMU
  return emu::dyn_smem_size();
#else
  unsigned v;
  asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(v));
  return v;
#endif
}

// The staged super-block j of the planes of a dense core's TOK rows of X from row t0 (rows
// past M as zeros): 16 pieces a row, hi at slot + XH, lo at slot + XL (rows G15_PAD apart).
template <int TOK>
__device__ __forceinline__ void i15_stage_planes(uint8_t* sl, const int8_t* __restrict__ xhi,
                                                 const int8_t* __restrict__ xlo, int t0, int M,
                                                 int K, int j) {
  constexpr int XL = TOK * G15_PAD;
  for (int i = threadIdx.x; i < TOK * 16; i += blockDim.x) {
    const int t = i >> 4, o = (i & 15) * 16;
    const bool ok = t0 + t < M;
    const size_t src = (size_t)(ok ? t0 + t : 0) * K + (size_t)j * 256 + o;
    i15_cp16(sl + t * G15_PAD + o, xhi + src, ok);
    i15_cp16(sl + XL + t * G15_PAD + o, xlo + src, ok);
  }
}

// A dense core's results: lane (r0 = its first weight row, tg) holds y[nt][e] of row of X
// t0 + 8 nt + 2 tg + (e & 1) and weight row r0 (e < 2) or r0 + 8; then the block's tile of
// 8 NT rows by R weight rows is finished (every thread of the block calls this).
template <int NT>
__device__ __forceinline__ void i15_put_dense(const I15Out& out, const float (&y)[NT][4],
                                              int splits, int z, int M, int N, int t0, int r0,
                                              int tg, int R) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int t = t0 + nt * 8 + 2 * tg + (e & 1), n = e < 2 ? r0 : r0 + 8;
      if (t < M && n < N) i15_put(out, splits, z, M, N, t, n, y[nt][e]);
    }
  i15_finish(out, splits, blockIdx.y * gridDim.x + blockIdx.x, M, N, t0, 8 * NT,
             blockIdx.x * R, R);
}

template <int T, int NT, bool FOLD>
__device__ __forceinline__ void gemm15p(const uint8_t* __restrict__ w, int N, int K,
                                        const int8_t* __restrict__ xhi,
                                        const int8_t* __restrict__ xlo,
                                        const float* __restrict__ xd,
                                        const int* __restrict__ xsq, int M, int splits,
                                        I15Out out) {
  using F = I15Fmt<T>;
  constexpr int TOK = 8 * NT;  // rows of X a block: NT n8 tiles
  const int R = (int)blockDim.x >> 1;  // weight rows a block: 16 a warp
  using LT = G15P<T, TOK>;
  const LT L(R);
  extern __shared__ __align__(16) uint8_t smem[];
  const int slots = (int)(i15_dyn_smem() / L.SLOT);
  if (slots < 1) __trap();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tg = lane & 3;
  const int nsb = K / 256;
  const int per = (nsb + splits - 1) / splits;
  const bool fold = FOLD && splits > 1;  // every split in this block (i15_fold; grid z 1)
  const int z = blockIdx.z;
  const int sb0 = z * per, sb1 = fold ? nsb : min(nsb, sb0 + per);
  const int t0 = blockIdx.y * TOK, n0 = blockIdx.x * R;
  const int lr0 = warp * 16 + g, lr1 = lr0 + 8;  // this lane's weight rows in the tile
  float y[NT][4], v[NT][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) y[nt][e] = v[nt][e] = 0.f;
  const auto stage = [&](int j, int c) {
    uint8_t* sl = smem + c * L.SLOT;
    i15_stage_planes<TOK>(sl, xhi, xlo, t0, M, K, j);
    for (int i = threadIdx.x; i < R * (F::BYTES / 16); i += blockDim.x) {  // weights
      const int r = i / (F::BYTES / 16), o = (i % (F::BYTES / 16)) * 16;
      const size_t src = (size_t)min(n0 + r, N - 1) * nsb * F::BYTES + (size_t)j * F::BYTES + o;
      i15_cp16(sl + LT::WQ + r * F::BYTES + o, w + src, true);
    }
    for (int i = threadIdx.x; i < TOK * 3; i += blockDim.x) {
      if (i < TOK * 2) {  // sq: two pieces a row
        const int t = i >> 1, o = (i & 1) * 4;
        const bool ok = t0 + t < M;
        i15_cp16(sl + L.SQ + (t * 8 + o) * 4,
                 xsq + (size_t)(ok ? t0 + t : 0) * (K / 32) + (size_t)j * 8 + o, ok);
      } else {  // d: one a row
        const int t = i - TOK * 2;
        const bool ok = t0 + t < M;
        i15_cp4(sl + L.DX + 4 * t, xd + (size_t)(ok ? t0 + t : 0) * nsb + j, ok);
      }
    }
  };
  const auto compute = [&](int j, int c) {
    const uint8_t* sl = smem + c * L.SLOT;
    const int8_t* shi = reinterpret_cast<const int8_t*>(sl + LT::XH);
    const int8_t* slo = reinterpret_cast<const int8_t*>(sl + LT::XL);
    const float* sdx = reinterpret_cast<const float*>(sl + L.DX);
    const int* ssq = reinterpret_cast<const int*>(sl + L.SQ);
    const uint8_t* b0 = sl + LT::WQ + lr0 * F::BYTES;
    const uint8_t* b1 = sl + LT::WQ + lr1 * F::BYTES;
    const uint4 hd0 = *reinterpret_cast<const uint4*>(b0);
    const uint4 hd1 = *reinterpret_cast<const uint4*>(b1);
    const uint8_t* sc0 = reinterpret_cast<const uint8_t*>(&hd0) + 4;
    const uint8_t* sc1 = reinterpret_cast<const uint8_t*>(&hd1) + 4;
    uint32_t h0[2] = {0u, 0u}, h1[2] = {0u, 0u};
    if constexpr (T == QT_Q5_K) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        h0[h] = *reinterpret_cast<const uint32_t*>(b0 + 16 + 16 * h + 4 * tg);
        h1[h] = *reinterpret_cast<const uint32_t*>(b1 + 16 + 16 * h + 4 * tg);
      }
    }
    int th[NT][4], tl[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) th[nt][e] = tl[nt][e] = 0;
#pragma unroll
    for (int s = 0; s < 8; ++s) {
      int sa, ma, sb, mb;
      scale_min_k4(sc0, s, sa, ma);
      scale_min_k4(sc1, s, sb, mb);
      const int o = F::QS + 32 * (s >> 1) + 4 * tg;  // k half h at + 16 h
      const uint32_t a[4] = {F::code(*reinterpret_cast<const uint32_t*>(b0 + o), h0[0], s),
                             F::code(*reinterpret_cast<const uint32_t*>(b1 + o), h1[0], s),
                             F::code(*reinterpret_cast<const uint32_t*>(b0 + o + 16), h0[1], s),
                             F::code(*reinterpret_cast<const uint32_t*>(b1 + o + 16), h1[1], s)};
      const int8_t* lrow = (lane < 16 ? shi : slo) + (lane & 7) * G15_PAD + s * 32 +
                           ((lane >> 3) & 1) * 16;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        uint32_t bf[4];
        ldsm_x4(bf, lrow + nt * 8 * G15_PAD);
        int dh[4], dl[4];
        mma_k32<false>(dh, a, bf);
        mma_k32<false>(dl, a, bf + 2);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int sc = e < 2 ? sa : sb;
          th[nt][e] += sc * dh[e];
          tl[nt][e] += sc * dl[e];
        }
      }
    }
    const float ds0 = __half2float(__ushort_as_half((uint16_t)(hd0.x & 0xFFFFu)));
    const float dm0 = __half2float(__ushort_as_half((uint16_t)(hd0.x >> 16)));
    const float ds1 = __half2float(__ushort_as_half((uint16_t)(hd1.x & 0xFFFFu)));
    const float dm1 = __half2float(__ushort_as_half((uint16_t)(hd1.x >> 16)));
    int m0[8], m1[8];
#pragma unroll
    for (int s = 0; s < 8; ++s) {
      int sc;
      scale_min_k4(sc0, s, sc, m0[s]);
      scale_min_k4(sc1, s, sc, m1[s]);
    }
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int t = nt * 8 + 2 * tg + (e & 1);
        int u = 0;
#pragma unroll
        for (int s = 0; s < 8; ++s) u += (e < 2 ? m0[s] : m1[s]) * ssq[t * 8 + s];
        y[nt][e] = i15_step(y[nt][e], sdx[t], e < 2 ? ds0 : ds1, e < 2 ? dm0 : dm1,
                            th[nt][e], tl[nt][e], u);
      }
    if (fold && (j + 1) % per == 0 && j + 1 < nsb) i15_fold<NT>(v, y, j + 1 == per);
  };
  i15_ring(sb0, sb1, slots, stage, compute);
  if (fold) i15_fold_end<NT>(v, y, nsb > per, splits - (nsb + per - 1) / per);
  i15_put_dense<NT>(out, y, fold ? 1 : splits, z, M, N, t0, n0 + lr0, tg, R);
}

#define GEMM15P(TY, NAME, NT, FOLD, SUFFIX)                                                  \
  extern "C" __global__ void __launch_bounds__(256) gemm15p##SUFFIX##_##NAME(              \
      const uint8_t* __restrict__ w, int N, int K, const int8_t* __restrict__ xhi,         \
      const int8_t* __restrict__ xlo, const float* __restrict__ xd,                        \
      const int* __restrict__ xsq, int M, int splits, float* __restrict__ part, float* y,  \
      const float* bias, const float* res, long long ldy, int* tickets) {                  \
    pdl_start();                                                                           \
    gemm15p<TY, NT, FOLD>(w, N, K, xhi, xlo, xd, xsq, M, splits,                          \
                          {part, y, bias, res, ldy, tickets});                              \
  }
GEMM15P(QT_Q4_K, q4_k, 4, false, )
GEMM15P(QT_Q5_K, q5_k, 4, false, )
GEMM15P(QT_Q4_K, q4_k, 4, true, f)
GEMM15P(QT_Q5_K, q5_k, 4, true, f)
GEMM15P(QT_Q4_K, q4_k, 1, false, 8)
GEMM15P(QT_Q5_K, q5_k, 1, false, 8)

// ---- Q6_K: 210-byte blocks (2-byte aligned): ql[128], qh[64], int8 scales[16], fp16 d.
// Element 32G + l of a super-block (32-group G = 4h + r, l < 32) is d * sc[2G + l / 16] *
// (q - 32), q = nibble r >> 1 of ql[64h + 32(r & 1) + l] | bits 2r, 2r + 1 of qh[32h + l] << 4.
// No minimum: the float step is i15_step with dmin = 0 and U = 0 (d * v - 0 = d * v exactly).
// The codes are signed (q - 32), so the products are s8 x s8 and the sub-blocks 16 wide: each
// half of an m16n8k32 A fragment is one sub-block, taken by an mma with the other half zero.

// bytes 4i .. 4i + 3 of the codes of 32-group G from the ql and qh words at element 4i, as
// signed bytes q - 32 (q < 64: + 96 never carries, ^ 128 then wraps to q - 32)
__device__ __forceinline__ uint32_t q6_codes(uint32_t ql, uint32_t qh, int r) {
  const uint32_t q =
      ((ql >> (4 * (r >> 1))) & 0x0F0F0F0Fu) | (((qh >> (2 * r)) & 0x03030303u) << 4);
  return (q + 0x60606060u) ^ 0x80808080u;
}
__device__ __forceinline__ int q6_ql_byte(int G, int l) { return 64 * (G >> 2) + 32 * (G & 1) + l; }
__device__ __forceinline__ int q6_qh_byte(int G, int l) { return 128 + 32 * (G >> 2) + l; }

// gemm15p for Q6_K: the same tiles and staging, a weight row's block staged as its 16-byte
// aligned cover (14 pieces into a 240-byte row: rows 60 words apart, so the 8 rows of a
// fragment fall in distinct banks; the last piece reads only the block's bytes), each word
// read as two aligned words shifted into place.
constexpr int Q6P_ROW = 240;
template <int TOK> struct Q6P {
  static constexpr int XH = 0, XL = TOK * G15_PAD, WQ = 2 * TOK * G15_PAD;
  int DX, SLOT;  // for R weight rows a block (multiples of 16)
  __device__ explicit Q6P(int R) : DX(WQ + R * Q6P_ROW), SLOT(DX + TOK * 4) {}
};

__device__ __forceinline__ uint32_t q6p_word(const uint8_t* rowp, int off, int b) {
  const uint32_t* p = reinterpret_cast<const uint32_t*>(rowp + ((off + b) & ~3));
  return __funnelshift_r(p[0], p[1], (unsigned)(off & 3) * 8);
}

template <int NT>
__device__ __forceinline__ void gemm15p_q6k(const uint8_t* __restrict__ w, int N, int K,
                                            const int8_t* __restrict__ xhi,
                                            const int8_t* __restrict__ xlo,
                                            const float* __restrict__ xd, int M, int splits,
                                            I15Out out) {
  constexpr int TOK = 8 * NT;  // rows of X a block: NT n8 tiles
  const int R = (int)blockDim.x >> 1;  // weight rows a block: 16 a warp
  using LT = Q6P<TOK>;
  const LT L(R);
  extern __shared__ __align__(16) uint8_t smem[];
  const int slots = (int)(i15_dyn_smem() / L.SLOT);
  if (slots < 1) __trap();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tg = lane & 3;
  const int nsb = K / 256;
  const int per = (nsb + splits - 1) / splits;
  const int z = blockIdx.z;
  const int sb0 = z * per, sb1 = min(nsb, sb0 + per);
  const int t0 = blockIdx.y * TOK, n0 = blockIdx.x * R;
  const int lr0 = warp * 16 + g, lr1 = lr0 + 8;
  float y[NT][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) y[nt][e] = 0.f;
  const auto stage = [&](int j, int c) {
    uint8_t* sl = smem + c * L.SLOT;
    i15_stage_planes<TOK>(sl, xhi, xlo, t0, M, K, j);
    for (int i = threadIdx.x; i < R * 14; i += blockDim.x) {
      const int r = i / 14, o = (i % 14) * 16;
      const uint8_t* b = w + (size_t)min(n0 + r, N - 1) * nsb * 210 + (size_t)j * 210;
      const uint8_t* a16 = reinterpret_cast<const uint8_t*>(reinterpret_cast<uintptr_t>(b) & ~(uintptr_t)15);
      const int left = (int)(b + 210 - (a16 + o));  // block bytes from this piece on
      i15_cpn(sl + LT::WQ + r * Q6P_ROW + o, a16 + o, max(0, min(16, left)));
    }
    for (int t = threadIdx.x; t < TOK; t += blockDim.x) {
      const bool ok = t0 + t < M;
      i15_cp4(sl + L.DX + 4 * t, xd + (size_t)(ok ? t0 + t : 0) * nsb + j, ok);
    }
  };
  const auto compute = [&](int j, int c) {
    const uint8_t* sl = smem + c * L.SLOT;
    const int8_t* shi = reinterpret_cast<const int8_t*>(sl + LT::XH);
    const int8_t* slo = reinterpret_cast<const int8_t*>(sl + LT::XL);
    const float* sdx = reinterpret_cast<const float*>(sl + L.DX);
    // this lane's two rows: their blocks' offsets in the staged covers
    const size_t e0 = (size_t)min(n0 + lr0, N - 1) * nsb * 210 + (size_t)j * 210;
    const size_t e1 = (size_t)min(n0 + lr1, N - 1) * nsb * 210 + (size_t)j * 210;
    const int off0 = (int)((reinterpret_cast<uintptr_t>(w) + e0) & 15);
    const int off1 = (int)((reinterpret_cast<uintptr_t>(w) + e1) & 15);
    const uint8_t* p0 = sl + LT::WQ + lr0 * Q6P_ROW;
    const uint8_t* p1 = sl + LT::WQ + lr1 * Q6P_ROW;
    int th[NT][4], tl[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) th[nt][e] = tl[nt][e] = 0;
#pragma unroll
    for (int G = 0; G < 8; ++G) {
      const uint32_t s0 = q6p_word(p0, off0, 192 + (G / 2) * 4);  // scales 4(G/2) ..
      const uint32_t s1 = q6p_word(p1, off1, 192 + (G / 2) * 4);
      const int sh8 = 16 * (G & 1);                               // 2G, 2G + 1 in the word
      const int sa0 = (int)(int8_t)(s0 >> sh8), sb0_ = (int)(int8_t)(s0 >> (sh8 + 8));
      const int sa1 = (int)(int8_t)(s1 >> sh8), sb1_ = (int)(int8_t)(s1 >> (sh8 + 8));
      uint32_t a[2][4];  // [half][fragment]: half 0 = sub-block 2G, 1 = 2G + 1
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int l = 16 * h + 4 * tg;
        const uint32_t c0w = q6_codes(q6p_word(p0, off0, q6_ql_byte(G, l)),
                                      q6p_word(p0, off0, q6_qh_byte(G, l)), G & 3);
        const uint32_t c1w = q6_codes(q6p_word(p1, off1, q6_ql_byte(G, l)),
                                      q6p_word(p1, off1, q6_qh_byte(G, l)), G & 3);
        a[h][0] = h == 0 ? c0w : 0u;
        a[h][1] = h == 0 ? c1w : 0u;
        a[h][2] = h == 1 ? c0w : 0u;
        a[h][3] = h == 1 ? c1w : 0u;
      }
      const int8_t* lrow = (lane < 16 ? shi : slo) + (lane & 7) * G15_PAD + G * 32 +
                           ((lane >> 3) & 1) * 16;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        uint32_t bf[4];
        ldsm_x4(bf, lrow + nt * 8 * G15_PAD);
        int dh0[4], dl0[4], dh1[4], dl1[4];
        mma_k32<true>(dh0, a[0], bf);
        mma_k32<true>(dl0, a[0], bf + 2);
        mma_k32<true>(dh1, a[1], bf);
        mma_k32<true>(dl1, a[1], bf + 2);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int sa = e < 2 ? sa0 : sa1, sb = e < 2 ? sb0_ : sb1_;
          th[nt][e] += sa * dh0[e] + sb * dh1[e];
          tl[nt][e] += sa * dl0[e] + sb * dl1[e];
        }
      }
    }
    const float d0 = __half2float(__ushort_as_half((uint16_t)q6p_word(p0, off0, 208)));
    const float d1 = __half2float(__ushort_as_half((uint16_t)q6p_word(p1, off1, 208)));
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int t = nt * 8 + 2 * tg + (e & 1);
        y[nt][e] = i15_step(y[nt][e], sdx[t], e < 2 ? d0 : d1, 0.f, th[nt][e], tl[nt][e], 0);
      }
  };
  i15_ring(sb0, sb1, slots, stage, compute);
  i15_put_dense<NT>(out, y, splits, z, M, N, t0, n0 + lr0, tg, R);
}

#define GEMM15P_Q6K(NT, SUFFIX)                                                            \
  extern "C" __global__ void __launch_bounds__(256) gemm15p##SUFFIX##_q6_k(                \
      const uint8_t* __restrict__ w, int N, int K, const int8_t* __restrict__ xhi,         \
      const int8_t* __restrict__ xlo, const float* __restrict__ xd,                        \
      const int* __restrict__ xsq, int M, int splits, float* __restrict__ part, float* y,  \
      const float* bias, const float* res, long long ldy, int* tickets) {                  \
    pdl_start();                                                                           \
    gemm15p_q6k<NT>(w, N, K, xhi, xlo, xd, M, splits,                                      \
                    {part, y, bias, res, ldy, tickets});                                   \
  }
// (no folded form: with the running total it spilled, and it was slower than the split
// core at every row count measured; i15_fold never picks it)
GEMM15P_Q6K(4, )
GEMM15P_Q6K(1, 8)

// ---- Q4_0 / Q5_0 / Q8_0: blocks of 32 (18 / 22 / 34 bytes, 2-byte aligned), an fp16 step d
// at bytes 0-1, value d * (q - off): Q4_0 q = nibble (elements 0-15 the low nibbles of qs[16]
// at byte 2, 16-31 the high ones), off 8; Q5_0 the same at byte 6 with bit l of the 32-bit
// qh at byte 2 as element l's fifth bit, off 16; Q8_0 q = the int8 at byte 2 + l, off 0.
// X is scaled per 32 (quant_x15 with blk 32). Per (row t, weight row n, block b):
//   V = sum((q - off) * (128 hi + lo)) = 128 S_hi + S_lo (exact int32, < 2^27)
//   y += dx * (d * float(V))
// as separately rounded float steps, blocks in K order within a split (whole chunks of 8
// blocks), splits added in order. The tensor-core cores make the codes signed.
template <int T> struct I15Leg;
template <> struct I15Leg<QT_Q4_0> {
  static constexpr int BYTES = 18, OFF = 8;
  static constexpr int PITCH = 176;  // staged cover row: 160 bytes (8 blocks + 14) + 16
};
template <> struct I15Leg<QT_Q5_0> {
  static constexpr int BYTES = 22, OFF = 16;
  static constexpr int PITCH = 208;  // 192 + 16
};
template <> struct I15Leg<QT_Q8_0> {
  static constexpr int BYTES = 34, OFF = 0;
  static constexpr int PITCH = 304;  // 288 + 16
};
// MXFP4 (gpt-oss's experts): 17 bytes, an E8M0 exponent e then qs[16] of E2M1 codes (elements
// 0-15 the low nibbles, 16-31 the high ones); value d * c with c of ggml's doubled table
// {0, 1, 2, 3, 4, 6, 8, 12} and the sign in bit 3, d = 2^(e - 128) (e8m0_half): the integer
// codes c are signed, no offset. Blocks start at any byte.
template <> struct I15Leg<QT_MXFP4> {
  static constexpr int BYTES = 17, OFF = 0;
  static constexpr int PITCH = 176;  // 160 (8 blocks + 15, in 16-byte pieces) + 16
};
constexpr int I15_CHUNK = 8;  // blocks of 32 a chunk

// bits 0-3 of x to bit 4 of bytes 0-3 (Q5_0's fifth bits of four elements)
__device__ __forceinline__ uint32_t i15_spread4(uint32_t x) {
  return (((x & 0xFu) * 0x00204081u) & 0x01010101u) << 4;
}

// MXFP4: four E2M1 codes (a nibble a byte) to their signed int8 values: the magnitudes by
// one byte permute of {0 1 2 3 4 6 8 12}, the negatives by one of their negations, picked
// per byte by bit 3.
__device__ __forceinline__ uint32_t i15_e2m1x4(uint32_t nib4) {
  const uint32_t x = nib4 & 0x07070707u;
  const uint32_t y = x | (x >> 4);
  const uint32_t sel = (y & 0x77u) | ((y >> 8) & 0x7700u);  // byte k's code at nibble k
  const uint32_t pos = __byte_perm(0x03020100u, 0x0C080604u, sel);
  const uint32_t neg = __byte_perm(0xFDFEFF00u, 0xF4F8FAFCu, sel);
  const uint32_t m = ((nib4 >> 3) & 0x01010101u) * 0xFFu;
  return (pos & ~m) | (neg & m);
}

// A block's float step d: fp16 at byte 0, or MXFP4's E8M0 byte
template <int T>
__device__ __forceinline__ float i15_leg_d(uint32_t first_word) {
  if constexpr (T == QT_MXFP4) return e8m0_half(first_word & 0xFFu);
  return __half2float(__ushort_as_half((uint16_t)first_word));
}

// Unsigned codes of elements 4i .. 4i + 3 of a block (one byte each, 0 .. 31; Q8_0's int8
// and MXFP4's values as they are), from get(q) = the block's bytes q .. q + 3.
template <int T, class Get>
__device__ __forceinline__ uint32_t i15_leg_codes(const Get& get, int i) {
  if constexpr (T == QT_Q8_0) {
    return get(2 + 4 * i);
  } else if constexpr (T == QT_MXFP4) {
    return i15_e2m1x4((get(1 + 4 * (i & 3)) >> (4 * (i >> 2))) & 0x0F0F0F0Fu);
  } else if constexpr (T == QT_Q4_0) {
    return (get(2 + 4 * (i & 3)) >> (4 * (i >> 2))) & 0x0F0F0F0Fu;
  } else {
    return ((get(6 + 4 * (i & 3)) >> (4 * (i >> 2))) & 0x0F0F0F0Fu) | i15_spread4(get(2) >> (4 * i));
  }
}
// the same, signed (q - off per byte: + 0x80 - off never carries, ^ 0x80 wraps to q - off)
template <int T>
__device__ __forceinline__ uint32_t i15_leg_signed(uint32_t u) {
  if constexpr (I15Leg<T>::OFF == 0) return u;
  return (u + (0x80u - I15Leg<T>::OFF) * 0x01010101u) ^ 0x80808080u;
}

// bytes pos .. pos + 3 of a 4-byte aligned shared row: two aligned words shifted
__device__ __forceinline__ uint32_t i15_sword(const uint8_t* rowp, int pos) {
  const uint32_t* p = reinterpret_cast<const uint32_t*>(rowp + (pos & ~3));
  return __funnelshift_r(p[0], p[1], (unsigned)(pos & 3) * 8);
}

// The float step of one block (the same expression in every core).
__device__ __forceinline__ float i15_step32(float y, float dx, float dw, int v) {
  return __fadd_rn(y, __fmul_rn(dx, __fmul_rn(dw, __int2float_rn(v))));
}

// Blocks of 32 a split: whole chunks, as even as they go (tools/i15.py legacy_split_blocks).
__device__ __forceinline__ int i15_leg_per(int nb, int splits) {
  const int chunks = (nb + I15_CHUNK - 1) / I15_CHUNK;
  return I15_CHUNK * ((chunks + splits - 1) / splits);
}

// gemm15p for the legacy formats: gemm15p's tiles, one chunk of up to 8 blocks a slot: both
// planes of the 32 rows of X, each weight row's 8 blocks as their 16-byte aligned cover (the
// last piece by cp.async's source size, so no byte past the blocks is read) in rows of PITCH
// bytes, and dx [32][8]. A lane's A fragment words are read as two aligned shared words
// shifted into place, made signed, and each block takes two mma (hi, lo) an n8 tile and one
// float step an output.
template <int T, int TOK> struct G15L {
  static constexpr int XH = 0, XL = TOK * G15_PAD, WQ = 2 * TOK * G15_PAD;
  int DX, SLOT;  // for R weight rows a block (multiples of 16)
  __device__ explicit G15L(int R) : DX(WQ + R * I15Leg<T>::PITCH), SLOT(DX + TOK * I15_CHUNK * 4) {}
};

// A routed launch (the experts of a MoE layer, moe_route's table): block y takes tile y
// (expert e = tiles[y].x, its matrix at w + e * expert_bytes) and its rows r < tiles[y].z are
// the assignments a = list[tiles[y].y + r], reading X row a (per_slot) or a / topk, writing
// output row a.
struct I15Route {
  const int* ntiles;
  const int4* tiles;
  const int* list;
  int topk, per_slot;
  long long expert_bytes;
};

template <int T, int NT, bool FOLD, bool ROUTED = false>
__device__ __forceinline__ void gemm15pl(const uint8_t* __restrict__ w, int N, int K,
                                         const int8_t* __restrict__ xhi,
                                         const int8_t* __restrict__ xlo,
                                         const float* __restrict__ xd, int M, int splits,
                                         I15Out out, I15Route route = {}) {
  using F = I15Leg<T>;
  constexpr int TOK = 8 * NT;  // rows of X a block: NT n8 tiles
  const int R = (int)blockDim.x >> 1;  // weight rows a block: 16 a warp
  using LT = G15L<T, TOK>;
  const LT L(R);
  extern __shared__ __align__(16) uint8_t smem[];
  __shared__ int s_xrow[TOK], s_yrow[TOK];  // a tile row's row of X and of the output (-1: none)
  const int slots = (int)(i15_dyn_smem() / L.SLOT);
  if (slots < 1) __trap();
  if constexpr (ROUTED) {
    if ((int)blockIdx.y >= route.ntiles[0]) return;  // the whole block: past the table
    const int4 tl = route.tiles[blockIdx.y];
    w += (size_t)tl.x * route.expert_bytes;
    for (int r = threadIdx.x; r < TOK; r += blockDim.x) {
      const int a = r < tl.z ? route.list[tl.y + r] : -1;
      s_xrow[r] = a < 0 ? -1 : (route.per_slot ? a : a / route.topk);
      s_yrow[r] = a;
    }
  } else {
    for (int r = threadIdx.x; r < TOK; r += blockDim.x) {
      const int t = blockIdx.y * TOK + r;
      s_xrow[r] = s_yrow[r] = t < M ? t : -1;
    }
  }
  __syncthreads();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tg = lane & 3;
  const int nb = K / 32;
  const int per = i15_leg_per(nb, splits);  // blocks a split (whole chunks)
  const bool fold = FOLD && splits > 1;  // every split in this block (i15_fold; grid z 1)
  const int z = blockIdx.z;
  const int b0 = min(nb, z * per), b1 = fold ? nb : min(nb, b0 + per);
  const int n0 = blockIdx.x * R;
  const int lr0 = warp * 16 + g, lr1 = lr0 + 8;
  const size_t rowb = (size_t)nb * F::BYTES;
  float y[NT][4], v[NT][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) y[nt][e] = v[nt][e] = 0.f;
  // units: the split's chunks of 8 blocks
  const auto stage = [&](int u, int c) {
    uint8_t* sl = smem + c * L.SLOT;
    const int jb = b0 + u * I15_CHUNK, nbc = min(I15_CHUNK, b1 - jb);
    for (int i = threadIdx.x; i < TOK * 2 * nbc; i += blockDim.x) {  // planes: 2 pieces a block
      const int t = i / (2 * nbc), o = (i % (2 * nbc)) * 16, xr = s_xrow[t];
      const size_t src = (size_t)max(xr, 0) * K + (size_t)jb * 32 + o;
      i15_cp16(sl + LT::XH + t * G15_PAD + o, xhi + src, xr >= 0);
      i15_cp16(sl + LT::XL + t * G15_PAD + o, xlo + src, xr >= 0);
    }
    constexpr int PIECES = (F::PITCH - 16) / 16;
    for (int i = threadIdx.x; i < R * PIECES; i += blockDim.x) {  // weights: aligned covers
      const int r = i / PIECES, o = (i % PIECES) * 16;
      const uint8_t* s = w + (size_t)min(n0 + r, N - 1) * rowb + (size_t)jb * F::BYTES;
      const uint8_t* a16 =
          reinterpret_cast<const uint8_t*>(reinterpret_cast<uintptr_t>(s) & ~(uintptr_t)15);
      const int left = (int)(s + nbc * F::BYTES - (a16 + o));  // block bytes from here on
      if (left > 0) i15_cpn(sl + LT::WQ + r * F::PITCH + o, a16 + o, min(16, left));
    }
    for (int i = threadIdx.x; i < TOK * I15_CHUNK; i += blockDim.x) {
      const int t = i / I15_CHUNK, b = i % I15_CHUNK, xr = s_xrow[t];
      const bool ok = xr >= 0 && b < nbc;
      i15_cp4(sl + L.DX + 4 * i, xd + (ok ? (size_t)xr * nb + jb + b : 0), ok);
    }
  };
  const auto compute = [&](int u, int c) {
    const uint8_t* sl = smem + c * L.SLOT;
    const int jb = b0 + u * I15_CHUNK, nbc = min(I15_CHUNK, b1 - jb);
    const int8_t* shi = reinterpret_cast<const int8_t*>(sl + LT::XH);
    const int8_t* slo = reinterpret_cast<const int8_t*>(sl + LT::XL);
    const float* sdx = reinterpret_cast<const float*>(sl + L.DX);
    // this lane's two rows: where their chunk starts in the staged covers
    const size_t e0 = (size_t)min(n0 + lr0, N - 1) * rowb + (size_t)jb * F::BYTES;
    const size_t e1 = (size_t)min(n0 + lr1, N - 1) * rowb + (size_t)jb * F::BYTES;
    const uint8_t* p0 = sl + LT::WQ + lr0 * F::PITCH;
    const uint8_t* p1 = sl + LT::WQ + lr1 * F::PITCH;
    const int off0 = (int)((reinterpret_cast<uintptr_t>(w) + e0) & 15);
    const int off1 = (int)((reinterpret_cast<uintptr_t>(w) + e1) & 15);
    for (int b = 0; b < nbc; ++b) {
      const int o0 = off0 + b * F::BYTES, o1 = off1 + b * F::BYTES;
      const auto get0 = [&](int q) { return i15_sword(p0, o0 + q); };
      const auto get1 = [&](int q) { return i15_sword(p1, o1 + q); };
      const float d0 = i15_leg_d<T>(T == QT_MXFP4 ? p0[o0] : *reinterpret_cast<const uint16_t*>(p0 + o0));
      const float d1 = i15_leg_d<T>(T == QT_MXFP4 ? p1[o1] : *reinterpret_cast<const uint16_t*>(p1 + o1));
      const uint32_t a[4] = {i15_leg_signed<T>(i15_leg_codes<T>(get0, tg)),
                             i15_leg_signed<T>(i15_leg_codes<T>(get1, tg)),
                             i15_leg_signed<T>(i15_leg_codes<T>(get0, 4 + tg)),
                             i15_leg_signed<T>(i15_leg_codes<T>(get1, 4 + tg))};
      const int8_t* lrow = (lane < 16 ? shi : slo) + (lane & 7) * G15_PAD + b * 32 +
                           ((lane >> 3) & 1) * 16;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        uint32_t bf[4];
        ldsm_x4(bf, lrow + nt * 8 * G15_PAD);
        int dh[4], dl[4];
        mma_k32<true>(dh, a, bf);
        mma_k32<true>(dl, a, bf + 2);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int t = nt * 8 + 2 * tg + (e & 1);
          y[nt][e] = i15_step32(y[nt][e], sdx[t * I15_CHUNK + b], e < 2 ? d0 : d1,
                                128 * dh[e] + dl[e]);
        }
      }
    }
    const int done = jb + nbc;  // blocks of K behind this unit
    if (fold && done % per == 0 && done < nb) i15_fold<NT>(v, y, done == per);
  };
  i15_ring(0, (b1 - b0 + I15_CHUNK - 1) / I15_CHUNK, slots, stage, compute);
  if (fold) i15_fold_end<NT>(v, y, nb > per, splits - (nb + per - 1) / per);
  const int zo = fold ? 0 : z, so = fold ? 1 : splits;  // where, and as how many splits
  const int r0 = n0 + lr0, r1 = n0 + lr1;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int t = s_yrow[nt * 8 + 2 * tg + (e & 1)], n = e < 2 ? r0 : r1;
      if (t >= 0 && n < N) i15_put(out, so, zo, M, N, t, n, y[nt][e]);
    }
  if constexpr (!ROUTED)  // (a routed launch writes partials: out.y is null)
    i15_finish(out, so, blockIdx.y * gridDim.x + blockIdx.x, M, N, blockIdx.y * TOK,
               TOK, blockIdx.x * R, R);
}

#define GEMM15PL(TY, NAME, NT, FOLD, SUFFIX)                                                 \
  extern "C" __global__ void __launch_bounds__(256) gemm15p##SUFFIX##_##NAME(              \
      const uint8_t* __restrict__ w, int N, int K, const int8_t* __restrict__ xhi,         \
      const int8_t* __restrict__ xlo, const float* __restrict__ xd,                        \
      const int* __restrict__ xsq, int M, int splits, float* __restrict__ part, float* y,  \
      const float* bias, const float* res, long long ldy, int* tickets) {                  \
    pdl_start();                                                                           \
    gemm15pl<TY, NT, FOLD>(w, N, K, xhi, xlo, xd, M, splits,                              \
                           {part, y, bias, res, ldy, tickets});                             \
  }
GEMM15PL(QT_Q4_0, q4_0, 4, false, )
GEMM15PL(QT_Q5_0, q5_0, 4, false, )
GEMM15PL(QT_Q8_0, q8_0, 4, false, )
GEMM15PL(QT_MXFP4, mxfp4, 4, false, )
GEMM15PL(QT_Q4_0, q4_0, 4, true, f)
GEMM15PL(QT_Q5_0, q5_0, 4, true, f)
GEMM15PL(QT_Q8_0, q8_0, 4, true, f)
GEMM15PL(QT_MXFP4, mxfp4, 4, true, f)
GEMM15PL(QT_Q4_0, q4_0, 1, false, 8)
GEMM15PL(QT_Q5_0, q5_0, 1, false, 8)
GEMM15PL(QT_Q8_0, q8_0, 1, false, 8)
GEMM15PL(QT_MXFP4, mxfp4, 1, false, 8)

// moe15p<TOK>_<fmt>: the routed form over moe_route's table of tiles of TOK (8, 16 or 64)
// assignments; grid (ceil(N / 64), tile bound, splits). The tile size only sets how many
// assignments share a staged weight unit (8 for decode steps of a few tokens, where an expert
// rarely has more than one: a smaller staged unit and fewer instructions a weight than 16's).
// Writes split partials of the assignments' rows (part [splits][M = assignments][N]);
// gemm_splitk_reduce adds them in order with each assignment's expert bias. An assignment's
// result is the dense core's on its expert's matrix and its row of X.
#define MOE15P(TY, NAME, NT, TOKS)                                                          \
  extern "C" __global__ void __launch_bounds__(256) moe15p##TOKS##_##NAME(                 \
      const uint8_t* __restrict__ w, int N, int K, const int8_t* __restrict__ xhi,         \
      const int8_t* __restrict__ xlo, const float* __restrict__ xd,                        \
      const int* __restrict__ xsq, int M, int splits, float* __restrict__ part,            \
      const int* ntiles, const int4* tiles, const int* list, int topk, int per_slot,       \
      long long expert_bytes) {                                                            \
    pdl_start();                                                                           \
    gemm15pl<TY, NT, false, true>(w, N, K, xhi, xlo, xd, M, splits, {part, 0, 0, 0, 0, 0}, \
                                  {ntiles, tiles, list, topk, per_slot, expert_bytes});    \
  }
MOE15P(QT_MXFP4, mxfp4, 1, 8)
MOE15P(QT_MXFP4, mxfp4, 2, 16)
MOE15P(QT_MXFP4, mxfp4, 8, 64)
MOE15P(QT_Q8_0, q8_0, 1, 8)
MOE15P(QT_Q8_0, q8_0, 2, 16)
MOE15P(QT_Q8_0, q8_0, 8, 64)

// The ends of an integer MoE layer (gpt-oss), one launch each where there were several, with
// the same float steps in the same order, so the same bits:
// moe15_glu, per assignment m (expert e = experts[m]) and element n < N: the gate's and up's
// split partials (gpart / upart + z * sstride + m * N + n) added in split order, then each
// one's expert bias (gemm_splitk_reduce's steps), gpt-oss's clamped SwiGLU (swiglu_oai_f32's
// expression), and that row's 15-bit codes per 32 for the down product (quant_x15's, blk 32:
// hi, lo [M][N], d, sq [M][N / 32]). grid (ceil(N / 256), M), block 256, N a multiple of 32;
// an assignment with no valid expert writes nothing (the routing never lists it).
extern "C" __global__ void __launch_bounds__(256) moe15_glu(
    const float* __restrict__ gpart, const float* __restrict__ upart, int S, long long sstride,
    int M, int N, const float* __restrict__ gbias, const float* __restrict__ ubias,
    const int* __restrict__ experts, int n_expert, float alpha, float limit,
    int8_t* __restrict__ hi, int8_t* __restrict__ lo, float* __restrict__ d,
    int* __restrict__ sq) {
  pdl_start();
  const int n = blockIdx.x * 256 + threadIdx.x, m = blockIdx.y, lane = threadIdx.x & 31;
  if (n - lane >= N || m >= M) return;  // whole warps (N a multiple of 32)
  const int e = experts[m];
  if (e < 0 || e >= n_expert) return;  // the whole block
  const long long brow = (long long)e * N, off = (long long)m * N + n;
  float g = gpart[off], u = upart[off];
  for (int z = 1; z < S; ++z) {
    g += gpart[(long long)z * sstride + off];
    u += upart[(long long)z * sstride + off];
  }
  if (gbias) g += gbias[brow + n];
  if (ubias) u += ubias[brow + n];
  const float v = swiglu_oai(g, u, alpha, limit);
  const float dd = i15_scale(warp_max(fabsf(v)));  // the row's 32-group of this warp
  const int q = i15_codes32(v, dd, hi[off], lo[off]);
  if (lane == 0) {
    const long long b = (long long)m * (N / 32) + n / 32;
    sq[b] = q;
    d[b] = dd;
  }
}

// moe15_combine, per token t < T and element n < N: x[t][n] += the sum over its k slots (in
// order) of w[t k + s] times assignment t k + s's down output, its split partials added in
// order plus its expert's bias: gemm_splitk_reduce's and moe_combine_f32's steps in one
// launch. grid (ceil(N / 256), T), block 256.
extern "C" __global__ void __launch_bounds__(256) moe15_combine(
    float* __restrict__ x, const float* __restrict__ part, int S, long long sstride, int N,
    const float* __restrict__ bias, const int* __restrict__ experts, int n_expert,
    const float* __restrict__ w, int k) {
  pdl_start();
  const int n = blockIdx.x * 256 + threadIdx.x;
  const size_t t = blockIdx.y;
  if (n >= N) return;
  float acc = 0.0f;
  for (int s = 0; s < k; ++s) {
    const long long a = (long long)t * k + s;
    const int e = experts[a];
    if (e < 0 || e >= n_expert) continue;
    const float* p = part + a * N + n;
    float y = p[0];
    for (int z = 1; z < S; ++z) y += p[(long long)z * sstride];
    if (bias) y += bias[(long long)e * N + n];
    acc = fmaf(w[a], y, acc);
  }
  x[t * N + n] += acc;
}

// y[t][n] = the splits' partials added in order (split 0 first).
extern "C" __global__ void i15_reduce(const float* __restrict__ part, int N, int M, int splits,
                                      float* __restrict__ y) {
  const int n = blockIdx.x * blockDim.x + threadIdx.x, t = blockIdx.y;
  if (n >= N || t >= M) return;
  float acc = part[(size_t)t * N + n];
  for (int z = 1; z < splits; ++z) acc = __fadd_rn(acc, part[((size_t)z * M + t) * N + n]);
  y[(size_t)t * N + n] = acc;
}
