// Token choice on the GPU so that only the chosen ids cross to the host: the reference
// sampler's pipeline (worker/engine/sampling.py) with integer weights, so a reduction order
// can never change the chosen id; greedy is its temperature-0 case (lowest index on ties).
#include "common.cuh"

#define SAMPLE_THREADS 1024
typedef unsigned long long u64;

__device__ __forceinline__ float exp32_w(float x) {
  // worker.engine.sampling.exp32: Cody-Waite by ln 2, degree-7 Horner, ldexp(., n + 40).
  // Constants rounded decimal -> double -> float, exactly as np.float32(python float).
  const float n = rintf(__fmul_rn(x, (float)1.44269504088896341));
  float r = __fsub_rn(x, __fmul_rn(n, (float)0.693359375));
  r = __fsub_rn(r, __fmul_rn(n, (float)-2.12194440e-4));
  const float c[8] = {(float)(1.0 / 5040), (float)(1.0 / 720), (float)(1.0 / 120),
                      (float)(1.0 / 24),   (float)(1.0 / 6),   (float)(1.0 / 2),
                      1.0f,                1.0f};
  float p = c[0];
#pragma unroll
  for (int k = 1; k < 8; ++k) p = __fadd_rn(__fmul_rn(p, r), c[k]);
  return ldexpf(p, (int)n + 40);
}

__device__ __forceinline__ u64 weight_of(float x) {
  if (!(x >= -28.0f)) return 0ull;
  return (u64)floorf(exp32_w(x));
}

__device__ __forceinline__ u64 key_of(float x, int id) {
  const int b = __float_as_int(x);
  const long long s = b >= 0 ? (long long)b : (long long)(b ^ 0x7FFFFFFF);
  return ((u64)(0x7FFFFFFFll - s) << 32) | (u64)(unsigned)id;
}

// ---- grid-wide pieces. The sampler runs as a grid of up to SAMPLE_MAX_GRID blocks that
// are all resident at once (gridDim.x <= number of SMs, one block per SM), joined by a
// software barrier; cross-block values go through global memory (read with __ldcg, L2) in
// ping-pong slots, so a block one barrier ahead never overwrites what a slower one reads.
#define SAMPLE_MAX_GRID 64
#define SAMPLE_SMALL_K 1024  // top-k up to this finishes in one block (sample_small)

struct GridScratch {
  u64 part_u[2][SAMPLE_MAX_GRID];
  float part_f[2][SAMPLE_MAX_GRID];
  int part_i[2][SAMPLE_MAX_GRID];
  u64 hist[2][SAMPLE_MAX_GRID][256];
  unsigned int hcnt[2][SAMPLE_MAX_GRID][256];
  u64 small_key[SAMPLE_SMALL_K];
  u64 found;
  unsigned int small_n;
};

struct SampleShared {
  u64 hist[256];
  unsigned int cnt[256];
  int single;
  u64 prefix;
  u64 target;
  u64 red_u[32];
  float red_f[32];
  int red_i[32];
};

__device__ __forceinline__ void grid_sync(unsigned int* bar) {
  __syncthreads();
  if (threadIdx.x == 0) {
    volatile unsigned int* gen = bar + 1;
    const unsigned int g = *gen;
    __threadfence();
    if (atomicAdd(bar, 1u) == gridDim.x - 1) {
      atomicExch(bar, 0u);
      __threadfence();
      atomicAdd(bar + 1, 1u);
    } else {
      while (*gen == g) __nanosleep(20);
    }
    __threadfence();
  }
  __syncthreads();
}

__device__ u64 grid_sum_u64(u64 v, GridScratch* gs, unsigned int* bar, int& ph,
                            SampleShared& st) {
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (lane == 0) st.red_u[wid] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    u64 b = 0ull;
    for (int w = 0; w < (int)(blockDim.x >> 5); ++w) b += st.red_u[w];
    gs->part_u[ph][blockIdx.x] = b;
  }
  grid_sync(bar);
  if (wid == 0) {
    u64 r = 0ull;
    for (int b = lane; b < (int)gridDim.x; b += 32) r += __ldcg(&gs->part_u[ph][b]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) r += __shfl_xor_sync(0xffffffffu, r, o);
    if (lane == 0) st.red_u[0] = r;
  }
  __syncthreads();
  const u64 r = st.red_u[0];
  __syncthreads();
  ph ^= 1;
  return r;
}

__device__ __forceinline__ void argmax_pair(float& v, int& i, float ov, int oi) {
  if (ov > v || (ov == v && oi < i)) {
    v = ov;
    i = oi;
  }
}

