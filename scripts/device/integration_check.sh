#!/usr/bin/env bash
# One device call over the integrated tree: every gpu-marked test except the cold-cache one
# (kernels, matrix kernels, embedding/MoE, whole model: PDL, sampled graph, prefill attention;
# full-size Phi-3 / GPT-OSS logits) and worker-orcd bench for the three full-size layouts
# (gpt-oss also with the MoE gate+up pair launch). Summary on stdout, logs in $OUT/logs.tgz.
# usage (device): source .device/setup.sh && bash scripts/device/integration_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/integration}; L=/tmp/integration_logs; mkdir -p "$OUT" $L
S=/tmp/synth; mkdir -p $S; export WORKER_ORCD_SYNTH_DIR=$S
source scripts/device/lib.sh
syn qwen2 q4_k_m &
Q=$!
(syn phi3 q4_k_m; syn gpt-oss mxfp4) &
P=$!
t matmul 200 tests/gpu/test_matmul.py tests/gpu/test_embed_moe.py
wait $Q
t kernels_model 200 tests/gpu/test_kernels.py tests/gpu/test_model.py
grep -E "teacher-forced|PDL edges" "$L/kernels_model.log"
wait $P
t full 300 tests/gpu/test_model_full.py
grep -E "teacher-forced" "$L/full.log"
b() {  # model tag [env...]
  local m=$1 tag=$2; shift 2
  env "$@" timeout 150 python3 -m worker bench --model "$S/$m.gguf" --ctx-size 4096 --no-cold --reps 3 \
    >"$L/bench-$tag.json" 2>>"$L/bench.err"
  python3 - "$L/bench-$tag.json" "$tag" <<'PY'
import json, sys
try:
    d = json.load(open(sys.argv[1]))
except Exception as e:
    print(sys.argv[2], "no result", e); raise SystemExit
print(sys.argv[2], "tg128", d.get("tg128_tok_s"), "step_p50", d.get("decode_step_us_p50"),
      "sampled", d.get("tg_sampled_tok_s"), "pp512", d.get("pp512_tok_s"))
PY
}
b qwen2-full-q4_k_m qwen2
b phi3-full-q4_k_m phi3
b gpt-oss-full-mxfp4 gptoss
b gpt-oss-full-mxfp4 gptoss-pair WORKER_ORCD_MOE_PAIR=1
b qwen2-full-q4_k_m qwen2-attn-split WORKER_ORCD_PREFILL_ATTN=split
tar czf "$OUT/logs.tgz" -C $L .
