#!/usr/bin/env bash
# The comparison BENCHMARKS.md is built on, on a machine with an NVIDIA GPU: worker-orcd bench
# and llama.cpp's llama-bench (-p 512 -n 128 -fa 1, the reference command) on the same card
# and the same full-size synthetic files of the three reference layouts (or the GGUF files
# given). llama.cpp is built from third_party/lcpp.tgz, a slimmed llama.cpp source tree (an
# ignored file, never committed; BENCHMARKS.md says how it is made), while our bench runs.
#
#   pip install -e '.[cuda]' && bash scripts/device/llama-baseline.sh [MODEL.gguf ...]
#
# Environment: OUT (/tmp/llama-baseline), WORKER_ORCD_SYNTH_DIR (/tmp/synth), CUDA_ARCH (90).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/llama-baseline}
S=${WORKER_ORCD_SYNTH_DIR:-/tmp/synth}
SRC=/tmp/lcpp
mkdir -p "$OUT" "$S"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
git rev-parse --short HEAD 2>/dev/null | tee "$OUT/commit.txt"

build_llama() {
  [ -x $SRC/build/bin/llama-bench ] && return
  mkdir -p $SRC && tar xzf third_party/lcpp.tgz -C $SRC
  cmake -S $SRC/llama.cpp -B $SRC/build -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON \
    -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCH:-90}" -DGGML_NATIVE=OFF -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
    >"$OUT/llama_cmake.log" 2>&1
  cmake --build $SRC/build --target llama-bench -j"$(nproc)" >"$OUT/llama_build.log" 2>&1
}
(build_llama) &
BUILD=$!

models=("$@")
if [ ${#models[@]} -eq 0 ]; then
  for spec in "qwen2 q4_k_m" "phi3 q4_k_m" "gpt-oss mxfp4"; do
    set -- $spec
    m="$S/$1-full-$2.gguf"
    [ -f "$m" ] || python3 -m worker synth --arch "$1" --size full --mix "$2" --seed 1 --out "$m" >/dev/null
    models+=("$m")
  done
fi
for m in "${models[@]}"; do
  name=$(basename "$m" .gguf)
  timeout 300 python3 -m worker bench --model "$m" --ctx-size 4096 --no-cold --reps 3 \
    2>"$OUT/bench-$name.err" | tee "$OUT/bench-$name.json"
done
wait $BUILD
[ -x $SRC/build/bin/llama-bench ] || { echo "llama.cpp did not build: $OUT/llama_build.log" >&2; exit 1; }
for m in "${models[@]}"; do
  name=$(basename "$m" .gguf)
  $SRC/build/bin/llama-bench -m "$m" -p 512 -n 128 -fa 1 -o json >"$OUT/llama-$name.json" 2>>"$OUT/llama.log"
  $SRC/build/bin/llama-bench -m "$m" -p 512 -n 128 -fa 1 2>>"$OUT/llama.log" | grep -E "^\|" | tee -a "$OUT/llama-table.txt"
done
