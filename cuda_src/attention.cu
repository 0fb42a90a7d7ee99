// Attention over the paged FP16 KV cache, causal, GQA/MHA, optional sliding window and
// gpt-oss sinks. The cache of a layer is a pool of blocks of KV_BLOCK positions
// ([n_blocks * KV_BLOCK][n_kv][head_dim] half for K, the same for V); a sequence's position
// j lives in pool row bt[j / KV_BLOCK] * KV_BLOCK + j % KV_BLOCK, bt being its block table.
//
// Decode (attn_paged_decode): one query row per sequence, each with its own position and
// block table. Split-K over the key length: a block takes one (row, KV head, key chunk) and
// all the query heads of that KV head (GQA: the K and V it loads serve every one of them).
// It streams its chunk in tiles of DT keys through shared memory (16-byte cp.async pieces,
// coalesced) and keeps, per query head, an online softmax: the running max score m, the sum
// l of exp(score - m) and the unnormalised exp-weighted sum of values. The last block of a
// (row, KV head) to finish (a ticket counter, reset by that block) merges the chunks of its
// heads in a fixed order, so results are bit-identical run to run whatever order the blocks
// ran in (the atomic only picks which block merges, never the order of a sum). A row's
// chunks depend only on its own position (max(64, ceil((pos + 1) / n_split)) keys each;
// the blocks of chunks without keys, past its position or before its window, leave at once
// and the merge counts only the others), never on the other rows: a sequence's result is
// the same in any batch.
//
// Prefill (attn_prefill_tc_d<D>): see below; also one row's arithmetic never depends on the
// other rows of its tile or on how its prompt was cut into chunks.
#include "rope.cuh"

#define AT 256  // threads per decode block; head_dim <= 128, head_dim % 8 == 0
#define MIN_CHUNK 64  // keys a decode split takes at least (short rows use fewer splits)
#define DT 64  // keys per decode tile
#define DSLD (DT + 1)  // floats per head row of the score tile (conflict-free column reads)
#define DMAXP 4  // (head, dim pair) items a thread accumulates: heads * head_dim <= 2 * AT * DMAXP

__device__ __forceinline__ size_t kv_row(const int* __restrict__ bt, int j) {
  return (size_t)bt[j / KV_BLOCK] * KV_BLOCK + (j % KV_BLOCK);
}

__device__ __forceinline__ unsigned tc_smem(const void* p) {
  return (unsigned)__cvta_generic_to_shared(p);
}

// 16 bytes global -> shared; src_bytes 0 writes zeros and reads nothing. (Under
// tools/kernel_emu the copy is done at once, so committing and waiting have nothing to do.)
__device__ __forceinline__ void tc_cp16(unsigned dst, const void* src, int src_bytes) {
#ifdef KERNEL_EMU
  emu::cp_async16(dst, src, src_bytes);
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes)
               : "memory");