// Argmax over the grid, lowest index on ties.
__device__ void grid_argmax(float& v, int& idx, GridScratch* gs, unsigned int* bar, int& ph,
                            SampleShared& st) {
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1)
    argmax_pair(v, idx, __shfl_xor_sync(0xffffffffu, v, o), __shfl_xor_sync(0xffffffffu, idx, o));
  if (lane == 0) {
    st.red_f[wid] = v;
    st.red_i[wid] = idx;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float bv = st.red_f[0];
    int bi = st.red_i[0];
    for (int w = 1; w < (int)(blockDim.x >> 5); ++w) argmax_pair(bv, bi, st.red_f[w], st.red_i[w]);
    gs->part_f[ph][blockIdx.x] = bv;
    gs->part_i[ph][blockIdx.x] = bi;
  }
  grid_sync(bar);
  if (wid == 0) {
    float bv = -CUDART_INF_F;
    int bi = 0x7fffffff;
    for (int b = lane; b < (int)gridDim.x; b += 32)
      argmax_pair(bv, bi, __ldcg(&gs->part_f[ph][b]), __ldcg(&gs->part_i[ph][b]));
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
      argmax_pair(bv, bi, __shfl_xor_sync(0xffffffffu, bv, o), __shfl_xor_sync(0xffffffffu, bi, o));
    if (lane == 0) {
      st.red_f[0] = bv;
      st.red_i[0] = bi;
    }
  }
  __syncthreads();
  v = st.red_f[0];
  idx = st.red_i[0];
  __syncthreads();
  ph ^= 1;
}

// Kept: x >= -28, key <= klim, and (when need_w) weight >= wfloor (wfloor >= 1).
// Returns the key of the first kept element, in key order, whose inclusive cumulative count
// (by_count) or weight exceeds target. Up to eight passes of 8-bit digits; integer histograms.
// A pass also counts the kept elements per digit: once the chosen digit holds exactly one
// element, the answer is that element's key (the later passes could only narrow the prefix
// down to it), found in one more pass - for distinct logits usually after 3 of the 8.
__device__ u64 radix_select(const float* __restrict__ xbuf, int n, u64 klim, bool need_w,
                            u64 wfloor, bool by_count, u64 target, GridScratch* gs,
                            unsigned int* bar, int& ph, SampleShared& st) {
  const int gtid = blockIdx.x * blockDim.x + threadIdx.x, gstride = gridDim.x * blockDim.x;
  if (threadIdx.x == 0) {
    st.prefix = 0ull;
    st.target = target;
  }
  for (int shift = 56; shift >= 0; shift -= 8) {
    for (int b = threadIdx.x; b < 256; b += blockDim.x) {
      st.hist[b] = 0ull;
      st.cnt[b] = 0u;
    }
    __syncthreads();
    const u64 pre = st.prefix;
    // Run-length accumulation per thread: most elements share the top digits, so adding
    // each one atomically would serialise the block on one shared counter.
    int cur = -1;
    u64 acc = 0ull;
    unsigned int accn = 0u;
    for (int i = gtid; i < n; i += gstride) {
      const float x = xbuf[i];
      if (!(x >= -28.0f)) continue;
      const u64 key = key_of(x, i);
      if (key > klim) continue;
      if (shift < 56 && (key >> (shift + 8)) != (pre >> (shift + 8))) continue;
      u64 add = 1ull;
      if (need_w || !by_count) {
        const u64 w = weight_of(x);
        if (need_w && w < wfloor) continue;
        if (!by_count) add = w;
      }
      const int bin = (int)((key >> shift) & 255ull);
      if (bin != cur) {
        if (cur >= 0) {
          atomicAdd(&st.hist[cur], acc);
          atomicAdd(&st.cnt[cur], accn);
        }
        cur = bin;
        acc = 0ull;
        accn = 0u;
      }
      acc += add;
      accn += 1u;
    }
    if (cur >= 0) {
      atomicAdd(&st.hist[cur], acc);
      atomicAdd(&st.cnt[cur], accn);
    }
    __syncthreads();
    for (int b = threadIdx.x; b < 256; b += blockDim.x) {
      gs->hist[ph][blockIdx.x][b] = st.hist[b];
      gs->hcnt[ph][blockIdx.x][b] = st.cnt[b];
    }
    grid_sync(bar);
    // Merge the blocks' histograms: thread (quarter qq, bin b) sums every fourth block's
    // count with its loads unrolled (all in flight), then the quarters are added (integers).
    {
      const int b = threadIdx.x & 255, qq = threadIdx.x >> 8;
      u64 tot = 0ull;
      unsigned int totn = 0u;
#pragma unroll 4
      for (int g = qq; g < (int)gridDim.x; g += 4) {
        tot += __ldcg(&gs->hist[ph][g][b]);
        totn += __ldcg(&gs->hcnt[ph][g][b]);
      }
      __syncthreads();
      if (qq == 0) {
        st.hist[b] = tot;
        st.cnt[b] = totn;
      }
      __syncthreads();
      for (int r = 1; r < 4; ++r) {
        if (qq == r) {
          st.hist[b] += tot;
          st.cnt[b] += totn;
        }
        __syncthreads();
      }
    }
    if (threadIdx.x == 0) {
      u64 a = 0ull, t = st.target;
      int sel = 255;
      for (int b = 0; b < 256; ++b) {
        if (a + st.hist[b] > t) {
          sel = b;
          break;
        }
        a += st.hist[b];
      }
      st.target = t - a;
      st.prefix = pre | ((u64)sel << shift);
      st.single = shift > 0 && st.cnt[sel] == 1u;
    }
    __syncthreads();
    ph ^= 1;
    if (st.single) {  // one kept element has this prefix: it is the answer
      const u64 want = st.prefix >> shift;
      for (int i = gtid; i < n; i += gstride) {
        const float x = xbuf[i];
        if (!(x >= -28.0f)) continue;
        const u64 key = key_of(x, i);
        if (key > klim || (key >> shift) != want) continue;
        if (need_w && weight_of(x) < wfloor) continue;
        gs->found = key;
      }
      grid_sync(bar);
      const u64 key = __ldcg(&gs->found);
      __syncthreads();  // st is reused by the caller
      return key;
    }
  }
  return st.prefix;
}

