#!/usr/bin/env bash
# Make .venv with hybridd installed (llama-cpp-python compiles on first install).
#   scripts/setup.sh        what serving needs, and the demo model (scripts/serve.sh)
#   scripts/setup.sh test   the test tools, the training extra and the llama-server engine (scripts/test.sh)
# The tests train on the CPU, so their torch is pinned to the CPU build: a plain requirement would pull a CUDA build
# of several GB (a user's `pip install 'hybridd[train]'` keeps the plain range). llama-server is compiled once from
# the llama.cpp that llama-cpp-python vendors and cached under $XDG_CACHE_HOME/hybridd/engines (about 7 minutes on
# 2 cores the first time, instant afterwards).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
if [ "${1:-}" = test ]; then
    .venv/bin/python -m pip install --quiet 'torch==2.13.0+cpu' -e '.[dev,train]'
    scripts/build_engines.sh
else
    .venv/bin/python -m pip install --quiet -e '.[demo]'
fi
