#!/usr/bin/env bash
# On the GPU machine: build llama.cpp's CUDA llama-bench from third_party/lcpp.tgz (an ignored,
# slimmed llama.cpp source tree; see BENCHMARKS.md for how it is made) and run the SPEC §6
# reference command on each model given: llama-bench -p 512 -n 128 -fa 1.
# usage: scripts/device/llama_baseline.sh OUTDIR MODEL.gguf [MODEL.gguf ...]
set -euo pipefail
out=$1; shift
src=/tmp/lcpp
if [ ! -x $src/build/bin/llama-bench ]; then
  mkdir -p $src && tar xzf third_party/lcpp.tgz -C $src
  cmake -S $src/llama.cpp -B $src/build -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON \
    -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_NATIVE=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF >"$out/llama_cmake.log" 2>&1
  cmake --build $src/build --target llama-bench -j"$(nproc)" >"$out/llama_build.log" 2>&1
fi
for m in "$@"; do
  $src/build/bin/llama-bench -m "$m" -p 512 -n 128 -fa 1 -o json >"$out/llama_bench_$(basename "$m" .gguf).json" 2>>"$out/llama_bench.log"
  $src/build/bin/llama-bench -m "$m" -p 512 -n 128 -fa 1 2>>"$out/llama_bench.log"
done