// ceil or floor of (m * 2^-sh) * total, exactly (m < 2^53).
__device__ __forceinline__ u64 mul_shift(u64 m, int sh, u64 total, bool ceil_) {
  const unsigned __int128 prod = (unsigned __int128)m * total;
  if (sh >= 128) return (ceil_ && prod != 0) ? 1ull : 0ull;
  unsigned __int128 q = prod >> sh;
  if (ceil_ && sh > 0 && (q << sh) != prod) q += 1;
  return (u64)q;
}

// After top-k (klim: the key of the k-th candidate, k <= SAMPLE_SMALL_K): the k kept keys
// are gathered (any order), then block 0 sorts them and does top-p, min-p and the draw over
// that list alone - the same selections radix_select makes over the whole vocabulary (first
// element in key order whose inclusive cumulative weight exceeds the target, weights of 0
// or under the min-p floor skipped), with the same integer sums, so the same id - instead of
// 16 more grid-wide passes. Returns the id in block 0 (other blocks return -1).
__device__ int sample_small(const float* __restrict__ xbuf, int n, u64 klim, u64 top_p_m,
                            int top_p_sh, u64 wfloor, u64 draw_m, int draw_sh,
                            GridScratch* gs, unsigned int* bar) {
  __shared__ u64 skey[SAMPLE_SMALL_K];
  __shared__ u64 sw[SAMPLE_SMALL_K];
  __shared__ int s_id;
  const int gtid = blockIdx.x * blockDim.x + threadIdx.x, gstride = gridDim.x * blockDim.x;
  for (int i = gtid; i < n; i += gstride) {
    const float x = xbuf[i];
    if (!(x >= -28.0f)) continue;
    const u64 key = key_of(x, i);
    if (key > klim) continue;
    const unsigned int slot = atomicAdd(&gs->small_n, 1u);
    if (slot < SAMPLE_SMALL_K) gs->small_key[slot] = key;
  }
  grid_sync(bar);
  if (blockIdx.x != 0) return -1;
  const int m = min((int)__ldcg(&gs->small_n), SAMPLE_SMALL_K);
  int np2 = 1;
  while (np2 < m) np2 <<= 1;
  for (int i = threadIdx.x; i < np2; i += blockDim.x) skey[i] = i < m ? __ldcg(&gs->small_key[i]) : ~0ull;
  __syncthreads();
  for (int k = 2; k <= np2; k <<= 1) {  // bitonic sort, ascending keys (x descending)
    for (int j = k >> 1; j > 0; j >>= 1) {
      for (int i = threadIdx.x; i < np2; i += blockDim.x) {
        const int p = i ^ j;
        if (p > i) {
          const u64 a = skey[i], b = skey[p];
          if ((a > b) == ((i & k) == 0)) {
            skey[i] = b;
            skey[p] = a;
          }
        }
      }
      __syncthreads();
    }
  }
  for (int i = threadIdx.x; i < m; i += blockDim.x)
    sw[i] = weight_of(__ldcg(&xbuf[(int)(skey[i] & 0xFFFFFFFFull)]));
  __syncthreads();
  if (threadIdx.x == 0) {
    int last = m - 1;
    if (top_p_sh >= 0) {
      u64 tot = 0ull;
      for (int i = 0; i < m; ++i) tot += sw[i];
      u64 need = mul_shift(top_p_m, top_p_sh, tot, true);
      if (need < 1ull) need = 1ull;
      u64 a = 0ull;
      for (int i = 0; i < m; ++i) {
        if (sw[i] < 1ull) continue;
        a += sw[i];
        if (a > need - 1ull) {
          last = i;
          break;
        }
      }
    }
    u64 tot = 0ull;
    for (int i = 0; i <= last; ++i)
      if (sw[i] >= wfloor) tot += sw[i];
    const u64 target = mul_shift(draw_m, draw_sh, tot, false);
    u64 a = 0ull;
    int pick = last;
    for (int i = 0; i <= last; ++i) {
      if (sw[i] < wfloor) continue;
      a += sw[i];
      if (a > target) {
        pick = i;
        break;
      }
    }
    s_id = (int)(skey[pick] & 0xFFFFFFFFull);
  }
  __syncthreads();
  return s_id;
}

