#!/usr/bin/env bash
# One device call for the batched engine: GPU tests (kernels, matrix invariance, whole
# model, batch invariance), worker-orcd bench --batch on full-size synthetic layouts, and
# llama.cpp's llama-batched-bench on the same files in the same call (built from the ignored
# third_party/lcpp.tgz in the background while the tests run). Logs under $OUT.
# usage (device): source .device/setup.sh && bash scripts/device/gpu-check.sh [MODELS] [TESTS]
#   MODELS: comma list of qwen2,phi3,gpt-oss (default qwen2); TESTS: pytest -k filter, or
#   "none" to skip the tests.
# Environment: NO_LLAMA=1 (no llama.cpp), BATCH (bench --batch list; "" skips the bench),
#   NOINV (also bench without batch invariance at these B), AB_ENV="VAR=value ..." with
#   AB_BATCH (also bench with that environment at these B: the A/B of a switch), PROFILE (kernel
#   profiles of every model at these B, PDL off), BASE (a tree, e.g. `git archive` of the
#   commit before a kernel change under the ignored third_party/: also bench it at AB_BATCH),
#   QUIET=1 (benches wait for the llama.cpp build: no compile load on the CPUs they use),
#   SERVE=1 (serving over NATS on the first model: bench --suite --concurrency $CONC,
#   the soak against a GPU worker with VRAM before/after, gateway-bench), TEST_FILES,
#   TEST_TIMEOUT, REPS.
set -uo pipefail
OUT=${OUT:-/tmp/batch_out}
mkdir -p "$OUT"
export WORKER_ORCD_CACHE=${WORKER_ORCD_CACHE:-$PWD/.kcache}
export WORKER_ORCD_SYNTH_DIR=/tmp/synth
S=$WORKER_ORCD_SYNTH_DIR
mkdir -p "$S"
MODELS=${1:-qwen2}
TESTS=${2:-}
BATCH=${BATCH-1,8,32,64,128}
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
  files=${TEST_FILES:-tests/gpu/test_kernels.py tests/gpu/test_matmul.py tests/gpu/test_i15.py tests/gpu/test_embed_moe.py tests/gpu/test_model.py}
  timeout "${TEST_TIMEOUT:-330}" python3 -m pytest -q -m gpu -p no:cacheprovider -rfE \
    --timeout 200 $files ${TESTS:+-k "$TESTS"} >"$OUT/pytest.log" 2>&1
  echo "tests rc=$? ($(( $(date +%s) - t0 )) s): $(grep -E '(passed|failed|error)' "$OUT/pytest.log" | tail -1)"
  grep -E "^FAILED|^ERROR|Error|assert" "$OUT/pytest.log" | head -30
