#!/usr/bin/env bash
# Create .venv (Python 3.11+) and install Mailroom with its dev extras into it.
# The install runs only when pyproject.toml (or the interpreter) changed since the
# last successful one, so running this again is fast. PYTHON=/path/to/python overrides
# the interpreter search.
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$MAILROOM_ROOT"

VENV=.venv
STAMP="$VENV/.mailroom-install-stamp"
VERSION_CHECK='import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'

python_ok() { "$1" -c "$VERSION_CHECK" >/dev/null 2>&1; }

find_python() {
    local candidate
    for candidate in ${PYTHON:-} python3.11 python3 python3.12 python3.13 python3.14; do
        if have "$candidate" && python_ok "$candidate"; then
            command -v "$candidate"
            return 0
        fi
    done
    return 1
}

create_venv() {
    local python=$1 version
    version="$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
    say "creating $VENV with $python (Python $version)"
    if "$python" -m venv "$VENV"; then
        return 0
    fi
    rm -rf "$VENV"
    # Debian/Ubuntu ship venv/ensurepip separately.
    if have apt-get && can_root; then
        apt_install "python$version-venv" || apt_install python3-venv ||
            die "could not install python$version-venv"
        "$python" -m venv "$VENV" && return 0
        rm -rf "$VENV"
    fi
    die "'$python -m venv' failed. On Debian/Ubuntu run: sudo apt-get install python$version-venv"
}

if [ -x "$VENV/bin/python" ] && ! python_ok "$VENV/bin/python"; then
    warn "$VENV is broken or older than Python 3.11; recreating it"
    rm -rf "$VENV"
fi

if [ ! -x "$VENV/bin/python" ]; then
    rm -rf "$VENV"
    if ! python="$(find_python)"; then
        die "Python 3.11 or newer is required and none was found (tried python3.11, python3, python3.12, python3.13).
  Debian 12 / Ubuntu 23.04+: sudo apt-get install python3 python3-venv
  Ubuntu 22.04:              sudo apt-get install python3.11 python3.11-venv
  or point PYTHON at one:    PYTHON=/path/to/python3.11 $0"
    fi
    create_venv "$python"
fi

want="$(
    {
        sha256sum pyproject.toml
        "$VENV/bin/python" -c 'import sys; print(sys.version)'
        echo "extras=dev"
    } | sha256sum | cut -d' ' -f1
)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
    exit 0
fi

say "installing Mailroom and its dependencies into $VENV"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e ".[dev]"
printf '%s\n' "$want" >"$STAMP"
say "$VENV is ready"
