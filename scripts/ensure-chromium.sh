#!/usr/bin/env bash
# Make sure a chromium binary is installed for tests/test_browser.py, which drives it
# headless with Playwright (the pip package of the dev extras; Playwright never downloads
# a browser here: the tests hand it this binary). When chromium is missing and we are root
# (or have passwordless sudo) with apt-get, install Debian's chromium package, quietly.
# Prints the path of the binary on stdout (everything else goes to stderr), or exits 1
# when chromium cannot be had; scripts/test.sh then warns and the browser tests skip
# (under CI=true they fail instead).
# MAILROOM_SKIP_CHROMIUM=1: use an installed chromium, but never install one.
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

find_chromium() {
    local candidate
    for candidate in chromium /usr/bin/chromium; do
        if command -v "$candidate" >/dev/null 2>&1; then
            command -v "$candidate"
            return 0
        fi
    done
    return 1
}

report() {
    # chromium --version may print a warning line of its wrapper script first
    say "chromium is installed: $1 ($("$1" --version 2>/dev/null | tail -n 1))"
    echo "$1"
}

if binary="$(find_chromium)"; then
    report "$binary"
    exit 0
fi
if [ "${MAILROOM_SKIP_CHROMIUM:-}" = 1 ]; then
    warn "chromium is not installed, and MAILROOM_SKIP_CHROMIUM=1: not installing it"
    exit 1
fi
if ! have apt-get || ! can_root; then
    warn "chromium is not installed. To get it: sudo apt-get install -y chromium"
    exit 1
fi

say "installing chromium with apt-get (for the browser tests; about 300 MB, once)"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
if ! as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq </dev/null >"$log" 2>&1 ||
    ! as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium </dev/null >>"$log" 2>&1; then
    tail -n 20 "$log" >&2
    warn "installing chromium failed"
    exit 1
fi
binary="$(find_chromium)" || {
    warn "the chromium package is installed, but there is no chromium binary on PATH"
    exit 1
}
report "$binary"
