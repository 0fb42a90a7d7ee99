// Mixture-of-experts matmuls (gpt-oss): experts stored as one tensor W [n_expert][N][K]
// (ggml layout, expert e at W + e*expert_bytes), biases B [n_expert][N] fp32 (optional).
// Routing: ids [n_assign] int32, assignment a = t*topk + slot is token t's slot-th expert.
// Input of assignment a: X + t*ldx_tok + slot*ldx_slot (ldx_slot = 0: every slot reads the
// token's hidden state, as for gate/up; ldx_slot = K: per-slot inputs, as for down).
// Output of assignment a: Y + a*ldy.
//
// Decode (docs/kernels.md, MoE):
// moe_gemv_<type>[_r2|_r4]: grid (ceil(N / (4*RW)), n_assign), 4 warps a block; warp w of
//   block (b, a) owns rows (4b + w)*RW .. +RW of assignment a's expert: the dense gemv's
//   structure (every lane issues its 16-byte L1-bypassing loads of a chunk, stages them in
//   the warp's own shared slice, decodes; no block barrier), for one token. MXFP4 has its own
//   decoder (MoeDot below). An id outside [0, n_expert) writes NaN rows.
// Prefill:
// moe_route: one block. Per-expert counts, the assignments of each expert in ascending order
//   (a counting sort whose placement is a ballot scan per expert: no atomics decide an
//   order), and a table of token tiles (expert, first list entry, rows <= BM) into a device
//   workspace; ids outside [0, n_expert) are in no list.
// moe_gemm5_<type>_m128 / _m64: grid (tile bound, ceil(N/128)); block (i, y) takes tile i of
//   the table (blocks past the table's length exit) and runs gemm.cu's gemm2 core (128 weight
//   rows a block, raw weights staged by cp.async, ldmatrix) on its gathered token rows for
//   weight rows 128y... Assignments with an id outside [0, n_expert) are left unwritten (the
//   caller validated routing on the device).
// moe_skinny_<type>: decode steps (at most 16 rows an expert tile) on gemm.cu's skinny core,
//   the same bits as moe_gemm5.
#define GEMV_CORE_ONLY
#define GEMM_CORE_ONLY
#include "gemv.cu"
#include "gemm.cu"

// ---- decode ---------------------------------------------------------------------------------

// MoeDot<T>: one 8-element group g of a quant block (staged in shared memory at blk) times x
// into acc; the group's x values are x[xoff(g, 0) .. +4] and x[xoff(g, 1) .. +4] from the
// block's first element. Default: the dense gemv's G4<T>::dot (element 8g + i).
template <int T> struct MoeDot {
  static constexpr bool NEED_SX = G4<T>::NEED_SX;
  static __device__ __forceinline__ int xoff(int g, int h) { return 8 * g + 4 * h; }
  static __device__ __forceinline__ void dot(const uint8_t* blk, int /*boff*/, int g,
                                             const float (&xv)[1][8], const float (&sx)[1],
                                             float (&acc)[1]) {
    G4<T>::template dot<1>(blk, g, xv, sx, acc);
  }
};

