// Runs CUDA kernels on the CPU, for correctness only (tools/kernel_emu/__init__.py compiles a
// kernel file with this header forced in front of it).
//
// A launch runs its blocks one after another; a block's threads are fibers on the calling thread,
// each running until it reaches a barrier (__syncthreads, or the warp rendezvous of a shuffle,
// ballot, mma or ldmatrix) or returns, so barriers are real rendezvous between the threads. Shared
// memory is a process-wide buffer (dynamic) or function statics (static `__shared__`): both are
// correct because only one block runs at a time. Float intrinsics with an explicit rounding
// (__fmul_rn, ...) are exact IEEE float32 operations here as on the GPU; plain float expressions
// are not contracted into FMAs (-ffp-contract=off) where nvcc may contract them, so only kernels
// whose float steps are all explicit give the GPU's bits. Inline PTX does not run: a function that
// reaches one aborts the process, except where a kernel gives a KERNEL_EMU stand-in (the fp16 mma,
// cp.async, ldmatrix). A kernel that waits for another block (a grid-wide barrier) never returns
// here, as blocks run one at a time.
#pragma once

#include <cuda_fp16.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <functional>
#include <ucontext.h>
#include <vector>

#define KERNEL_EMU 1
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __noinline__
#undef __launch_bounds__
#undef __align__
#ifdef KERNEL_EMU_SCAN  // the signature scan (tools/kernel_emu) finds kernels by this mark
#define __global__ KERNEL_EMU_GLOBAL
#else
#define __global__
#endif
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define EMU_ASM(...) ::emu::unsupported(__func__)

namespace emu {

[[noreturn]] inline void unsupported(const char* where) {
  std::fprintf(stderr, "kernel_emu: inline PTX reached in %s\n", where);
  std::abort();
}

struct Launch {
  unsigned gx, gy, gz, bx, by, bz;
  size_t smem;
};

constexpr int kWarp = 32;

// A block's threads are fibers (ucontext) on the calling thread: each runs until it reaches a
// barrier or returns, then the next runnable one runs. A barrier (of the block or of a warp)
// counts the threads of its scope that have not returned, those that have arrived, and its
// generation; it releases, advancing the generation, when every live thread has arrived.
struct Barrier {
  int live = 0, arrived = 0;
  unsigned gen = 0;
};

struct Fiber {
  ucontext_t ctx;
  uint3 tid;
  int lane = 0, warp = 0;
  bool done = false;
  Barrier* waits = nullptr;  // the barrier it waits at, in generation gen
  unsigned gen = 0;
};

// What a warp's lanes exchange: one 64-bit value a lane (shuffles, ballots, ldmatrix's row
// addresses), or an mma's fragments.
struct WarpState {
  int lanes = kWarp;  // fewer in a block's last warp when blockDim is not a multiple of 32
  Barrier bar;
  std::array<uint64_t, kWarp> slot{};
  std::array<std::array<uint32_t, 8>, kWarp> frag{};
};

struct BlockState {
  std::vector<Fiber> fibers;
  std::vector<std::unique_ptr<char[]>> stacks;
  ucontext_t main;
  int cur = 0;
  Barrier bar;
  std::vector<WarpState> warps;
  std::function<void()> body;
};

constexpr size_t kStack = 256 * 1024;

inline BlockState g_block;
inline uint3 g_block_dim, g_grid_dim;
inline std::vector<uint8_t> g_dyn_smem;
inline uint3 t_thread_idx, t_block_idx;  // the running fiber's
inline int t_lane, t_warp;

inline uint8_t* dyn_smem() { return g_dyn_smem.data(); }

inline void yield_to_scheduler() {
  BlockState& B = g_block;
  swapcontext(&B.fibers[B.cur].ctx, &B.main);
}

inline void release(Barrier& b) {
  b.arrived = 0;
  ++b.gen;
}

// The running thread arrives; the last to arrive releases the others, the rest wait.
inline void arrive(Barrier& b) {
  if (++b.arrived == b.live) return release(b);
  Fiber& me = g_block.fibers[g_block.cur];
  me.waits = &b;
  me.gen = b.gen;
  yield_to_scheduler();
  me.waits = nullptr;
}

// A returned thread leaves its barriers: one the others already all wait at releases.
inline void leave(Barrier& b) {
  if (--b.live > 0 && b.arrived == b.live) release(b);
}

inline void block_barrier() { arrive(g_block.bar); }
inline void warp_sync() { arrive(g_block.warps[t_warp].bar); }

template <class T>
T shfl(T v, int src) {
  static_assert(sizeof(T) <= 8);
  WarpState& w = g_block.warps[t_warp];
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  w.slot[t_lane] = bits;
  warp_sync();
  const uint64_t r = w.slot[(src >= 0 && src < kWarp) ? src : t_lane];
  warp_sync();
  T out;
  std::memcpy(&out, &r, sizeof(T));
  return out;
}

inline void fiber_main() {
  BlockState& B = g_block;
  B.body();
  Fiber& me = B.fibers[B.cur];
  me.done = true;
  leave(B.bar);
  leave(B.warps[me.warp].bar);
}  // returns to B.main (uc_link)

inline bool runnable(const Fiber& f) {
  return !f.done && (f.waits == nullptr || f.waits->gen != f.gen);
}

// PTX prmt.b32 in its default mode: selector nibble i picks byte (nibble & 7) of b:a (a the
// low four), and its bit 3 replicates that byte's sign bit over the result byte.
inline uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
  const uint64_t v = (uint64_t(b) << 32) | a;
  uint32_t r = 0;
  for (int i = 0; i < 4; ++i) {
    const uint32_t n = (sel >> (4 * i)) & 0xF;
    uint32_t byte = uint32_t(v >> (8 * (n & 7))) & 0xFF;
    if (n & 8) byte = (byte & 0x80) ? 0xFF : 0x00;
    r |= byte << (8 * i);
  }
  return r;
}

