// ggml tensor block layouts and in-kernel dequantization, shared by every matrix kernel.
//
// Type ids are ggml's (GGMLQuantizationType), so the Python side passes them through as-is.
// Every type is described as blocks of QK elements stored in BYTES bytes; a row of K elements
// is K/QK consecutive blocks (K must be a multiple of QK; for F32/F16/BF16 QK is 32 by our
// convention, so rows are whole 32-element groups).
//
// The one primitive is dequant8<T>(blk, g, w): the 8 consecutive elements 8g..8g+7 of the
// block at `blk` as floats. It works on global or shared memory and needs only the alignment
// that ggml's layout guarantees when the block array starts 16-byte aligned (2 bytes for the
// 18/22/34/210-byte blocks, 1 byte for MXFP4's 17-byte blocks), so it reads with 1-, 2- or
// 4-byte loads as the layout allows.
#pragma once
#include <cuda_fp16.h>
#include "pdl.cuh"
#include <stdint.h>
#include <string.h>

// Device functions here are also host-callable so that CI (no GPU) can check dequant8 against
// the NumPy reference with a host program built by nvcc (tests/unit/cuda/test_matmul_args.py).
#define QDEV __host__ __device__ __forceinline__

QDEV float q_bits_float(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, 4);
  return f;
#endif
}

enum QType : int {
  QT_F32 = 0,
  QT_F16 = 1,
  QT_Q4_0 = 2,
  QT_Q4_1 = 3,
  QT_Q5_0 = 6,
  QT_Q5_1 = 7,
  QT_Q8_0 = 8,
  QT_Q4_K = 12,
  QT_Q5_K = 13,
  QT_Q6_K = 14,
  QT_BF16 = 30,
  QT_MXFP4 = 39,
};

template <int T> struct QTraits;
template <> struct QTraits<QT_F32> { static constexpr int QK = 32, BYTES = 128; };
template <> struct QTraits<QT_F16> { static constexpr int QK = 32, BYTES = 64; };
template <> struct QTraits<QT_BF16> { static constexpr int QK = 32, BYTES = 64; };
template <> struct QTraits<QT_Q4_0> { static constexpr int QK = 32, BYTES = 18; };
template <> struct QTraits<QT_Q4_1> { static constexpr int QK = 32, BYTES = 20; };
template <> struct QTraits<QT_Q5_0> { static constexpr int QK = 32, BYTES = 22; };
template <> struct QTraits<QT_Q5_1> { static constexpr int QK = 32, BYTES = 24; };
template <> struct QTraits<QT_Q8_0> { static constexpr int QK = 32, BYTES = 34; };
template <> struct QTraits<QT_MXFP4> { static constexpr int QK = 32, BYTES = 17; };
template <> struct QTraits<QT_Q4_K> { static constexpr int QK = 256, BYTES = 144; };
template <> struct QTraits<QT_Q5_K> { static constexpr int QK = 256, BYTES = 176; };
template <> struct QTraits<QT_Q6_K> { static constexpr int QK = 256, BYTES = 210; };

