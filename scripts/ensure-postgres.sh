#!/usr/bin/env bash
# Make sure PostgreSQL answers on 127.0.0.1:5432: start the installed cluster(s) when
# stopped, or install PostgreSQL (root/passwordless sudo + apt-get only). Exits 1 when
# it cannot be had; scripts/test.sh then warns and the PostgreSQL tests skip.
# MAILROOM_SKIP_POSTGRES=1 skips all of this. POSTGRES_WAIT bounds the wait (default 30).
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

host=127.0.0.1
port=5432
wait_seconds="${POSTGRES_WAIT:-30}"

if [ "${MAILROOM_SKIP_POSTGRES:-}" = 1 ]; then
    say "MAILROOM_SKIP_POSTGRES=1: not checking PostgreSQL"
    exit 0
fi
if port_open "$host" "$port"; then
    say "PostgreSQL is reachable on $host:$port"
    exit 0
fi

# A cluster (/etc/postgresql/<version>/main) means the server is installed; pg_ctlcluster
# alone only means postgresql-common (it comes with the client too).
has_cluster() { compgen -G '/etc/postgresql/*/main' >/dev/null; }

if ! has_cluster; then
    if have apt-get && can_root; then
        apt_install postgresql || {
            warn "installing postgresql failed"
            exit 1
        }
        if wait_port "$host" "$port" 5; then
            say "PostgreSQL is reachable on $host:$port"
            exit 0
        fi
        has_cluster || {
            warn "postgresql is installed but has no cluster in /etc/postgresql"
            exit 1
        }
    else
        warn "PostgreSQL is not installed. To get it: sudo apt-get install -y postgresql"
        exit 1
    fi
fi

if ! can_root; then
    warn "PostgreSQL is installed but not running, and starting it needs root:
    sudo systemctl start postgresql    # or: sudo pg_ctlcluster <version> main start"
    exit 1
fi

say "starting PostgreSQL"
if systemd_running; then
    as_root systemctl start postgresql || warn "systemctl start postgresql failed"
else
    started=0
    for dir in /etc/postgresql/*/main; do
        version="${dir#/etc/postgresql/}"
        version="${version%/main}"
        if as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start; then
            started=1
        else
            warn "pg_ctlcluster $version main start failed"
        fi
    done
    if [ "$started" -eq 0 ]; then
        warn "no PostgreSQL cluster could be started"
        exit 1
    fi
fi
if wait_port "$host" "$port" "$wait_seconds"; then
    say "PostgreSQL is reachable on $host:$port"
    exit 0
fi
warn "PostgreSQL did not open $host:$port within ${wait_seconds}s"
exit 1
