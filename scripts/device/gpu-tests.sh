#!/usr/bin/env bash
# The GPU test suite and the speed figures on a machine with an NVIDIA GPU, in one go:
# warm the kernel cache and write the synthetic full-size models in parallel, run every
# gpu-marked test, then `worker-orcd bench` (with the decode A/B sweeps). Logs in $OUT.
#
#   pip install -e '.[cuda,test]' && bash scripts/device/gpu-tests.sh [PYTEST -k EXPRESSION]
#
# Environment: OUT (log folder, /tmp/gpu-tests), WORKER_ORCD_SYNTH_DIR (synthetic models,
# kept between runs; /tmp/synth), PHI3=1 / GPTOSS=1 (also bench the full-size Phi-3-mini /
# GPT-OSS-20B layouts), SANITIZE=1 (compute-sanitizer memcheck and racecheck over a sample of
# the kernel tests), PYTEST_TIMEOUT / BENCH_TIMEOUT (seconds).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/gpu-tests}
export WORKER_ORCD_SYNTH_DIR=${WORKER_ORCD_SYNTH_DIR:-/tmp/synth}
mkdir -p "$OUT" "$WORKER_ORCD_SYNTH_DIR"
K=${1:-}
synth() {  # ARCH MIX: the full-size synthetic layout, written once
  local out="$WORKER_ORCD_SYNTH_DIR/$1-full-$2.gguf"
  [ -f "$out" ] || python3 -m worker synth --arch "$1" --size full --mix "$2" --seed 1 --out "$out" >/dev/null
  echo "$out"
}
nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
git rev-parse --short HEAD 2>/dev/null | tee "$OUT/commit.txt"

t0=$(date +%s)
pids=()
for m in $(python3 -c "from worker.backends.cuda.compile import module_names; print(*module_names())"); do
  python3 -c "from worker.backends.cuda.compile import prewarm; prewarm('sm_90', ['$m'])" &
  pids+=($!)
done
synth qwen2 q4_k_m >/dev/null &
pids+=($!)
[ -n "${PHI3:-}" ] && { synth phi3 q4_k_m >/dev/null & pids+=($!); }
[ -n "${GPTOSS:-}" ] && { synth gpt-oss mxfp4 >/dev/null & pids+=($!); }
wait "${pids[@]}"
echo "kernels compiled and models written in $(( $(date +%s) - t0 )) s" | tee "$OUT/prep.txt"

timeout "${PYTEST_TIMEOUT:-900}" python3 -m pytest -q -m gpu -p no:cacheprovider -rf \
  ${K:+-k "$K"} 2>&1 | tee "$OUT/pytest.log" | tail -40
rc=${PIPESTATUS[0]}

if [ -n "${SANITIZE:-}" ] && command -v compute-sanitizer >/dev/null; then
  for tool in memcheck racecheck; do
    timeout 300 compute-sanitizer --tool "$tool" --error-exitcode 9 python3 -m pytest -q -m gpu \
      -p no:cacheprovider tests/gpu/test_kernels.py -k "${SANITIZE_K:-rmsnorm or attention}" \
      2>&1 | tail -8 | tee "$OUT/sanitizer-$tool.txt"
  done
fi

for model in "$(synth qwen2 q4_k_m)" ${PHI3:+"$(synth phi3 q4_k_m)"} ${GPTOSS:+"$(synth gpt-oss mxfp4)"}; do
  name=$(basename "$model" .gguf)
  timeout "${BENCH_TIMEOUT:-300}" python3 -m worker bench --model "$model" --ctx-size 4096 \
    --sweep-pdl 2>"$OUT/bench-$name.err" | tee "$OUT/bench-$name.json"
done
exit "$rc"
