#!/usr/bin/env bash
# Install what the desktop tests drive, when it is missing:
#   a desktop session for the tray test (tests/test_tray.py): Xvfb, the trayer tray host, xdotool, xwininfo and a
#   D-Bus session bus, the Ayatana AppIndicator typelib, and what PyGObject (hybridd[tray]) compiles against
#   (pkg-config, the girepository and cairo headers, Python's own headers where this Python lacks them);
#   headless Chromium for the dashboard's browser test (tests/test_dashboard.py), in an apt-get run of its own, so a
#   system whose Chromium is not an apt package (Ubuntu's is a snap) still gets the session.
# Runs apt-get as root, through sudo elsewhere; without either it prints the command to run and exits 1.
# HYBRIDD_CHROMIUM may point at any Chromium or Chrome binary, and then no Chromium is installed. PYTHON is the
# interpreter PyGObject is built for (default: .venv's, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
session=()
need() {  # need COMMAND PACKAGE: the package, unless the command is already here
    command -v "$1" >/dev/null 2>&1 || session+=("$2")
}
need Xvfb xvfb
need trayer trayer
need xdotool xdotool
need xwininfo x11-utils
need dbus-daemon dbus
need pkg-config pkg-config
typelib=girepository-1.0/AyatanaAppIndicator3-0.1.typelib
if ! ls /usr/lib/*/"$typelib" /usr/lib/"$typelib" >/dev/null 2>&1; then
    session+=(gir1.2-ayatanaappindicator3-0.1)  # pulls gir1.2-gtk-3.0
fi
pkg-config --exists gobject-introspection-1.0 2>/dev/null || session+=(libgirepository1.0-dev)
pkg-config --exists cairo 2>/dev/null || session+=(libcairo2-dev)
include="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["include"])' 2>/dev/null || true)"
if [ ! -f "$include/Python.h" ]; then
    session+=(python3-dev)  # a stock python3 without its headers; a pyenv or uv Python carries its own
fi
browser=(chromium fonts-dejavu-core)
for name in "${HYBRIDD_CHROMIUM:-}" chromium chromium-browser google-chrome; do
    if [ -n "$name" ] && command -v "$name" >/dev/null 2>&1; then
        browser=()
    fi
done
if [ "${#session[@]}" = 0 ] && [ "${#browser[@]}" = 0 ]; then
    exit 0
fi
wanted="${session[*]} ${browser[*]}"
if [ "$(id -u)" -eq 0 ]; then
    as_root=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    as_root=(sudo -n)
else
    echo "scripts/install_desktop.sh: ${wanted# } missing and this user cannot install packages; run:" >&2
    echo "    sudo apt-get update && sudo apt-get install -y --no-install-recommends ${wanted# }" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "scripts/install_desktop.sh: no apt-get here; install these with this system's package manager:" \
         "${wanted# } (or set HYBRIDD_CHROMIUM to a Chromium or Chrome binary)" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" apt-get update -qq
if [ "${#session[@]}" != 0 ]; then
    "${as_root[@]}" apt-get install -y -qq --no-install-recommends "${session[@]}" >/dev/null
fi
if [ "${#browser[@]}" != 0 ] && ! "${as_root[@]}" apt-get install -y -qq --no-install-recommends "${browser[@]}" \
    >/dev/null; then
    echo "scripts/install_desktop.sh: Chromium is not an apt package here; install Chromium or Chrome and set" \
         "HYBRIDD_CHROMIUM to it" >&2
    exit 1
fi
