// Attention over the FP16 KV cache for prefill (many query rows) and decode (one row), causal,
// GQA/MHA, optional sliding window and gpt-oss sinks. Split-K over the key length, one
// launch: each block of attn_split computes, per (query row, head, key chunk), the chunk's
// max score m, the sum of exp(score - m) l and the unnormalised exp-weighted sum of values;
// the last block of a (row, head) to finish (a ticket counter, reset by that block) merges
// the chunks in a fixed order, so results are bit-identical run to run whatever order the
// blocks ran in (the atomic only picks which block merges, never the order of a sum).
//
// The query position is pos0[0] + row, read from device memory, and the chunk length is
// derived in the kernel from the current key length (ceil((pos0 + n_tokens) / n_split)), so
// one captured decode graph with a fixed grid covers every step and every block has work;
// chunks with no visible key write l = 0 and are skipped by the combine.
#include "rope.cuh"

#define AT 128  // threads per attn_split block; head_dim <= AT, head_dim % 8 == 0

// One chunk's partial result (see attn_split). Loads are batched (a key row's 16-byte
// pieces, eight value rows) so that several are in flight per thread: a decode step is
// latency-bound, not bandwidth-bound.
template <bool kDecode>
__device__ __forceinline__ void attn_chunk(
    const float* __restrict__ q, int q_stride, const __half* __restrict__ kc,
    const __half* __restrict__ vc, float* __restrict__ opart, float* __restrict__ ml, float* sp,
    float* sq, float* sacc, float* sh, size_t pidx, int t, int h, int n_head, int n_kv,
    int head_dim, int j0, int j1, float scale, const __half* kcur, const __half* vcur,
    int cur_jj) {
  // kcur/vcur (shared memory): key and value of chunk entry cur_jj when they are not read
  // from the cache (the fused decode path); q is then already in sq, scaled.
  const int kh = h / (n_head / n_kv);
  if (q) {
    const float* qr = q + (size_t)t * q_stride + (size_t)h * head_dim;
    for (int d = threadIdx.x; d < head_dim; d += AT) sq[d] = qr[d] * scale;
  }
  __syncthreads();
  const int n = j1 - j0;
  float lmax = -CUDART_INF_F;
  for (int jj = threadIdx.x; jj < n; jj += AT) {
    const uint4* kr = reinterpret_cast<const uint4*>(kc + ((size_t)(j0 + jj) * n_kv + kh) * head_dim);
    uint4 raw[AT / 8];
    if (jj == cur_jj) {
#pragma unroll
      for (int c = 0; c < AT / 8; ++c)
        if (c * 8 < head_dim) raw[c] = reinterpret_cast<const uint4*>(kcur)[c];
    } else {
#pragma unroll
      for (int c = 0; c < AT / 8; ++c)
        if (c * 8 < head_dim) raw[c] = __ldg(kr + c);
    }
    float acc = 0.0f;
#pragma unroll
    for (int c = 0; c < AT / 8; ++c) {
      if (c * 8 < head_dim) {
        const __half2* h2 = reinterpret_cast<const __half2*>(&raw[c]);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float2 f = __half22float2(h2[e]);
          acc = fmaf(sq[c * 8 + 2 * e], f.x, acc);
          acc = fmaf(sq[c * 8 + 2 * e + 1], f.y, acc);
        }
      }
    }
    sp[jj] = acc;
    lmax = fmaxf(lmax, acc);
  }
  const float m = block_max(lmax, sh);
  float lsum = 0.0f;
  for (int jj = threadIdx.x; jj < n; jj += AT) {
    const float p = expf(sp[jj] - m);
    sp[jj] = p;
    lsum += p;
  }
  const float l = block_sum(lsum, sh);  // its barriers also publish sp
  const int G = AT / head_dim, g = threadIdx.x / head_dim, d = threadIdx.x % head_dim;
  float acc = 0.0f;
  if (kDecode && g < G) {
    // VB value rows per batch, all requested before the first is used (predicated at the
    // end of the chunk, so a short chunk is one round trip, not one per leftover row); the
    // sum runs over the rows in the same order as a row-at-a-time loop would. Decode only:
    // for prefill (many blocks, throughput-bound) it measured 18-23 % slower (pp512).
    constexpr int VB = 16;
    const unsigned short* vb =
        reinterpret_cast<const unsigned short*>(vc) + (size_t)kh * head_dim + d;
    const size_t vstride = (size_t)n_kv * head_dim;
    for (int jj = g; jj < n; jj += VB * G) {
      unsigned short r[VB];  // raw halves, all requested before any is used
#pragma unroll
      for (int u = 0; u < VB; ++u)  // past the chunk: its last row again, unused
        r[u] = __ldg(vb + (size_t)(j0 + min(jj + u * G, n - 1)) * vstride);
#pragma unroll
      for (int u = 0; u < VB; ++u) {
        const int j = jj + u * G;
        const float v = j == cur_jj ? __half2float(vcur[d]) : __half2float(__ushort_as_half(r[u]));
        if (j < n) acc = fmaf(sp[j], v, acc);
      }
    }
  }
  if (!kDecode && g < G) {
    const unsigned short* vb =
        reinterpret_cast<const unsigned short*>(vc) + (size_t)kh * head_dim + d;
    const size_t vstride = (size_t)n_kv * head_dim;
    int jj = g;
    for (; jj + 7 * G < n; jj += 8 * G) {
      float v[8];
#pragma unroll
      for (int u = 0; u < 8; ++u)
        v[u] = jj + u * G == cur_jj
                   ? __half2float(vcur[d])
                   : __half2float(__ushort_as_half(__ldg(vb + (size_t)(j0 + jj + u * G) * vstride)));
#pragma unroll
      for (int u = 0; u < 8; ++u) acc = fmaf(sp[jj + u * G], v[u], acc);
    }
    for (; jj < n; jj += G)
      acc = fmaf(sp[jj],
                 jj == cur_jj
                     ? __half2float(vcur[d])
                     : __half2float(__ushort_as_half(__ldg(vb + (size_t)(j0 + jj) * vstride))),
                 acc);
  }
  sacc[threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.x < head_dim) {
    float o = 0.0f;
    for (int gg = 0; gg < G; ++gg) o += sacc[gg * head_dim + threadIdx.x];
    opart[pidx * head_dim + threadIdx.x] = o;
  }
  if (threadIdx.x == 0) {
    ml[2 * pidx] = m;
    ml[2 * pidx + 1] = l;
  }
}

