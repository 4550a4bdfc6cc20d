#!/usr/bin/env bash
# Refresh the README's screenshots from the tests that take them:
#   docs/dashboard.png  the browser test starts a desktop and a peer, pairs them, serves a local and a forwarded
#                       request and screenshots the page in headless Chromium (tests/test_dashboard.py);
#   docs/tray.png       the tray test opens the tray's menu in trayer on Xvfb and screenshots it (tests/test_tray.py).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install_desktop.sh
mkdir -p docs
# CI=1: a test that cannot run fails rather than skips, so an old screenshot never passes for a new one.
CI=1 HYBRIDD_DASHBOARD_SCREENSHOT="$PWD/docs/dashboard.png" HYBRIDD_TRAY_SCREENSHOT="$PWD/docs/tray.png" \
    .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_dashboard.py tests/test_tray.py \
    -k "test_dashboard_in_chromium or test_tray_item"
for target in docs/dashboard.png docs/tray.png; do
    size=$(stat -c %s "$target")
    if [ "$size" -gt 200000 ]; then
        echo "scripts/screenshots.sh: $target is $size bytes; keep the README's copies under 200 KB" >&2
        exit 1
    fi
    echo "$target: $size bytes"
done
