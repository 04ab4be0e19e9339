#!/usr/bin/env bash
# THE run command: set up .venv (what running needs, not the dev tools), make sure
# RabbitMQ runs, then start worker + server (+ the local capture SMTP server when
# SMTP_HOST is not set) under launcher.py. Ctrl-C stops everything. Extra arguments go
# to launcher.py (see --help).
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$MAILROOM_ROOT"

say "step 1 of 3: Python packages in .venv (the first run installs them: a minute or two)"
bash scripts/setup-venv.sh
say "step 2 of 3: RabbitMQ (started, or installed with apt-get, when it is not running)"
bash scripts/ensure-rabbitmq.sh
say "step 3 of 3: starting Mailroom (worker, server, and a local capture SMTP server when SMTP_HOST is unset)"
exec .venv/bin/python launcher.py "$@"
