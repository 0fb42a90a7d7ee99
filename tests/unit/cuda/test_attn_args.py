"""Tensor-core prefill attention (attn_prefill_tc_d<D>, cuda_src/attention.cu) without a GPU.

* Every argument check of `check_attn_prefill_tc` refuses a bad launch, naming the kernel,
  and a good launch gets the right kernel, grid and shared memory.
* `emulate_tc` is a NumPy twin of the kernel's tiling: the same 64-row query tiles (longest
  first), the same key-tile range (skipping tiles past the causal limit and before the
  window), the same zero-filled rows outside [kv_lo, kv_hi), the same masks and the same
  online-softmax update order (running max with the -inf guard, rescale, FP16 P, the sum of
  the rounded P), the sink at the end. Against worker.models.common.attention (the model
  reference) it catches indexing and mask mistakes before any device time, and measures the
  error that FP16 Q and P cost, which the GPU test's bound is based on.
* The kernel's own source (attn_prefill_tc_body, cut out of attention.cu) compiled for the
  host with g++ against a SIMT emulation of what it uses: one std::thread per CUDA thread,
  ldmatrix (plain and .trans), mma.sync m16n8k16 and shuffles as warp collectives with the
  PTX ISA's fragment layouts, __syncthreads as a block barrier, cp.async as an immediate copy,
  shared memory pre-filled with NaN. This runs the real index arithmetic (fragments, lane
  addresses, masks, the tile loop) on the CPU; it equals the NumPy twin to ~1e-5.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from worker.backends.cuda.arena import DevBuf, LaunchRefused
from worker.backends.cuda.kernels import (
    LOG2E,
    MAX_DYN_SMEM,
    TC_BM,
    TC_BN,
    TC_HEAD_DIMS,
    attn_tc_smem_bytes,
    check_attn_prefill_tc,
)
from worker.gguf.hparams import HParams, RopeParams
from worker.models.common import AttnOptions, KVCache, attention

A = 1 << 20


def _args(**over: object) -> dict[str, object]:
    n, nh, nkv, hd, rows = 37, 14, 2, 64, 128
    a: dict[str, object] = dict(
        q=DevBuf(A, n * nh * hd * 4, "q"),
        q_stride=nh * hd,
        kcache=DevBuf(2 * A, rows * nkv * hd * 2, "kc"),
        vcache=DevBuf(3 * A, rows * nkv * hd * 2, "vc"),
        seq=DevBuf(4 * A, 12, "seq"),
        bt=DevBuf(7 * A, 4 * 4, "bt"),
        bt_stride=4,
        out=DevBuf(5 * A, n * nh * hd * 4, "out"),
        out_stride=nh * hd,
        chunks=[(0, n, 0)],
        n_head=nh,
        n_kv=nkv,
        head_dim=hd,
        pool_rows=rows,
        window=0,
        sinks=None,
    )
    a.update(over)
    return a


def test_good_launch_plan() -> None:
    t = check_attn_prefill_tc(**_args())  # type: ignore[arg-type]
    assert t.kernel == "attn_prefill_tc_d64"
    assert t.grid == (1, 14, 1)
    assert t.shared == 2 * 2 * 64 * 72 * 2
    big = dict(q=DevBuf(A, 65 * 896 * 4, "q"), out=DevBuf(5 * A, 65 * 896 * 4, "out"))
    t = check_attn_prefill_tc(**_args(chunks=[(0, 65, 25)], **big))  # type: ignore[arg-type]
    assert t.grid == (2, 14, 1)
    two = dict(seq=DevBuf(4 * A, 24, "seq"), bt=DevBuf(7 * A, 32, "bt"))
    t = check_attn_prefill_tc(  # type: ignore[arg-type]
        **_args(chunks=[(0, 30, 0), (30, 7, 190)], **two)
    )
    assert t.grid == (1, 14, 2)
    with pytest.raises(LaunchRefused, match="out \\(out\\) needs"):
        check_attn_prefill_tc(**_args(chunks=[(0, 65, 0)], q=big["q"]))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "over,msg",
    [
        (dict(head_dim=48), "head_dim 48 has no kernel"),
        (dict(head_dim=256), "head_dim 256 has no kernel"),
        (dict(n_kv=3), "not a multiple"),
        (dict(chunks=[(0, 0, 0)]), "n_tok must be a positive"),
        (dict(chunks=[]), "no chunks"),
        (dict(chunks=[(0, 37, 220)]), "past a block-table row"),
        (dict(chunks=[(0, 37, -1)]), "negative"),
        (dict(window=-1), "window"),
        (dict(q_stride=895), "shorter than the rows"),
        (dict(q_stride=897), "even"),
        (dict(out_stride=899), "even"),
        (dict(q=DevBuf(A, 37 * 896 * 4 - 4, "q")), "q \\(q\\) needs"),
        (dict(q=DevBuf(A + 4, 37 * 896 * 4, "q")), "8-byte aligned"),
        (dict(out=DevBuf(5 * A, 36 * 896 * 4, "out")), "out \\(out\\) needs"),
        (dict(kcache=DevBuf(2 * A, 128 * 128 * 2 - 2, "kc")), "kcache"),
        (dict(vcache=DevBuf(3 * A + 8, 128 * 128 * 2, "vc")), "16-byte aligned"),
        (dict(seq=DevBuf(4 * A, 8, "seq")), "seq"),
        (dict(bt=DevBuf(7 * A, 12, "bt")), "block tables"),
        (dict(sinks=DevBuf(6 * A, 13 * 4, "sinks")), "sinks"),
    ],
)
def test_bad_launches_are_refused(over: dict[str, object], msg: str) -> None:
    with pytest.raises(LaunchRefused, match=f"attn_prefill_tc: launch refused: .*{msg}"):
        check_attn_prefill_tc(**_args(**over))  # type: ignore[arg-type]


def test_every_model_head_dim_has_a_kernel_and_fits() -> None:
    from tools.synth import preset

    for arch in ("qwen2", "phi3", "gpt-oss", "llama", "gpt2"):
        for size in ("full", "tiny"):
            assert preset(arch, size).head_dim in TC_HEAD_DIMS, (arch, size)
    for d in TC_HEAD_DIMS:
        assert d % 16 == 0  # mma k-steps of 16 and ldmatrix pairs of 8-wide tiles
        # at most 227 KB a block on sm_90 / 163 KB on sm_80; > 48 KB is opted into at load
        assert attn_tc_smem_bytes(d) <= 100 * 1024
    assert attn_tc_smem_bytes(64) <= MAX_DYN_SMEM  # the common case needs no opt-in


# ---------------------------------------------------------------------------- emulation


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(np.float32)


def emulate_tc(
    q: np.ndarray,
    kc: np.ndarray,
    vc: np.ndarray,
    pos0: int,
    n_head: int,
    n_kv: int,
    scale: float,
    window: int,
    sinks: np.ndarray | None,
) -> np.ndarray:
    """The kernel's arithmetic, block by block. q [n, n_head*D] f32, kc/vc [ctx, n_kv, D]
    f16 (rows past pos0 + n may be NaN: never read). Returns [n, n_head*D]."""
    n = q.shape[0]
    d = kc.shape[2]
    gqa = n_head // n_kv
    scale_log2 = np.float32(scale * LOG2E)
    out = np.full((n, n_head * d), np.nan, np.float32)
    n_qt = -(-n // TC_BM)
    for h in range(n_head):
        kh = h // gqa
        for bx in range(n_qt):
            qt = n_qt - 1 - bx
            t_first = qt * TC_BM
            t_last = min(t_first + TC_BM, n) - 1
            kv_hi = pos0 + t_last + 1
            kv_lo = max(0, pos0 + t_first - window + 1) if window > 0 else 0
            tile0, tile1 = kv_lo // TC_BN, -(-kv_hi // TC_BN)
            t = t_first + np.arange(TC_BM)
            tq = np.minimum(t, n - 1)
            qp = pos0 + tq
            qa = _f16(q[tq, h * d : (h + 1) * d] * scale_log2)  # [BM, D]
            o = np.zeros((TC_BM, d), np.float32)
            m = np.full(TC_BM, -np.inf, np.float32)
            lsum = np.zeros(TC_BM, np.float32)
            qmin, qmax = pos0 + t_first, pos0 + t_last
            for it in range(tile0, tile1):
                j0 = it * TC_BN
                j = j0 + np.arange(TC_BN)
                ok_row = (j >= kv_lo) & (j < kv_hi)
                jj = np.where(ok_row, j, kv_lo)
                kt = np.where(ok_row[:, None], kc[jj, kh].astype(np.float32), 0.0)
                vt = np.where(ok_row[:, None], vc[jj, kh].astype(np.float32), 0.0)
                s = (qa @ kt.T).astype(np.float32)  # [BM, BN]
                full = j0 + TC_BN - 1 <= qmin and (window <= 0 or qmax - j0 < window)
                if not full:
                    ok = j[None, :] <= qp[:, None]
                    if window > 0:
                        ok &= (qp[:, None] - j[None, :]) < window
                    s = np.where(ok, s, np.float32(-np.inf))
                mx = np.maximum(m, s.max(axis=1))
                base = np.where(mx == -np.inf, np.float32(0.0), mx)
                c = np.exp2(m - base).astype(np.float32)
                m = mx
                lsum *= c
                o *= c[:, None]
                p = _f16(np.exp2(s - base[:, None]))
                lsum += p.sum(axis=1, dtype=np.float32)
                o += p @ vt
            if sinks is not None:
                sk = np.float32(sinks[h] * LOG2E)
                big = np.maximum(m, sk)
                e = np.exp2(m - big)
                f = (e / (lsum * e + np.exp2(sk - big))).astype(np.float32)
            else:
                f = (1.0 / lsum).astype(np.float32)
            keep = t < n
            out[t[keep], h * d : (h + 1) * d] = (o * f[:, None])[keep]
    return out


def _reference(
    q: np.ndarray,
    kc: np.ndarray,
    vc: np.ndarray,
    pos0: int,
    n_head: int,
    n_kv: int,
    scale: float,
    window: int,
    sinks: np.ndarray | None,
) -> np.ndarray:
    n, d = q.shape[0], kc.shape[2]
    ctx = kc.shape[0]
    hp = HParams(
        arch="qwen2",
        n_layer=1,
        n_embd=n_head * d,
        n_head=n_head,
        n_head_kv=n_kv,
        head_dim=d,
        head_dim_v=d,
        n_ff=8,
        n_vocab=8,
        n_ctx_train=ctx,
        norm="rms",
        norm_eps=1e-6,
        rope=RopeParams(type="none"),
    )
    cache = KVCache(hp, ctx)
    cache.k[0][:] = kc.astype(np.float32)
    cache.v[0][:] = vc.astype(np.float32)
    return attention(
        q.reshape(n, n_head, d),
        cache,
        0,
        cache.k[0][pos0 : pos0 + n].copy(),
        cache.v[0][pos0 : pos0 + n].copy(),
        pos0,
        AttnOptions(scale=scale, window=window, sinks=sinks),
    )


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    assert not np.isnan(got).any()
    g, r = got.astype(np.float64), ref.astype(np.float64)
    return float(np.linalg.norm(g - r) / np.linalg.norm(r))


# FP16 Q (scaled) and P: each rounding is at most 2^-11 relative; scores move by about
# |q||k| 2^-11 (log2 units) and p by that times ln 2, while O = sum p v / sum p sees the same
# rounded p in both sums. Measured here with the cases below: <= ~4e-4; the GPU bound is 2e-3.
TC_BOUND = 2e-3


@pytest.mark.parametrize(
    "n,pos0,nh,nkv,hd,window,sinks",
    [
        (1, 0, 4, 4, 64, 0, False),  # one token
        (37, 0, 14, 2, 64, 0, False),  # qwen, odd length, one partial tile
        (130, 0, 8, 1, 32, 0, False),  # GQA 8, three query tiles, head_dim 32
        (65, 100, 4, 4, 96, 0, False),  # phi3 head_dim, chunked (pos0 > 0, not tile-aligned)
        (200, 0, 8, 1, 64, 128, True),  # gpt-oss: window + sinks, GQA 8
        (70, 300, 14, 2, 64, 128, True),  # window + sinks, second chunk
        (77, 5, 7, 1, 80, 0, True),  # GQA 7, head_dim 80, sinks
        (64, 64, 4, 2, 128, 16, False),  # tile-aligned chunk, tiny window, head_dim 128
        (3, 600, 2, 1, 128, 0, False),  # short chunk far into the cache
    ],
)
def test_emulated_tiling_matches_reference(
    n: int, pos0: int, nh: int, nkv: int, hd: int, window: int, sinks: bool
) -> None:
    rng = np.random.default_rng(n * 31 + pos0)
    kv = pos0 + n
    ctx = kv + 70
    kc = (rng.standard_normal((ctx, nkv, hd)) * 0.5).astype(np.float16)
    vc = rng.standard_normal((ctx, nkv, hd)).astype(np.float16)
    kc[kv:] = np.nan  # past the keys: the kernel must never use them
    vc[kv:] = np.nan
    q = rng.standard_normal((n, nh * hd)).astype(np.float32)
    sk = (rng.standard_normal(nh) * 2).astype(np.float32) if sinks else None
    scale = 1.0 / float(np.sqrt(hd))
    got = emulate_tc(q, kc, vc, pos0, nh, nkv, scale, window, sk)
    kc_ref, vc_ref = kc.copy(), vc.copy()
    kc_ref[kv:] = 0
    vc_ref[kv:] = 0
    ref = _reference(q, kc_ref, vc_ref, pos0, nh, nkv, scale, window, sk)
    err = rel_err(got, ref)
    print(f"emulated tc vs reference: {err:.2e}")
    assert err < TC_BOUND / 4, err


# ------------------------------------------------------------- the kernel source on the host

CUDA_SRC = Path(__file__).resolve().parents[3] / "cuda_src"
HOST_PRELUDE = r"""
// Host emulation of the CUDA pieces attn_prefill_tc_body uses: one std::thread per CUDA
// thread of a block, warp collectives (ldmatrix, mma.sync, shuffles) through per-warp
// barriers, __syncthreads through a block barrier; cp.async copies at once.
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <thread>
#include <vector>
using std::max;
using std::min;
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__
#define __align__(n) __attribute__((aligned(n)))
#define CUDART_INF_F std::numeric_limits<float>::infinity()
struct float2 { float x, y; };
inline float2 make_float2(float a, float b) { return {a, b}; }
typedef _Float16 __half;
struct __half2 { _Float16 x, y; };
inline __half2 __floats2half2_rn(float a, float b) { return {(_Float16)a, (_Float16)b}; }
inline float2 __half22float2(__half2 h) { return {(float)h.x, (float)h.y}; }
#define KV_BLOCK 64
inline void pdl_start() {}
struct Idx { unsigned x, y, z; };
thread_local Idx threadIdx, blockIdx;
alignas(16) unsigned char tc_smem_raw[1 << 17];