// MXFP4 (e, qs[16]; element j < 16 = low nibble of qs[j], j + 16 = its high nibble; value =
// ggml's doubled e2m1 value v times e8m0_half(e)). Group g = the qs word g: elements 4g..4g+3
// (low nibbles) and 16+4g..16+4g+3 (high nibbles), so one 32-bit word holds the group's eight
// codes and its low/high halves are byte-permute selectors as they are: PRMT looks up a byte
// per 4-bit selector, bits 0-2 index the 8-byte table, bit 3 set replicates the sign of that
// byte (0x00 for the tables' bytes, all < 0x80). Two lookups (codes 0-7 in TP, codes 8-15 via
// selector ^ 0x8888 in TN) and an OR give per code the byte 0x80 | (12 + v) << 2, which one
// more PRMT turns into the float 1 + (12 + v)/32 (exact); so sum v x = 32 sum f x - 44 sum x,
// one PRMT and one FFMA per weight (the K-quant form of gemv.cu, G4<QT_Q4_K>).
// TP bytes (12 + {0,1,2,3,4,6,8,12}) << 2, TN bytes (12 - {0,1,2,3,4,6,8,12}) << 2.
#define MXFP4_TP0 0x3C383430u
#define MXFP4_TP1 0x60504840u
#define MXFP4_TN0 0x24282C30u
#define MXFP4_TN1 0x00101820u
// PTX prmt in its default mode (the selector's bit 3 replicates the sign); __byte_perm uses
// only bits 0-2 of each selector nibble.
__device__ __forceinline__ uint32_t prmt_sx(uint32_t a, uint32_t b, uint32_t sel) {
#ifdef KERNEL_EMU
  return emu::prmt(a, b, sel);
#else
  uint32_t d;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
  return d;
#endif
}
__device__ __forceinline__ uint32_t mxfp4_units(uint32_t sel) {
  const uint32_t pos = prmt_sx(MXFP4_TP0, MXFP4_TP1, sel);
  const uint32_t neg = prmt_sx(MXFP4_TN0, MXFP4_TN1, sel ^ 0x8888u);
  return pos | neg | 0x80808080u;
}
template <> struct MoeDot<QT_MXFP4> {
  static constexpr bool NEED_SX = true;
  static __device__ __forceinline__ int xoff(int g, int h) { return 4 * g + 16 * h; }
  // boff: blk's byte offset from a 4-byte aligned address
  static __device__ __forceinline__ void dot(const uint8_t* blk, int boff, int g,
                                             const float (&xv)[1][8], const float (&sx)[1],
                                             float (&acc)[1]) {
    // the word at blk + 1 + 4g (any alignment) from the two aligned words around it; the
    // stage slices are padded so the second word is always inside the array
    const uint8_t* p = blk + 1 + 4 * g;
    const int mis = (boff + 1) & 3;
    const uint32_t* q = reinterpret_cast<const uint32_t*>(p - mis);
    const uint32_t w = __funnelshift_r(q[0], q[1], 8 * mis);
    const uint32_t t0 = mxfp4_units(w), t1 = mxfp4_units(w >> 16);
    // t0: elements 4g, 16+4g, 4g+1, 16+4g+1; t1: 4g+2, 16+4g+2, 4g+3, 16+4g+3
    float dp = g4_unit(t0, 0) * xv[0][0];
    dp = fmaf(g4_unit(t0, 1), xv[0][4], dp);
    dp = fmaf(g4_unit(t0, 2), xv[0][1], dp);
    dp = fmaf(g4_unit(t0, 3), xv[0][5], dp);
    dp = fmaf(g4_unit(t1, 0), xv[0][2], dp);
    dp = fmaf(g4_unit(t1, 1), xv[0][6], dp);
    dp = fmaf(g4_unit(t1, 2), xv[0][3], dp);
    dp = fmaf(g4_unit(t1, 3), xv[0][7], dp);
    const float d = e8m0_half(blk[0]);
    acc[0] = fmaf(fmaf(dp, 32.f, -44.f * sx[0]), d, acc[0]);
  }
};

