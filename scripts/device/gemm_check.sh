#!/usr/bin/env bash
# Device check of the prefill gemm (H11, docs/kernels.md "H11: prefill gemm v2"): the card, the
# gemm GPU tests (v1, v2 and v3, every type, odd shapes, real shapes, bit-identical reruns,
# refusals), then v1 against v2 and v3 at 512 tokens on every model shape in one process, then
# (E2E=1, default) worker-orcd bench pp512 on a full-size synthetic Qwen2.5-0.5B Q4_K_M with
# WORKER_ORCD_GEMM_VERSION=1, 2 and 3.
# usage (device): source .device/setup.sh && export WORKER_ORCD_CACHE=$PWD/.kcache && \
#   bash scripts/device/gemm_check.sh        (logs and JSON under $OUT)
set -uo pipefail
OUT=${OUT:-/tmp/gemm_check}
mkdir -p "$OUT"
export WORKER_ORCD_COMMIT=${WORKER_ORCD_COMMIT:-device}
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
  --format=csv | tee "$OUT/card.txt"
T_TESTS=${T_TESTS:-120}
T_BENCH=${T_BENCH:-70}
timeout "$T_TESTS" python3 -m pytest -q -m gpu tests/gpu/test_matmul.py \
  -k "gemm or in_place or refused" -p no:cacheprovider --junitxml="$OUT/tests.xml" \
  > "$OUT/tests.log" 2>&1
echo "tests rc=$?"
grep -E "passed|failed|error" "$OUT/tests.log" | tail -3
grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -20
timeout "$T_BENCH" python3 scripts/gpu_matmul_bench.py --gemm-only --json "$OUT/gemm_bench.json" \
  > "$OUT/bench.log" 2>&1
echo "bench rc=$?"
cat "$OUT/bench.log" | cut -c1-160
if [ "${E2E:-1}" = 1 ]; then
  S=/tmp/synth; mkdir -p $S
  e2e() {  # e2e ARCH VERSION
    [ -f $S/$1.gguf ] || timeout 90 python3 -m worker synth --arch $1 --size full --mix q4_k_m \
      --seed 1 --out $S/$1.gguf > "$OUT/synth_$1.log" 2>&1 || { echo "synth $1 failed"; return; }
    r=$(WORKER_ORCD_GEMM_VERSION=$2 timeout 60 python3 -m worker bench --model $S/$1.gguf \
      --ctx-size 4096 --no-cold --reps 3 --tg 32 2>>"$OUT/e2e.err")
    echo "{\"arch\": \"$1\", \"gemm_version\": $2, \"bench\": ${r:-null}}" >> "$OUT/e2e.jsonl"
    echo "$1 synth q4_k_m, gemm v$2: $(echo "$r" | python3 -c 'import json,sys; d=json.load(sys.stdin); print("pp512", d.get("pp512_tok_s"), "tok/s, tg32", d.get("tg32_tok_s"), d.get("gpu"))' 2>&1 | tail -1)"
  }
  for av in "qwen2 1" "qwen2 3" "phi3 1" "phi3 3" "qwen2 2" "qwen2 3" "qwen2 1" "phi3 2"; do
    [ $SECONDS -lt ${E2E_UNTIL:-250} ] || { echo "e2e: out of time at $av"; break; }
    e2e $av
  done
fi