// The last block of a (row, head) to arrive merges its chunks (see the file comment).
__device__ __forceinline__ void attn_merge(
    const float* __restrict__ ml, const float* __restrict__ opart, const float* __restrict__ sinks,
    float* __restrict__ out, int out_stride, unsigned int* __restrict__ tickets, float* sacc,
    float* scw, float* sh, unsigned int& s_ticket, int t, int h, int n_head, int head_dim,
    int n_split) {
  __threadfence();
  __syncthreads();
  const unsigned int slot = (unsigned int)t * n_head + h;
  if (threadIdx.x == 0) s_ticket = atomicAdd(&tickets[slot], 1u);
  __syncthreads();
  if (s_ticket != (unsigned int)(n_split - 1)) return;
  __threadfence();
  const size_t base = ((size_t)t * n_head + h) * n_split;
  if (threadIdx.x < n_split) {  // n_split <= AT (host-checked)
    scw[threadIdx.x] = __ldcg(&ml[2 * (base + threadIdx.x)]);
    sacc[threadIdx.x] = __ldcg(&ml[2 * (base + threadIdx.x) + 1]);
  }
  __syncthreads();
  if (threadIdx.x == 0) {  // fixed order over the chunks
    float M = sinks ? sinks[h] : -CUDART_INF_F;
    for (int c = 0; c < n_split; ++c)
      if (sacc[c] > 0.0f) M = fmaxf(M, scw[c]);
    float L = sinks ? expf(sinks[h] - M) : 0.0f;
    for (int c = 0; c < n_split; ++c) {
      const float w = sacc[c] > 0.0f ? expf(scw[c] - M) : 0.0f;
      if (sacc[c] > 0.0f) L += sacc[c] * w;
      scw[c] = w;  // chunk weight; 0 for an empty chunk
    }
    sh[0] = 1.0f / L;
  }
  __syncthreads();
  const float inv = sh[0];
  for (int d = threadIdx.x; d < head_dim; d += AT) {
    float o = 0.0f;
#pragma unroll 8
    for (int c = 0; c < n_split; ++c) {
      const float v = sacc[c] > 0.0f ? __ldcg(&opart[(base + c) * head_dim + d]) : 0.0f;
      o += v * scw[c];
    }
    out[(size_t)t * out_stride + (size_t)h * head_dim + d] = o * inv;
  }
  if (threadIdx.x == 0) tickets[slot] = 0u;  // ready for the next launch (graph replay)
}