struct WarpState {
  std::barrier<>* bar;
  unsigned addr[32];
  float fv[32];
  unsigned a[32][4], b[32][2];
  float c[32][4];
};
WarpState g_warp[4];
std::barrier<>* g_block;

static inline int lane_id() { return threadIdx.x & 31; }
static inline WarpState& W() { return g_warp[threadIdx.x >> 5]; }
inline void __syncthreads() { g_block->arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float v, int m) {
  WarpState& w = W();
  w.fv[lane_id()] = v;
  w.bar->arrive_and_wait();
  const float r = w.fv[lane_id() ^ m];
  w.bar->arrive_and_wait();
  return r;
}
inline unsigned tc_smem(const void* p) {
  return (unsigned)((const unsigned char*)p - tc_smem_raw);
}
inline void tc_cp16(unsigned dst, const void* src, int n) {
  if (n == 16) memcpy(tc_smem_raw + dst, src, 16);
  else memset(tc_smem_raw + dst, 0, 16);
}
inline void tc_commit() {}
template <int N>
inline void tc_wait() {}
static inline _Float16 smem_h(unsigned addr) {
  _Float16 h;
  memcpy(&h, tc_smem_raw + addr, 2);
  return h;
}
static inline unsigned pack2(_Float16 lo, _Float16 hi) {
  unsigned short a, b;
  memcpy(&a, &lo, 2);
  memcpy(&b, &hi, 2);
  return (unsigned)a | ((unsigned)b << 16);
}
static void ldm(unsigned* r, unsigned addr, bool trans) {
  WarpState& w = W();
  const int T = lane_id();
  if (addr % 16) { fprintf(stderr, "ldmatrix: unaligned row address %u\n", addr); abort(); }
  w.addr[T] = addr;
  w.bar->arrive_and_wait();
  const int g = T / 4, t = T % 4;
  for (int i = 0; i < 4; ++i) {
    if (!trans) {
      const unsigned row = w.addr[8 * i + g];
      r[i] = pack2(smem_h(row + 4 * t), smem_h(row + 4 * t + 2));
    } else {
      r[i] = pack2(smem_h(w.addr[8 * i + 2 * t] + 2 * g),
                   smem_h(w.addr[8 * i + 2 * t + 1] + 2 * g));
    }
  }
  w.bar->arrive_and_wait();
}
inline void tc_ldm4(unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3, unsigned addr) {
  unsigned r[4];
  ldm(r, addr, false);
  r0 = r[0]; r1 = r[1]; r2 = r[2]; r3 = r[3];
}
inline void tc_ldm4t(unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3, unsigned addr) {
  unsigned r[4];
  ldm(r, addr, true);
  r0 = r[0]; r1 = r[1]; r2 = r[2]; r3 = r[3];
}
static inline float half_bits(unsigned short s) {
  _Float16 h;
  memcpy(&h, &s, 2);
  return (float)h;
}
static inline float lo_h(unsigned v) { return half_bits(v & 0xffff); }
static inline float hi_h(unsigned v) { return half_bits(v >> 16); }
inline void tc_mma(float* c, const unsigned* a, unsigned b0, unsigned b1) {
  WarpState& w = W();
  const int T = lane_id();
  for (int i = 0; i < 4; ++i) { w.a[T][i] = a[i]; w.c[T][i] = c[i]; }
  w.b[T][0] = b0; w.b[T][1] = b1;
  w.bar->arrive_and_wait();
  float A[16][16], B[16][8], C[16][8];
  for (int L = 0; L < 32; ++L) {
    const int g = L / 4, t = L % 4;
    A[g][2 * t] = lo_h(w.a[L][0]); A[g][2 * t + 1] = hi_h(w.a[L][0]);
    A[g + 8][2 * t] = lo_h(w.a[L][1]); A[g + 8][2 * t + 1] = hi_h(w.a[L][1]);
    A[g][2 * t + 8] = lo_h(w.a[L][2]); A[g][2 * t + 9] = hi_h(w.a[L][2]);
    A[g + 8][2 * t + 8] = lo_h(w.a[L][3]); A[g + 8][2 * t + 9] = hi_h(w.a[L][3]);
    B[2 * t][g] = lo_h(w.b[L][0]); B[2 * t + 1][g] = hi_h(w.b[L][0]);
    B[2 * t + 8][g] = lo_h(w.b[L][1]); B[2 * t + 9][g] = hi_h(w.b[L][1]);
    C[g][2 * t] = w.c[L][0]; C[g][2 * t + 1] = w.c[L][1];
    C[g + 8][2 * t] = w.c[L][2]; C[g + 8][2 * t + 1] = w.c[L][3];
  }
  const int g = T / 4, t = T % 4;
  const int rows[4] = {g, g, g + 8, g + 8}, cols[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
  float d[4];
  for (int i = 0; i < 4; ++i) {
    float s = C[rows[i]][cols[i]];
    for (int k = 0; k < 16; ++k) s += A[rows[i]][k] * B[k][cols[i]];
    d[i] = s;
  }
  w.bar->arrive_and_wait();
  for (int i = 0; i < 4; ++i) c[i] = d[i];
}
inline unsigned tc_pack(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const unsigned*>(&h);
}
"""

HOST_MAIN = r"""// driver: input file -> run every block -> output file
// The cache arrives as a pool of KV_BLOCK-row blocks and a block table per chunk; one launch
// covers every chunk (grid z), as the worker's steps do.
template <int D>
static void run_grid(const float* q, int q_stride, const __half* kc, const __half* vc,
                     const int* seq, int n_seq, const int* bt, int bt_stride, int nh, int nkv,
                     float sl2, int window, const float* sinks, float* out, int out_stride) {
  int longest = 0;
  for (int z = 0; z < n_seq; ++z) longest = std::max(longest, seq[3 * z + 1]);
  const int nqt = (longest + TC_BM - 1) / TC_BM;
  for (int bz = 0; bz < n_seq; ++bz)
    for (int by = 0; by < nh; ++by)
      for (int bx = 0; bx < nqt; ++bx) {
        memset(tc_smem_raw, 0xff, sizeof(tc_smem_raw));  // NaN halves: unwritten reads show
        std::barrier<> blk(TC_THREADS);
        std::vector<std::barrier<>*> wb;
        for (int i = 0; i < TC_THREADS / 32; ++i) {
          wb.push_back(new std::barrier<>(32));
          g_warp[i].bar = wb.back();
        }
        g_block = &blk;
        std::vector<std::thread> th;
        for (int t = 0; t < TC_THREADS; ++t)
          th.emplace_back([=] {
            threadIdx = {(unsigned)t, 0, 0};
            blockIdx = {(unsigned)bx, (unsigned)by, (unsigned)bz};
            attn_prefill_tc_body<D>(q, q_stride, kc, vc, seq, bt, bt_stride, nh, nkv, sl2,
                                    window, sinks, out, out_stride);
          });
        for (auto& x : th) x.join();
        for (auto* b : wb) delete b;
      }
}

int main(int argc, char** argv) {
  FILE* f = fopen(argv[1], "rb");
  int h[11];
  float sl2;
  if (fread(h, 4, 11, f) != 11 || fread(&sl2, 4, 1, f) != 1) return 2;
  const int D = h[0], n = h[1], nh = h[2], nkv = h[3], rows = h[4], n_seq = h[5],
            window = h[6], has_sinks = h[7], q_stride = h[8], out_stride = h[9],
            bt_stride = h[10];
  std::vector<int> seq(3 * n_seq), bt((size_t)n_seq * bt_stride);
  std::vector<float> q((size_t)n * q_stride), sinks(nh), out((size_t)n * out_stride, NAN);
  std::vector<__half> kc((size_t)rows * nkv * D), vc((size_t)rows * nkv * D);
  size_t ok = fread(seq.data(), 4, seq.size(), f) + fread(bt.data(), 4, bt.size(), f) +
              fread(q.data(), 4, q.size(), f) + fread(kc.data(), 2, kc.size(), f) +
              fread(vc.data(), 2, vc.size(), f);
  if (has_sinks) ok += fread(sinks.data(), 4, nh, f);
  fclose(f);
  if (ok != seq.size() + bt.size() + q.size() + kc.size() + vc.size() + (has_sinks ? nh : 0))
    return 3;
  const float* sk = has_sinks ? sinks.data() : nullptr;
  switch (D) {
#define RUN(d)                                                                          \
  case d:                                                                               \
    run_grid<d>(q.data(), q_stride, kc.data(), vc.data(), seq.data(), n_seq, bt.data(), \
                bt_stride, nh, nkv, sl2, window, sk, out.data(), out_stride);           \
    break;
    RUN(32) RUN(64) RUN(80) RUN(96) RUN(128)
    default: return 4;
  }
  FILE* o = fopen(argv[2], "wb");
  fwrite(out.data(), 4, out.size(), o);
  fclose(o);
  return 0;
}
"""


@pytest.fixture(scope="module")
def host_kernel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = (CUDA_SRC / "attention.cu").read_text()
    defs = "\n".join(re.findall(r"^#define TC_(?:BM|BN|THREADS)\b.*$", src, re.M))
    i = src.index("template <int D>\n__device__ __forceinline__ void attn_prefill_tc_body")
    j = src.index("#define TC_KERNEL(D)")
    d = tmp_path_factory.mktemp("tc_host")
    cpp = d / "tc_host.cpp"
    cpp.write_text(HOST_PRELUDE + "\n" + defs + "\n" + src[i:j] + "\n" + HOST_MAIN)
    exe = d / "tc_host"
    cmd = ["g++", "-std=c++20", "-O2", "-pthread", "-Wno-unknown-pragmas", str(cpp), "-o"]
    subprocess.run([*cmd, str(exe)], check=True, capture_output=True)
    return exe


def _paged(
    rng: np.random.Generator, kc: np.ndarray, vc: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """The logical cache [ctx] as a pool of shuffled KV_BLOCK-row blocks (NaN in the blocks
    no table points to) and its block table."""
    ctx, nkv, hd = kc.shape
    nb = -(-ctx // TC_BN)
    phys = rng.permutation(nb + 3)[:nb]  # spare blocks between, never read
    rows = (nb + 3) * TC_BN
    pk = np.full((rows, nkv, hd), np.nan, np.float16)
    pv = np.full((rows, nkv, hd), np.nan, np.float16)
    for b, p in enumerate(phys):
        n = min(TC_BN, ctx - b * TC_BN)
        pk[p * TC_BN : p * TC_BN + n] = kc[b * TC_BN : b * TC_BN + n]
        pv[p * TC_BN : p * TC_BN + n] = vc[b * TC_BN : b * TC_BN + n]
    return pk, pv, phys.astype(np.int32), rows


def _run_host(
    exe: Path,
    tmp: Path,
    q: np.ndarray,
    pk: np.ndarray,
    pv: np.ndarray,
    chunks: list[tuple[int, int, int]],
    table: np.ndarray,
    nh: int,
    window: int,
    sk: np.ndarray | None,
    scale: float,
) -> np.ndarray:
    """Run the host-compiled kernel over `chunks` (row0, n, pos0), all with one table;
    returns the written rows [n, nh*hd] (the padding between rows checked untouched)."""
    n = q.shape[0]
    rows, nkv, hd = pk.shape
    q_stride, out_stride = nh * hd + 2, nh * hd + 4  # strides past the rows
    qpad = np.zeros((n, q_stride), np.float32)
    qpad[:, : nh * hd] = q
    bt_stride = table.size + 1
    bt = np.zeros((len(chunks), bt_stride), np.int32)
    bt[:, : table.size] = table
    inp = tmp / "in.bin"
    with inp.open("wb") as f:
        hdr = [hd, n, nh, nkv, rows, len(chunks), window, int(sk is not None)]
        np.array([*hdr, q_stride, out_stride, bt_stride], np.int32).tofile(f)
        np.array([scale * LOG2E], np.float32).tofile(f)
        np.array(chunks, np.int32).reshape(-1).tofile(f)
        bt.tofile(f)
        qpad.tofile(f)
        pk.tofile(f)
        pv.tofile(f)
        if sk is not None:
            sk.tofile(f)
    outp = tmp / "out.bin"
    subprocess.run([str(exe), str(inp), str(outp)], check=True, timeout=120)
    out = np.fromfile(outp, np.float32).reshape(n, out_stride)
    assert np.isnan(out[:, nh * hd :]).all()  # nothing written between rows
    return out[:, : nh * hd]


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is required (CI has it)")
@pytest.mark.parametrize(
    "n,pos0,nh,nkv,hd,window,sinks",
    [
        (130, 0, 2, 1, 64, 0, False),  # three query tiles, a partial one
        (70, 300, 2, 1, 64, 128, True),  # second chunk, window + sinks
        (77, 5, 2, 1, 80, 0, True),
        (65, 100, 2, 2, 96, 0, False),
        (3, 600, 2, 1, 128, 0, False),
        (40, 0, 3, 1, 32, 16, True),  # GQA 3
    ],
)
def test_kernel_source_on_host_matches_reference(
    host_kernel: Path,
    tmp_path: Path,
    n: int,
    pos0: int,
    nh: int,
    nkv: int,
    hd: int,
    window: int,
    sinks: bool,
) -> None:
    rng = np.random.default_rng(n * 31 + pos0)
    kv = pos0 + n
    ctx = kv + 9
    kc = (rng.standard_normal((ctx, nkv, hd)) * 0.5).astype(np.float16)
    vc = rng.standard_normal((ctx, nkv, hd)).astype(np.float16)
    kc[kv:] = np.nan
    vc[kv:] = np.nan
    q = rng.standard_normal((n, nh * hd)).astype(np.float32)
    sk = (rng.standard_normal(nh) * 2).astype(np.float32) if sinks else None
    scale = 1.0 / float(np.sqrt(hd))
    pk, pv, table, _ = _paged(rng, kc, vc)
    got = _run_host(host_kernel, tmp_path, q, pk, pv, [(0, n, pos0)], table, nh, window, sk, scale)
    kr, vr = kc.copy(), vc.copy()
    kr[kv:] = 0
    vr[kv:] = 0
    ref = _reference(q, kr, vr, pos0, nh, nkv, scale, window, sk)
    assert rel_err(got, ref) < TC_BOUND / 4
    # the same arithmetic as the NumPy twin, up to the order of the fp32 sums
    assert rel_err(got, emulate_tc(q, kc, vc, pos0, nh, nkv, scale, window, sk)) < 1e-4


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is required (CI has it)")
@pytest.mark.parametrize("window,sinks", [(0, False), (100, True)])
def test_kernel_rows_do_not_depend_on_the_chunking(
    host_kernel: Path, tmp_path: Path, window: int, sinks: bool
) -> None:
    """Batch invariance of the prompt attention: a 150-token prompt run as one chunk, as
    three chunks of one launch (cut at 37 and 101, not at tile edges), and beside another
    sequence's chunk gives bit-identical rows."""
    rng = np.random.default_rng(11 + window)
    n, nh, nkv, hd = 150, 4, 2, 64
    kc = (rng.standard_normal((n + 5, nkv, hd)) * 0.5).astype(np.float16)
    vc = rng.standard_normal((n + 5, nkv, hd)).astype(np.float16)
    q = rng.standard_normal((n, nh * hd)).astype(np.float32)
    sk = (rng.standard_normal(nh) * 2).astype(np.float32) if sinks else None
    scale = 1.0 / float(np.sqrt(hd))
    pk, pv, table, _ = _paged(rng, kc, vc)
    args = (table, nh, window, sk, scale)
    whole = _run_host(host_kernel, tmp_path, q, pk, pv, [(0, n, 0)], *args)
    cut = [(0, 37, 0), (37, 64, 37), (101, 49, 101)]
    parts = _run_host(host_kernel, tmp_path, q, pk, pv, cut, *args)
    assert np.array_equal(whole.view(np.uint32), parts.view(np.uint32))
    # rows 37..100 again, launched beside a chunk of another sequence
    q2 = np.concatenate([rng.standard_normal((20, nh * hd)).astype(np.float32), q[37:101]])
    beside = _run_host(host_kernel, tmp_path, q2, pk, pv, [(0, 20, 3), (20, 64, 37)], *args)
    assert np.array_equal(beside[20:].view(np.uint32), whole[37:101].view(np.uint32))
