// Runs CUDA kernels on the CPU, for correctness only (tools/kernel_emu/__init__.py compiles a
// kernel file with this header forced in front of it).
//
// A launch runs its blocks one after another; a block's threads are OS threads, so
// __syncthreads, warp shuffles and ballots are real rendezvous between them. Shared
// memory is a process-wide buffer (dynamic) or function statics (static `__shared__`): both
// are correct because only one block runs at a time. Float intrinsics with an explicit
// rounding (__fmul_rn, ...) are exact IEEE float32 operations here as on the GPU; plain float
// expressions are not contracted into FMAs (-ffp-contract=off) where nvcc may contract them, so
// only kernels whose float steps are all explicit give the GPU's bits. Inline PTX does not
// run: a function that reaches one aborts the process. A kernel that waits for another block
// (a grid-wide barrier) never returns here, as blocks run one at a time.
#pragma once

#include <cuda_fp16.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
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

// What a warp's lanes exchange: one 64-bit value a lane (shuffles, ballots).
struct WarpState {
  std::unique_ptr<std::barrier<>> bar;
  int lanes = kWarp;  // fewer in a block's last warp when blockDim is not a multiple of 32
  std::array<uint64_t, kWarp> slot{};
};

struct BlockState {
  std::unique_ptr<std::barrier<>> bar;
  std::vector<WarpState> warps;
};

inline BlockState g_block;
inline uint3 g_block_dim, g_grid_dim;
inline std::vector<uint8_t> g_dyn_smem;
inline std::mutex g_atomic;
inline thread_local uint3 t_thread_idx, t_block_idx;
inline thread_local int t_lane, t_warp;

inline uint8_t* dyn_smem() { return g_dyn_smem.data(); }

inline void warp_sync() { g_block.warps[t_warp].bar->arrive_and_wait(); }

template <class T>
T shfl(T v, int src) {
  static_assert(sizeof(T) <= 8);
  WarpState& w = g_block.warps[t_warp];
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  w.slot[t_lane] = bits;
  w.bar->arrive_and_wait();
  const uint64_t r = w.slot[(src >= 0 && src < kWarp) ? src : t_lane];
  w.bar->arrive_and_wait();
  T out;
  std::memcpy(&out, &r, sizeof(T));
  return out;
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
  const unsigned n_warps = (n + kWarp - 1) / kWarp;
  auto reset = [&] {
    g_block.bar = std::make_unique<std::barrier<>>(n);
    g_block.warps = std::vector<WarpState>(n_warps);
    for (unsigned w = 0; w < n_warps; ++w) {
      g_block.warps[w].lanes = int(std::min<unsigned>(kWarp, n - w * kWarp));
      g_block.warps[w].bar = std::make_unique<std::barrier<>>(g_block.warps[w].lanes);
    }
  };
  std::barrier<> gate(n);
  std::vector<std::thread> threads;
  threads.reserve(n);
  for (unsigned i = 0; i < n; ++i) {
    threads.emplace_back([&, i] {
      t_thread_idx = {i % L.bx, (i / L.bx) % L.by, i / (L.bx * L.by)};
      t_lane = int(i % kWarp);
      t_warp = int(i / kWarp);
      for (unsigned b = 0; b < blocks; ++b) {
        if (i == 0) reset();
        gate.arrive_and_wait();
        t_block_idx = {b % L.gx, (b / L.gx) % L.gy, b / (L.gx * L.gy)};
        body();
        // a thread that has returned no longer takes part in the block's barriers
        g_block.bar->arrive_and_drop();
        g_block.warps[t_warp].bar->arrive_and_drop();
        gate.arrive_and_wait();
      }
    });
  }
  for (auto& t : threads) t.join();
}

}  // namespace emu

#define threadIdx (::emu::t_thread_idx)
#define blockIdx (::emu::t_block_idx)
#define blockDim (::emu::g_block_dim)
#define gridDim (::emu::g_grid_dim)

inline void __syncthreads() { emu::g_block.bar->arrive_and_wait(); }
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
  w.bar->arrive_and_wait();
  unsigned r = 0;
  for (int l = 0; l < w.lanes; ++l) r |= unsigned(w.slot[l] & 1u) << l;
  w.bar->arrive_and_wait();
  return r;
}
inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned s) {
  return unsigned(((uint64_t(hi) << 32) | lo) >> (s & 31));
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
// (the address is only ever handed to inline PTX, which aborts)
inline size_t __cvta_generic_to_shared(const void* p) { return reinterpret_cast<size_t>(p); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const uint64_t v = (uint64_t(y) << 32) | x;
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) r |= unsigned((v >> (8 * ((s >> (4 * i)) & 7))) & 0xFF) << (8 * i);
  return r;
}
inline int max(int a, int b) { return a > b ? a : b; }
inline int min(int a, int b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline float max(float a, float b) { return std::fmax(a, b); }
inline float min(float a, float b) { return std::fmin(a, b); }
template <class T>
T atomicExch(T* p, T v) {
  std::lock_guard<std::mutex> g(emu::g_atomic);
  const T o = *p;
  *p = v;
  return o;
}
inline void __nanosleep(unsigned) { std::this_thread::yield(); }
template <class T>
T atomicAdd(T* p, T v) {
  std::lock_guard<std::mutex> g(emu::g_atomic);
  const T o = *p;
  *p = o + v;
  return o;
}
