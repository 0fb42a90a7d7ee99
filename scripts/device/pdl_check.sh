#!/usr/bin/env bash
# One device call for programmatic dependent launch: the whole-model GPU tests (the PDL test
# compares logits and greedy tokens with it on and off), decode with PDL off/on twice each
# on one warm card (bench --sweep-pdl) for Qwen2.5-0.5B and Phi-3-mini Q4_K_M layouts, and
# the per-kernel profile of the Qwen step with it on. Logs packed into $OUT/pdl.tgz.
# usage (device): source .device/setup.sh && bash scripts/device/pdl_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/pdl_check}; L=/tmp/pdl_logs; mkdir -p "$OUT" $L
S=/tmp/synth; mkdir -p $S; export WORKER_ORCD_SYNTH_DIR=$S
syn() { python3 -m worker synth --arch "$1" --size full --mix "$2" --seed 1 --out "$S/$1-full-$2.gguf" >/dev/null; }
syn qwen2 q4_k_m
syn phi3 q4_k_m &
P=$!
timeout 150 python3 -m pytest -q -m gpu -s -p no:cacheprovider -rfE tests/gpu/test_model.py \
  tests/gpu/test_kernels.py >$L/tests.log 2>&1
echo "tests rc=$? $(grep -E '(passed|failed)' $L/tests.log | tail -1)"; grep -E "PDL edges|graph" $L/tests.log | head -5
b() { timeout 120 python3 -m worker bench --model "$S/$1.gguf" --ctx-size 4096 --no-cold --reps 3 --sweep-pdl 2>>$L/bench.err; }
b qwen2-full-q4_k_m | tee $L/bench-qwen2.json | python3 -c 'import json,sys; d=json.load(sys.stdin); print("qwen2", d.get("tg128_tok_s"), "off", d.get("tg_pdl_off"), "on", d.get("tg_pdl_on"), "edges", d.get("pdl_edges"), "pp512", d.get("pp512_tok_s"))'
wait $P
b phi3-full-q4_k_m | tee $L/bench-phi3.json | python3 -c 'import json,sys; d=json.load(sys.stdin); print("phi3", d.get("tg128_tok_s"), "off", d.get("tg_pdl_off"), "on", d.get("tg_pdl_on"), "edges", d.get("pdl_edges"), "pp512", d.get("pp512_tok_s"))'
timeout 90 python3 scripts/device/kernel_profile.py $S/qwen2-full-q4_k_m.gguf --json $L/profile-qwen2.json >$L/profile-qwen2.txt 2>&1
grep -A14 "decode" $L/profile-qwen2.txt | grep -v Warn | head -16
tar czf "$OUT/pdl.tgz" -C $L .