// ---- small load helpers -------------------------------------------------------------------
QDEV float qf16(const uint8_t* p) {
  return __half2float(__ushort_as_half(*reinterpret_cast<const uint16_t*>(p)));
}
QDEV uint32_t ld_u16(const uint8_t* p) {
  return *reinterpret_cast<const uint16_t*>(p);
}
// 4 bytes from a 2-byte-aligned address.
QDEV uint32_t ld_u32_a2(const uint8_t* p) {
  return ld_u16(p) | (ld_u16(p + 2) << 16);
}
QDEV uint32_t ld_u32_a4(const uint8_t* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}
// 4 bytes from any address.
QDEV uint32_t ld_u32_a1(const uint8_t* p) {
  return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

// Integer codes become floats without I2F (quarter-rate on sm_90): 2^23 + c is the float with
// bit pattern 0x4B000000 | c (c < 2^23), so c - off is that float minus (2^23 + off), exactly:
// q_int(c, off).
QDEV float q_int(uint32_t c, float off = 0.f) {
  return q_bits_float(0x4B000000u | c) - (8388608.f + off);
}
// 2^23 + byte i of x: one byte permute on the device
QDEV float q_magic_byte(uint32_t x, int i) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(__byte_perm(x, 0x4B000000u, 0x7540u | i));
#else
  return q_bits_float(0x4B000000u | ((x >> (8 * i)) & 0xFFu));
#endif
}
// q[i] = byte i of lo - off, q[4 + i] = byte i of hi - off, as exact floats. The callers build
// the code bytes four at a time (shifts and masks on whole words).
QDEV void codes8(uint32_t lo, uint32_t hi, float off, float q[8]) {
  const float base = 8388608.f + off;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    q[i] = q_magic_byte(lo, i) - base;
    q[4 + i] = q_magic_byte(hi, i) - base;
  }
}
// bits 0..3 of x into bit 0 of bytes 0..3 (the four partial products do not overlap)
QDEV uint32_t spread4(uint32_t x) { return ((x & 0xFu) * 0x00204081u) & 0x01010101u; }

// 6-bit scale and min of sub-block j (0..7) of a Q4_K/Q5_K super-block (12 packed bytes).
QDEV void scale_min_k4(const uint8_t* s, int j, int& sc, int& m) {
  if (j < 4) {
    sc = s[j] & 63;
    m = s[j + 4] & 63;
  } else {
    sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
    m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

// ---- decode8 / dequant8 ---------------------------------------------------------------------
// decode8<T>(blk, g, q, d, m): element 8g+i of the block is q[i]*d + m, with q[i] small exact
// integers (or the value itself for the float types, d = 1, m = 0) and (d, m) shared by the 8
// elements. The gemv factors d and m out of its dot products (sum q*x, then *d, + m*sum x),
// which saves a multiply per weight; dequant8 applies them (used by gemm and embedding).
// QTraits<T>::HAS_MIN says whether m can be non-zero.
template <int T> struct HasMin { static constexpr bool value = false; };
template <> struct HasMin<QT_Q4_1> { static constexpr bool value = true; };
template <> struct HasMin<QT_Q5_1> { static constexpr bool value = true; };
template <> struct HasMin<QT_Q4_K> { static constexpr bool value = true; };
template <> struct HasMin<QT_Q5_K> { static constexpr bool value = true; };

template <int T> QDEV void decode8(const uint8_t* blk, int g, float q[8], float& d, float& m);

template <>
QDEV void decode8<QT_F32>(const uint8_t* blk, int g, float q[8], float& d, float& m) {
  const float* p = reinterpret_cast<const float*>(blk) + 8 * g;
#pragma unroll
  for (int i = 0; i < 8; ++i) q[i] = p[i];
  d = 1.f;
  m = 0.f;
}

template <>
QDEV void decode8<QT_F16>(const uint8_t* blk, int g, float q[8], float& d, float& m) {
  const uint8_t* p = blk + 16 * g;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    uint32_t v = ld_u32_a4(p + 4 * i);
    q[2 * i] = __half2float(__ushort_as_half((unsigned short)(v & 0xFFFF)));
    q[2 * i + 1] = __half2float(__ushort_as_half((unsigned short)(v >> 16)));
  }
  d = 1.f;
  m = 0.f;
}

template <>
QDEV void decode8<QT_BF16>(const uint8_t* blk, int g, float q[8], float& d, float& m) {
  const uint8_t* p = blk + 16 * g;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    uint32_t v = ld_u32_a4(p + 4 * i);
    q[2 * i] = q_bits_float(v << 16);
    q[2 * i + 1] = q_bits_float(v & 0xFFFF0000u);
  }
  d = 1.f;
  m = 0.f;
}

// Q4_0: d(f16) qs[16]; element j<16 = low nibble of qs[j], j>=16 = high nibble of qs[j-16].
template <>
QDEV void decode8<QT_Q4_0>(const uint8_t* blk, int g, float q[8], float& d, float& m) {
  const uint8_t* p = blk + 2 + (g & 1) * 8;
  const int sh = (g >> 1) * 4;
  codes8((ld_u32_a2(p) >> sh) & 0x0F0F0F0Fu, (ld_u32_a2(p + 4) >> sh) & 0x0F0F0F0Fu, 8.f, q);
  d = qf16(blk);
  m = 0.f;
}

