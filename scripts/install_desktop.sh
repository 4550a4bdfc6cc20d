#!/usr/bin/env bash
# Install what the desktop tests drive, when it is missing, in one apt-get run:
#   headless Chromium for the dashboard's browser test (tests/test_dashboard.py);
#   a desktop session for the tray test (tests/test_tray.py): Xvfb, the trayer tray host, xdotool, xwininfo and a
#   D-Bus session bus, the Ayatana AppIndicator typelib, and what PyGObject (hybridd[tray]) compiles against.
# Runs apt-get as root, through sudo elsewhere; without either it prints the command to run and exits 1.
# Debian names it chromium, Ubuntu's apt chromium-browser (a snap shim there): HYBRIDD_CHROMIUM may point at any
# Chromium or Chrome binary instead, and then no Chromium is installed.
set -euo pipefail
packages=()
has_browser=0
for name in "${HYBRIDD_CHROMIUM:-}" chromium chromium-browser google-chrome; do
    if [ -n "$name" ] && command -v "$name" >/dev/null 2>&1; then
        has_browser=1
    fi
done
if [ "$has_browser" = 0 ]; then
    packages+=(chromium fonts-dejavu-core)
fi
need() {  # need COMMAND PACKAGE: the package, unless the command is already here
    command -v "$1" >/dev/null 2>&1 || packages+=("$2")
}
need Xvfb xvfb
need trayer trayer
need xdotool xdotool
need xwininfo x11-utils
need dbus-daemon dbus
need pkg-config pkg-config
for typelib in AyatanaAppIndicator3-0.1 Gtk-3.0; do
    if ! ls /usr/lib/*/girepository-1.0/"$typelib".typelib /usr/lib/girepository-1.0/"$typelib".typelib \
        >/dev/null 2>&1; then
        packages+=(gir1.2-ayatanaappindicator3-0.1)
    fi
done
pkg-config --exists gobject-introspection-1.0 2>/dev/null || packages+=(libgirepository1.0-dev)
pkg-config --exists cairo 2>/dev/null || packages+=(libcairo2-dev)
if [ "${#packages[@]}" = 0 ]; then
    exit 0
fi
# One name once (the typelib check can add it twice).
mapfile -t packages < <(printf '%s\n' "${packages[@]}" | awk '!seen[$0]++')
if [ "$(id -u)" -eq 0 ]; then
    as_root=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    as_root=(sudo -n)
else
    echo "scripts/install_desktop.sh: ${packages[*]} missing and this user cannot install packages; run:" >&2
    echo "    sudo apt-get update && sudo apt-get install -y --no-install-recommends ${packages[*]}" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "scripts/install_desktop.sh: no apt-get here; install these with this system's package manager:" \
         "${packages[*]} (or set HYBRIDD_CHROMIUM to a Chromium or Chrome binary)" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" apt-get update -qq
"${as_root[@]}" apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