// Rows r0 .. r0+RW of the matrix at W + w_off (W 16-byte aligned, the whole tensor ends
// `total` bytes after W), one token: a warp's work, no block barrier. Chunks of CB whole quant
// blocks per row (<= 512*U bytes of 16-byte pieces); every lane issues its RW*U loads, stores
// them to the warp's slice, then decodes groups lane, lane+32, ...; a fixed shuffle tree per
// row, lane 0 writes y[row] (+ bias[row]).
template <int T, int RW, int U>
__device__ __forceinline__ void moe_gemv4_rows(const uint8_t* __restrict__ W, long long w_off,
                                               long long total, long long row_bytes, int N,
                                               int K, int r0, const float* __restrict__ x,
                                               const float* __restrict__ bias, float* y) {
  constexpr int BYTES = QTraits<T>::BYTES, QK = QTraits<T>::QK, GPB = QK / 8;
  constexpr int SPAN = 512 * U;            // bytes of one row's chunk in shared memory
  constexpr int CB = (SPAN - 15) / BYTES;  // whole blocks per chunk: start&15 <= 15
  static_assert(CB >= 1, "chunk too small for one block");
  // +16: MoeDot<MXFP4> reads the aligned word after its last byte
  __shared__ __align__(16) uint8_t sm[GEMV4_WARPS][RW][SPAN + 16];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nr = min(RW, N - r0);
  const int nblk = K / QK, nch = (nblk + CB - 1) / CB;
  uint8_t(*mine)[SPAN + 16] = sm[warp];
  float acc[RW][1];
#pragma unroll
  for (int r = 0; r < RW; ++r) acc[r][0] = 0.f;
  for (int ci = 0; ci < nch; ++ci) {
    const int j0 = ci * CB, cb = min(CB, nblk - j0);
    uint4 buf[RW][U];
    int n16[RW], coff[RW];
    long long a0[RW];
#pragma unroll
    for (int r = 0; r < RW; ++r) {
      const long long start = w_off + (long long)(r0 + r) * row_bytes + (long long)j0 * BYTES;
      coff[r] = (int)(start & 15);
      a0[r] = start & ~15LL;
      n16[r] = r < nr ? (coff[r] + cb * BYTES + 15) >> 4 : 0;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int qp = lane + 32 * u;
        if (qp < n16[r]) {
          const long long addr = a0[r] + 16LL * qp;
          buf[r][u] = addr + 16 <= total ? g4_ld16(W + addr)
                                         : g4_ld_tail(W + addr, (int)(total - addr));
        }
      }
    }
    __syncwarp();  // every lane is done decoding the previous chunk
#pragma unroll
    for (int r = 0; r < RW; ++r)
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int qp = lane + 32 * u;
        if (qp < n16[r]) *reinterpret_cast<uint4*>(&mine[r][16 * qp]) = buf[r][u];
      }
    __syncwarp();
    const int ngroups = cb * GPB;
    for (int qg = lane; qg < ngroups; qg += 32) {
      // K-quants (32 groups a block): lane l always takes group l
      const int jj = GPB == 32 ? qg >> 5 : qg / GPB, g = GPB == 32 ? lane : qg % GPB;
      const float* xb = x + (long long)(j0 + jj) * QK;
      float xv[1][8];
      const float4 lo = __ldg(reinterpret_cast<const float4*>(xb + MoeDot<T>::xoff(g, 0)));
      const float4 hi = __ldg(reinterpret_cast<const float4*>(xb + MoeDot<T>::xoff(g, 1)));
      xv[0][0] = lo.x; xv[0][1] = lo.y; xv[0][2] = lo.z; xv[0][3] = lo.w;
      xv[0][4] = hi.x; xv[0][5] = hi.y; xv[0][6] = hi.z; xv[0][7] = hi.w;
      float sx[1] = {0.f};
      if (MoeDot<T>::NEED_SX) {
#pragma unroll
        for (int i = 0; i < 8; ++i) sx[0] += xv[0][i];
      }
#pragma unroll
      for (int r = 0; r < RW; ++r)
        if (r < nr) {
          const int boff = coff[r] + jj * BYTES;
          MoeDot<T>::dot(&mine[r][boff], boff, g, xv, sx, acc[r]);
        }
    }
  }
#pragma unroll
  for (int r = 0; r < RW; ++r) {
    float v = acc[r][0];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0 && r < nr) y[r0 + r] = bias ? v + bias[r0 + r] : v;
  }
}

// Block (blockIdx.x, a) of moe_gemv: rows (4 blockIdx.x + warp)*RW .. of assignment a.
template <int T, int RW, int U>
__device__ __forceinline__ void moe_gemv4_entry(const uint8_t* W, long long expert_bytes,
                                                long long row_bytes, int N, int K, int n_expert,
                                                const int* ids, int topk, const float* X,
                                                long long ldx_tok, long long ldx_slot,
                                                const float* B, float* Y, long long ldy, int a) {
  const int e = ids[a];
  float* y = Y + (long long)a * ldy;
  if (e < 0 || e >= n_expert) {
    const int r = blockIdx.x * GEMV4_WARPS * RW + threadIdx.x;
    if (threadIdx.x < GEMV4_WARPS * RW && r < N) y[r] = __int_as_float(0x7fc00000);
    return;
  }
  const int r0 = (blockIdx.x * GEMV4_WARPS + (threadIdx.x >> 5)) * RW;
  if (r0 >= N) return;  // warp-uniform; no block barrier follows
  const int t = a / topk, slot = a % topk;
  moe_gemv4_rows<T, RW, U>(W, (long long)e * expert_bytes, (long long)n_expert * expert_bytes,
                           row_bytes, N, K, r0,
                           X + (long long)t * ldx_tok + (long long)slot * ldx_slot,
                           B ? B + (long long)e * N : nullptr, y);
}

