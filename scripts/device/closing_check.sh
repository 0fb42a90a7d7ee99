#!/usr/bin/env bash
# The session's closing device call over the final tree: every gpu-marked test but the cold
# cache start and the full-size Phi-3 logits (the full-size GPT-OSS logits run: router,
# MoE and loader changed since), compute-sanitizer memcheck and racecheck over the kernels
# added this session (tensor-core attention, sampler paths, router rowdot, gemm v3, MoE route
# and routed gemm), and worker-orcd bench for Qwen2.5-0.5B and GPT-OSS-20B. $OUT/closing.tgz.
# usage (device): source .device/setup.sh && bash scripts/device/closing_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/closing}; L=/tmp/closing_logs; mkdir -p "$OUT" $L
S=/tmp/synth; mkdir -p $S; export WORKER_ORCD_SYNTH_DIR=$S
source scripts/device/lib.sh
(syn qwen2 q4_k_m; syn gpt-oss mxfp4) &
P=$!
t matmul 150 tests/gpu/test_matmul.py tests/gpu/test_embed_moe.py
t kernels 90 tests/gpu/test_kernels.py
wait $P
t model 150 tests/gpu/test_model.py
t full_gptoss 200 tests/gpu/test_model_full.py -k gpt
grep -E "teacher-forced" "$L/full_gptoss.log"
for m in qwen2-full-q4_k_m gpt-oss-full-mxfp4; do
  timeout 120 python3 -m worker bench --model "$S/$m.gguf" --ctx-size 4096 --no-cold --reps 3 >$L/bench-$m.json 2>>$L/bench.err
  python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[2], {k: d.get(k) for k in ("tg128_tok_s","decode_step_us_p50","tg_sampled_tok_s","tg_sampled_default_tok_s","pp512_tok_s","load_s_warm_kernel_cache","weights_upload_gb_s","h2d_plain_pinned_gb_s")})' $L/bench-$m.json $m 2>&1 | tail -1
done
san() {  # tool selection
  timeout 100 compute-sanitizer --tool "$1" --error-exitcode 9 python3 -m pytest -q -m gpu \
    -p no:cacheprovider "${@:2}" >"$L/sanitizer-$1.log" 2>&1
  echo "compute-sanitizer $1 rc=$? $(grep -E 'ERROR SUMMARY|passed|failed' "$L/sanitizer-$1.log" | tail -2 | tr '\n' ' ')"
}
SEL=(tests/gpu/test_kernels.py tests/gpu/test_matmul.py tests/gpu/test_embed_moe.py -k "(attention_tc and (lengths or deterministic)) or rowdot or case8] or case12] or case1] or case2] or moe_route or gemm5_one_expert or (gemm2_tiles and (q4_k or mxfp4) and 3])")
san memcheck "${SEL[@]}"
san racecheck "${SEL[@]}"
tar czf "$OUT/closing.tgz" -C $L .