// grid (n_split, n_head, n_tokens), block AT.
// q: row t, head h at q + t*q_stride + h*head_dim (float). kc/vc: [ctx][n_kv][head_dim] half.
// opart: [n_tokens][n_head][n_split][head_dim]; ml: [n_tokens][n_head][n_split][2].
// Key j is visible to query position p iff j <= p and (window <= 0 or p - j < window).
// Dynamic shared memory: max_chunk floats (the host sizes it for the largest key length).
// sinks: per-head logit that joins the softmax denominator only (gpt-oss), or null.
// out row t at out + t*out_stride. tickets: n_tokens*n_head zeroed uints (left zeroed).
extern "C" __global__ void __launch_bounds__(AT)
    attn_split(const float* __restrict__ q, int q_stride, const __half* __restrict__ kc,
               const __half* __restrict__ vc, float* __restrict__ opart, float* __restrict__ ml,
               const int* __restrict__ pos0, int n_tokens, int n_head, int n_kv, int head_dim,
               int n_split, int max_chunk, float scale, int window,
               const float* __restrict__ sinks, float* __restrict__ out, int out_stride,
               unsigned int* __restrict__ tickets) {
  extern __shared__ float sp[];
  __shared__ float sq[AT];
  __shared__ float sacc[AT];
  __shared__ float scw[AT];
  __shared__ float sh[32];
  __shared__ unsigned int s_ticket;
  pdl_start();
  const int s = blockIdx.x, h = blockIdx.y, t = blockIdx.z;
  const int qpos = pos0[0] + t;
  int chunk = (pos0[0] + n_tokens + n_split - 1) / n_split;
  if (chunk > max_chunk) chunk = 0;  // the host never allows this; write nothing out of bounds
  const int kv_begin = window > 0 ? max(0, qpos - window + 1) : 0;
  const int j0 = max(kv_begin, s * chunk), j1 = min(qpos + 1, (s + 1) * chunk);
  const size_t pidx = ((size_t)t * n_head + h) * n_split + s;
  if (j0 >= j1) {
    if (threadIdx.x == 0) {
      ml[2 * pidx] = -CUDART_INF_F;
      ml[2 * pidx + 1] = 0.0f;
    }
  } else {
    attn_chunk<false>(q, q_stride, kc, vc, opart, ml, sp, sq, sacc, sh, pidx, t, h, n_head, n_kv,
               head_dim, j0, j1, scale, nullptr, nullptr, -1);
  }
  attn_merge(ml, opart, sinks, out, out_stride, tickets, sacc, scw, sh, s_ticket, t, h, n_head,
             head_dim, n_split);
}