// Q4_1: d m qs[16]; value = q*d + m.
template <>
QDEV void decode8<QT_Q4_1>(const uint8_t* blk, int g, float q[8], float& d, float& m) {
  const uint8_t* p = blk + 4 + (g & 1) * 8;
  const int sh = (g >> 1) * 4;
  codes8((ld_u32_a4(p) >> sh) & 0x0F0F0F0Fu, (ld_u32_a4(p + 4) >> sh) & 0x0F0F0F0Fu, 0.f, q);
  d = qf16(blk);
  m = qf16(blk + 2);
}

// Q5_0: d qh[4] qs[16]; 5th bit of element j is bit j of qh; value = (q-16)*d.
template <>
QDEV void decode8<QT_Q5_0>(const uint8_t* blk, int g, float q[8], float& d, float& m) {
  const uint32_t qh = ld_u32_a2(blk + 2) >> (8 * g);
  const uint8_t* p = blk + 6 + (g & 1) * 8;
  const int sh = (g >> 1) * 4;
  codes8(((ld_u32_a2(p) >> sh) & 0x0F0F0F0Fu) | (spread4(qh) << 4),
         ((ld_u32_a2(p + 4) >> sh) & 0x0F0F0F0Fu) | (spread4(qh >> 4) << 4), 16.f, q);
  d = qf16(blk);
  m = 0.f;
}

// Q5_1: d m qh[4] qs[16]; value = q*d + m.
template <>
QDEV void decode8<QT_Q5_1>(const uint8_t* blk, int g, float q[8], float& d, float& m) {
  const uint32_t qh = ld_u32_a4(blk + 4) >> (8 * g);
  const uint8_t* p = blk + 8 + (g & 1) * 8;
  const int sh = (g >> 1) * 4;
  codes8(((ld_u32_a4(p) >> sh) & 0x0F0F0F0Fu) | (spread4(qh) << 4),
         ((ld_u32_a4(p + 4) >> sh) & 0x0F0F0F0Fu) | (spread4(qh >> 4) << 4), 0.f, q);
  d = qf16(blk);
  m = qf16(blk + 2);
}

// Q8_0: d qs[32] (int8).
template <>
QDEV void decode8<QT_Q8_0>(const uint8_t* blk, int g, float q[8], float& d, float& m) {
  const uint8_t* p = blk + 2 + 8 * g;  // int8 codes + 128: unsigned bytes
  codes8(ld_u32_a2(p) ^ 0x80808080u, ld_u32_a2(p + 4) ^ 0x80808080u, 128.f, q);
  d = qf16(blk);
  m = 0.f;
}

// MXFP4: e (E8M0 exponent) qs[16]; e2m1 codes, ggml's doubled table times 2^(e-128).
QDEV float e8m0_half(uint32_t e) {
  return q_bits_float(e < 2 ? (0x00200000u << e) : ((e - 1) << 23));
}
QDEV float e2m1_doubled(int c) {
  // 0 1 2 3 4 6 8 12, sign in bit 3
  const int mag = c & 7;
  const int v = mag < 5 ? mag : (mag == 5 ? 6 : (mag == 6 ? 8 : 12));
  const float f = q_int(static_cast<uint32_t>(v));
  return (c & 8) ? -f : f;
}
template <>
QDEV void decode8<QT_MXFP4>(const uint8_t* blk, int g, float q[8], float& d, float& m) {
  const uint8_t* p = blk + 1 + (g & 1) * 8;
  const int sh = (g >> 1) * 4;
  const uint32_t lo = ld_u32_a1(p) >> sh, hi = ld_u32_a1(p + 4) >> sh;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    q[i] = e2m1_doubled(static_cast<int>((lo >> (8 * i)) & 0xFu));
    q[4 + i] = e2m1_doubled(static_cast<int>((hi >> (8 * i)) & 0xFu));
  }
  d = e8m0_half(blk[0]);
  m = 0.f;
}

