#!/usr/bin/env bash
# Set up (once) and run the daemon; with no config it serves a small real demo model on 127.0.0.1:11435.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/hybridd serve "$@"
