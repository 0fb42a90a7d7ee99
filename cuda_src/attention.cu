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