inline unsigned dyn_smem_size() { return unsigned(g_dyn_smem.size() - 16); }

// D = A · B + D on the warp for mma.m16n8k16.row.col.f32.f16.f16.f32 (lane = 4 g + t):
// A register r holds the fp16 pair row g + 8 (r & 1), k = 8 (r >> 1) + 2 t + {0, 1}; B register
// r the pair k = 8 r + 2 t + {0, 1}, n = g; C/D element e is row g + 8 (e >> 1), n = 2 t +
// (e & 1). The products are exact in float; the sum here runs in k order from D (the tensor
// core's own order is not documented: emulated sums agree with the GPU to rounding, not bits).
inline void mma_m16n8k16_f16(float d[4], const uint32_t a[4], const uint32_t b[2]) {
  WarpState& w = g_block.warps[t_warp];
  for (int r = 0; r < 4; ++r) w.frag[t_lane][r] = a[r];
  for (int r = 0; r < 2; ++r) w.frag[t_lane][4 + r] = b[r];
  warp_sync();
  auto half = [](uint32_t v, int i) -> float {
    return __half2float(__ushort_as_half(uint16_t(v >> (16 * i))));
  };
  const int g = t_lane >> 2, t = t_lane & 3;
  float out[4];
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e >> 1), col = 2 * t + (e & 1);
    float s = d[e];
    for (int k = 0; k < 16; ++k) {
      const int la = 4 * (row & 7) + (k & 7) / 2, ra = (row >> 3) + 2 * (k >> 3);
      const int lb = 4 * col + (k & 7) / 2, rb = k >> 3;
      s += half(w.frag[la][ra], k & 1) * half(w.frag[lb][4 + rb], k & 1);
    }
    out[e] = s;
  }
  warp_sync();
  for (int e = 0; e < 4; ++e) d[e] = out[e];
}

// D = A · B + C on the warp: A 16x32 (row), B 32x8 (col), int32 C and D, the fragments as
// PTX lays them out for mma.m16n8k32 (lane = 4 g + t): A register r holds row g + 8 (r & 1),
// k = 16 (r >> 1) + 4 t + byte; B register r holds k = 16 r + 4 t + byte, n = g; C/D element
// e is row g + 8 (e >> 1), n = 2 t + (e & 1). A_SIGNED / B_SIGNED pick s8 or u8. Integer sums
// are exact: these are the GPU's bits.
template <bool A_SIGNED, bool B_SIGNED>
void mma_m16n8k32(int d[4], const uint32_t a[4], const uint32_t b[2], const int c[4]) {
  WarpState& w = g_block.warps[t_warp];
  for (int r = 0; r < 4; ++r) w.frag[t_lane][r] = a[r];
  for (int r = 0; r < 2; ++r) w.frag[t_lane][4 + r] = b[r];
  warp_sync();
  auto byte = [](uint32_t v, int i, bool sgn) -> int {
    const uint32_t u = (v >> (8 * i)) & 0xFFu;
    return sgn ? int(int8_t(u)) : int(u);
  };
  const int g = t_lane >> 2, t = t_lane & 3;
  int out[4];
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e >> 1), col = 2 * t + (e & 1);
    int64_t s = c[e];
    for (int k = 0; k < 32; ++k) {
      const int la = 4 * (row & 7) + (k & 15) / 4, ra = (row >> 3) + 2 * (k >> 4);
      const int lb = 4 * col + (k & 15) / 4, rb = k >> 4;
      s += int64_t(byte(w.frag[la][ra], k & 3, A_SIGNED)) *
           byte(w.frag[lb][4 + rb], k & 3, B_SIGNED);
    }
    out[e] = int(int32_t(uint32_t(uint64_t(s))));  // wraps as the hardware's int32 does
  }
  warp_sync();
  for (int e = 0; e < 4; ++e) d[e] = out[e];
}

