#!/usr/bin/env bash
# Device call (H10, docs/kernels.md "H10: MoE kernels"): the card, the MoE GPU tests
# (tests/gpu/test_embed_moe.py), the tiny gpt-oss model test and the MoE bench (previous and
# new kernels in one process on one card, scripts/device/moe_bench.py). From the repository root on the device:
#   source .device/setup.sh && export WORKER_ORCD_CACHE=$PWD/.kcache PYTHONUNBUFFERED=1 && \
#   bash scripts/device/moe_check.sh
# with the cubins prebuilt here (scripts/device/prebuild_cubins.py .kcache) and carried.
# Logs and the bench JSON go to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/moe_check}
mkdir -p "$OUT"
export WORKER_ORCD_COMMIT=${WORKER_ORCD_COMMIT:-device}
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
  --format=csv | tee "$OUT/card.txt"
T_TESTS=${T_TESTS:-170}
T_BENCH=${T_BENCH:-100}
timeout "$T_TESTS" python3 -m pytest -q -m gpu tests/gpu/test_embed_moe.py \
  -p no:cacheprovider --junitxml="$OUT/tests.xml" > "$OUT/tests.log" 2>&1
echo "tests rc=$?"
grep -E "passed|failed|error" "$OUT/tests.log" | tail -3
grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -30
# the whole gpt-oss layer recipe on a tiny real-layout file (backend._moe: routed gemm for the
# prefill, the gate+up pair (WORKER_ORCD_MOE_PAIR=1) or two launches, and moe_gemv for decode)
# against the NumPy reference
for pair in 0 1; do
  WORKER_ORCD_MOE_PAIR=$pair timeout "${T_MODEL:-90}" python3 -m pytest -q -m gpu \
    tests/gpu/test_model.py -k "gpt-oss" -s -p no:cacheprovider > "$OUT/model_pair$pair.log" 2>&1
  echo "model test (MOE_PAIR=$pair) rc=$?"
  grep -E "passed|failed|error|max rel" "$OUT/model_pair$pair.log" | tail -4
done
timeout "$T_BENCH" python3 scripts/device/moe_bench.py --json "$OUT/moe_bench.json" \
  > "$OUT/bench.log" 2>&1
echo "bench rc=$?"
cut -c1-160 "$OUT/bench.log"
