#!/usr/bin/env bash
# One device call for the SPEC §6 headline table: worker-orcd bench and llama.cpp's
# llama-bench (-p 512 -n 128 -fa 1) on the same card, on full-size synthetic files of the
# three reference layouts. llama.cpp builds in the background while our bench runs.
# usage (device): source .device/setup.sh && bash scripts/device/headline.sh   (logs in $OUT)
set -uo pipefail
OUT=${OUT:-/tmp/headline}; mkdir -p "$OUT"
S=/tmp/synth; mkdir -p $S
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
git rev-parse --short HEAD 2>/dev/null | tee "$OUT/commit.txt"
(bash scripts/device/llama_baseline.sh "$OUT" > "$OUT/llama_build_driver.log" 2>&1) &
BUILD=$!
gen() { python3 -m worker synth --arch "$1" --size full --mix "$2" --seed 1 --out "$S/$1.gguf"; }
gen qwen2 q4_k_m > "$OUT/synth.txt" 2>&1 &
Q=$!
gen phi3 q4_k_m >> "$OUT/synth.txt" 2>&1 &
P=$!
gen gpt-oss mxfp4 >> "$OUT/synth.txt" 2>&1 &
G=$!
wait $Q
timeout 200 python3 -m worker bench --model $S/qwen2.gguf --ctx-size 4096 2>"$OUT/bench-qwen2.err" | tee "$OUT/bench-qwen2.json"
wait $P
timeout 120 python3 -m worker bench --model $S/phi3.gguf --ctx-size 4096 --no-cold --reps 3 2>"$OUT/bench-phi3.err" | tee "$OUT/bench-phi3.json"
wait $G
timeout 150 python3 -m worker bench --model $S/gpt-oss.gguf --ctx-size 4096 --no-cold --reps 3 2>"$OUT/bench-gpt-oss.err" | tee "$OUT/bench-gpt-oss.json"
wait $BUILD
timeout 200 bash scripts/device/llama_baseline.sh "$OUT" $S/qwen2.gguf $S/phi3.gguf $S/gpt-oss.gguf 2>&1 | grep -E "^\|" | tee "$OUT/llama-table.txt"
