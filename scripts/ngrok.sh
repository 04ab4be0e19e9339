#!/usr/bin/env bash
# A public https URL for the running Mailroom, through ngrok (see the README, "A public
# URL with ngrok"): needs ngrok installed with its authtoken configured, and API_TOKEN
# set. Starts `ngrok http` to nginx (port 80) when it answers, else to the app, prints
# the URL and the two curl commands, and runs until Ctrl-C. Arguments go to tunnel.py
# (--to nginx|app, --nginx-port N, --api URL; see --help).
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$MAILROOM_ROOT"

bash scripts/setup-venv.sh
exec .venv/bin/python tunnel.py "$@"
