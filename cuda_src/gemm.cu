// Matrix products on tensor cores: Y[m] = W X[m] (+ bias) (+ residual[m]) for m rows, i.e.
// Y = X Wᵀ with X [M][K] fp32, W [N][K] in any ggml type of quant.cuh, Y [M][N] fp32.
//
// mma.sync.m16n8k16 with fp16 operands and fp32 accumulation (sm_80 and sm_90). Kernels:
// gemm2/gemm3 (prefill and batched decode, 64- or 128-row tiles), skinny (decode steps of
// 1-16 rows in one launch, the same arithmetic), gemm_splitk_reduce (the in-order sum of
// split-K partials) and gemm_x16 (gemm3's fp16 X pre-pass); docs/kernels.md says why each is
// shaped so. Rounding: X and W are rounded to fp16 (relative 2^-11 each), products are exact
// in fp32 and the sums are fp32, so the error of a K-long dot is about 2^-11 * ||x|| ||w|| /
// sqrt(K)-ish relative to the inputs; |X| must stay below 65504 (fp16 range). No atomics:
// bit-identical run to run, and with splits fixed per matrix shape the same bits for a row
// whatever the other rows of the launch.
//
// Rows of a token tile are addressed through per-row offsets in shared memory (s_xoff,
// s_yoff; -1 = no row) so that moe.cu reuses the cores with gathered tokens.
#include "quant.cuh"

// (Under tools/kernel_emu the PTX helpers below have plain C++ stand-ins: the mma from its
// fragment layout, cp.async as an immediate copy, ldmatrix from its row addresses.)
__device__ __forceinline__ void mma16816(float c[4], const uint32_t a[4], const uint32_t b[2]) {
#ifdef KERNEL_EMU
  emu::mma_m16n8k16_f16(c, a, b);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// ---- gemm v2 tile geometry (also outside the kernels: host code and tests read Smem) ----
namespace g2 {
constexpr int BN = 128, BK = 32, LD = 40, THREADS = 256;
template <int T> struct Cfg {
  static constexpr int QK = QTraits<T>::QK, BYTES = QTraits<T>::BYTES;
  static constexpr int KC = QK > 128 ? QK : 128;       // elements per raw chunk
  static constexpr int SEG = KC / QK * BYTES;           // bytes of a row's chunk
  static constexpr int WIN = (SEG + 30) / 16 * 16;      // >= 16-byte cover of any SEG bytes
  static constexpr int NPC = WIN / 16;                  // pieces per row and chunk (at most)
  static constexpr int P = (NPC % 2 == 0) ? WIN + 16 : WIN;  // row pitch: odd 16-byte count
  static constexpr int SPC = KC / BK;                   // K steps per chunk
};
template <int T, int BM> struct Smem {
  static constexpr int bytes = 2 * (BM + BN) * LD * 2 + 2 * BN * Cfg<T>::P;
};
// gemm3 (fp16 X from a pre-pass, cp.async into XS stages): XS X tiles instead of 2.
constexpr int XS = 3;
template <int T, int BM> struct Smem3 {
  static constexpr int bytes = (XS * BM + 2 * BN) * LD * 2 + 2 * BN * Cfg<T>::P;
};

}  // namespace g2

// skinny's shared memory (below): per warp NST raw chunks of its 8 rows (the ring of chunks
// in flight) and the fp16 tile of one chunk (rows of KC + 8 halves: conflict-free fragment
// loads); then 16 x 8 fp32 partials per item. NST is 4 for the quantized types (a raw row
// chunk of at most 256 bytes), 2 for f16/bf16/f32, whose chunks are larger.
namespace sk {
constexpr int ROWS = 8;  // weight rows of a warp's tile (the mma's n)
template <int T> struct Smem {
  static constexpr int TLD = g2::Cfg<T>::KC + 8;  // halves per tile row
  static constexpr int NST = g2::Cfg<T>::P <= 256 ? 4 : 2;  // raw chunks in the ring
  static constexpr int warp = NST * ROWS * g2::Cfg<T>::P + ROWS * TLD * 2;
  static constexpr int item = 16 * ROWS * 4;
};
}  // namespace sk

// ---- gemm v2 (dense prefill; docs/kernels.md, gemm) ------------------------------------------
// gemm2_<type>_m128 / _m64: a block of 256 threads (8 warps, 2 x 4) computes BM tokens x 128
// weight rows (warp tile BM/2 x 32, mma.sync m16n8k16 fp16 -> fp32), K step 32. Per block:
// * the raw quantized bytes of the W tile travel global -> shared by cp.async, one chunk of
//   KC = max(QK, 128) elements per row (16-byte pieces covering the row's byte range; the one
//   piece that would cross the end of the matrix is copied with byte loads), double-buffered
//   a whole chunk ahead, so dequantization never waits on global memory;
// * each K step's W tile (128 x 32) is dequantized once (dequant8h from shared memory) into a
//   padded fp16 tile, one step ahead of the tensor cores;
// * the X tile (fp32) is requested into registers one step ahead, converted to fp16 and stored
//   after the current step's mma (|X| < 65504 assumed);
// * fragments come from ldmatrix.x4 (80-byte rows: conflict-free); one __syncthreads per step
//   plus one per chunk. No atomics: bit-identical run to run. Split K (a fixed number of
//   splits per matrix shape, never per row count, so a row's sum is the same in any batch):
//   each split a plain partial, summed in order by gemm_splitk_reduce.
// gemm3_<type>_m128 / _m64: the same with X already fp16 (gemm_x16 pre-pass into a workspace):
// the X tile goes global -> shared by cp.async through 3 stages, two steps ahead, with no
// conversion and no registers held; one __syncthreads per step (the chunk waits ride on it).
// Shared memory is dynamic (g2::Smem<T, BM>::bytes, g2::Smem3 for gemm3, mirrored by gemm2_smem_bytes in plans/dense.py
// and checked against it in tests/unit/cuda/test_matmul_args.py); the kernel traps if launched
// with less.
namespace g2 {
__device__ __forceinline__ void cp16(void* dst, const void* src) {
#ifdef KERNEL_EMU
  emu::copy16(dst, src, 16);
#else
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(src) : "memory");
#endif
}
// 16 bytes, or 16 zero bytes when !valid (nothing read)
__device__ __forceinline__ void cp16z(void* dst, const void* src, bool valid) {
  const int n = valid ? 16 : 0;
#ifdef KERNEL_EMU
  emu::copy16(dst, src, n);
#else
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src), "r"(n)
               : "memory");
