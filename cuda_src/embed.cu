// Embedding lookup: out[i][:] = dequantized row ids[i] of W (any ggml type of quant.cuh), fp32.
// grid (ceil(K / 8 / 128), n), block 128: thread q writes elements 8q..8q+7 of one row with two
// 16-byte stores. An id outside [0, n_rows) writes a row of NaN, so a bad id can never read
// outside the table and cannot go unnoticed.
#include "quant.cuh"

template <int T>
__device__ __forceinline__ void embed_row(const uint8_t* __restrict__ W, long long row_bytes,
                                          int n_rows, int K, const int* __restrict__ ids,
                                          float* out, long long ldo) {
  constexpr int QK = QTraits<T>::QK, BYTES = QTraits<T>::BYTES, GPB = QK / 8;
  pdl_start();
  const int q = blockIdx.x * blockDim.x + threadIdx.x;
  if (8 * q >= K) return;
  const int id = ids[blockIdx.y];
  float w[8];
  if (id < 0 || id >= n_rows) {
#pragma unroll
    for (int i = 0; i < 8; ++i) w[i] = __int_as_float(0x7fc00000);
  } else {
    dequant8<T>(W + (long long)id * row_bytes + (long long)(q / GPB) * BYTES, q % GPB, w);
  }
  float4* o = reinterpret_cast<float4*>(out + blockIdx.y * ldo + 8 * q);
  o[0] = make_float4(w[0], w[1], w[2], w[3]);
  o[1] = make_float4(w[4], w[5], w[6], w[7]);
}

#define EMBED_INST(TY, NAME)                                                                    \
  extern "C" __global__ void __launch_bounds__(128)                                            \
      embed_##NAME(const uint8_t* W, long long row_bytes, int n_rows, int K, const int* ids,  \
                   float* out, long long ldo) {                                                \
    embed_row<TY>(W, row_bytes, n_rows, K, ids, out, ldo);                                     \
  }
FOR_EACH_QTYPE(EMBED_INST)
