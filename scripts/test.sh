#!/usr/bin/env bash
# THE test command: set up .venv (with dev extras), make sure RabbitMQ (and, when they
# can be had, PostgreSQL, the nginx and chromium binaries, Postfix and Dovecot) is there,
# then run ruff check, ruff format --check, mypy and pytest.
# Every step runs; the exit status is non-zero if any failed. Extra arguments go to
# pytest, e.g. scripts/test.sh -k talktome -x
set -uo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$MAILROOM_ROOT" || exit 1

bash scripts/setup-venv.sh --dev </dev/null || die "could not set up .venv"
bash scripts/ensure-rabbitmq.sh </dev/null || die "the tests need RabbitMQ (see above)"
bash scripts/ensure-postgres.sh </dev/null ||
    warn "PostgreSQL is not available on 127.0.0.1:5432; tests that need it will skip"
# tests/test_nginx.py runs the real nginx in front of the app; MAILROOM_NGINX tells it
# where the binary is (and that a missing one is a failure, not a skip).
if nginx_bin="$(bash scripts/ensure-nginx.sh </dev/null)" && [ -n "$nginx_bin" ]; then
    export MAILROOM_NGINX="$nginx_bin"
else
    warn "nginx is not available; the tests in tests/test_nginx.py will skip"
fi
# tests/test_mailserver.py runs a real Postfix and Dovecot; MAILROOM_MAILSERVER=1 tells it
# they are installed (and that a missing one is a failure, not a skip).
if bash scripts/ensure-mailserver.sh </dev/null; then
    export MAILROOM_MAILSERVER=1
else
    warn "Postfix/Dovecot are not available; the tests in tests/test_mailserver.py will skip"
fi
# tests/test_browser.py drives Debian's chromium headless (Playwright, from the dev extras,
# downloads no browser); MAILROOM_CHROMIUM says where it is (and that a missing one is a
# failure, not a skip; under CI=true it is a failure anyway).
if chromium_bin="$(bash scripts/ensure-chromium.sh </dev/null)" && [ -n "$chromium_bin" ]; then
    export MAILROOM_CHROMIUM="$chromium_bin"
else
    warn "chromium is not available; the tests in tests/test_browser.py will skip"
fi

export PATH="$MAILROOM_ROOT/.venv/bin:$PATH"
failed=()

step() {
    local name=$1
    shift
    say "$name"
    "$@"
    local status=$?
    if [ "$status" -ne 0 ]; then
        failed+=("$name (exit $status)")
    fi
    return 0
}

step "ruff check" ruff check .
step "ruff format --check" ruff format --check .
step "mypy" mypy

# The broker-restart test restarts the local RabbitMQ (stop_app/start_app): CI runs it;
# elsewhere only when asked, since it disturbs every other client of that broker.
extra=()
if [ "${CI:-}" = true ] || [ "${MAILROOM_BROKER_RESTART:-}" = 1 ]; then
    extra+=(--broker-restart)
fi

say "pytest ${extra[*]} $*"
pytest "${extra[@]}" "$@"
status=$?
if [ "$status" -eq 5 ]; then
    warn "pytest collected no tests"
elif [ "$status" -ne 0 ]; then
    failed+=("pytest (exit $status)")
fi

if [ "${#failed[@]}" -ne 0 ]; then
    printf 'FAILED: %s\n' "${failed[@]}" >&2
    exit 1
fi
say "all checks passed"