#endif
}
__device__ __forceinline__ void cp_commit() {
#ifndef KERNEL_EMU
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int N> __device__ __forceinline__ void cp_wait() {
#ifndef KERNEL_EMU
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}
__device__ __forceinline__ void ldsm4(uint32_t r[4], const __half* p) {
#ifdef KERNEL_EMU
  emu::ldmatrix_x4(r, p);
#else
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
#endif
}
// bytes of dynamic shared memory this launch has
__device__ __forceinline__ unsigned dyn_smem_bytes() {
#ifdef KERNEL_EMU
  return emu::dyn_smem_size();
#else
  unsigned dyn;
  asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dyn));
  return dyn;
#endif
}

// XH = false: gemm2 (X fp32, converted in the kernel, one step ahead through registers).
// XH = true: gemm3 (X already fp16, row stride ldx halves, 16-byte aligned rows: cp.async into
// XS stages, XS-1 steps ahead; no conversion, no registers held; one barrier per step).
// GA = true (gathered rows, moe.cu's routed gemm; gemm2 only): token row r of the tile is
// X + gx[r] and Y + gy[r] (gx, gy: BM offsets in shared memory, -1 = no row; ldx, ldy, M and
// blockIdx.x unused) and the matrix starts w_off bytes after W (any alignment; W itself
// 16-byte aligned). GA = false compiles to the dense kernels as before (w_off, gx, gy unused).
// Split K (dense only): kps > 0 K steps per split (a multiple of a raw chunk's steps), split
// blockIdx.z taking steps z*kps .. and writing its plain partial sums (no bias, no residual)
// at Y + z*sstride; gemm_splitk_reduce then adds the splits in order. kps = 0: one pass.
template <int T, int BM, bool XH, typename XT, bool GA = false>
__device__ __forceinline__ void run(const uint8_t* __restrict__ W, long long row_bytes, int N,
                                    int K, const XT* __restrict__ X, long long ldx, int M,
                                    const float* __restrict__ bias, const float* residual,
                                    float* Y, long long ldy, const long long* gx = nullptr,
                                    const long long* gy = nullptr, long long w_off = 0,
                                    int kps = 0, long long sstride = 0) {
  static_assert(!(GA && XH), "gathered rows: gemm2 (fp32 X) only");
  using C = Cfg<T>;
  constexpr int MI = BM / 32;                          // m16 tiles per warp
  constexpr int XL = BM * (BK / 4) / THREADS;          // float4 X loads per thread: 4 or 2
  constexpr int XP = BM * (BK / 8) / THREADS;          // 16-byte fp16 X pieces per thread: 2 or 1
  constexpr int WL = BN * (BK / 8) / THREADS;          // 8-element W groups per thread: 2
  constexpr int CPI = (BN * C::NPC + THREADS - 1) / THREADS;  // piece slots per thread
  constexpr int NXS = XH ? XS : 2;                     // X tiles in shared memory
  constexpr int SMEM = XH ? Smem3<T, BM>::bytes : Smem<T, BM>::bytes;
  extern __shared__ __align__(16) uint8_t g2_smem[];
  __half* As = reinterpret_cast<__half*>(g2_smem);     // [NXS][BM * LD]
  __half* Bs = As + NXS * BM * LD;                     // [2][BN * LD]
  uint8_t* Raw = reinterpret_cast<uint8_t*>(Bs + 2 * BN * LD);  // [2][BN * P]
  if (g2::dyn_smem_bytes() < static_cast<unsigned>(SMEM)) __trap();
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp >> 2, wn = warp & 3, gq = lane >> 2, cq = lane & 3;
  const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
  const int nk_all = K / BK, nc_all = (K + C::KC - 1) / C::KC;
  // this block's K steps [k0, nk) and raw chunks [k0 / SPC, nc)
  const int k0 = kps > 0 ? static_cast<int>(blockIdx.z) * kps : 0;
  const int nk = kps > 0 ? min(nk_all, k0 + kps) : nk_all;
  const int nc = kps > 0 ? min(nc_all, (nk + C::SPC - 1) / C::SPC) : nc_all;
  const int c0 = k0 / C::SPC;
  if (kps > 0) {
    Y += static_cast<long long>(blockIdx.z) * sstride;
    bias = nullptr;
    residual = nullptr;
  }
  const long long wo = GA ? w_off : 0LL;  // GA = false: the constant 0
  const long long wend = wo + (long long)N * row_bytes;
  const unsigned rb15 = static_cast<unsigned>(row_bytes & 15);
  const unsigned wo15 = static_cast<unsigned>(wo & 15);

  // raw bytes of chunk c (elements c*KC ..) of the block's rows -> Raw[c & 1]
  auto issue_chunk = [&](int c) {
    uint8_t* dst = Raw + (c & 1) * (BN * C::P);
    const long long cb = (long long)c * C::SEG;
    const long long rest = row_bytes - cb;
    const int seg = rest < C::SEG ? static_cast<int>(rest) : C::SEG;
#pragma unroll
    for (int i = 0; i < CPI; ++i) {
      const int idx = tid + i * THREADS;
      if (idx >= BN * C::NPC) break;
      const int r = idx / C::NPC, p = idx - r * C::NPC;
      const int n = n0 + r;
      if (n >= N) continue;
      const long long a = wo + (long long)n * row_bytes + cb;
      const long long gp = (a & ~15LL) + 16 * p;
      if (gp >= a + seg) continue;
      uint8_t* d = dst + r * C::P + 16 * p;
      if (gp + 16 <= wend) {
        cp16(d, W + gp);
      } else {
        for (int b = 0; b < 16; ++b) d[b] = gp + b < wend ? W[gp + b] : 0;
      }
    }
  };
  // dequantize K step kt (its chunk is in Raw) -> Bs[buf]
  auto dequant_step = [&](int kt, int buf) {
    const int c = kt / C::SPC;
    const int ke = (kt - c * C::SPC) * BK;
    const uint8_t* src = Raw + (c & 1) * (BN * C::P);
    __half* dst = Bs + buf * (BN * LD);
    const unsigned coff = static_cast<unsigned>(c) * static_cast<unsigned>(C::SEG & 15);
#pragma unroll
    for (int i = 0; i < WL; ++i) {
      const int idx = tid + i * THREADS, r = idx >> 2, gi = idx & 3;
      const int n = n0 + r;
      uint4 v = make_uint4(0, 0, 0, 0);
      if (n < N) {
        const unsigned off = (wo15 + static_cast<unsigned>(n) * rb15 + coff) & 15u;
        const int e = ke + 8 * gi;
        uint32_t h[4];
        dequant8h<T>(src + r * C::P + off + (e / C::QK) * C::BYTES, (e % C::QK) >> 3, h);
        v = make_uint4(h[0], h[1], h[2], h[3]);
      }
      *reinterpret_cast<uint4*>(dst + r * LD + 8 * gi) = v;
    }
  };
  float4 xr[XH ? 1 : XL];
  auto load_x = [&](int kt) {
    if constexpr (!XH) {
#pragma unroll
      for (int i = 0; i < XL; ++i) {
        const int idx = tid + i * THREADS, row = idx >> 3, c4 = idx & 7;
        if constexpr (GA) {
          const long long xo = gx[row];
          xr[i] = xo >= 0 ? __ldg(reinterpret_cast<const float4*>(X + xo + kt * BK + 4 * c4))
                          : make_float4(0.f, 0.f, 0.f, 0.f);
        } else {
          const int m = m0 + row;
          xr[i] = m < M ? __ldg(reinterpret_cast<const float4*>(X + (long long)m * ldx +
                                                                kt * BK + 4 * c4))
                        : make_float4(0.f, 0.f, 0.f, 0.f);
        }
      }
    }
  };
  auto store_x = [&](int buf) {
    if constexpr (!XH) {
#pragma unroll
      for (int i = 0; i < XL; ++i) {
        const int idx = tid + i * THREADS, row = idx >> 3, c4 = idx & 7;
        *reinterpret_cast<uint2*>(As + buf * (BM * LD) + row * LD + 4 * c4) =
            make_uint2(q_pack_h2(xr[i].x, xr[i].y), q_pack_h2(xr[i].z, xr[i].w));
      }
    }
  };
  // gemm3: the fp16 X tile of step kt -> As[stage] by cp.async (rows past M: zeros)
  const XT* xrow[XH ? XP : 1];
  bool xok[XH ? XP : 1];
  if constexpr (XH) {
#pragma unroll
    for (int i = 0; i < XP; ++i) {
      const int idx = tid + i * THREADS, row = idx >> 2, p = idx & 3;
      const int m = m0 + row;
      xok[i] = m < M;
      xrow[i] = X + (xok[i] ? (long long)m * ldx : 0) + 8 * p;
    }
  }
  auto issue_x = [&](int kt, int stage) {
    if constexpr (XH) {
#pragma unroll
      for (int i = 0; i < XP; ++i) {
        const int idx = tid + i * THREADS, row = idx >> 2, p = idx & 3;
        cp16z(As + stage * (BM * LD) + row * LD + 8 * p, xrow[i] + (xok[i] ? kt * BK : 0),
              xok[i]);
      }
    }
  };

  float acc[MI][4][4];
#pragma unroll
  for (int i = 0; i < MI; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

  // ldmatrix lane addresses (halves) within a buffer
  const int a_off = (wm * (BM / 2) + (lane & 15)) * LD + (lane >> 4) * 8;
  const int b_off = (wn * 32 + (lane & 7) + ((lane >> 4) << 3)) * LD + ((lane >> 3) & 1) * 8;

  auto mma_step = [&](const __half* Ab, const __half* Bb) {
#pragma unroll
    for (int ks = 0; ks < BK; ks += 16) {
      uint32_t a[MI][4], b[4][2];
#pragma unroll
      for (int mi = 0; mi < MI; ++mi) ldsm4(a[mi], Ab + a_off + mi * 16 * LD + ks);
#pragma unroll
      for (int nj = 0; nj < 2; ++nj) {
        uint32_t t[4];
        ldsm4(t, Bb + b_off + nj * 16 * LD + ks);
        b[2 * nj][0] = t[0];
        b[2 * nj][1] = t[1];
        b[2 * nj + 1][0] = t[2];
        b[2 * nj + 1][1] = t[3];
      }
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) mma16816(acc[mi][ni], a[mi], b[ni]);
    }
  };

  // programmatic dependent launch: the weights (which no earlier kernel writes) are requested
  // before waiting for the previous kernel; X and every write come after the wait
  pdl_trigger();
  if constexpr (!XH) {
    issue_chunk(c0);
    cp_commit();
    if (c0 + 1 < nc) issue_chunk(c0 + 1);
    cp_commit();
    pdl_wait();
    load_x(k0);
    cp_wait<1>();
    __syncthreads();
    dequant_step(k0, k0 & 1);
    store_x(k0 & 1);
    __syncthreads();

    for (int kt = k0; kt < nk; ++kt) {
      const int buf = kt & 1;
      const bool more = kt + 1 < nk;
      if (more) {
        if ((kt + 1) % C::SPC == 0) {  // step kt+1 opens chunk c: chunk c+1's buffer is free
          const int c = (kt + 1) / C::SPC;
          if (c + 1 < nc) issue_chunk(c + 1);
          cp_commit();
          cp_wait<1>();       // chunk c has landed (this thread's pieces) ...
          __syncthreads();  // ... and everyone's
        }
        dequant_step(kt + 1, buf ^ 1);
        load_x(kt + 1);  // after the dequant: its registers are not held through it
      }
      mma_step(As + buf * (BM * LD), Bs + buf * (BN * LD));
      if (more) store_x(buf ^ 1);
      __syncthreads();
    }
  } else {
    // cp.async groups: group i holds X(i) (+ a raw chunk); groups 0 and 1 are issued here,
    // iteration kt commits group kt+2 (X(kt+2), and chunk c+1 when step kt+1 opens chunk c).
    static_assert(XS == 3, "the group bookkeeping below assumes 3 X stages");
    static_assert(C::SPC >= XS - 1, "a raw chunk must land before its first step");
    issue_chunk(c0);
    pdl_wait();
    issue_x(k0, k0 % XS);
    cp_commit();
    if (k0 + 1 < nk) issue_x(k0 + 1, (k0 + 1) % XS);
    if (c0 + 1 < nc) issue_chunk(c0 + 1);
    cp_commit();
    cp_wait<1>();  // group 0: X(k0) and chunk c0 (this thread's pieces) ...
    __syncthreads();  // ... and everyone's
    dequant_step(k0, k0 & 1);
    __syncthreads();
    for (int kt = k0; kt < nk; ++kt) {
      // X(kt+2) -> stage (kt+2) % 3 = that of step kt-1, whose mma ended before the barrier
      // that closed the last iteration
      if (kt + 2 < nk) issue_x(kt + 2, (kt + 2) % XS);
      if ((kt + 1) % C::SPC == 0) {  // step kt+1 opens chunk c; chunk c+1 goes to the buffer
        const int c = (kt + 1) / C::SPC;  // of chunk c-1, last read by the dequant of step kt
        if (c + 1 < nc) issue_chunk(c + 1);  // (last iteration, before its closing barrier)
      }
      cp_commit();  // group kt+2
      // chunk of step kt+1: in a group <= kt, complete since the last closing barrier
      if (kt + 1 < nk) dequant_step(kt + 1, (kt + 1) & 1);
      mma_step(As + (kt % XS) * (BM * LD), Bs + (kt & 1) * (BN * LD));
      cp_wait<1>();       // groups <= kt+1 complete: X(kt+1) (this thread's pieces) ...
      __syncthreads();  // ... everyone's, and Bs[(kt+1) & 1]; stage kt % 3 free again
    }
  }

#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int m = m0 + wm * (BM / 2) + mi * 16 + gq + 8 * h;
      long long yo;
      if constexpr (GA) {
        yo = gy[m - m0];
        if (yo < 0) continue;
      } else {
        if (m >= M) continue;
        yo = (long long)m * ldy;
      }
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
}  // namespace g2

