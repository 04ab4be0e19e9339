#!/usr/bin/env bash
# Make sure RabbitMQ answers on the host/port of AMQP_URL (environment, else .env,
# else amqp://guest:guest@localhost:5672/; of a comma-separated list, the first). Only a local broker (localhost, 127.0.0.1,
# ::1) is started or installed; a remote one is only checked. Safe to run repeatedly.
# RABBITMQ_WAIT (seconds, default 60) bounds the wait after starting it.
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

url="$(env_setting AMQP_URL amqp://guest:guest@localhost:5672/)"
url="${url%%,*}" # a list of brokers (a cluster): the first one is checked
wait_seconds="${RABBITMQ_WAIT:-60}"

scheme="${url%%://*}"
rest="${url#*://}"
rest="${rest%%/*}"
rest="${rest%%\?*}"
hostport="${rest##*@}" # drop user:password@
if [[ "$hostport" == \[* ]]; then # [::1]:5672
    host="${hostport%%]*}"
    host="${host#[}"
    port="${hostport#*]}"
    port="${port#:}"
else
    host="${hostport%%:*}"
    port=""
    [[ "$hostport" == *:* ]] && port="${hostport##*:}"
fi
host="${host:-localhost}"
if [ -z "$port" ]; then
    if [ "$scheme" = amqps ]; then port=5671; else port=5672; fi
fi

if port_open "$host" "$port"; then
    say "RabbitMQ is reachable on $host:$port"
    exit 0
fi

if ! is_local_host "$host"; then
    warn "RabbitMQ at $host:$port is not reachable. It is not local, so this script leaves it alone;
  Mailroom keeps retrying the connection until it comes up."
    exit 0
fi

start_rabbitmq() {
    say "starting RabbitMQ"
    if systemd_running; then
        as_root systemctl start rabbitmq-server
    else
        as_root rabbitmq-server -detached
    fi
}

if ! have rabbitmq-server; then
    if have apt-get && can_root; then
        apt_install rabbitmq-server || die "installing rabbitmq-server failed"
        # The package may already have started it.
        if wait_port "$host" "$port" 5; then
            say "RabbitMQ is reachable on $host:$port"
            exit 0
        fi
    else
        cat >&2 <<MSG
error: RabbitMQ is not running on $host:$port and is not installed.
Install and start it, then run this again:

    sudo apt-get update && sudo apt-get install -y rabbitmq-server
    sudo systemctl start rabbitmq-server    # or, without systemd: sudo rabbitmq-server -detached

(or point AMQP_URL in .env at a RabbitMQ you have).
MSG
        exit 1
    fi
fi

if ! can_root; then
    cat >&2 <<MSG
error: RabbitMQ is installed but not running on $host:$port, and starting it needs root.
Start it, then run this again:

    sudo systemctl start rabbitmq-server    # or, without systemd: sudo rabbitmq-server -detached
MSG
    exit 1
fi

# A node that runs but does not listen where AMQP_URL points: starting another won't help.
if have rabbitmq-diagnostics && as_root timeout 20 rabbitmq-diagnostics -q ping >/dev/null 2>&1; then
    die "a RabbitMQ node is running, but nothing answers on $host:$port.
  Check AMQP_URL (in the environment or .env) against the node's listeners:
    sudo rabbitmq-diagnostics listeners"
fi

# A failed start command is not fatal by itself (the node may already be booting):
# what counts is whether the port opens in time.
start_rabbitmq || warn "the start command failed; waiting for the port anyway"
say "waiting up to ${wait_seconds}s for RabbitMQ on $host:$port"
if wait_port "$host" "$port" "$wait_seconds"; then
    say "RabbitMQ is reachable on $host:$port"
    exit 0
fi
die "RabbitMQ did not open $host:$port within ${wait_seconds}s.
  Look at /var/log/rabbitmq/ (or: sudo journalctl -u rabbitmq-server) for the reason."
