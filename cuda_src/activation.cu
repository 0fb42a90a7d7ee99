// Gated and plain activations over float32 rows. Strided so that a fused gate+up matmul
// output ([gate | up] per row, Phi-3) and separate buffers (Qwen2, Llama) both work.
#include "common.cuh"
#include "i15.cuh"

// out[r][i] = silu(gate[r][i]) * up[r][i]; grid (ceil(n/256), rows), block 256. With planes
// (hi non-null; n a multiple of blk, 32 or 256) each block also writes its 256 outputs'
// 15-bit codes (i15.cuh; rows of n codes) for the integer product that reads them.
extern "C" __global__ void swiglu_f32(const float* __restrict__ gate, const float* __restrict__ up,
                                      float* __restrict__ out, int n, int gate_stride,
                                      int up_stride, int out_stride, int8_t* __restrict__ hi,
                                      int8_t* __restrict__ lo, float* __restrict__ qd,
                                      int* __restrict__ sq, int blk) {
  pdl_start();
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const size_t r = blockIdx.y;
  if (i < n) {
    const float g = gate[r * gate_stride + i];
    const float u = up[r * up_stride + i];
    out[r * out_stride + i] = g / (1.0f + expf(-g)) * u;
  }
  if (hi) {
    __syncthreads();  // the block's outputs, written by other threads, are visible
    const int base = blockIdx.x * blockDim.x;
    const size_t c = r * n + base;
    i15_quant_span(out + r * out_stride + base, min((int)blockDim.x, n - base), blk, hi + c,
                   lo + c, qd + c / blk, sq + c / 32);
  }
}

// gpt-oss's clamped SwiGLU (common.cuh swiglu_oai).
extern "C" __global__ void swiglu_oai_f32(const float* __restrict__ gate,
                                          const float* __restrict__ up, float* __restrict__ out,
                                          int n, int gate_stride, int up_stride, int out_stride,
                                          float alpha, float limit) {
  pdl_start();
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const size_t r = blockIdx.y;
  out[r * out_stride + i] =
      swiglu_oai(gate[r * gate_stride + i], up[r * up_stride + i], alpha, limit);
}

// GELU, tanh approximation (GPT-2): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))). In place ok.
extern "C" __global__ void gelu_f32(const float* __restrict__ x, float* __restrict__ out, int n) {
  pdl_start();
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float v = x[i];
  out[i] = 0.5f * v * (1.0f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
}
