#!/usr/bin/env bash
# One device call for the batched engine: GPU tests (kernels, matrix invariance, whole
# model, batch invariance), worker-orcd bench --batch on full-size synthetic layouts, and
# llama.cpp's llama-batched-bench on the same files in the same call (built from the ignored
# third_party/lcpp.tgz in the background while the tests run). Logs under $OUT.
# usage (device): source .device/setup.sh && bash scripts/device/gpu-check.sh [MODELS] [TESTS]
#   MODELS: comma list of qwen2,phi3,gpt-oss (default qwen2); TESTS: pytest -k filter, or
#   "none" to skip the tests.
set -uo pipefail
OUT=${OUT:-/tmp/batch_out}
mkdir -p "$OUT"
export WORKER_ORCD_CACHE=${WORKER_ORCD_CACHE:-$PWD/.kcache}
export WORKER_ORCD_SYNTH_DIR=/tmp/synth
S=$WORKER_ORCD_SYNTH_DIR
mkdir -p "$S"
MODELS=${1:-qwen2}
TESTS=${2:-}
BATCH=${BATCH:-1,8,32,64,128}
nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
t0=$(date +%s)
lcpp=/tmp/lcpp
LCPP=
[ -n "${NO_LLAMA:-}" ] || (
  mkdir -p $lcpp && tar xzf third_party/lcpp.tgz -C $lcpp &&
    cmake -S $lcpp/llama.cpp -B $lcpp/build -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON \
      -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_NATIVE=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
      -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF >"$OUT/lcpp_cmake.log" 2>&1 &&
    cmake --build $lcpp/build --target llama-batched-bench llama-bench -j"$(nproc)" \
      >"$OUT/lcpp_build.log" 2>&1
  echo "llama.cpp build rc=$? after $(( $(date +%s) - t0 )) s" >>"$OUT/lcpp_build.log"
) &
[ -n "${NO_LLAMA:-}" ] || LCPP=$!
mix() { case $1 in gpt-oss) echo mxfp4 ;; *) echo q4_k_m ;; esac; }
for m in ${MODELS//,/ }; do
  f=$S/$m-full-$(mix "$m").gguf  # written under another name, then renamed: never half a file
  (python3 -c "from tools.synth import preset, write_synthetic; write_synthetic('$f.part', preset('$m', 'full', mix='$(mix "$m")', seed=1))" \
    >"$OUT/synth-$m.log" 2>&1 && mv "$f.part" "$f"; echo "synth $m rc=$?" >>"$OUT/synth-$m.log") &
done
python3 -c "from worker.backends.cuda.compile import prewarm; print('compiled:', prewarm('sm_90'))" \
  >"$OUT/prewarm.log" 2>&1
echo "prewarm: $(cat "$OUT/prewarm.log" | tail -1) ($(( $(date +%s) - t0 )) s)"
if [ "$TESTS" != none ]; then
  files=${TEST_FILES:-tests/gpu/test_kernels.py tests/gpu/test_matmul.py tests/gpu/test_embed_moe.py tests/gpu/test_model.py}
  timeout "${TEST_TIMEOUT:-330}" python3 -m pytest -q -m gpu -p no:cacheprovider -rfE \
    --timeout 200 $files ${TESTS:+-k "$TESTS"} >"$OUT/pytest.log" 2>&1
  echo "tests rc=$? ($(( $(date +%s) - t0 )) s): $(grep -E '(passed|failed|error)' "$OUT/pytest.log" | tail -1)"
  grep -E "^FAILED|^ERROR|Error|assert" "$OUT/pytest.log" | head -30
fi
if [ -n "${PROFILE:-}" ]; then
  for b in ${PROFILE//,/ }; do
    timeout 120 python3 -m tools.kernel_profile "$S/qwen2-full-q4_k_m.gguf" --batch "$b" \
      --json "$OUT/profile-b$b.json" 2>&1 | grep -v Warning | head -30
  done
fi
for m in ${MODELS//,/ }; do
  f=$S/$m-full-$(mix "$m").gguf
  for _ in $(seq 400); do [ -f "$f" ] && break; sleep 1; done  # its synthetic file
  timeout "${BENCH_TIMEOUT:-150}" python3 -m worker bench --model "$f" --ctx-size 4096 --no-cold \
    --reps "${REPS:-3}" --batch "$BATCH" >"$OUT/bench-$m.txt" 2>&1
  echo "bench $m rc=$?"; grep -v "^{" "$OUT/bench-$m.txt" | tail -8
  grep "^{" "$OUT/bench-$m.txt" | python3 -c "import json,sys; d=json.loads(sys.stdin.read()); print({k: d.get(k) for k in ('gpu','pp_tok_s','tg_tok_s','max_batch','load_s_warm_kernel_cache','error')})"
  if [ -n "${NOINV:-}" ]; then  # the same without batch invariance (A/B of its cost)
    timeout 120 python3 -m worker bench --model "$f" --ctx-size 4096 --no-cold --reps 3 \
      --no-invariant --batch "$NOINV" >"$OUT/bench-$m-noinv.txt" 2>&1
    echo "bench $m --no-invariant rc=$?"; grep -v "^{" "$OUT/bench-$m-noinv.txt" | tail -6
    grep "^{" "$OUT/bench-$m-noinv.txt" | python3 -c "import json,sys; d=json.loads(sys.stdin.read()); print({k: d.get(k) for k in ('pp_tok_s','tg_tok_s','batch_invariant','error')})"
  fi
done
[ -n "$LCPP" ] && timeout 400 tail --pid=$LCPP -f /dev/null && tail -1 "$OUT/lcpp_build.log"
for m in ${MODELS//,/ }; do
  [ -n "$LCPP" ] || break
  f=$S/$m-full-$(mix "$m").gguf
  [ -x $lcpp/build/bin/llama-batched-bench ] || break
  timeout 200 $lcpp/build/bin/llama-batched-bench -m "$f" -c 33792 -b 2048 -ub 512 -npp 128 \
    -ntg 128 -npl "$BATCH" -ngl 99 -fa on >"$OUT/lcpp-batched-$m.txt" 2>&1
  echo "llama-batched-bench $m rc=$?"; grep -E "^\|" "$OUT/lcpp-batched-$m.txt" | tail -8
  if [ -n "${LLAMA_BENCH:-}" ]; then
    timeout 120 $lcpp/build/bin/llama-bench -m "$f" -p 512 -n 128 -fa 1 -r 3 >"$OUT/lcpp-bench-$m.txt" 2>&1
    echo "llama-bench $m rc=$?"; grep -E "^\|" "$OUT/lcpp-bench-$m.txt" | tail -3
  fi
done
echo "total $(( $(date +%s) - t0 )) s"
# what comes back: at most 8 files
tar czf "$OUT/logs.tgz" -C "$OUT" --exclude logs.tgz --exclude '*.json' . 2>/dev/null
find "$OUT" -maxdepth 1 -type f ! -name logs.tgz ! -name 'profile-*.json' ! -name 'bench-*.txt' -delete
