#!/usr/bin/env bash
# Assemble the ignored third_party/ that a device call carries beside the checkout, on a
# machine without a GPU (needs the package index for the llama.cpp source, and nvcc):
#   third_party/lcpp.tgz  llama.cpp's source from the llama-cpp-python sdist (LCPP_VERSION),
#                         slimmed to what the CUDA llama-bench / llama-batched-bench build needs
#   third_party/base      `git archive BASE_REF` (default HEAD): the "before" tree of an A/B
#                         (gpu-check.sh's BASE=third_party/base)
#   third_party/kcache    the sm_90 kernel cubins of both trees (tools.prebuild_cubins), so the
#                         device compiles nothing (WORKER_ORCD_CACHE=$PWD/third_party/kcache)
# usage: bash scripts/device/third-party.sh [BASE_REF]   (run from the repository root)
# Existing pieces are kept (delete one to rebuild it); stale cubins are not pruned, so keep
# an eye on the carry limit (du -sh third_party).
set -euo pipefail
cd "$(dirname "$0")/../.."
BASE_REF=${1:-HEAD}
LCPP_VERSION=${LCPP_VERSION:-0.3.36}
PY=${PY:-.venv/bin/python}
PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"  # absolute: also used inside base/
mkdir -p third_party
if [ ! -f third_party/lcpp.tgz ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  "$PY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$LCPP_VERSION" -d "$tmp"
  tar xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$tmp"
  src=$(ls -d "$tmp"/llama_cpp_python-*/vendor/llama.cpp)
  mkdir -p "$tmp/out/llama.cpp"
  for d in ggml src include common vendor tools cmake app CMakeLists.txt; do
    [ -e "$src/$d" ] && cp -r "$src/$d" "$tmp/out/llama.cpp/"
  done
  tar czf third_party/lcpp.tgz -C "$tmp/out" llama.cpp
  echo "third_party/lcpp.tgz: llama.cpp from llama-cpp-python $LCPP_VERSION"
fi
if [ ! -d third_party/base ]; then
  mkdir -p third_party/base
  git archive "$BASE_REF" | tar x -C third_party/base
  echo "third_party/base: git archive $(git rev-parse --short "$BASE_REF")"
fi
"$PY" -m tools.prebuild_cubins third_party/kcache
(cd third_party/base && "$PY" -m tools.prebuild_cubins ../kcache)
du -sh third_party