// ---- skinny: gemm2's products for a decode step (at most 16 rows), in one launch -----------
// Batch invariance fixes a row's arithmetic per weight shape: split z of S (gemm_split) sums
// mma.m16n8k16 products (fp16 X and W as gemm2 rounds them, fp32 accumulators) over its K
// steps in order from zero; gemm_splitk_reduce adds the splits in order, then bias, then the
// residual. For a decode step that arithmetic in gemm2's 64-row tiles multiplies mostly zero
// rows, in N/128 blocks a split, and needs the reduce launch. skinny does the same arithmetic
// (same instruction, same operand roundings, same K order and split ranges, same order of the
// final sums, so every output bit equals gemm2's) with one warp per (8 weight rows, split):
// the weight chunks go global -> the warp's shared memory by cp.async through a ring of NST
// chunks, NST - 1 ahead (a split of a few chunks has all of them requested before the PDL
// wait); per chunk the warp first loads the X fragments of all its K steps (fp32 from global
// memory, converted as gemm2 converts), dequantizes all its steps into the warp's fp16 tile
// (one warp barrier), then runs the chunk's mma chain; the splits meet in shared memory.
// Item i < G*S of a block is (row tile tile0 + i / S, split i % S); warp w takes items w,
// w + NW, ... (NW = blockDim.x / 32). kps = 0: one split over all of K (S must be 1).
// Rows: row r < 16 reads X + s_xoff[r] and writes Y + s_yoff[r] (-1: no row), set by the
// caller before a barrier; the matrix starts w_off bytes after W (any alignment).
// Dynamic shared memory: NW * sk::Smem<T>::warp + G * S * sk::Smem<T>::item bytes
// (skinny_warp_bytes and SKINNY_ITEM_BYTES in plans/dense.py); the kernel traps with less.
template <int T>
__device__ __forceinline__ void skinny_run(const uint8_t* __restrict__ W, long long w_off,
                                           long long row_bytes, int N, int K,
                                           const float* __restrict__ X, const long long* s_xoff,
                                           const long long* s_yoff,
                                           const float* __restrict__ bias,
                                           const float* residual, float* Y, int S, int kps,
                                           int G, int tile0) {
  using C = g2::Cfg<T>;
  constexpr int RB = sk::ROWS;
  extern __shared__ __align__(16) uint8_t sk_smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nw = blockDim.x >> 5;
  const int gq = lane >> 2, cq = lane & 3;
  if (g2::dyn_smem_bytes() < static_cast<unsigned>(nw * sk::Smem<T>::warp + G * S * sk::Smem<T>::item))
    __trap();
  constexpr int NST = sk::Smem<T>::NST;
  uint8_t* raw = sk_smem + warp * sk::Smem<T>::warp;                // [NST][RB * P]
  __half* tile = reinterpret_cast<__half*>(raw + NST * RB * C::P);  // [RB * TLD]
  float* part = reinterpret_cast<float*>(sk_smem + nw * sk::Smem<T>::warp);  // [G*S][16][RB]
  const int nk_all = K / g2::BK, nc_all = (K + C::KC - 1) / C::KC;
  const long long wend = w_off + (long long)N * row_bytes;
  const unsigned rb15 = static_cast<unsigned>(row_bytes & 15);
  const unsigned wo15 = static_cast<unsigned>(w_off & 15);
  const long long xo0 = s_xoff[gq], xo1 = s_xoff[gq + 8];  // this lane's A rows

  pdl_trigger();
  bool waited = false;
  for (int item = warp; item < G * S; item += nw) {
    const int t = item / S, z = item - t * S;
    const int n0 = (tile0 + t) * RB;
    if (n0 >= N) continue;
    const int k0 = kps > 0 ? z * kps : 0;
    const int nk = kps > 0 ? min(nk_all, k0 + kps) : nk_all;
    const int c0 = k0 / C::SPC, nc = kps > 0 ? min(nc_all, (nk + C::SPC - 1) / C::SPC) : nc_all;
    auto issue_chunk = [&](int c) {
      uint8_t* dst = raw + (c % NST) * (RB * C::P);
      const long long cb = (long long)c * C::SEG;
      const long long rest = row_bytes - cb;
      const int seg = rest < C::SEG ? static_cast<int>(rest) : C::SEG;
      for (int idx = lane; idx < RB * C::NPC; idx += 32) {
        const int r = idx / C::NPC, p = idx - r * C::NPC;
        const int n = n0 + r;
        if (n >= N) continue;
        const long long a = w_off + (long long)n * row_bytes + cb;
        const long long gp = (a & ~15LL) + 16 * p;
        if (gp >= a + seg) continue;
        uint8_t* d = dst + r * C::P + 16 * p;
        if (gp + 16 <= wend) {
          g2::cp16(d, W + gp);
        } else {
          for (int b = 0; b < 16; ++b) d[b] = gp + b < wend ? W[gp + b] : 0;
        }
      }
    };
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    // chunks c0 .. c0 + NST - 2 in flight, one commit group each (empty past the split)
#pragma unroll
    for (int a = 0; a < NST - 1; ++a) {
      if (c0 + a < nc) issue_chunk(c0 + a);
      g2::cp_commit();
    }
    if (!waited) {  // weights before the wait, activations after (pdl.cuh)
      pdl_wait();
      waited = true;
    }
    for (int c = c0; c < nc; ++c) {
      // into the slot of chunk c - 1, read by every lane before the last __syncwarp
      if (c + NST - 1 < nc) issue_chunk(c + NST - 1);
      g2::cp_commit();
      const uint8_t* src = raw + (c % NST) * (RB * C::P);
      const unsigned coff = static_cast<unsigned>(c) * static_cast<unsigned>(C::SEG & 15);
      const int kbase = c * C::SPC, nst = min(nk, kbase + C::SPC) - kbase;  // steps here
      // the chunk's A fragments of row gq (a0, a2; half2 words), requested before waiting
      // for its weights; row gq + 8's (a1, a3) are loaded in the chain, only when the tile
      // has more than 8 rows (registers)
      uint32_t xa[C::SPC][2][2];
#pragma unroll
      for (int j = 0; j < C::SPC; ++j)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int k = (kbase + j) * g2::BK + 16 * h + 2 * cq;
          xa[j][h][0] = xa[j][h][1] = 0u;
          if (j < nst && xo0 >= 0) {
            const float2 lo = __ldg(reinterpret_cast<const float2*>(X + xo0 + k));
            const float2 hi = __ldg(reinterpret_cast<const float2*>(X + xo0 + k + 8));
            xa[j][h][0] = q_pack_h2(lo.x, lo.y);
            xa[j][h][1] = q_pack_h2(hi.x, hi.y);
          }
        }
      g2::cp_wait<NST - 1>();  // chunk c (this lane's pieces) ...
      __syncwarp();             // ... and the warp's
      // dequantize the chunk's steps: lane = (row gq, 8-element group cq of each step)
      const int n = n0 + gq;
#pragma unroll
      for (int j = 0; j < C::SPC; ++j) {
        if (j >= nst) break;
        const int e = j * g2::BK + 8 * cq;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (n < N) {
          const unsigned off = (wo15 + static_cast<unsigned>(n) * rb15 + coff) & 15u;
          uint32_t h[4];
          dequant8h<T>(src + gq * C::P + off + (e / C::QK) * C::BYTES, (e % C::QK) >> 3, h);
          v = make_uint4(h[0], h[1], h[2], h[3]);
        }
        *reinterpret_cast<uint4*>(tile + gq * sk::Smem<T>::TLD + e) = v;
      }
      __syncwarp();
      // the chain: steps in order, k16 halves in order (gemm2's order)
#pragma unroll
      for (int j = 0; j < C::SPC; ++j) {
        if (j >= nst) break;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const __half* bp = tile + gq * sk::Smem<T>::TLD + j * g2::BK + 16 * h + 2 * cq;
          uint32_t a[4] = {xa[j][h][0], 0u, xa[j][h][1], 0u}, b[2];
          if (xo1 >= 0) {
            const int k = (kbase + j) * g2::BK + 16 * h + 2 * cq;
            const float2 lo = __ldg(reinterpret_cast<const float2*>(X + xo1 + k));
            const float2 hi = __ldg(reinterpret_cast<const float2*>(X + xo1 + k + 8));
            a[1] = q_pack_h2(lo.x, lo.y);
            a[3] = q_pack_h2(hi.x, hi.y);
          }
          b[0] = *reinterpret_cast<const uint32_t*>(bp);
          b[1] = *reinterpret_cast<const uint32_t*>(bp + 8);
          mma16816(acc, a, b);
        }
      }
      __syncwarp();  // the tile and this raw buffer are rewritten for the next chunks
    }
    // acc: rows gq (0, 1) and gq + 8 (2, 3), weight rows n0 + 2cq (+1)
    float* pz = part + item * 16 * RB;
    pz[gq * RB + 2 * cq] = acc[0];
    pz[gq * RB + 2 * cq + 1] = acc[1];
    pz[(gq + 8) * RB + 2 * cq] = acc[2];
    pz[(gq + 8) * RB + 2 * cq + 1] = acc[3];
  }
  if (!waited) pdl_wait();
  __syncthreads();
  // the splits in order, then bias, then the residual: gemm_splitk_reduce's sums (S = 1:
  // gemm2's epilogue)
  for (int idx = tid; idx < G * 16 * RB; idx += blockDim.x) {
    const int t = idx / (16 * RB), m = (idx / RB) % 16, j = idx % RB;
    const int n = (tile0 + t) * RB + j;
    const long long yo = s_yoff[m];
    if (yo < 0 || n >= N) continue;
    const float* p = part + (t * S) * 16 * RB + m * RB + j;
    float s = p[0];
    for (int z = 1; z < S; ++z) s += p[z * 16 * RB];
    if (bias) s += bias[n];
    if (residual) s += residual[yo + n];
    Y[yo + n] = s;
  }
}

