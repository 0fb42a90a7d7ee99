#!/usr/bin/env bash
# Device call (H13, docs/kernels.md "H13: routed MoE prefill on the gemm2 core"; before: H10):
# the card, the routed gemm's GPU tests (version 5 first, then the rest of
# tests/gpu/test_embed_moe.py), the prefill MoE bench (versions 3/4/5 in one process,
# scripts/device/moe_bench.py --prefill-only), pp512 of a full-size synthetic GPT-OSS-20B
# file with the routed gemm version 5 (default) and 4 (WORKER_ORCD_MOE_GEMM_VERSION=4), and the
# tiny gpt-oss model test with both. From the repository root on the device:
#   source .device/setup.sh && export WORKER_ORCD_CACHE=$PWD/.kcache13 PYTHONUNBUFFERED=1 \
#     WORKER_ORCD_COMMIT=<sha> && bash scripts/device/moe_check.sh
# with the cubins prebuilt here (scripts/device/prebuild_cubins.py .kcache13) and carried.
# Every step has a timeout inside a total budget (TOTAL, seconds); logs go to $OUT/moe13.tgz.
set -uo pipefail
OUT=${OUT:-/tmp/moe_check}
L=/tmp/moe13_logs
mkdir -p "$OUT" $L
export WORKER_ORCD_COMMIT=${WORKER_ORCD_COMMIT:-device}
T0=$(date +%s)
TOTAL=${TOTAL:-395}
left() { echo $((TOTAL - ($(date +%s) - T0))); }
cap() { local l; l=$(left); if [ "$l" -lt "$1" ]; then echo $((l > 5 ? l : 5)); else echo "$1"; fi; }
finish() { tar czf "$OUT/moe13.tgz" -C $L . 2>/dev/null; }
trap finish EXIT
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
  --format=csv | tee $L/card.txt
G=/tmp/g.gguf
(python3 -m worker synth --arch gpt-oss --size full --mix mxfp4 --seed 1 --out $G \
  >$L/synth.log 2>&1; echo "synth rc=$?" >>$L/synth.log) &
SYN=$!
pt() {  # pt NAME TIMEOUT pytest-args...
  local name=$1 t=$2
  shift 2
  timeout "$(cap "$t")" python3 -m pytest -q -m gpu -p no:cacheprovider -rfE "$@" >$L/$name.log 2>&1
  echo "$name rc=$? $(grep -E '(passed|failed|error)' $L/$name.log | tail -1) [$(left) s left]"
  grep -E "^(FAILED|ERROR)" $L/$name.log | cut -c1-300 | head -12
}
pt tests_v5 110 tests/gpu/test_embed_moe.py -k "gemm5"
timeout "$(cap 60)" python3 scripts/device/moe_bench.py --prefill-only --json $L/moe_bench.json \
  >$L/bench.log 2>&1
echo "bench rc=$? [$(left) s left]"
sed -n '/^prefill/,$p' $L/bench.log | cut -c1-120
for _ in $(seq 1 60); do kill -0 $SYN 2>/dev/null || break; sleep 1; done
cat $L/synth.log | tail -2
pp() {  # pp VERSION
  WORKER_ORCD_MOE_GEMM_VERSION=$1 timeout "$(cap 75)" python3 -m worker bench --model $G \
    --ctx-size 4096 --no-cold --reps 3 --tg 32 >$L/pp512_v$1.json 2>$L/pp512_v$1.err
  echo "pp512 moe gemm v$1 rc=$? [$(left) s left]"
  python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print("  ", {k: v for k, v in d.items() if k.startswith(("pp", "tg")) and not isinstance(v, (dict, list))})' \
    $L/pp512_v$1.json 2>&1 | tail -1
  tail -2 $L/pp512_v$1.err | cut -c1-200
}
pp 5
pp 4
for v in 5 4; do
  (export WORKER_ORCD_MOE_GEMM_VERSION=$v; pt model_v$v 45 tests/gpu/test_model.py -k "tiny and gpt" -s)
done
pt tests_rest 150 tests/gpu/test_embed_moe.py -k "not gemm5"
echo "done in $(($(date +%s) - T0)) s"