// The result: out[0] = chosen id; out[1] = 0 ok, 1 NaN in the logits.
__device__ __forceinline__ void sample_done(int gtid, int id, int nan, int* out) {
  if (gtid == 0) {
    out[0] = id;
    out[1] = nan;
  }
}

// out: as above. grid: <= SAMPLE_MAX_GRID blocks (all co-resident), block SAMPLE_THREADS.
// pen_ids: n_pen ids for the repetition penalty (applied when pen != 1; a repeated id is
// harmless: the penalized value is computed from the original logit).
// top_p = top_p_m * 2^-top_p_sh (top_p_sh < 0: off); draw = draw_m * 2^-draw_sh;
// wfloor = ceil(min_p * 2^40) (1 when min_p is off). xbuf: n floats of scratch;
// gscratch: a GridScratch; bar: two zeroed uints (left consistent for the next launch).
__device__ __forceinline__ void sample_body(
    const float* __restrict__ logits, int n, const int* __restrict__ pen_ids, int n_pen,
    float pen, float temperature, int top_k, u64 top_p_m, int top_p_sh, u64 wfloor, u64 draw_m,
    int draw_sh, float* __restrict__ xbuf, int* __restrict__ out, GridScratch* gs,
    unsigned int* bar, SampleShared& st) {
  const int gtid = blockIdx.x * blockDim.x + threadIdx.x, gstride = gridDim.x * blockDim.x;
  int ph = 0;
  // 1. copy with the NaN check; the penalty after a barrier.
  u64 nan_seen = 0ull;
  for (int i = gtid; i < n; i += gstride) {
    const float l = logits[i];
    nan_seen |= (l != l) ? 1ull : 0ull;
    xbuf[i] = l;
  }
  if (gtid == 0) gs->small_n = 0u;  // made visible by the barrier inside grid_sum_u64
  nan_seen = grid_sum_u64(nan_seen, gs, bar, ph, st);
  if (nan_seen) {
    sample_done(gtid, 0, 1, out);
    return;
  }
  if (pen != 1.0f) {
    for (int j = gtid; j < n_pen; j += gstride) {
      const int id = pen_ids[j];
      if (id < 0 || id >= n) continue;
      const float l = logits[id];
      xbuf[id] = l > 0.0f ? __fdiv_rn(l, pen) : __fmul_rn(l, pen);
    }
    grid_sync(bar);
  }
  // 2. greedy: argmax of the penalized logits, lowest index on ties.
  if (temperature == 0.0f) {
    float v = -CUDART_INF_F;
    int bi = 0x7fffffff;
    for (int i = gtid; i < n; i += gstride) argmax_pair(v, bi, __ldcg(&xbuf[i]), i);
    grid_argmax(v, bi, gs, bar, ph, st);
    sample_done(gtid, bi == 0x7fffffff ? 0 : bi, 0, out);
    return;
  }
  // 3. z = l / T; x = (z - max z) + 0 (or 0 / -inf when the max is infinite). Each thread
  // only ever touches its own elements from here on, so plain loads are coherent.
  float zmax = -CUDART_INF_F;
  int dummy = 0;
  for (int i = gtid; i < n; i += gstride) {
    const float z = __fdiv_rn(__ldcg(&xbuf[i]), temperature);
    xbuf[i] = z;
    zmax = fmaxf(zmax, z);
  }
  grid_argmax(zmax, dummy, gs, bar, ph, st);
  const bool finite = isfinite(zmax);
  for (int i = gtid; i < n; i += gstride) {
    const float z = xbuf[i];
    xbuf[i] = finite ? __fadd_rn(__fsub_rn(z, zmax), 0.0f) : (z == zmax ? 0.0f : -CUDART_INF_F);
  }
  // 4. top-k over the candidates (x >= -28).
  u64 klim = ~0ull;
  if (top_k > 0) {
    u64 cnt = 0ull;
    for (int i = gtid; i < n; i += gstride) cnt += (xbuf[i] >= -28.0f) ? 1ull : 0ull;
    cnt = grid_sum_u64(cnt, gs, bar, ph, st);
    if ((u64)top_k < cnt) {
      klim = radix_select(xbuf, n, ~0ull, false, 1ull, true, (u64)(top_k - 1), gs, bar, ph, st);
      if (top_k <= SAMPLE_SMALL_K) {
        const int id = sample_small(xbuf, n, klim, top_p_m, top_p_sh, wfloor, draw_m, draw_sh,
                                    gs, bar);
        if (blockIdx.x == 0) sample_done(gtid, id, 0, out);
        return;
      }
    }
  }
  // 5-6. weights; top-p.
  if (top_p_sh >= 0) {
    u64 tot = 0ull;
    for (int i = gtid; i < n; i += gstride) {
      const float x = xbuf[i];
      if (x >= -28.0f && key_of(x, i) <= klim) tot += weight_of(x);
    }
    tot = grid_sum_u64(tot, gs, bar, ph, st);
    u64 need = mul_shift(top_p_m, top_p_sh, tot, true);
    if (need < 1ull) need = 1ull;
    klim = radix_select(xbuf, n, klim, true, 1ull, false, need - 1ull, gs, bar, ph, st);
  }
  // 7. min-p floor; 8. the draw.
  u64 tot = 0ull;
  for (int i = gtid; i < n; i += gstride) {
    const float x = xbuf[i];
    if (x >= -28.0f && key_of(x, i) <= klim) {
      const u64 w = weight_of(x);
      if (w >= wfloor) tot += w;
    }
  }
  tot = grid_sum_u64(tot, gs, bar, ph, st);
  const u64 target = mul_shift(draw_m, draw_sh, tot, false);
  const u64 key = radix_select(xbuf, n, klim, true, wfloor, false, target, gs, bar, ph, st);
  sample_done(gtid, (int)(key & 0xFFFFFFFFull), 0, out);
}

