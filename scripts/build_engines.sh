#!/usr/bin/env bash
# Build the CPU llama-server from the llama.cpp that the installed llama-cpp-python vendors, for the tests
# (tests/test_llama_server.py). Needs .venv (scripts/setup.sh). A second run finds the build and returns at once;
# a cold one takes about 7 minutes on 2 cores. JOBS=N overrides the compilers at once (default: the CPU count).
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m hybridd.cli.engines \
    build llama-server --cpu ${JOBS:+--jobs "$JOBS"}