// ---- prefill: routing pre-pass ----------------------------------------------------------------
#define MOE_ROUTE_THREADS 1024
#define MOE_MAX_EXPERTS 1024

// Workspace: ntiles[0] = number of tiles; tiles[i] = (expert, first entry of list, rows, 0);
// list = assignment indices grouped by expert (experts ascending), ascending within one.
extern "C" __global__ void __launch_bounds__(MOE_ROUTE_THREADS)
    moe_route(const int* __restrict__ ids, int n_assign, int n_expert, int bm, int* ntiles,
              int4* tiles, int* list) {
  __shared__ int s_cnt[MOE_MAX_EXPERTS], s_off[MOE_MAX_EXPERTS], s_tile[MOE_MAX_EXPERTS];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  constexpr int NWARP = MOE_ROUTE_THREADS / 32;
  for (int e = tid; e < n_expert; e += MOE_ROUTE_THREADS) s_cnt[e] = 0;
  __syncthreads();
  for (int a = tid; a < n_assign; a += MOE_ROUTE_THREADS) {  // counts: order-independent
    const int e = ids[a];
    if (e >= 0 && e < n_expert) atomicAdd(&s_cnt[e], 1);
  }
  __syncthreads();
  if (warp == 0) {  // exclusive scans of the counts and of the tiles per expert
    int off = 0, nt = 0;
    for (int e0 = 0; e0 < n_expert; e0 += 32) {
      const int e = e0 + lane;
      const int c = e < n_expert ? s_cnt[e] : 0, tc = (c + bm - 1) / bm;
      int ci = c, ti = tc;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const int cu = __shfl_up_sync(0xffffffffu, ci, o), tu = __shfl_up_sync(0xffffffffu, ti, o);
        if (lane >= o) {
          ci += cu;
          ti += tu;
        }
      }
      if (e < n_expert) {
        s_off[e] = off + ci - c;
        s_tile[e] = nt + ti - tc;
      }
      off += __shfl_sync(0xffffffffu, ci, 31);
      nt += __shfl_sync(0xffffffffu, ti, 31);
    }
    if (lane == 0) ntiles[0] = nt;
  }
  __syncthreads();
  // placement: warp w scans the ids in order for experts w, w + NWARP, ...
  for (int e = warp; e < n_expert; e += NWARP) {
    const int end = s_off[e] + s_cnt[e];
    int pos = s_off[e];
    for (int c0 = 0; c0 < n_assign && pos < end; c0 += 32) {
      const int a = c0 + lane;
      const bool hit = a < n_assign && ids[a] == e;
      const unsigned bal = __ballot_sync(0xffffffffu, hit);
      if (hit) list[pos + __popc(bal & ((1u << lane) - 1u))] = a;
      pos += __popc(bal);
    }
  }
  for (int e = tid; e < n_expert; e += MOE_ROUTE_THREADS) {
    const int c = s_cnt[e], off = s_off[e], t0 = s_tile[e];
    for (int j = 0; j * bm < c; ++j) tiles[t0 + j] = make_int4(e, off + j * bm, min(bm, c - j * bm), 0);
  }
}