// Decode (one token) with the RoPE + KV-store stage fused in: qkv holds the token's raw
// [q | k | v] projections (biases added). Each block rotates its q head itself; the block
// whose chunk ends at the current position takes that key and value from the projections
// (rotated, rounded to FP16 exactly as the cache would hold them) instead of the cache, and
// one block per KV head (q head h % gqa == 0) stores them into the cache for later steps.
// Same arithmetic as qkv_rope_store followed by attn_split. grid (n_split, n_head), block AT.
extern "C" __global__ void __launch_bounds__(AT)
    attn_decode_rope(const float* __restrict__ qkv, __half* __restrict__ kc,
                     __half* __restrict__ vc, float* __restrict__ opart, float* __restrict__ ml,
                     const int* __restrict__ pos0, int n_head, int n_kv, int head_dim,
                     int n_split, int max_chunk, float scale, int window,
                     const float* __restrict__ sinks, float* __restrict__ out,
                     unsigned int* __restrict__ tickets, const double* __restrict__ inv_freq,
                     float mscale, int mode, int n_rot, int ctx) {
  extern __shared__ float sp[];
  __shared__ float sq[AT];
  __shared__ float sacc[AT];
  __shared__ float scw[AT];
  __shared__ float sh[32];
  __shared__ float sraw[AT];
  __shared__ float skraw[AT];
  __shared__ double sfreq[AT / 2];
  __shared__ __align__(16) __half kcur[AT];
  __shared__ __align__(16) __half vcur[AT];
  pdl_start();
  __shared__ unsigned int s_ticket;
  const int s = blockIdx.x, h = blockIdx.y;
  const int gqa = n_head / n_kv, kh = h / gqa;
  // Everything that does not depend on the position is requested first, in one round trip
  // with the position itself: this block's q head, its KV head's k and v, the RoPE
  // frequencies (head_dim <= AT, so one element per thread).
  const int tid = threadIdx.x;
  float qraw = 0.0f, kraw = 0.0f, vraw = 0.0f;
  if (tid < head_dim) {
    qraw = qkv[(size_t)h * head_dim + tid];
    kraw = qkv[(size_t)(n_head + kh) * head_dim + tid];
    vraw = qkv[(size_t)(n_head + n_kv + kh) * head_dim + tid];
  }
  if (mode != 0 && tid < (n_rot >> 1)) sfreq[tid] = inv_freq[tid];
  const int pos = pos0[0];
  const double dpos = (double)pos;
  int chunk = (pos + 1 + n_split - 1) / n_split;
  if (chunk > max_chunk || pos >= ctx) chunk = 0;  // never allowed by the host
  const int kv_begin = window > 0 ? max(0, pos - window + 1) : 0;
  const int j0 = max(kv_begin, s * chunk), j1 = min(pos + 1, (s + 1) * chunk);
  const size_t pidx = (size_t)h * n_split + s;
  // q head h, rotated and scaled; the current key (rotated) and value when this block's
  // chunk ends at the position
  const bool has_cur = j0 < j1 && j1 - 1 == pos;
  if (tid < head_dim) {
    sraw[tid] = qraw;
    skraw[tid] = kraw;
    vcur[tid] = __float2half_rn(vraw + 0.0f);
  }
  __syncthreads();
  if (tid < head_dim) {
    sq[tid] = rope_elem(sraw, tid, n_rot, mode, dpos, sfreq, mscale) * scale;
    if (has_cur)
      kcur[tid] = __float2half_rn(rope_elem(skraw, tid, n_rot, mode, dpos, sfreq, mscale));
  }
  __syncthreads();
  if (has_cur) {
    if (h % gqa == 0) {
      const size_t crow = ((size_t)pos * n_kv + kh) * head_dim;
      for (int d = threadIdx.x; d < head_dim; d += AT) {
        kc[crow + d] = kcur[d];
        vc[crow + d] = vcur[d];
      }
    }
  }
  if (j0 >= j1) {
    if (threadIdx.x == 0) {
      ml[2 * pidx] = -CUDART_INF_F;
      ml[2 * pidx + 1] = 0.0f;
    }
  } else {
    attn_chunk<true>(nullptr, 0, kc, vc, opart, ml, sp, sq, sacc, sh, pidx, 0, h, n_head, n_kv,
               head_dim, j0, j1, scale, kcur, vcur, has_cur ? j1 - 1 - j0 : -1);
  }
  attn_merge(ml, opart, sinks, out, head_dim * n_head, tickets, sacc, scw, sh, s_ticket, 0, h,
             n_head, head_dim, n_split);
}

// ==================================================================== tensor-core prefill
// attn_prefill_tc_d<D>: FlashAttention-2-style prefill attention on the tensor cores,
// one launch, no workspace, no atomics. A block of 4 warps takes 64 query rows (16 a warp)
// of one query head; it streams 64-key tiles of its KV head's K and V from the FP16 cache
// through shared memory (cp.async, two stages: the next tile is in flight while this one is
// used), S = Q K^T and O += P V with mma.sync m16n8k16 (fp16 operands, fp32 accumulators),
// and an online softmax in fp32 per row: a running max m (log2 domain: q is scaled by
// scale * log2(e) before its FP16 conversion, so p = exp2(s - m)) and a running sum l of the
// FP16-rounded p that the P V product uses (numerator and denominator see the same p).
// Key j is visible to query position p = pos0[0] + t iff j <= p and (window <= 0 or
// p - j < window), as in attn_split; tiles wholly past the block's causal limit or before
// its window are never loaded. The sink logit (gpt-oss) joins the denominator at the end.
// Every sum runs in a fixed order: bit-identical run to run.
// The first block (blockIdx.x 0) takes the last (longest) query tile.
#define TC_BM 64
#define TC_BN 64
#define TC_THREADS 128  // 4 warps; __launch_bounds__(.., 2): no spills at D = 128 (208 regs)