// ldmatrix.sync.aligned.m8n8.x4.b16: lanes 8q .. 8q + 7 give the row addresses (16 bytes, 8
// b16 a row) of matrix q; register q of lane T receives elements 2 (T % 4) and + 1 of row
// T / 4, or with .trans elements T / 4 of rows 2 (T % 4) and + 1 (the matrix transposed).
inline void ldmatrix_x4(uint32_t r[4], const void* row, bool trans = false) {
  WarpState& w = g_block.warps[t_warp];
  w.slot[t_lane] = reinterpret_cast<uint64_t>(row);
  warp_sync();
  for (int q = 0; q < 4; ++q) {
    auto at = [&](int rr, int cc) {
      uint16_t v;
      std::memcpy(&v, reinterpret_cast<const uint8_t*>(w.slot[8 * q + rr]) + 2 * cc, 2);
      return uint32_t(v);
    };
    const int a = t_lane / 4, b = 2 * (t_lane % 4);
    r[q] = trans ? at(b, a) | (at(b + 1, a) << 16) : at(a, b) | (at(a, b + 1) << 16);
  }
  warp_sync();
}
// the same at a shared address (an offset into the dynamic shared memory)
inline void ldmatrix_x4_at(uint32_t r[4], unsigned addr, bool trans) {
  ldmatrix_x4(r, g_dyn_smem.data() + addr, trans);
}

// Runs `body` once for every thread of every block of the launch.
template <class F>
void run(const Launch& L, F body) {
  const unsigned n = L.bx * L.by * L.bz;
  const unsigned blocks = L.gx * L.gy * L.gz;
  if (n == 0 || n > 1024 || blocks == 0) {
    std::fprintf(stderr, "kernel_emu: bad launch (%u threads, %u blocks)\n", n, blocks);
    std::abort();
  }
  g_block_dim = {L.bx, L.by, L.bz};
  g_grid_dim = {L.gx, L.gy, L.gz};
  g_dyn_smem.assign(L.smem + 16, 0xCD);  // never zero: a kernel must not count on it
  BlockState& B = g_block;
  B.body = body;
  B.fibers.assign(n, Fiber{});
  while (B.stacks.size() < n) B.stacks.emplace_back(new char[kStack]);
  const unsigned n_warps = (n + kWarp - 1) / kWarp;
  for (unsigned b = 0; b < blocks; ++b) {
    t_block_idx = {b % L.gx, (b / L.gx) % L.gy, b / (L.gx * L.gy)};
    B.bar = Barrier{int(n)};
    B.warps.assign(n_warps, WarpState{});
    for (unsigned w = 0; w < n_warps; ++w)
      B.warps[w].lanes = B.warps[w].bar.live = int(std::min<unsigned>(kWarp, n - w * kWarp));
    for (unsigned i = 0; i < n; ++i) {
      Fiber& f = B.fibers[i];
      f = Fiber{};
      f.tid = {i % L.bx, (i / L.bx) % L.by, i / (L.bx * L.by)};
      f.lane = int(i % kWarp);
      f.warp = int(i / kWarp);
      getcontext(&f.ctx);
      f.ctx.uc_stack.ss_sp = B.stacks[i].get();
      f.ctx.uc_stack.ss_size = kStack;
      f.ctx.uc_link = &B.main;
      makecontext(&f.ctx, fiber_main, 0);
    }
    for (;;) {
      bool ran = false, all_done = true;
      for (unsigned i = 0; i < n; ++i) {
        Fiber& f = B.fibers[i];
        if (f.done) continue;
        all_done = false;
        if (!runnable(f)) continue;
        ran = true;
        B.cur = int(i);
        t_thread_idx = f.tid;
        t_lane = f.lane;
        t_warp = f.warp;
        swapcontext(&B.main, &f.ctx);
      }
      if (all_done) break;
      if (!ran) {
        std::fprintf(stderr, "kernel_emu: every thread of block %u waits (a deadlock)\n", b);
        std::abort();
      }
    }
  }
}

}  // namespace emu

#define threadIdx (::emu::t_thread_idx)
#define blockIdx (::emu::t_block_idx)
#define blockDim (::emu::g_block_dim)
#define gridDim (::emu::g_grid_dim)