// Q4_K: d dmin scales[12] qs[128]; sub-block s (32 elements) = nibble (s&1) of qs[32*(s/2)..];
// value = (d*sc)*q - (dmin*mn).
template <>
QDEV void decode8<QT_Q4_K>(const uint8_t* blk, int g, float q[8], float& d, float& m) {
  const int s = g >> 2, l0 = (g & 3) * 8;
  int sc, mn;
  scale_min_k4(blk + 4, s, sc, mn);
  const uint8_t* p = blk + 16 + 32 * (s >> 1) + l0;
  const int sh = (s & 1) * 4;
  codes8((ld_u32_a4(p) >> sh) & 0x0F0F0F0Fu, (ld_u32_a4(p + 4) >> sh) & 0x0F0F0F0Fu, 0.f, q);
  d = qf16(blk) * q_int(static_cast<uint32_t>(sc));
  m = -(qf16(blk + 2) * q_int(static_cast<uint32_t>(mn)));
}

// Q5_K: d dmin scales[12] qh[32] qs[128]; 5th bit of sub-block s element l is bit s of qh[l].
template <>
QDEV void decode8<QT_Q5_K>(const uint8_t* blk, int g, float q[8], float& d, float& m) {
  const int s = g >> 2, l0 = (g & 3) * 8;
  int sc, mn;
  scale_min_k4(blk + 4, s, sc, mn);
  const uint8_t* p = blk + 48 + 32 * (s >> 1) + l0;
  const uint32_t hlo = ld_u32_a4(blk + 16 + l0) >> s, hhi = ld_u32_a4(blk + 16 + l0 + 4) >> s;
  const int sh = (s & 1) * 4;
  codes8(((ld_u32_a4(p) >> sh) & 0x0F0F0F0Fu) | ((hlo & 0x01010101u) << 4),
         ((ld_u32_a4(p + 4) >> sh) & 0x0F0F0F0Fu) | ((hhi & 0x01010101u) << 4), 0.f, q);
  d = qf16(blk) * q_int(static_cast<uint32_t>(sc));
  m = -(qf16(blk + 2) * q_int(static_cast<uint32_t>(mn)));
}

// Q6_K: ql[128] qh[64] scales[16] (int8) d; element e: half n=e/128, r=e%128, quarter k=r/32,
// l=r%32: low 4 bits from ql[64n + 32(k&1) + l] nibble (k>>1), high 2 bits from
// qh[32n + l] bits 2k, scale scales[8n + l/16 + 2k]; value = (d*scale)*(q-32).
template <>
QDEV void decode8<QT_Q6_K>(const uint8_t* blk, int g, float q[8], float& d, float& m) {
  const int e0 = 8 * g, h = e0 >> 7, r = e0 & 127, k = r >> 5, l0 = r & 31;
  const uint8_t* pl = blk + 64 * h + 32 * (k & 1) + l0;
  const uint8_t* ph = blk + 128 + 32 * h + l0;
  const int sh = (k >> 1) * 4;
  const uint32_t hlo = ld_u32_a2(ph) >> (2 * k), hhi = ld_u32_a2(ph + 4) >> (2 * k);
  codes8(((ld_u32_a2(pl) >> sh) & 0x0F0F0F0Fu) | ((hlo & 0x03030303u) << 4),
         ((ld_u32_a2(pl + 4) >> sh) & 0x0F0F0F0Fu) | ((hhi & 0x03030303u) << 4), 32.f, q);
  const uint32_t sc = blk[192 + 8 * h + (l0 >> 4) + 2 * k] ^ 0x80u;  // int8 scale + 128
  d = qf16(blk + 208) * q_int(sc, 128.f);
  m = 0.f;
}

// The 8 elements 8g..8g+7 of the block at blk as floats (ggml's values, to a rounding).
template <int T> QDEV void dequant8(const uint8_t* blk, int g, float w[8]) {
  float q[8], d, m;
  decode8<T>(blk, g, q, d, m);
#pragma unroll
  for (int i = 0; i < 8; ++i) w[i] = q[i] * d + m;
}