// One launch for a whole step: row r of `logits` (row stride ldl) is sampled with args[r]
// by the blocks (blockIdx.x, r), G = gridDim.x of them (all of a row's blocks co-resident;
// rows need not be), with scratch xbuf + r*n, gs + r, bar + 2*r, out + 2*r. The penalty ids
// of row r are its sequence's generated ids, hist + slot[r] * hist_stride (args[r].n_pen of
// them; duplicates are harmless: the penalty is computed from the original logit), and the
// chosen id is appended there at index n_pen, so the next step of that sequence finds its
// whole history without a copy from the host. The chosen id never depends on G.
struct SampleArgs {
  u64 top_p_m, wfloor, draw_m;
  float pen, temperature;
  int n_pen, top_k, top_p_sh, draw_sh;
};

extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS, 1)
    sample_rows(const float* __restrict__ logits, long long ldl, int n,
                const SampleArgs* __restrict__ args, const int* __restrict__ slot,
                int* __restrict__ hist, int hist_stride, float* __restrict__ xbuf,
                int* __restrict__ out, GridScratch* gs, unsigned int* bar) {
  __shared__ SampleShared st;
  pdl_start();
  const int r = blockIdx.y;
  const SampleArgs v = args[r];
  int* h = hist + (size_t)slot[r] * hist_stride;
  sample_body(logits + (size_t)r * ldl, n, h, v.n_pen, v.pen, v.temperature, v.top_k,
              v.top_p_m, v.top_p_sh, v.wfloor, v.draw_m, v.draw_sh, xbuf + (size_t)r * n,
              out + 2 * r, gs + r, bar + 2 * r, st);
  // the thread that wrote the result appends it to the history (not after a NaN)
  if (blockIdx.x == 0 && threadIdx.x == 0 && out[2 * r + 1] == 0 && v.n_pen < hist_stride)
    h[v.n_pen] = out[2 * r];
}
