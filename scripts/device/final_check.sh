#!/usr/bin/env bash
# Last device call of the session: llama.cpp's CUDA llama-bench built in the background
# (third_party/lcpp.tgz) while the sampler / whole-model GPU tests and the per-layer prefill
# attention timing (attn_bench.py) run; then worker-orcd bench and llama-bench -p 512 -n 128
# -fa 1 on the same three full-size files, on this one warm card. Logs in $OUT/final.tgz.
# usage (device): source .device/setup.sh && bash scripts/device/final_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/final}; L=/tmp/final_logs; mkdir -p "$OUT" $L
(bash scripts/device/llama_baseline.sh $L >$L/llama_build.log 2>&1) &
B=$!
S=/tmp/synth; mkdir -p $S; export WORKER_ORCD_SYNTH_DIR=$S
source scripts/device/lib.sh
syn qwen2 q4_k_m &
Q=$!
(syn phi3 q4_k_m; syn gpt-oss mxfp4) &
P=$!
timeout 150 python3 -m pytest -q -m gpu -s -p no:cacheprovider -rfE tests/gpu/test_kernels.py \
  -k "sampler or attn or attention" >$L/kernels.log 2>&1
echo "kernel tests rc=$? $(grep -E '(passed|failed)' $L/kernels.log | tail -1)"; grep -E "^FAILED" $L/kernels.log | head
wait $Q
timeout 200 python3 -m pytest -q -m gpu -s -p no:cacheprovider -rfE tests/gpu/test_model.py >$L/model.log 2>&1
echo "model tests rc=$? $(grep -E '(passed|failed)' $L/model.log | tail -1)"; grep -E "^FAILED" $L/model.log | head
timeout 90 python3 scripts/device/attn_bench.py --tokens 512 --json $L/attn_bench.json >$L/attn_bench.log 2>&1
echo "attn_bench rc=$?"; sed -n '/^prefill attention/,$p' $L/attn_bench.log | head -30
wait $P
b() {
  timeout 150 python3 -m worker bench --model "$S/$1.gguf" --ctx-size 4096 --no-cold --reps 3 >$L/bench-$1.json 2>>$L/bench.err
  python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[2], "tg128", d.get("tg128_tok_s"), "step", d.get("decode_step_us_p50"), "sampled", d.get("tg_sampled_tok_s"), "sampled_default", d.get("tg_sampled_default_tok_s"), "pp512", d.get("pp512_tok_s"))' $L/bench-$1.json $1 2>&1 | tail -1
}
for m in qwen2-full-q4_k_m phi3-full-q4_k_m gpt-oss-full-mxfp4; do b $m; done
for _ in $(seq 1 120); do kill -0 $B 2>/dev/null || break; sleep 2; done
echo "llama build: $(ls /tmp/lcpp/build/bin/llama-bench 2>&1)"
timeout 240 bash scripts/device/llama_baseline.sh $L $S/qwen2-full-q4_k_m.gguf $S/phi3-full-q4_k_m.gguf $S/gpt-oss-full-mxfp4.gguf 2>&1 | grep -E "^\|" | tail -8
tar czf "$OUT/final.tgz" -C $L .