// ---- dequant8h: the tensor-core operand ----------------------------------------------------
// dequant8h<T>(blk, g, h): dequant8's 8 values rounded to fp16 (round to nearest even), packed
// in pairs (h[i] = elements 2i in the low half, 2i + 1 in the high half): what the gemm and
// skinny cores multiply. For Q4_0, Q5_0, Q8_0 and MXFP4 (scale 2^-14 .. 2^15) an element is
// q * d + 0 with q a small integer and d an fp16 value, so the float q * d is exact and its
// fp16 rounding is one fp16 FMA of q (exact in fp16) by d plus +0, the same bits as rounding
// dequant8's float (the +0 keeps dequant8's +0 for q = 0 with d < 0). That takes a few byte
// permutes and fp16 FMAs for 8 weights instead of float conversions, multiplies and packs
// per weight (MXFP4: ~40 SASS instructions for 8 weights instead of ~135). Other types, and
// MXFP4 scales outside that range, round dequant8's floats; so does the host build (CI
// checks dequant8).
QDEV uint32_t q_pack_h2(float a, float b) {
  const __half2 h = __floats2half2_rn(a, b);
  uint32_t u;
  memcpy(&u, &h, 4);
  return u;
}
template <int T> QDEV void dequant8h_rounded(const uint8_t* blk, int g, uint32_t h[4]) {
  float w[8];
  dequant8<T>(blk, g, w);
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = q_pack_h2(w[2 * i], w[2 * i + 1]);
}

template <int T> struct FastH { static constexpr bool value = false; };
template <> struct FastH<QT_Q4_0> { static constexpr bool value = true; };
template <> struct FastH<QT_Q5_0> { static constexpr bool value = true; };
template <> struct FastH<QT_Q8_0> { static constexpr bool value = true; };
template <> struct FastH<QT_MXFP4> { static constexpr bool value = true; };

