#!/usr/bin/env bash
# One device call: GPU tests touched by the decode-step work, then worker-orcd bench (tg128)
# for Qwen2.5-0.5B and Phi-3-mini Q4_K_M (full-size synthetic layouts), the baseline tree
# (build/base: commit 4e4f584, carried) and this tree alternating on one warm card, then
# llama.cpp's llama-bench on the same Qwen file (built in the background while the tests run,
# finished before any timing starts).
# usage (device): source .device/setup.sh && bash scripts/device/decode_final.sh
# carry: .device third_party .kcache_dec build/base build/mid (cubins prebuilt with prebuild_cubins.py)
set -uo pipefail
OUT=${OUT:-/tmp/decode_final}; mkdir -p "$OUT"
(bash scripts/device/llama_baseline.sh "$OUT" >"$OUT/b.log" 2>&1) &
BPID=$!
export WORKER_ORCD_CACHE=$PWD/.kcache_dec
S=/tmp/synth; mkdir -p $S
export WORKER_ORCD_SYNTH_DIR=$S
python3 -m worker synth --arch qwen2 --size full --mix q4_k_m --seed 1 --out $S/qwen2.gguf >/dev/null
cp $S/qwen2.gguf $S/qwen2-full-q4_k_m.gguf
python3 -m worker synth --arch phi3 --size full --mix q4_k_m --seed 1 --out $S/phi3.gguf >/dev/null &
SPID=$!
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv >"$OUT/nvidia-smi.txt"
timeout 200 python3 -m pytest -q -m gpu tests/gpu/test_model.py tests/gpu/test_kernels.py \
  >"$OUT/tests.txt" 2>&1
echo "gpu tests rc=$? $(tail -1 "$OUT/tests.txt")"
timeout 60 python3 scripts/device/spec_check.py $S/qwen2.gguf >"$OUT/spec_check.txt" 2>&1
echo "spec_check rc=$? $(tail -1 "$OUT/spec_check.txt")"
for _ in $(seq 1 150); do kill -0 $BPID 2>/dev/null || break; sleep 2; done  # at most ~5 min
kill -0 $BPID 2>/dev/null && echo "llama build still running at $(date +%T): timings below share the CPU"
wait $SPID
b() {  # tree model tag
  local r
  r=$(cd "$1" && timeout 90 python3 -m worker bench --model "$S/$2.gguf" --ctx-size 4096 \
    --no-cold --reps 3 2>>"$OUT/bench.err")
  echo "{\"tag\": \"$3\", \"model\": \"$2\", \"r\": ${r:-null}}" >>"$OUT/bench.jsonl"
  echo "$2 $3: $(echo "$r" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d.get("tg128_tok_s"), d.get("decode_step_us_p50"), d.get("pp512_tok_s"))' 2>&1)"
}
# build/mid: this tree with the baseline's attention.cu (carried)
for rep in 1 2; do
  b build/base qwen2 base; b build/mid qwen2 mid; b . qwen2 new
done
b build/base phi3 base; b . phi3 new; b build/base phi3 base; b . phi3 new
b . qwen2 new-after-phi3
wait $BPID; echo "llama build rc=$? $(ls /tmp/lcpp/build/bin/llama-bench 2>&1)"
bash scripts/device/llama_baseline.sh "$OUT" $S/qwen2.gguf 2>&1 | grep -E "tg|pp|model" | tail -4
timeout 60 python3 tests/gpu/profile_decode.py $S/qwen2.gguf 4096 >"$OUT/profile_qwen.txt" 2>&1
grep -E "graph replay|host wall|speculative" "$OUT/profile_qwen.txt"