inline void __syncthreads() { emu::block_barrier(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::warp_sync(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
template <class T>
T __shfl_xor_sync(unsigned, T v, int m, int = 32) { return emu::shfl(v, emu::t_lane ^ m); }
template <class T>
T __shfl_sync(unsigned, T v, int src, int = 32) { return emu::shfl(v, src); }
template <class T>
T __shfl_down_sync(unsigned, T v, unsigned d, int = 32) {
  return emu::shfl(v, emu::t_lane + int(d) < 32 ? emu::t_lane + int(d) : emu::t_lane);
}
template <class T>
T __shfl_up_sync(unsigned, T v, unsigned d, int = 32) {
  return emu::shfl(v, emu::t_lane >= int(d) ? emu::t_lane - int(d) : emu::t_lane);
}

inline unsigned __ballot_sync(unsigned, int pred) {
  emu::WarpState& w = emu::g_block.warps[emu::t_warp];
  w.slot[emu::t_lane] = pred != 0;
  emu::warp_sync();
  unsigned r = 0;
  for (int l = 0; l < w.lanes; ++l) r |= unsigned(w.slot[l] & 1u) << l;
  emu::warp_sync();
  return r;
}
inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned s) {
  return unsigned(((uint64_t(hi) << 32) | lo) >> (s & 31));
}
inline unsigned __funnelshift_rc(unsigned lo, unsigned hi, unsigned s) {
  return unsigned(((uint64_t(hi) << 32) | lo) >> (s < 32 ? s : 32));
}

template <class T>
T __ldg(const T* p) { return *p; }
template <class T>
T __ldcg(const T* p) { return *p; }

inline int __dp4a(int a, int b, int c) {
  for (int i = 0; i < 4; ++i) c += int(int8_t(a >> (8 * i))) * int(int8_t(b >> (8 * i)));
  return c;
}
inline unsigned __dp4a(unsigned a, unsigned b, unsigned c) {
  for (int i = 0; i < 4; ++i) c += ((a >> (8 * i)) & 0xFFu) * ((b >> (8 * i)) & 0xFFu);
  return c;
}
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }  // (the GPU's is approximate)
using std::isfinite;
using std::isinf;
using std::isnan;
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fmaf(a, b, c); }
inline int __float2int_rn(float x) { return int(std::nearbyintf(x)); }
inline float __int2float_rn(int x) { return float(x); }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __int_as_float(int u) { float f; std::memcpy(&f, &u, 4); return f; }
inline int __float_as_int(float f) { int u; std::memcpy(&u, &f, 4); return u; }
[[noreturn]] inline void __trap() { std::abort(); }
// A shared-memory address is the offset into the dynamic shared memory (the only shared
// memory a kernel hands to cp.async here); emu::cp_async16 copies at once.
inline size_t __cvta_generic_to_shared(const void* p) {
  const auto* b = reinterpret_cast<const uint8_t*>(p);
  if (b < emu::g_dyn_smem.data() || b >= emu::g_dyn_smem.data() + emu::g_dyn_smem.size()) {
    std::fprintf(stderr, "kernel_emu: a shared address outside the dynamic shared memory\n");
    std::abort();
  }
  return size_t(b - emu::g_dyn_smem.data());
}
namespace emu {
// cp.async's 16 bytes (zeros past src_bytes), done at once; to a shared pointer, or to the
// shared address of a dynamic shared-memory byte
inline void copy16(void* dst, const void* src, int src_bytes) {
  std::memset(dst, 0, 16);
  if (src_bytes > 0) std::memcpy(dst, src, size_t(std::min(src_bytes, 16)));
}
// cp.async's 4 bytes (zeros when src_bytes is 0), done at once
inline void copy4(void* dst, const void* src, int src_bytes) {
  std::memset(dst, 0, 4);
  if (src_bytes > 0) std::memcpy(dst, src, 4);
}
inline void cp_async16(unsigned dst, const void* src, int src_bytes) {
  copy16(g_dyn_smem.data() + dst, src, src_bytes);
}
}  // namespace emu
inline int __popc(unsigned x) { return __builtin_popcount(x); }
// prmt without its sign replication (only bits 0-2 of each selector nibble count)
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  return emu::prmt(x, y, s & 0x7777u);
}
inline int max(int a, int b) { return a > b ? a : b; }
inline int min(int a, int b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline float max(float a, float b) { return std::fmax(a, b); }
inline float min(float a, float b) { return std::fmin(a, b); }
// Atomics need no lock: one fiber runs at a time and none yields inside one.
template <class T>
T atomicExch(T* p, T v) {
  const T o = *p;
  *p = v;
  return o;
}
inline void __nanosleep(unsigned) {}
template <class T>
T atomicAdd(T* p, T v) {
  const T o = *p;
  *p = o + v;
  return o;
}
