#!/usr/bin/env bash
# Install onevision with its test dependencies into .venv (from scratch if needed) and run the test suite.
# Default suite first; then the slow checks (real 0.5B shapes) unless ONEVISION_SKIP_SLOW=1.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch 2.14.1 / torchvision 0.29.1 are the versions the reference (transformers 5.24) was measured with.
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q -e ".[test]"
# the web page test drives Debian's Chromium through Playwright (no browser download)
if [ ! -x /usr/bin/chromium ]; then
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium
fi
.venv/bin/python -m pytest -m "not slow" -q --durations=15 "$@"
if [ "${ONEVISION_SKIP_SLOW:-0}" != "1" ]; then
  .venv/bin/python -m pytest -m slow -q --durations=15 "$@"
fi