__device__ __forceinline__ unsigned tc_smem(const void* p) {
  return (unsigned)__cvta_generic_to_shared(p);
}

// 16 bytes global -> shared; src_bytes 0 writes zeros and reads nothing.
__device__ __forceinline__ void tc_cp16(unsigned dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void tc_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void tc_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void tc_ldm4(unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3,
                                        unsigned addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}
__device__ __forceinline__ void tc_ldm4t(unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3,
                                         unsigned addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}

// c += a (16x16, row) * b (16x8, col); fp16 inputs, fp32 accumulators.
__device__ __forceinline__ void tc_mma(float* c, const unsigned* a, unsigned b0, unsigned b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats as a half2 (lo in the low 16 bits: the lower column of an mma fragment).
__device__ __forceinline__ unsigned tc_pack(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const unsigned*>(&h);
}

// q: row t, head h at q + t*q_stride + h*D (fp32, RoPE applied; 8-byte aligned rows).
// kc/vc: [ctx][n_kv][D] half. out row t at out + t*out_stride (+ h*D). grid
// (ceil(n_tokens / 64), n_head), block 128, dynamic shared memory 2*2*64*(D+8) halves.
// scale_log2: the softmax scale times log2(e). sinks: one logit per head (natural log
// domain, as the model stores it) or null.
template <int D>
__device__ __forceinline__ void attn_prefill_tc_body(
    const float* __restrict__ q, int q_stride, const __half* __restrict__ kc,
    const __half* __restrict__ vc, const int* __restrict__ pos0p, int n_tokens, int n_head,
    int n_kv, float scale_log2, int window, const float* __restrict__ sinks,
    float* __restrict__ out, int out_stride) {
  constexpr int LD = D + 8;  // halves per shared row: 16 bytes of padding, conflict-free
  constexpr int KS = D / 16;  // k-steps of Q K^T
  constexpr int NT = D / 8;  // 8-wide column tiles of O
  constexpr int CH = D / 8;  // 16-byte pieces per K or V row
  extern __shared__ __align__(16) unsigned char tc_smem_raw[];
  __half* sK = reinterpret_cast<__half*>(tc_smem_raw);  // [2][TC_BN][LD]
  __half* sV = sK + 2 * TC_BN * LD;  // [2][TC_BN][LD]

  const int n_qt = (n_tokens + TC_BM - 1) / TC_BM;
  const int qt = n_qt - 1 - (int)blockIdx.x;
  const int h = blockIdx.y;
  const int kh = h / (n_head / n_kv);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, tig = lane & 3;
  const int pos0 = pos0p[0];
  const int t_first = qt * TC_BM;
  const int t_last = min(t_first + TC_BM, n_tokens) - 1;
  const int kv_hi = pos0 + t_last + 1;  // keys [kv_lo, kv_hi) are visible to some row
  const int kv_lo = window > 0 ? max(0, pos0 + t_first - window + 1) : 0;
  const int tile0 = kv_lo / TC_BN, tile1 = (kv_hi + TC_BN - 1) / TC_BN;
  const size_t kv_row = (size_t)n_kv * D;  // halves from one position to the next

  // this thread's two rows: t0 (fragment row g) and t1 (row g + 8) of the warp's 16;
  // rows past n_tokens compute on the last row's data and are not stored
  const int t0 = t_first + warp * 16 + g, t1 = t0 + 8;
  const int tq0 = min(t0, n_tokens - 1), tq1 = min(t1, n_tokens - 1);
  const int qp0 = pos0 + tq0, qp1 = pos0 + tq1;

  // Q as A fragments (row-major 16x16 per k-step), scaled, FP16, held for the whole block
  unsigned qa[KS][4];
  {
    const float* q0 = q + (size_t)tq0 * q_stride + (size_t)h * D + 2 * tig;
    const float* q1 = q + (size_t)tq1 * q_stride + (size_t)h * D + 2 * tig;
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
      const float2 a = *reinterpret_cast<const float2*>(q0 + ks * 16);
      const float2 b = *reinterpret_cast<const float2*>(q1 + ks * 16);
      const float2 c = *reinterpret_cast<const float2*>(q0 + ks * 16 + 8);
      const float2 d = *reinterpret_cast<const float2*>(q1 + ks * 16 + 8);
      qa[ks][0] = tc_pack(a.x * scale_log2, a.y * scale_log2);
      qa[ks][1] = tc_pack(b.x * scale_log2, b.y * scale_log2);
      qa[ks][2] = tc_pack(c.x * scale_log2, c.y * scale_log2);
      qa[ks][3] = tc_pack(d.x * scale_log2, d.y * scale_log2);
    }
  }

  // K and V rows of tile `tile` into stage `st`; rows outside [kv_lo, kv_hi) are zeroed
  // (never read: they may lie past the cache or hold stale values)
  auto load_tile = [&](int tile, int st) {
    const int j0 = tile * TC_BN;
    __half* dk = sK + st * TC_BN * LD;
    __half* dv = sV + st * TC_BN * LD;
#pragma unroll
    for (int c = threadIdx.x; c < TC_BN * CH; c += TC_THREADS) {
      const int r = c / CH, col = (c % CH) * 8;
      const int j = j0 + r;
      const bool ok = j >= kv_lo && j < kv_hi;
      const size_t off = (size_t)(ok ? j : kv_lo) * kv_row + (size_t)kh * D + col;
      tc_cp16(tc_smem(dk + r * LD + col), kc + off, ok ? 16 : 0);
      tc_cp16(tc_smem(dv + r * LD + col), vc + off, ok ? 16 : 0);
    }
    tc_commit();
  };

  float o[NT][4];
#pragma unroll
  for (int n = 0; n < NT; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
  float m0 = -CUDART_INF_F, m1 = -CUDART_INF_F;  // running max (log2 domain) of rows t0, t1
  float l0 = 0.0f, l1 = 0.0f;  // this thread's part of the running sums (its 2 columns of 8)
  // the block's smallest query position: a tile is free of masking when every key in it is
  // visible to every row of the block
  const int qmin = pos0 + t_first, qmax = pos0 + t_last;

  load_tile(tile0, 0);
  for (int it = tile0; it < tile1; ++it) {
    const int st = (it - tile0) & 1;
    if (it + 1 < tile1) {
      load_tile(it + 1, st ^ 1);
      tc_wait<1>();
    } else {
      tc_wait<0>();
    }
    __syncthreads();
    const __half* ks_ = sK + st * TC_BN * LD;
    const __half* vs_ = sV + st * TC_BN * LD;

    // S = Q K^T: 8 column tiles of 8 keys; ldmatrix x4 gives the B fragments of two
    // column tiles (keys np*16 .. +15) for one k-step
    float s[8][4];
#pragma unroll
    for (int n = 0; n < 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
    for (int np = 0; np < 4; ++np) {
#pragma unroll
      for (int ks = 0; ks < KS; ++ks) {
        unsigned b0, b1, b2, b3;
        const int key = np * 16 + (lane & 7) + ((lane >> 4) << 3);
        const int dim = ks * 16 + (((lane >> 3) & 1) << 3);
        tc_ldm4(b0, b1, b2, b3, tc_smem(ks_ + key * LD + dim));
        tc_mma(s[2 * np], qa[ks], b0, b1);
        tc_mma(s[2 * np + 1], qa[ks], b2, b3);
      }
    }

    const int j0 = it * TC_BN;
    const bool full = j0 + TC_BN - 1 <= qmin && (window <= 0 || qmax - j0 < window);
    if (!full) {
#pragma unroll
      for (int n = 0; n < 8; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int j = j0 + n * 8 + 2 * tig + (e & 1);
          const int qp = e < 2 ? qp0 : qp1;
          const bool ok = j <= qp && (window <= 0 || qp - j < window);
          if (!ok) s[n][e] = -CUDART_INF_F;
        }
      }
    }

    // online softmax: the new running max over the row's 4 threads (fixed shuffle order)
    float mx0 = m0, mx1 = m1;
#pragma unroll
    for (int n = 0; n < 8; ++n) {
      mx0 = fmaxf(mx0, fmaxf(s[n][0], s[n][1]));
      mx1 = fmaxf(mx1, fmaxf(s[n][2], s[n][3]));
    }
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
    // a row with no visible key yet keeps max -inf: subtract 0 then (every p is 0)
    const float b0 = mx0 == -CUDART_INF_F ? 0.0f : mx0;
    const float b1 = mx1 == -CUDART_INF_F ? 0.0f : mx1;
    const float c0 = exp2f(m0 - b0), c1 = exp2f(m1 - b1);  // 0 while m was -inf
    m0 = mx0;
    m1 = mx1;
    l0 *= c0;
    l1 *= c1;
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      o[n][0] *= c0;
      o[n][1] *= c0;
      o[n][2] *= c1;
      o[n][3] *= c1;
    }
    // P (FP16) as A fragments of 4 k-steps of 16 keys: column tiles 2kk and 2kk + 1
    unsigned pa[4][4];
#pragma unroll
    for (int n = 0; n < 8; ++n) {
      const __half2 h0 = __floats2half2_rn(exp2f(s[n][0] - b0), exp2f(s[n][1] - b0));
      const __half2 h1 = __floats2half2_rn(exp2f(s[n][2] - b1), exp2f(s[n][3] - b1));
      const float2 f0 = __half22float2(h0), f1 = __half22float2(h1);
      l0 += f0.x + f0.y;
      l1 += f1.x + f1.y;
      pa[n >> 1][(n & 1) * 2] = *reinterpret_cast<const unsigned*>(&h0);
      pa[n >> 1][(n & 1) * 2 + 1] = *reinterpret_cast<const unsigned*>(&h1);
    }

    // O += P V: ldmatrix.trans of V rows (keys) gives the B fragments of two 8-wide column
    // tiles (dims np*16 .. +15) for one k-step of 16 keys
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
#pragma unroll
      for (int np = 0; np < NT / 2; ++np) {
        unsigned v0, v1, v2, v3;
        const int key = kk * 16 + (lane & 7) + (((lane >> 3) & 1) << 3);
        const int dim = np * 16 + ((lane >> 4) << 3);
        tc_ldm4t(v0, v1, v2, v3, tc_smem(vs_ + key * LD + dim));
        tc_mma(o[2 * np], pa[kk], v0, v1);
        tc_mma(o[2 * np + 1], pa[kk], v2, v3);
      }
    }
    __syncthreads();  // this stage is refilled by the next iteration's load
  }

  // full row sums (the 4 threads of a row, fixed order), the sink, normalisation
  l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
  l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
  float f0 = 1.0f / l0, f1 = 1.0f / l1;
  if (sinks) {
    const float sk = sinks[h] * 1.4426950408889634f;
    const float M0 = fmaxf(m0, sk), M1 = fmaxf(m1, sk);
    const float e0 = exp2f(m0 - M0), e1 = exp2f(m1 - M1);
    f0 = e0 / (l0 * e0 + exp2f(sk - M0));
    f1 = e1 / (l1 * e1 + exp2f(sk - M1));
  }
#pragma unroll
  for (int n = 0; n < NT; ++n) {
    const int col = h * D + n * 8 + 2 * tig;
    if (t0 < n_tokens)
      *reinterpret_cast<float2*>(out + (size_t)t0 * out_stride + col) =
          make_float2(o[n][0] * f0, o[n][1] * f0);
    if (t1 < n_tokens)
      *reinterpret_cast<float2*>(out + (size_t)t1 * out_stride + col) =
          make_float2(o[n][2] * f1, o[n][3] * f1);
  }
}

#define TC_KERNEL(D)                                                                         \
  extern "C" __global__ void __launch_bounds__(TC_THREADS, 2) attn_prefill_tc_d##D(         \
      const float* __restrict__ q, int q_stride, const __half* __restrict__ kc,              \
      const __half* __restrict__ vc, const int* __restrict__ pos0, int n_tokens, int n_head, \
      int n_kv, float scale_log2, int window, const float* __restrict__ sinks,               \
      float* __restrict__ out, int out_stride) {                                             \
    attn_prefill_tc_body<D>(q, q_stride, kc, vc, pos0, n_tokens, n_head, n_kv, scale_log2,   \
                            window, sinks, out, out_stride);                                 \
  }
TC_KERNEL(32)
TC_KERNEL(64)
TC_KERNEL(80)
TC_KERNEL(96)
TC_KERNEL(128)
