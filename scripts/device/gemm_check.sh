#!/usr/bin/env bash
# Device check of the prefill gemm (H11, docs/kernels.md "H11: prefill gemm v2"): the card, the
# gemm GPU tests (v1 and v2, every type, odd shapes, real shapes, bit-identical reruns,
# refusals), then v1 against v2 at 512 tokens on every model shape in one process.
# usage (device): source .device/setup.sh && export WORKER_ORCD_CACHE=$PWD/.kcache && \
#   bash scripts/device/gemm_check.sh        (logs and JSON under $OUT)
set -uo pipefail
OUT=${OUT:-/tmp/gemm_check}
mkdir -p "$OUT"
export WORKER_ORCD_COMMIT=${WORKER_ORCD_COMMIT:-device}
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
  --format=csv | tee "$OUT/card.txt"
T_TESTS=${T_TESTS:-150}
T_BENCH=${T_BENCH:-110}
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
