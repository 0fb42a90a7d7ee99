#!/usr/bin/env bash
# A/B of the decode gemv versions/modes on one warm card: worker-orcd bench (tg128) on the
# full-size synthetic Qwen2.5-0.5B and Phi-3-mini Q4_K_M layouts, each variant twice.
# usage (device): source .device/setup.sh && bash scripts/device/gemv_ab.sh
set -uo pipefail
OUT=${OUT:-/tmp/gemv_ab}; mkdir -p "$OUT"; S=/tmp/synth; mkdir -p $S
for a in qwen2 phi3; do
  [ -f $S/$a.gguf ] || python3 -m worker synth --arch $a --size full --mix q4_k_m --seed 1 --out $S/$a.gguf >/dev/null
done
for m in qwen2 phi3; do
  for v in "4:" "3:" "4:plain:2" "4:plain:1" "4:async:2"; do
    ver=${v%%:*}; mode=${v#*:}
    for rep in 1 2; do
      r=$(WORKER_ORCD_GEMV_VERSION=$ver WORKER_ORCD_GEMV_MODE=$mode timeout 120 python3 -m worker bench \
        --model $S/$m.gguf --ctx-size 4096 --no-cold --reps 3 2>/dev/null)
      echo "$r" >> "$OUT/ab.jsonl"
      echo "$m v$ver mode=${mode:-default} rep$rep: $(echo "$r" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["tg128_tok_s"], d["decode_step_us_p50"], d["pp512_tok_s"])')"
    done
  done
done
