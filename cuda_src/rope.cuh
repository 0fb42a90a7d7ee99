// Rotary embedding of one element (rope.cu).
// Rotation: angle(pos, i) = pos * inv_freq[i] for pair i < n_rot/2, computed in double;
// `mscale` multiplies cos and sin. mode 0: none, 1: normal (2i, 2i+1), 2: NeoX (i, i+n_rot/2).
#pragma once
#include "common.cuh"
__device__ __forceinline__ float rope_elem(const float* __restrict__ v, int d, int n_rot, int mode,
                                           double pos, const double* __restrict__ inv_freq,
                                           float mscale) {
  if (mode == 0 || d >= n_rot) return v[d];
  const int half = n_rot >> 1;
  int i, lo, hi;
  bool first;
  if (mode == 2) {
    i = d < half ? d : d - half;
    lo = i;
    hi = i + half;
    first = d < half;
  } else {
    i = d >> 1;
    lo = 2 * i;
    hi = lo + 1;
    first = (d & 1) == 0;
  }
  double sn, cs;
  sincos(pos * inv_freq[i], &sn, &cs);
  const float c = (float)cs * mscale, s = (float)sn * mscale;
  return first ? v[lo] * c - v[hi] * s : v[lo] * s + v[hi] * c;
}
