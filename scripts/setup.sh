#!/usr/bin/env bash
# Make .venv with hybridd, its test tools and the training extra installed (llama-cpp-python compiles on first
# install). The tests train on the CPU, so torch is pinned to the CPU build here: a plain requirement would pull a
# CUDA build of several GB. A user's `pip install hybridd[train]` keeps the plain range. Then the llama-server
# engine, compiled once from the llama.cpp llama-cpp-python vendors and cached under $XDG_CACHE_HOME/hybridd/engines
# (about 12 minutes on 2 cores the first time, instant afterwards).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet 'torch==2.13.0+cpu' -e '.[dev,train]'
scripts/build_engines.sh
