#!/usr/bin/env bash
# Install headless Chromium (Debian's package) for the dashboard's browser test, when it is missing.
# Runs apt-get as root, through sudo elsewhere; without either it prints the command to run and exits 1.
# Debian names it chromium, Ubuntu's apt chromium-browser (a snap shim there): HYBRIDD_CHROMIUM may point at any
# Chromium or Chrome binary instead, and then nothing is installed.
set -euo pipefail
for name in "${HYBRIDD_CHROMIUM:-}" chromium chromium-browser google-chrome; do
    if [ -n "$name" ] && command -v "$name" >/dev/null 2>&1; then
        exit 0
    fi
done
packages=(chromium fonts-dejavu-core)
if [ "$(id -u)" -eq 0 ]; then
    as_root=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    as_root=(sudo -n)
else
    echo "scripts/install_browser.sh: Chromium is missing and this user cannot install packages; run:" >&2
    echo "    sudo apt-get update && sudo apt-get install -y --no-install-recommends ${packages[*]}" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "scripts/install_browser.sh: no apt-get here; install Chromium with this system's package manager," \
         "or set HYBRIDD_CHROMIUM to a Chromium or Chrome binary" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" apt-get update -qq
"${as_root[@]}" apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
command -v chromium >/dev/null