#ifdef __CUDA_ARCH__
__device__ __forceinline__ uint32_t q_prmt(uint32_t a, uint32_t b, uint32_t sel) {
  uint32_t d;  // PTX prmt, default mode (selector nibbles < 8 here: plain byte picks)
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
  return d;
}
// a * b + 0 on fp16 pairs, one rounding
__device__ __forceinline__ uint32_t q_hfma0(uint32_t a, uint32_t b) {
  uint32_t d;
  asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(0u));
  return d;
}
__device__ __forceinline__ uint32_t q_hsub(uint32_t a, uint32_t b) {
  uint32_t d;
  asm("sub.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
  return d;
}
// codes: the 4 bytes of c (each < 256) minus off, times d2 (fp16 pair): 1024 + c is the fp16
// with bits 0x6400 | c, and (1024 + c) - (1024 + off) is exact; off2 = (0x6400 | off) twice.
__device__ __forceinline__ void q_codes_h(uint32_t c, uint32_t off2, uint32_t d2, uint32_t* h) {
  h[0] = q_hfma0(q_hsub(q_prmt(c, 0x64646464u, 0x5140u), off2), d2);
  h[1] = q_hfma0(q_hsub(q_prmt(c, 0x64646464u, 0x5342u), off2), d2);
}
// high bytes of the fp16 values 0 1 2 3 (TL) and 4 6 8 12 (TH): MXFP4's doubled e2m1 table
#define MXFP4_H16L 0x42403C00u
#define MXFP4_H16H 0x4A484644u

template <int T> __device__ __forceinline__ void dequant8h_fast(const uint8_t*, int, uint32_t*);
template <>
__device__ __forceinline__ void dequant8h_fast<QT_Q4_0>(const uint8_t* blk, int g, uint32_t* h) {
  const uint8_t* p = blk + 2 + (g & 1) * 8;
  const int sh = (g >> 1) * 4;
  const uint32_t d2 = ld_u16(blk) * 0x10001u;
  q_codes_h((ld_u32_a2(p) >> sh) & 0x0F0F0F0Fu, 0x64086408u, d2, h);
  q_codes_h((ld_u32_a2(p + 4) >> sh) & 0x0F0F0F0Fu, 0x64086408u, d2, h + 2);
}
template <>
__device__ __forceinline__ void dequant8h_fast<QT_Q5_0>(const uint8_t* blk, int g, uint32_t* h) {
  const uint32_t qh = ld_u32_a2(blk + 2) >> (8 * g);
  const uint8_t* p = blk + 6 + (g & 1) * 8;
  const int sh = (g >> 1) * 4;
  const uint32_t d2 = ld_u16(blk) * 0x10001u;
  q_codes_h(((ld_u32_a2(p) >> sh) & 0x0F0F0F0Fu) | (spread4(qh) << 4), 0x64106410u, d2, h);
  q_codes_h(((ld_u32_a2(p + 4) >> sh) & 0x0F0F0F0Fu) | (spread4(qh >> 4) << 4), 0x64106410u,
            d2, h + 2);
}
template <>
__device__ __forceinline__ void dequant8h_fast<QT_Q8_0>(const uint8_t* blk, int g, uint32_t* h) {
  const uint8_t* p = blk + 2 + 8 * g;  // int8 codes + 128: unsigned bytes
  const uint32_t d2 = ld_u16(blk) * 0x10001u;
  q_codes_h(ld_u32_a2(p) ^ 0x80808080u, 0x64806480u, d2, h);
  q_codes_h(ld_u32_a2(p + 4) ^ 0x80808080u, 0x64806480u, d2, h + 2);
}
template <>
__device__ __forceinline__ void dequant8h_fast<QT_MXFP4>(const uint8_t* blk, int g, uint32_t* h) {
  const uint32_t e = blk[0];
  if (e - 114u > 29u) {  // 2^(e-128) outside fp16's normal range: round the floats
    dequant8h_rounded<QT_MXFP4>(blk, g, h);
    return;
  }
  const uint32_t sb = (e - 113u) << 10;  // fp16 bits of 2^(e-128)
  const uint32_t s2 = sb | (sb << 16);
  const uint8_t* p = blk + 1 + (g & 1) * 8;
  const int sh = (g >> 1) * 4;
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    const uint32_t x = ld_u32_a1(p + 4 * k) >> sh;  // element 4k + i: low nibble of byte i
    const uint32_t v = x & 0x07070707u;              // magnitudes
    const uint32_t sel = q_prmt(v | (v >> 4), 0u, 0x0020u);  // the 4 as selector nibbles
    const uint32_t hb = q_prmt(MXFP4_H16L, MXFP4_H16H, sel) | ((x << 4) & 0x80808080u);
    h[2 * k] = q_hfma0(q_prmt(hb, 0u, 0x1404u), s2);      // (0, hb0, 0, hb1): two fp16
    h[2 * k + 1] = q_hfma0(q_prmt(hb, 0u, 0x3424u), s2);
  }
}
#endif

template <int T> QDEV void dequant8h(const uint8_t* blk, int g, uint32_t h[4]) {
#ifdef __CUDA_ARCH__
  if constexpr (FastH<T>::value) {
    dequant8h_fast<T>(blk, g, h);
    return;
  }
#endif
  dequant8h_rounded<T>(blk, g, h);
}

// Dispatch helper: instantiate MACRO(type_id, Name) for every supported type.
#define FOR_EACH_QTYPE(X) \
  X(QT_F32, f32)          \
  X(QT_F16, f16)          \
  X(QT_BF16, bf16)        \
  X(QT_Q4_0, q4_0)        \
  X(QT_Q4_1, q4_1)        \
  X(QT_Q5_0, q5_0)        \
  X(QT_Q5_1, q5_1)        \
  X(QT_Q8_0, q8_0)        \
  X(QT_Q4_K, q4_k)        \
  X(QT_Q5_K, q5_k)        \
  X(QT_Q6_K, q6_k)        \
  X(QT_MXFP4, mxfp4)