#ifndef GEMM_CORE_ONLY
#define GEMM2_INST(TY, NAME)                                                                 \
  extern "C" __global__ void __launch_bounds__(256, 2) gemm2_##NAME##_m128(                 \
      const uint8_t* W, long long row_bytes, int N, int K, const float* X, long long ldx,   \
      int M, const float* bias, const float* residual, float* Y, long long ldy, int kps,    \
      long long sstride) {                                                                   \
    g2::run<TY, 128, false>(W, row_bytes, N, K, X, ldx, M, bias, residual, Y, ldy, nullptr, \
                            nullptr, 0, kps, sstride);                                       \
  }                                                                                          \
  extern "C" __global__ void __launch_bounds__(256, 2) gemm2_##NAME##_m64(                  \
      const uint8_t* W, long long row_bytes, int N, int K, const float* X, long long ldx,   \
      int M, const float* bias, const float* residual, float* Y, long long ldy, int kps,    \
      long long sstride) {                                                                   \
    g2::run<TY, 64, false>(W, row_bytes, N, K, X, ldx, M, bias, residual, Y, ldy, nullptr,  \
                           nullptr, 0, kps, sstride);                                        \
  }                                                                                          \
  extern "C" __global__ void __launch_bounds__(256, 2) gemm3_##NAME##_m128(                 \
      const uint8_t* W, long long row_bytes, int N, int K, const __half* X, long long ldx,  \
      int M, const float* bias, const float* residual, float* Y, long long ldy, int kps,    \
      long long sstride) {                                                                   \
    g2::run<TY, 128, true>(W, row_bytes, N, K, X, ldx, M, bias, residual, Y, ldy, nullptr,  \
                           nullptr, 0, kps, sstride);                                        \
  }                                                                                          \
  extern "C" __global__ void __launch_bounds__(256, 2) gemm3_##NAME##_m64(                  \
      const uint8_t* W, long long row_bytes, int N, int K, const __half* X, long long ldx,  \
      int M, const float* bias, const float* residual, float* Y, long long ldy, int kps,    \
      long long sstride) {                                                                   \
    g2::run<TY, 64, true>(W, row_bytes, N, K, X, ldx, M, bias, residual, Y, ldy, nullptr,   \
                          nullptr, 0, kps, sstride);                                         \
  }
