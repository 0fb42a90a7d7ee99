#!/usr/bin/env bash
# Compile-checks every cuda_src/*.cu for Ampere and Hopper exactly as the worker compiles it
# (same flags as worker/backends/cuda/compile.py), so a kernel that does not build never lands.
set -euo pipefail
cd "$(dirname "$0")/.."
shopt -s nullglob
srcs=(cuda_src/*.cu)
if [ ${#srcs[@]} -eq 0 ]; then echo "check-kernels: no kernels yet"; exit 0; fi
command -v nvcc >/dev/null || { echo "check-kernels: nvcc not found" >&2; exit 1; }
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for arch in sm_80 sm_90; do
  for f in "${srcs[@]}"; do
    nvcc -arch=$arch --cubin -std=c++17 -O3 -Icuda_src -Xptxas=-warn-spills -o "$out/$(basename "$f" .cu).$arch.cubin" "$f"
  done
done
echo "check-kernels: ${#srcs[@]} files compiled for sm_80 and sm_90"