#endif
}
__device__ __forceinline__ void tc_commit() {
#ifndef KERNEL_EMU
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void tc_wait() {
#ifndef KERNEL_EMU
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// The last of the nc blocks of a (row, KV head) with keys (chunks c0 .. c0 + nc - 1) to arrive
// merges those chunks of its G query heads (see the file comment). smem: at least 2 * G * nc
// + 2 * G floats.
__device__ __forceinline__ void attn_merge(
    const float* __restrict__ ml, const float* __restrict__ opart, const float* __restrict__ sinks,
    float* __restrict__ out, int out_stride, unsigned int* __restrict__ tickets, float* smem,
    unsigned int& s_ticket, int t, int kh, int G, int n_head, int n_kv, int head_dim,
    int n_split, int c0, int nc) {
  __threadfence();
  __syncthreads();
  const unsigned int slot = (unsigned int)t * n_kv + kh;
  if (threadIdx.x == 0) s_ticket = atomicAdd(&tickets[slot], 1u);
  __syncthreads();
  if (s_ticket != (unsigned int)(nc - 1)) return;
  __threadfence();
  float* cm = smem;  // [G][nc] chunk max, then the chunk's weight
  float* cl = smem + G * nc;  // [G][nc] chunk sum
  float* inv = cl + G * nc;  // [G]
  const int h0 = kh * G;
  for (int i = threadIdx.x; i < G * nc; i += AT) {
    const int g = i / nc, c = i - g * nc;
    const size_t pidx = ((size_t)t * n_head + h0 + g) * n_split + c0 + c;
    cm[i] = __ldcg(&ml[2 * pidx]);
    cl[i] = __ldcg(&ml[2 * pidx + 1]);
  }
  __syncthreads();
  if (threadIdx.x < G) {  // fixed order over the chunks, one head a thread
    const int g = threadIdx.x, h = h0 + g;
    float* w = cm + g * nc;
    const float* l = cl + g * nc;
    float M = sinks ? sinks[h] : -CUDART_INF_F;
    for (int c = 0; c < nc; ++c)
      if (l[c] > 0.0f) M = fmaxf(M, w[c]);
    float L = sinks ? expf(sinks[h] - M) : 0.0f;
    for (int c = 0; c < nc; ++c) {
      const float wc = l[c] > 0.0f ? expf(w[c] - M) : 0.0f;
      if (l[c] > 0.0f) L += l[c] * wc;
      w[c] = wc;  // chunk weight; 0 for an empty chunk
    }
    inv[g] = L > 0.0f ? 1.0f / L : 0.0f;  // a padding row (no keys, no sink) writes zeros
  }
  __syncthreads();
  for (int i = threadIdx.x; i < G * head_dim; i += AT) {
    const int g = i / head_dim, d = i % head_dim;
    const size_t base = ((size_t)t * n_head + h0 + g) * n_split + c0;
    float o = 0.0f;
#pragma unroll 8
    for (int c = 0; c < nc; ++c) {
      const float v = cl[g * nc + c] > 0.0f ? __ldcg(&opart[(base + c) * head_dim + d]) : 0.0f;
      o += v * cm[g * nc + c];
    }
    out[(size_t)t * out_stride + (size_t)(h0 + g) * head_dim + d] = o * inv[g];
  }
  if (threadIdx.x == 0) tickets[slot] = 0u;  // ready for the next launch (graph replay)
}

// grid (n_split, n_kv, n_rows), block AT.
// Row t: query q + t*q_stride (+ h*head_dim), float, RoPE applied; its position pos[t] (keys
// 0..pos[t] are visible, minus the window); its block table bt + t*bt_stride. A row whose
// position is negative is padding: it writes zeros. kc/vc: this layer's pools.
// opart: [n_rows][n_head][n_split][head_dim]; ml: [n_rows][n_head][n_split][2].
// Dynamic shared memory (attn_decode_smem_bytes on the host): K and V tiles
// 2 * DT * (head_dim + 8) halves, then G * head_dim floats of scaled queries, G * DSLD floats
// of scores, 3 * G floats of softmax state. G = n_head / n_kv; G * head_dim <= 2 * AT * DMAXP,
// n_split <= 32 (the merge reuses the score tile).
// sinks: per-head logit that joins the softmax denominator only (gpt-oss), or null.
// out row t at out + t*out_stride. tickets: n_rows*n_kv zeroed uints (left zeroed).
extern "C" __global__ void __launch_bounds__(AT)
    attn_paged_decode(const float* __restrict__ q, int q_stride, const __half* __restrict__ kc,
                      const __half* __restrict__ vc, const int* __restrict__ bt, int bt_stride,
                      const int* __restrict__ pos, float* __restrict__ opart,
                      float* __restrict__ ml, int n_head, int n_kv, int head_dim, int n_split,
                      int max_chunk, float scale, int window, const float* __restrict__ sinks,
                      float* __restrict__ out, int out_stride, unsigned int* __restrict__ tickets) {
  extern __shared__ __align__(16) unsigned char dec_smem[];
  __shared__ unsigned int s_ticket;
  const int D = head_dim, LD = D + 8, CH = D / 8, D2 = D / 2;
  const int G = n_head / n_kv;
  __half* sK = reinterpret_cast<__half*>(dec_smem);  // [DT][LD]
  __half* sV = sK + DT * LD;  // [DT][LD]
  float* sq = reinterpret_cast<float*>(sV + DT * LD);  // [G][D]
  float* sS = sq + G * D;  // [G][DSLD]
  float* s_m = sS + G * DSLD;  // [G] running max
  float* s_l = s_m + G;  // [G] running sum
  float* s_a = s_l + G;  // [G] this tile's rescale of the running sums
  pdl_start();
  const int s = blockIdx.x, kh = blockIdx.y, t = blockIdx.z, h0 = kh * G;
  const int qpos = pos[t];
  int chunk = max(MIN_CHUNK, (qpos + 1 + n_split - 1) / n_split);  // the row's own length
  if (chunk > max_chunk || qpos < 0) chunk = 0;  // padding row (or never allowed by the host)
  const int kv_begin = window > 0 ? max(0, qpos - window + 1) : 0;
  // the row's chunks with keys, c0 .. c0 + nc - 1 (a padding row: chunk 0 alone, no keys);
  // the other blocks of the grid (short rows, windows) leave at once and the merge counts
  // only these
  const int c0 = chunk > 0 ? kv_begin / chunk : 0, nc = chunk > 0 ? qpos / chunk - c0 + 1 : 1;
  if (s < c0 || s >= c0 + nc) return;
  const int j0 = max(kv_begin, s * chunk), j1 = min(qpos + 1, (s + 1) * chunk);
  if (j0 < j1) {
    const int* __restrict__ btr = bt + (size_t)t * bt_stride;
    const float* __restrict__ qr = q + (size_t)t * q_stride + (size_t)h0 * D;
    for (int i = threadIdx.x; i < G * D; i += AT) sq[i] = qr[i] * scale;
    for (int g = threadIdx.x; g < G; g += AT) {
      s_m[g] = -CUDART_INF_F;
      s_l[g] = 0.0f;
    }
    float2 acc[DMAXP];
#pragma unroll
    for (int i = 0; i < DMAXP; ++i) acc[i] = make_float2(0.0f, 0.0f);
    const size_t kv_pitch = (size_t)n_kv * D;  // halves from one pool row to the next
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    for (int jt = j0; jt < j1; jt += DT) {
      const int n = min(DT, j1 - jt);
      for (int i = threadIdx.x; i < DT * CH; i += AT) {  // rows past n: zeros, nothing read
        const int r = i / CH, c = i % CH;
        const bool ok = r < n;
        const size_t off = ok ? kv_row(btr, jt + r) * kv_pitch + (size_t)kh * D + c * 8 : 0;
        tc_cp16(tc_smem(sK + r * LD + c * 8), kc + off, ok ? 16 : 0);
        tc_cp16(tc_smem(sV + r * LD + c * 8), vc + off, ok ? 16 : 0);
      }
      tc_commit();
      tc_wait<0>();
      __syncthreads();
      // scores: one (head, key) a thread at a time over the tile's n keys; the dot keeps
      // two sums (even and odd head dims, each in dim order: two dependency chains)
      for (int i = threadIdx.x; i < G * n; i += AT) {
        const int g = i / n, j = i - g * n;
        const uint4* kr = reinterpret_cast<const uint4*>(sK + j * LD);
        const float2* qg = reinterpret_cast<const float2*>(sq + g * D);
        float a0 = 0.0f, a1 = 0.0f;
#pragma unroll 4
        for (int c = 0; c < CH; ++c) {
          const uint4 raw = kr[c];
          const __half2* h2 = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const float2 f = __half22float2(h2[e]);
            const float2 qq = qg[c * 4 + e];
            a0 = fmaf(qq.x, f.x, a0);
            a1 = fmaf(qq.y, f.y, a1);
          }
        }
        sS[g * DSLD + j] = a0 + a1;
      }
      __syncthreads();
      // online softmax, one head a warp: the tile's max, its p = exp(score - m), their sum
      for (int g = warp; g < G; g += AT / 32) {
        float* sg = sS + g * DSLD;
        const float a0 = lane < n ? sg[lane] : -CUDART_INF_F;
        const float a1 = lane + 32 < n ? sg[lane + 32] : -CUDART_INF_F;
        const float m_old = s_m[g];
        const float m_new = fmaxf(m_old, warp_max(fmaxf(a0, a1)));
        const float p0 = lane < n ? expf(a0 - m_new) : 0.0f;
        const float p1 = lane + 32 < n ? expf(a1 - m_new) : 0.0f;
        const float sum = warp_sum(p0 + p1);
        sg[lane] = p0;
        sg[lane + 32] = p1;
        __syncwarp();
        if (lane == 0) {
          const float alpha = expf(m_old - m_new);  // 0 on the first tile (m_old = -inf)
          s_a[g] = alpha;
          s_m[g] = m_new;
          s_l[g] = s_l[g] * alpha + sum;
        }
      }
      __syncthreads();
      // values: two adjacent dims of one head a thread, the keys in order
#pragma unroll
      for (int k = 0; k < DMAXP; ++k) {
        const int i = threadIdx.x + k * AT;
        if (i < G * D2) {
          const int g = i / D2, d2 = i % D2;
          const float alpha = s_a[g];
          const float* pg = sS + g * DSLD;
          const __half2* vcol = reinterpret_cast<const __half2*>(sV) + d2;
          float2 o = make_float2(acc[k].x * alpha, acc[k].y * alpha);
#pragma unroll 8
          for (int j = 0; j < n; ++j) {
            const float2 v = __half22float2(vcol[j * (LD / 2)]);
            o.x = fmaf(pg[j], v.x, o.x);
            o.y = fmaf(pg[j], v.y, o.y);
          }
          acc[k] = o;
        }
      }
      __syncthreads();  // the tiles and scores are reused
    }
#pragma unroll
    for (int k = 0; k < DMAXP; ++k) {
      const int i = threadIdx.x + k * AT;
      if (i < G * D2) {
        const int g = i / D2, d2 = i % D2;
        const size_t pidx = ((size_t)t * n_head + h0 + g) * n_split + s;
        reinterpret_cast<float2*>(opart + pidx * D)[d2] = acc[k];
      }
    }
    for (int g = threadIdx.x; g < G; g += AT) {
      const size_t pidx = ((size_t)t * n_head + h0 + g) * n_split + s;
      ml[2 * pidx] = s_m[g];
      ml[2 * pidx + 1] = s_l[g];
    }
  } else {
    for (int g = threadIdx.x; g < G; g += AT) {
      const size_t pidx = ((size_t)t * n_head + h0 + g) * n_split + s;
      ml[2 * pidx] = -CUDART_INF_F;
      ml[2 * pidx + 1] = 0.0f;
    }
  }
  attn_merge(ml, opart, sinks, out, out_stride, tickets, sS, s_ticket, t, kh, G, n_head, n_kv,
             D, n_split, c0, nc);
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
// One launch covers the prompt chunks of several sequences (grid z): sequence z's chunk is
// query rows row0[z] .. row0[z] + n_tok[z] - 1 at positions pos0[z] .., over its block
// table bt + z*bt_stride. A key tile is exactly one KV block (TC_BN == KV_BLOCK).
// Key j is visible to query position p iff j <= p and (window <= 0 or p - j < window);
// tiles wholly past the block's causal limit or before its window are never loaded. The
// sink logit (gpt-oss) joins the denominator at the end. Every sum runs in a fixed order:
// bit-identical run to run. A row's result does not depend on the other rows of its tile:
// the tiles it does not see are masked to -inf (their p is exactly 0, the running max and sum
// are unchanged), so how a prompt is cut into chunks changes no bit.
// The first block (blockIdx.x 0) takes the last (longest) query tile.
#define TC_BM 64
#define TC_BN 64
#define TC_THREADS 128  // 4 warps; __launch_bounds__(.., 2): no spills at D = 128 (208 regs)

// (Under tools/kernel_emu: ldmatrix and the mma from their PTX definitions.)
__device__ __forceinline__ void tc_ldm4(unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3,
                                        unsigned addr) {
#ifdef KERNEL_EMU
  uint32_t r[4];
  emu::ldmatrix_x4_at(r, addr, false);
  r0 = r[0], r1 = r[1], r2 = r[2], r3 = r[3];
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
#endif
}
__device__ __forceinline__ void tc_ldm4t(unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3,
                                         unsigned addr) {
#ifdef KERNEL_EMU
  uint32_t r[4];
  emu::ldmatrix_x4_at(r, addr, true);
  r0 = r[0], r1 = r[1], r2 = r[2], r3 = r[3];
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
#endif
}

// c += a (16x16, row) * b (16x8, col); fp16 inputs, fp32 accumulators.
__device__ __forceinline__ void tc_mma(float* c, const unsigned* a, unsigned b0, unsigned b1) {
#ifdef KERNEL_EMU
  const uint32_t b[2] = {b0, b1};
  emu::mma_m16n8k16_f16(c, a, b);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// Two floats as a half2 (lo in the low 16 bits: the lower column of an mma fragment).
__device__ __forceinline__ unsigned tc_pack(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const unsigned*>(&h);
}

// q: row t, head h at q + t*q_stride + h*D (fp32, RoPE applied; 8-byte aligned rows).
// kc/vc: this layer's pools. out row t at out + t*out_stride (+ h*D). grid
// (ceil(max n_tok / 64), n_head, n_seq), block 128, dynamic shared memory 2*2*64*(D+8)
// halves. seq: [n_seq][3] ints (row0, n_tok, pos0). scale_log2: the softmax scale times
// log2(e). sinks: one logit per head (natural log domain, as the model stores it) or null.
template <int D>
__device__ __forceinline__ void attn_prefill_tc_body(
    const float* __restrict__ q_all, int q_stride, const __half* __restrict__ kc,
    const __half* __restrict__ vc, const int* __restrict__ seq, const int* __restrict__ bt_all,
    int bt_stride, int n_head, int n_kv, float scale_log2, int window,
    const float* __restrict__ sinks, float* __restrict__ out_all, int out_stride) {
  static_assert(TC_BN == KV_BLOCK, "a key tile is one KV block");
  const int row0 = seq[3 * blockIdx.z], n_tokens = seq[3 * blockIdx.z + 1];
  const int* __restrict__ bt = bt_all + (size_t)blockIdx.z * bt_stride;
  const float* __restrict__ q = q_all + (size_t)row0 * q_stride;
  float* __restrict__ out = out_all + (size_t)row0 * out_stride;
  constexpr int LD = D + 8;  // halves per shared row: 16 bytes of padding, conflict-free
  constexpr int KS = D / 16;  // k-steps of Q K^T
  constexpr int NT = D / 8;  // 8-wide column tiles of O
  constexpr int CH = D / 8;  // 16-byte pieces per K or V row
  extern __shared__ __align__(16) unsigned char tc_smem_raw[];
  __half* sK = reinterpret_cast<__half*>(tc_smem_raw);  // [2][TC_BN][LD]
  __half* sV = sK + 2 * TC_BN * LD;  // [2][TC_BN][LD]

  const int n_qt = (n_tokens + TC_BM - 1) / TC_BM;
  if ((int)blockIdx.x >= n_qt) return;  // a shorter chunk than the launch's longest
  const int qt = n_qt - 1 - (int)blockIdx.x;
  const int h = blockIdx.y;
  const int kh = h / (n_head / n_kv);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, tig = lane & 3;
  const int pos0 = seq[3 * blockIdx.z + 2];
  const int t_first = qt * TC_BM;
  const int t_last = min(t_first + TC_BM, n_tokens) - 1;
  const int kv_hi = pos0 + t_last + 1;  // keys [kv_lo, kv_hi) are visible to some row
  const int kv_lo = window > 0 ? max(0, pos0 + t_first - window + 1) : 0;
  const int tile0 = kv_lo / TC_BN, tile1 = (kv_hi + TC_BN - 1) / TC_BN;
  const size_t kv_pitch = (size_t)n_kv * D;  // halves from one pool row to the next

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
    const size_t base = (size_t)bt[tile] * KV_BLOCK;  // the tile's KV block
    __half* dk = sK + st * TC_BN * LD;
    __half* dv = sV + st * TC_BN * LD;
#pragma unroll
    for (int c = threadIdx.x; c < TC_BN * CH; c += TC_THREADS) {
      const int r = c / CH, col = (c % CH) * 8;
      const int j = j0 + r;
      const bool ok = j >= kv_lo && j < kv_hi;
      const size_t off = (base + (ok ? r : 0)) * kv_pitch + (size_t)kh * D + col;
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

#define TC_KERNEL(D)                                                                        \
  extern "C" __global__ void __launch_bounds__(TC_THREADS, 2) attn_prefill_tc_d##D(        \
      const float* __restrict__ q, int q_stride, const __half* __restrict__ kc,             \
      const __half* __restrict__ vc, const int* __restrict__ seq,                           \
      const int* __restrict__ bt, int bt_stride, int n_head, int n_kv, float scale_log2,    \
      int window, const float* __restrict__ sinks, float* __restrict__ out,                 \
      int out_stride) {                                                                     \
    pdl_start();                                                                            \
    attn_prefill_tc_body<D>(q, q_stride, kc, vc, seq, bt, bt_stride, n_head, n_kv,          \
                            scale_log2, window, sinks, out, out_stride);                    \
  }
TC_KERNEL(32)
TC_KERNEL(64)
TC_KERNEL(80)
TC_KERNEL(96)
TC_KERNEL(128)