FOR_EACH_QTYPE(GEMM2_INST)

// Split-K sum: Y[m][n] = ((part[0][m][n] + part[1][m][n]) + ...) + bias[n] + residual[m][n]
// over S splits in order (part rows of N floats, splits sstride floats apart); residual has
// Y's layout and may be Y itself. experts (moe.cu's routed gemm): row m is an assignment to
// expert experts[m]; a row whose expert is outside [0, n_expert) is left unwritten (as the
// routed gemm leaves it), and bias is [n_expert][N], row m adding its expert's row.
// grid (ceil(N / 256), M), 256 threads.
extern "C" __global__ void __launch_bounds__(256) gemm_splitk_reduce(
    const float* __restrict__ part, int S, long long sstride, int M, int N,
    const float* __restrict__ bias, const float* residual, float* Y, long long ldy,
    const int* __restrict__ experts, int n_expert) {
  pdl_start();
  const int n = blockIdx.x * 256 + threadIdx.x, m = blockIdx.y;
  if (n >= N || m >= M) return;
  long long brow = 0;
  if (experts) {
    const int e = experts[m];
    if (e < 0 || e >= n_expert) return;
    brow = (long long)e * N;
  }
  const float* p = part + (long long)m * N + n;
  float s = p[0];
  for (int z = 1; z < S; ++z) s += p[(long long)z * sstride];
  if (bias) s += bias[brow + n];
  const long long yo = (long long)m * ldy + n;
  if (residual) s += residual[yo];
  Y[yo] = s;
}


