#!/usr/bin/env bash
# Set up (once), run ruff, mypy and the import-linter contracts, then the whole test suite; fails if pytest ran
# no test at all.
set -uo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test || exit 1
# Static checks first: a layering break, a lint or a type error fails the run before the suite starts.
.venv/bin/ruff check hybridd tests bench || exit 1
.venv/bin/mypy hybridd || exit 1
.venv/bin/lint-imports || exit 1
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
.venv/bin/python -m pytest "$@" 2>&1 | tee "$log"
status="${PIPESTATUS[0]}"
if [ "$status" -ne 0 ]; then
    exit "$status"
fi
# pytest exits 5 when it collects nothing; also refuse a green run whose summary shows no passed test.
if ! tail -n 3 "$log" | grep -Eq '[0-9]+ passed'; then
    echo "scripts/test.sh: no test passed; refusing to report success" >&2
    exit 1
fi
