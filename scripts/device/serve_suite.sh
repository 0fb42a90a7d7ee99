#!/usr/bin/env bash
# The worker end to end on the GPU over NATS: `worker-orcd bench --suite --device cuda` (real
# `serve` subprocesses, embedded nats-server, cold and warm kernel-cache loads, TTFT,
# inter-token, health, cancel, VRAM after 100 jobs, shutdown) on the full-size synthetic
# Qwen2.5-0.5B Q4_K_M layout, then `serve` + `submit` from the command line.
# usage (device): source .device/setup.sh && bash scripts/device/serve_suite.sh
set -uo pipefail
OUT=${OUT:-/tmp/serve_suite}; mkdir -p "$OUT"; S=/tmp/synth; mkdir -p $S
M=$S/qwen2.gguf
[ -f $M ] || python3 -m worker synth --arch qwen2 --size full --mix q4_k_m --seed 1 --out $M >/dev/null
timeout 300 python3 -m worker bench --suite --device cuda --model $M --ctx-size 4096 --jobs 20 \
  --max-tokens 64 --prompt-tokens 32 --health-requests 1000 --cancel-runs 10 --vram-jobs 100 \
  --loads 2 2>"$OUT/suite.err" | tee "$OUT/suite.json"
echo "suite exit: ${PIPESTATUS[0]}"
tail -5 "$OUT/suite.err"
