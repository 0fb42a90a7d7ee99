#!/usr/bin/env bash
# One device call: where a Qwen2.5-0.5B decode step's time goes (per-kernel profile of the
# decode graph), a per-shape A/B of the decode gemv modes in graph timing (Qwen and Phi-3
# shapes as launched), and the Qwen bench with the default and with every gemv forced plain:1.
# usage (device): source .device/setup.sh && bash scripts/device/decode_profile.sh
# Cubins prebuilt here with scripts/device/prebuild_cubins.py .kcache_dec and carried.
set -uo pipefail
OUT=${OUT:-/tmp/decode_profile}; mkdir -p "$OUT"
export WORKER_ORCD_CACHE=$PWD/.kcache_dec
S=/tmp/synth; mkdir -p $S
python3 -m worker synth --arch qwen2 --size full --mix q4_k_m --seed 1 --out $S/qwen2.gguf >/dev/null
nvidia-smi > "$OUT/nvidia-smi.txt"
timeout 180 python3 tests/gpu/profile_decode.py $S/qwen2.gguf 4096 >"$OUT/profile_qwen.txt" 2>&1
echo "profile rc=$?"
timeout 120 python3 scripts/device/gemv_shapes_ab.py --json "$OUT/gemv_ab.json" >"$OUT/gemv_ab.txt" 2>&1
echo "gemv_ab rc=$?"
timeout 60 python3 scripts/device/spec_check.py $S/qwen2.gguf >"$OUT/spec_check.txt" 2>&1
echo "spec_check rc=$? $(tail -1 "$OUT/spec_check.txt")"
timeout 100 python3 -m pytest -q -m gpu tests/gpu/test_kernels.py -k "attn or attention or argmax or rope" \
  >"$OUT/tests.txt" 2>&1
echo "gpu tests rc=$? $(tail -1 "$OUT/tests.txt")"
# tree (build/base: the baseline commit, carried), spec (WORKER_ORCD_SPEC_DECODE), gemv mode
for v in "build/base::1" ".::0" ".::1" ".:plain:1:1" "build/base::1" ".::1"; do
  tree=${v%%:*}; rest=${v#*:}; mode=${rest%:*}; spec=${rest##*:}
  r=$(cd $tree && WORKER_ORCD_SPEC_DECODE=$spec WORKER_ORCD_GEMV_MODE=$mode timeout 90 python3 -m worker \
    bench --model $S/qwen2.gguf --ctx-size 4096 --no-cold --reps 3 2>>"$OUT/bench.err")
  echo "{\"v\": \"$v\", \"r\": ${r:-null}}" >>"$OUT/bench.jsonl"
  echo "qwen $tree mode=${mode:-default} spec=$spec: $(echo "$r" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d.get("tg128_tok_s"), d.get("decode_step_us_p50"), d.get("pp512_tok_s"))' 2>&1)"
done
cat "$OUT/profile_qwen.txt" | head -60
tail -20 "$OUT/gemv_ab.txt"
