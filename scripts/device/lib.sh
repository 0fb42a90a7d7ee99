# Shared by the device-call scripts (source it; they set -uo pipefail, L = log folder, S =
# synthetic model folder).
#   syn ARCH MIX            write the full-size synthetic layout $S/ARCH-full-MIX.gguf
#   t NAME TIMEOUT ARGS...  run the gpu-marked pytest ARGS, log to $L/NAME.log, print a line
syn() {
  python3 -m worker synth --arch "$1" --size full --mix "$2" --seed 1 \
    --out "$S/$1-full-$2.gguf" >/dev/null
}
t() {
  local name=$1 to=$2; shift 2
  local t0; t0=$(date +%s)
  timeout "$to" python3 -m pytest -q -m gpu -s -p no:cacheprovider -rfE "$@" >"$L/$name.log" 2>&1
  echo "$name rc=$? $(( $(date +%s) - t0 )) s: $(grep -E '(passed|failed|error)' "$L/$name.log" | tail -1)"
  grep -E "^FAILED|^ERROR" "$L/$name.log" | head -8
}
