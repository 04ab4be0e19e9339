#!/usr/bin/env bash
# THE run command: set up .venv, make sure RabbitMQ runs, then start worker + server
# (+ the local capture SMTP server when SMTP_HOST is not set) under launcher.py.
# Ctrl-C stops everything. Extra arguments go to launcher.py (see --help).
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$MAILROOM_ROOT"

bash scripts/setup-venv.sh
bash scripts/ensure-rabbitmq.sh
exec .venv/bin/python launcher.py "$@"
