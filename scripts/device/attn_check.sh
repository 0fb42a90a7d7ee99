#!/usr/bin/env bash
# Device call (H12, docs/kernels.md "H12: tensor-core prefill attention"): the attention GPU
# tests (old attn_split/attn_decode_rope and the new attn_prefill_tc), old vs new prefill
# attention timed in one process at Phi-3 / GPT-OSS / Qwen / Llama shapes for 512 tokens
# (scripts/device/attn_bench.py), the whole-model tests (tc is the prefill default; the tiny
# model of every architecture covers head_dim 32, gpt-oss window + sinks), and pp512 of the
# full-size Qwen2.5-0.5B and Phi-3-mini layouts with WORKER_ORCD_PREFILL_ATTN=split and =tc.
# usage (device, repository root): source .device/setup.sh && bash scripts/device/attn_check.sh
# Logs: $OUT/attn_*.  Time: ~1 min tests, <1 min bench, ~2-3 min models + pp512 (timeouts
# below; T_* override them; SKIP_PP=1 skips the pp512 A/B; a pp512 run starts only while
# less than PP_BUDGET seconds, default 420, have passed, so the call stays under 10 min).
set -uo pipefail
OUT=${OUT:-/tmp/attn_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
  --format=csv > "$OUT/attn_card.txt" 2>&1
cat "$OUT/attn_card.txt"
S=${WORKER_ORCD_SYNTH_DIR:-/tmp/synth}; mkdir -p "$S"; export WORKER_ORCD_SYNTH_DIR=$S
syn() {  # to a temporary name, then renamed: test_model.py may look for the same file
  [ -f "$S/$1-full-q4_k_m.gguf" ] || { timeout "${T_SYN:-360}" python3 -m worker synth --arch "$1" --size full \
    --mix q4_k_m --seed 1 --out "$S/.h12-$1.gguf" >/dev/null 2>>"$OUT/attn_synth.err" &&
    mv -f "$S/.h12-$1.gguf" "$S/$1-full-q4_k_m.gguf"; }
}
if [ "${SKIP_PP:-0}" != 1 ]; then (syn qwen2; syn phi3) & SYN=$!; fi

# 1. kernel tests: every attention kernel (old ones too: they must be unchanged)
timeout "${T_TESTS:-150}" python3 -m pytest -q -m gpu -p no:cacheprovider -rfE -s \
  tests/gpu/test_kernels.py -k "attn or attention" > "$OUT/attn_tests.log" 2>&1
echo "kernel tests rc=$? $(grep -E '(passed|failed|error)' "$OUT/attn_tests.log" | tail -1)"
grep -E "^(FAILED|ERROR)|worst rel err" "$OUT/attn_tests.log" | head -30

# 2. old vs new prefill attention, one process, one card
timeout "${T_BENCH:-90}" python3 scripts/device/attn_bench.py --tokens 512 \
  --json "$OUT/attn_bench.json" > "$OUT/attn_bench.log" 2>&1
echo "bench rc=$?"
sed -n '/^prefill attention/,$p' "$OUT/attn_bench.log"
grep -E "Error|error" "$OUT/attn_bench.log" | head -5

# 3. whole-model checks against NumPy with tc as the prefill default
timeout "${T_MODEL:-150}" python3 -m pytest -q -m gpu -p no:cacheprovider -rfE \
  tests/gpu/test_model.py > "$OUT/attn_model.log" 2>&1
echo "model tests (tc default) rc=$? $(grep -E '(passed|failed|error)' "$OUT/attn_model.log" | tail -1)"
grep -E "^(FAILED|ERROR)" "$OUT/attn_model.log" | head -20

# 4. pp512, old and new prefill attention (separate processes: the flag is read at import)
if [ "${SKIP_PP:-0}" != 1 ]; then
  wait $SYN
  for m in qwen2 phi3; do
    for a in split tc; do
      if [ "$SECONDS" -gt "${PP_BUDGET:-420}" ]; then echo "$m $a: skipped (time)"; continue; fi
      WORKER_ORCD_PREFILL_ATTN=$a timeout "${T_PP:-75}" python3 -m worker bench \
        --model "$S/$m-full-q4_k_m.gguf" --ctx-size 4096 --no-cold --reps 3 \
        > "$OUT/attn_pp_${m}_$a.json" 2>> "$OUT/attn_pp.err"
      python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[2], sys.argv[3], "pp512", d.get("pp512_tok_s"), "tg128", d.get("tg128_tok_s"))' \
        "$OUT/attn_pp_${m}_$a.json" "$m" "$a" 2>/dev/null || echo "$m $a: bench failed (see attn_pp.err)"
    done
  done
fi