// skinny_<type>: the dense form, rows m < M of X (stride ldx) and Y (stride ldy); grid
// ceil(ceil(N / 8) / G) blocks.
template <int T>
__device__ __forceinline__ void skinny_entry(const uint8_t* W, long long row_bytes, int N, int K,
                                             const float* X, long long ldx, int M,
                                             const float* bias, const float* residual, float* Y,
                                             long long ldy, int S, int kps, int G) {
  __shared__ long long s_xoff[16], s_yoff[16];
  if (threadIdx.x < 16) {
    const int m = threadIdx.x;
    s_xoff[m] = m < M ? (long long)m * ldx : -1;
    s_yoff[m] = m < M ? (long long)m * ldy : -1;
  }
  __syncthreads();
  skinny_run<T>(W, 0, row_bytes, N, K, X, s_xoff, s_yoff, bias, residual, Y, S, kps, G,
                blockIdx.x * G);
}

#define SKINNY_INST(TY, NAME)                                                                \
  extern "C" __global__ void __launch_bounds__(512) skinny_##NAME(                          \
      const uint8_t* W, long long row_bytes, int N, int K, const float* X, long long ldx,   \
      int M, const float* bias, const float* residual, float* Y, long long ldy, int S,      \
      int kps, int G) {                                                                      \
    skinny_entry<TY>(W, row_bytes, N, K, X, ldx, M, bias, residual, Y, ldy, S, kps, G);     \
  }
FOR_EACH_QTYPE(SKINNY_INST)

// gemm3's pre-pass: Xh[m][k] = fp16(X[m][k]) for m < M, k < K (K a multiple of 8, X rows
// 16-byte aligned); grid (M, ceil(K / 1024)), 128 threads, 8 elements a thread.
extern "C" __global__ void __launch_bounds__(128) gemm_x16(const float* __restrict__ X,
                                                          long long ldx, int M, int K,
                                                          __half* __restrict__ Xh,
                                                          long long ldh) {
  pdl_start();
  const int m = blockIdx.x, k = 8 * (blockIdx.y * 128 + threadIdx.x);
  if (m >= M || k >= K) return;
  const float4* src = reinterpret_cast<const float4*>(X + (long long)m * ldx + k);
  const float4 a = __ldg(src), b = __ldg(src + 1);
  *reinterpret_cast<uint4*>(Xh + (long long)m * ldh + k) =
      make_uint4(q_pack_h2(a.x, a.y), q_pack_h2(a.z, a.w), q_pack_h2(b.x, b.y),
                 q_pack_h2(b.z, b.w));
}
#endif
