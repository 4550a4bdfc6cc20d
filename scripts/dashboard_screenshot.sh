#!/usr/bin/env bash
# Refresh the README's dashboard screenshot (docs/dashboard.png): the browser test starts a desktop and a peer,
# pairs them, serves a local and a forwarded request, screenshots the page in headless Chromium, and copies it here.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install_browser.sh
target="$PWD/docs/dashboard.png"
mkdir -p "$(dirname "$target")"
HYBRIDD_DASHBOARD_SCREENSHOT="$target" .venv/bin/python -m pytest -q -p no:cacheprovider \
    tests/test_dashboard.py -k test_dashboard_in_chromium
size=$(stat -c %s "$target")
if [ "$size" -gt 200000 ]; then
    echo "scripts/dashboard_screenshot.sh: $target is $size bytes; keep the README's copy under 200 KB" >&2
    exit 1
fi
echo "$target: $size bytes"
