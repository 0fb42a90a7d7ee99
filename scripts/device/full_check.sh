#!/usr/bin/env bash
# One device call: every gpu-marked test (kernels, matrix kernels, embedding/MoE, whole model,
# the cold kernel-cache start, the full-size Phi-3 and GPT-OSS logits) and a per-kernel
# profile (CUPTI, scripts/device/kernel_profile.py) of the decode step and a 512-token
# prefill for the three full-size layouts. The synthetic files are written in the background
# while the first tests run. Logs under $OUT.
# usage (device): source .device/setup.sh && bash scripts/device/full_check.sh
# carry: .device and a kernel cache prebuilt here (prebuild_cubins.py) named by WORKER_ORCD_CACHE
set -uo pipefail
OUT=${OUT:-/tmp/full_check}; L=$OUT; mkdir -p "$OUT"
S=/tmp/synth; mkdir -p $S
export WORKER_ORCD_SYNTH_DIR=$S
source scripts/device/lib.sh
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv >"$OUT/nvidia-smi.txt"
syn qwen2 q4_k_m &
Q=$!
(syn phi3 q4_k_m; syn gpt-oss mxfp4) &
P=$!
t matmul 150 tests/gpu/test_matmul.py tests/gpu/test_embed_moe.py
t cold 150 tests/gpu/test_kernel_cache_cold.py
wait $Q
t kernels_model 200 tests/gpu/test_kernels.py tests/gpu/test_model.py
wait $P
t full 330 tests/gpu/test_model_full.py
grep -E "teacher-forced" "$OUT/full.log"
for m in qwen2-full-q4_k_m phi3-full-q4_k_m gpt-oss-full-mxfp4; do
  timeout 90 python3 scripts/device/kernel_profile.py $S/$m.gguf --json "$OUT/profile-$m.json" \
    >"$OUT/profile-$m.txt" 2>&1
  echo "profile $m rc=$?"; grep "==" "$OUT/profile-$m.txt"
done