// ---- prefill: gemm over the routed tiles ------------------------------------------------------
// The row offsets of tile tl (expert tl.x, tl.z assignments from list[tl.y]): row r reads
// X + s_xoff[r] and writes Y + s_yoff[r], -1 past the tile's rows; ends with a barrier.
template <int BM>
__device__ __forceinline__ void moe_tile_rows(int4 tl, const int* list, int topk,
                                              long long ldx_tok, long long ldx_slot,
                                              long long ldy, long long* s_xoff,
                                              long long* s_yoff) {
  const int tid = threadIdx.x;
  if (tid < BM) {
    long long xo = -1, yo = -1;
    if (tid < tl.z) {
      const int a = list[tl.y + tid];
      const int t = a / topk, slot = a % topk;
      xo = (long long)t * ldx_tok + (long long)slot * ldx_slot;
      yo = (long long)a * ldy;
    }
    s_xoff[tid] = xo;
    s_yoff[tid] = yo;
  }
  __syncthreads();
}

// moe_gemm5_<type>_m<BM> (docs/kernels.md, MoE: routed prefill on the gemm2 core): the
// tile table of moe_route, 128 weight rows a block (grid (tile bound,
// ceil(N/128)), 256 threads, dynamic shared memory g2::Smem<T, BM>): block (i, y) takes tile i
// (its expert's matrix at W + expert*expert_bytes, any alignment) and runs the dense gemm2 core
// with gathered rows (GA): row r of the tile reads X + xoff[r] and writes Y + yoff[r] (-1: no
// row, nothing read or written). Bias per expert; no residual. Split K as the dense gemm2:
// kps > 0 K steps a split, split blockIdx.z writing its plain partial sums at Y + z*sstride
// (gemm_splitk_reduce then adds them in order, then the expert's bias).
template <int T, int BM>
__device__ __forceinline__ void moe_gemm5_entry(const uint8_t* W, long long expert_bytes,
                                                long long row_bytes, int N, int K,
                                                const int* ntiles, const int4* tiles,
                                                const int* list, int topk, const float* X,
                                                long long ldx_tok, long long ldx_slot,
                                                const float* B, float* Y, long long ldy,
                                                int kps, long long sstride) {
  __shared__ long long s_xoff[BM], s_yoff[BM];
  if ((int)blockIdx.x >= ntiles[0]) return;  // uniform: past the table
  const int4 tl = tiles[blockIdx.x];
  moe_tile_rows<BM>(tl, list, topk, ldx_tok, ldx_slot, ldy, s_xoff, s_yoff);
  g2::run<T, BM, false, float, true>(W, row_bytes, N, K, X, 0, 0,
                                     B ? B + (long long)tl.x * N : nullptr, nullptr, Y, 0,
                                     s_xoff, s_yoff, (long long)tl.x * expert_bytes, kps,
                                     sstride);
}

// moe_skinny_<type> (decode steps): the routed tiles of moe_route with bm = 16 on gemm.cu's
// skinny core: grid (tile bound, ceil(ceil(N / 8) / G)), block (i, y) computes weight rows
// y*G*8 .. +G*8 of tile i's expert for the tile's rows in S splits of kps K steps (its G*S
// items over its warps), the splits summed in order, then the expert's bias: moe_gemm5's
// bits with the same split; dynamic shared memory NW * sk::Smem<T>::warp + G * S *
// sk::Smem<T>::item.
// moe_skinny_<type>_pair: the same over two expert tensors of one type and shape (gpt-oss's
// gate and up) read by the same routed tiles, W2 with its bias B2 into its output Y2: grid y
// doubled, blocks y >= ceil(ceil(N / 8) / G) take W2's rows. At one token one launch for both
// fills the GPU better than two; each row's arithmetic is the one-tensor kernel's. (A
// separate kernel: choosing the tensor at run time cost the one-tensor launches 2-3 %.)
template <int T, bool PAIR>
__device__ __forceinline__ void moe_skinny_entry(const uint8_t* W, long long expert_bytes,
                                                 long long row_bytes, int N, int K,
                                                 const int* ntiles, const int4* tiles,
                                                 const int* list, int topk, const float* X,
                                                 long long ldx_tok, long long ldx_slot,
                                                 const float* B, float* Y, long long ldy,
                                                 int S, int kps, int G,
                                                 const uint8_t* W2 = nullptr,
                                                 const float* B2 = nullptr,
                                                 float* Y2 = nullptr) {
  __shared__ long long s_xoff[16], s_yoff[16];
  if ((int)blockIdx.x >= ntiles[0]) return;  // uniform: past the table
  int by = blockIdx.y;
  if (PAIR) {
    const int per_w = ((N + sk::ROWS - 1) / sk::ROWS + G - 1) / G;  // y blocks a tensor
    if (by >= per_w) {
      W = W2;
      B = B2;
      Y = Y2;
      by -= per_w;
    }
  }
  const int4 tl = tiles[blockIdx.x];
  moe_tile_rows<16>(tl, list, topk, ldx_tok, ldx_slot, ldy, s_xoff, s_yoff);
  skinny_run<T>(W, (long long)tl.x * expert_bytes, row_bytes, N, K, X, s_xoff, s_yoff,
                B ? B + (long long)tl.x * N : nullptr, nullptr, Y, S, kps, G, by * G);
}