fi
if [ -n "${PROFILE:-}" ]; then
  for m in ${MODELS//,/ }; do
    f=$S/$m-full-$(mix "$m").gguf
    for _ in $(seq 400); do [ -f "$f" ] && break; sleep 1; done
    for b in ${PROFILE//,/ }; do  # PDL off: overlapping kernels' times do not add up
      WORKER_ORCD_PDL=0 timeout 120 python3 -m tools.kernel_profile "$f" --batch "$b" \
        --json "$OUT/profile-$m-b$b.json" 2>&1 | grep -v Warning | head -30
    done
  done
fi
if [ -n "${QUIET:-}" ] && [ -n "$LCPP" ]; then
  wait "$LCPP"; echo "llama.cpp build waited for ($(( $(date +%s) - t0 )) s)"
fi
for m in ${MODELS//,/ }; do
  [ -n "$BATCH" ] || break
  f=$S/$m-full-$(mix "$m").gguf
  for _ in $(seq 400); do [ -f "$f" ] && break; sleep 1; done  # its synthetic file
  timeout "${BENCH_TIMEOUT:-150}" python3 -m worker bench --model "$f" --ctx-size 4096 --no-cold \
    --reps "${REPS:-3}" --batch "$BATCH" >"$OUT/bench-$m.txt" 2>&1
  echo "bench $m rc=$?"; grep -v "^{" "$OUT/bench-$m.txt" | tail -8
  grep "^{" "$OUT/bench-$m.txt" | python3 -c "import json,sys; d=json.loads(sys.stdin.read()); print({k: d.get(k) for k in ('gpu','pp_tok_s','tg_tok_s','max_batch','load_s_warm_kernel_cache','error')})"
  if [ -n "${AB_ENV:-}" ]; then  # the same with an environment switch (A/B in one call)
    timeout 120 env $AB_ENV python3 -m worker bench --model "$f" --ctx-size 4096 --no-cold \
      --reps "${REPS:-3}" --batch "${AB_BATCH:-$BATCH}" >"$OUT/bench-$m-ab.txt" 2>&1
    echo "bench $m with $AB_ENV rc=$?"; grep -v "^{" "$OUT/bench-$m-ab.txt" | tail -6
  fi
  if [ -n "${BASE:-}" ]; then  # the same from another tree (a kernel change's A/B in one call)
    (cd "$BASE" && timeout 150 python3 -m worker bench --model "$f" --ctx-size 4096 --no-cold \
      --reps "${REPS:-3}" --batch "${AB_BATCH:-$BATCH}") >"$OUT/bench-$m-base.txt" 2>&1
    echo "bench $m from $BASE rc=$?"; grep -v "^{" "$OUT/bench-$m-base.txt" | tail -6
  fi
  if [ -n "${NOINV:-}" ]; then  # the same without batch invariance (A/B of its cost)
    timeout 120 python3 -m worker bench --model "$f" --ctx-size 4096 --no-cold --reps 3 \
      --no-invariant --batch "$NOINV" >"$OUT/bench-$m-noinv.txt" 2>&1
    echo "bench $m --no-invariant rc=$?"; grep -v "^{" "$OUT/bench-$m-noinv.txt" | tail -6
    grep "^{" "$OUT/bench-$m-noinv.txt" | python3 -c "import json,sys; d=json.loads(sys.stdin.read()); print({k: d.get(k) for k in ('pp_tok_s','tg_tok_s','batch_invariant','error')})"
  fi
done
if [ -n "${SERVE:-}" ]; then
  m=${MODELS%%,*}; f=$S/$m-full-$(mix "$m").gguf
  for _ in $(seq 400); do [ -f "$f" ] && break; sleep 1; done
  timeout 300 python3 -m worker bench --suite --model "$f" --ctx-size 4096 --no-cold \
    --concurrency "${CONC:-1,16,64}" --jobs-per-client 4 --max-tokens 128 --jobs 20 \
    --health-requests 1000 --cancel-runs 10 --vram-jobs 100 >"$OUT/suite.json" 2>"$OUT/suite.err"
  echo "suite rc=$? ($(( $(date +%s) - t0 )) s)"; tail -3 "$OUT/suite.err"
  python3 - "$OUT/suite.json" <<'PY'
import json, sys
d = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
print({k: d.get(k) for k in ("gpu", "error", "ttft", "inter_token", "health", "cancel", "vram", "pass")})
print("abandoned", d.get("abort", {}).get("abandoned"))
for p in d.get("concurrency", []):
    print(p["clients"], p["jobs"], p["tokens_per_s"], p["ttft"], p["inter_token"], p["errors"][:2])
PY
  # soak against one GPU worker (embedded nats-server): every job ends once, VRAM after
  python3 -m worker serve --device cuda --model "$f" --model-ref soak --ctx-size 4096 \
    --log-format json >"$OUT/soak-worker.log" 2>&1 &
  wpid=$!
  for _ in $(seq 120); do grep -q '"event": *"ready"' "$OUT/soak-worker.log" && break; sleep 1; done
  python3 -m worker health --model-ref soak --json >"$OUT/soak-health-before.json" 2>&1
  timeout 150 python3 -m tools.soak --nats-url nats://127.0.0.1:4222 --model-ref soak \
    --jobs 1000 --clients 8 --in-flight 8 --worker-pid "$wpid" >"$OUT/soak.json" 2>"$OUT/soak.err"
  echo "soak rc=$?"; tail -c 1500 "$OUT/soak.json"; echo
  python3 -m worker health --model-ref soak --json >"$OUT/soak-health-after.json" 2>&1
  python3 - "$OUT" <<'PY'
import json, sys
b, a = (json.loads(open(f"{sys.argv[1]}/soak-health-{w}.json").read()) for w in ("before", "after"))
print("soak VRAM before/after", b.get("vram_bytes_used"), a.get("vram_bytes_used"), a.get("status"))
PY
  kill -TERM $wpid; wait $wpid; echo "soak worker exit $?"
  timeout 200 python3 -m worker gateway-bench --model "$f" --device cuda --jobs 20 \
    --max-tokens 64 --streams 256 >"$OUT/gateway-bench.json" 2>"$OUT/gateway-bench.err"
  echo "gateway-bench rc=$?"; tail -c 2500 "$OUT/gateway-bench.json"; echo
fi
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
find "$OUT" -maxdepth 1 -type f ! -name logs.tgz ! -name 'profile-*.json' ! -name 'bench-*.txt' \
  ! -name suite.json ! -name soak.json ! -name gateway-bench.json -delete
