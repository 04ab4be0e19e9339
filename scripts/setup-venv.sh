#!/usr/bin/env bash
# Create .venv (Python 3.11+) and install Mailroom into it: what running needs, or with
# --dev also the development extras (pytest, ruff, mypy, schemathesis, ...) the tests use.
# Each part is installed only when pyproject.toml (or the interpreter) changed since it
# was last installed, and each is remembered on its own: after scripts/run.sh (runtime),
# scripts/test.sh (--dev) installs only the extras; after scripts/test.sh, scripts/run.sh
# installs nothing. PYTHON=/path/to/python overrides the interpreter search.
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$MAILROOM_ROOT"

dev=0
case "${1:-}" in
--dev) dev=1 ;;
"") ;;
*) die "usage: $0 [--dev]" ;;
esac

VENV=.venv
RUNTIME_STAMP="$VENV/.mailroom-runtime-stamp" # Mailroom and what running needs
DEV_STAMP="$VENV/.mailroom-dev-stamp"         # the dev extras too
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
    rm -rf "$VENV" # its stamps go with it
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

# What an install stamp holds: pyproject.toml and the interpreter it was made for.
want="$(
    {
        sha256sum pyproject.toml
        "$VENV/bin/python" -c 'import sys; print(sys.version)'
    } | sha256sum | cut -d' ' -f1
)"
installed() { [ -f "$1" ] && [ "$(cat "$1")" = "$want" ]; }

have_runtime=0
installed "$RUNTIME_STAMP" && have_runtime=1
if [ "$have_runtime" = 1 ] && { [ "$dev" = 0 ] || installed "$DEV_STAMP"; }; then
    exit 0 # all there already
fi

export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
pip() { "$VENV/bin/python" -m pip "$@"; }

if [ "$have_runtime" = 0 ]; then
    if [ "$dev" = 1 ]; then
        what="Mailroom, its dependencies and the development tools (pytest, ruff, mypy, schemathesis, ...)"
    else
        what="Mailroom and the packages it needs to run"
    fi
    say "installing $what into $VENV; the first time this takes a minute or two (pip's progress follows)"
    say "updating pip"
    pip install --upgrade pip
    if [ "$dev" = 1 ]; then
        pip install -e ".[dev]"
        printf '%s\n' "$want" >"$DEV_STAMP"
    else
        pip install -e .
    fi
    printf '%s\n' "$want" >"$RUNTIME_STAMP"
else
    # Mailroom is installed already (scripts/run.sh did it): add the dev extras alone.
    say "installing the development tools (pytest, ruff, mypy, schemathesis, ...) into $VENV; the first time this takes a minute or two (pip's progress follows)"
    mapfile -t extras < <(
        "$VENV/bin/python" -c 'import tomllib
with open("pyproject.toml", "rb") as f:
    print("\n".join(tomllib.load(f)["project"]["optional-dependencies"]["dev"]))'
    )
    pip install "${extras[@]}"
    printf '%s\n' "$want" >"$DEV_STAMP"
fi
say "$VENV is ready"