#define MOE_GEMV_ARGS                                                                      \
  const uint8_t *W, long long expert_bytes, long long row_bytes, int N, int K, int n_expert, \
      const int *ids, int topk, const float *X, long long ldx_tok, long long ldx_slot,       \
      const float *B, float *Y, long long ldy
#define MOE_GEMV_PASS \
  W, expert_bytes, row_bytes, N, K, n_expert, ids, topk, X, ldx_tok, ldx_slot, B, Y, ldy, blockIdx.y
#define MOE_GEMM_ARGS                                                                         \
  const uint8_t *W, long long expert_bytes, long long row_bytes, int N, int K,               \
      const int *ntiles, const int4 *tiles, const int *list, int topk, const float *X,       \
      long long ldx_tok, long long ldx_slot, const float *B, float *Y, long long ldy, int S, \
      int kps, long long sstride, int G
#define MOE_GEMM_PASS \
  W, expert_bytes, row_bytes, N, K, ntiles, tiles, list, topk, X, ldx_tok, ldx_slot, B, Y, ldy

// The paired MXFP4 kernel (gpt-oss's gate and up) at 64 registers, as ptxas compiles the
// one-tensor one: 32 warps an SM. Left to itself ptxas gave it ~100 and 19 warps, and steps of
// 8-64 tokens ran 10 % slower; the other types keep their own counts (a 64-register cap
// spills 30-140 bytes for them).
#define SKINNY_PAIR_MIN_BLOCKS(TY) ((TY) == QT_MXFP4 ? 2 : 1)

#define MOE_INST(TY, NAME)                                                                     \
  extern "C" __global__ void __launch_bounds__(32 * GEMV4_WARPS)                               \
      moe_gemv_##NAME(MOE_GEMV_ARGS) {                                                         \
    moe_gemv4_entry<TY, 1, 8>(MOE_GEMV_PASS);                                                  \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(32 * GEMV4_WARPS)                               \
      moe_gemv_##NAME##_r2(MOE_GEMV_ARGS) {                                                    \
    moe_gemv4_entry<TY, 2, 4>(MOE_GEMV_PASS);                                                  \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(32 * GEMV4_WARPS)                               \
      moe_gemv_##NAME##_r4(MOE_GEMV_ARGS) {                                                    \
    moe_gemv4_entry<TY, 4, 2>(MOE_GEMV_PASS);                                                  \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(256, 2) moe_gemm5_##NAME##_m128(MOE_GEMM_ARGS) { \
    moe_gemm5_entry<TY, 128>(MOE_GEMM_PASS, kps, sstride);                                     \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(256, 2) moe_gemm5_##NAME##_m64(MOE_GEMM_ARGS) {  \
    moe_gemm5_entry<TY, 64>(MOE_GEMM_PASS, kps, sstride);                                      \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(512) moe_skinny_##NAME(MOE_GEMM_ARGS) {         \
    moe_skinny_entry<TY, false>(MOE_GEMM_PASS, S, kps, G);                                     \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(512, SKINNY_PAIR_MIN_BLOCKS(TY))                 \
      moe_skinny_##NAME##_pair(MOE_GEMM_ARGS, const uint8_t* W2, const float* B2, float* Y2) { \
    moe_skinny_entry<TY, true>(MOE_GEMM_PASS, S, kps, G, W2, B2, Y2);                          \
  }
FOR_EACH_QTYPE(MOE_INST)
