# shellcheck shell=bash
# Helpers shared by the scripts in this directory. Source it; do not run it.

MAILROOM_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

say() { printf '==> %s\n' "$*" >&2; }
warn() { printf 'warning: %s\n' "$*" >&2; }
die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

have() { command -v "$1" >/dev/null 2>&1; }

is_root() { [ "$(id -u)" -eq 0 ]; }

# True when we are root or passwordless sudo works (never prompts for a password).
can_root() { is_root || { have sudo && sudo -n true 2>/dev/null; }; }

# as_root CMD ARGS...: run CMD as root (directly or via passwordless sudo).
as_root() {
    if is_root; then
        "$@"
    elif have sudo && sudo -n true 2>/dev/null; then
        sudo -n "$@"
    else
        return 126
    fi
}

# True when systemd is the running init (false in most containers).
systemd_running() { [ -d /run/systemd/system ] && have systemctl; }

# apt_install PACKAGE...: non-interactive install as root; never reads stdin.
apt_install() {
    have apt-get || return 1
    say "installing $* with apt-get"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q </dev/null || return 1
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" </dev/null
}

# deny_service_starts: until the calling script exits, packages being installed may not
# start their services (invoke-rc.d and deb-systemd-invoke honour /usr/sbin/policy-rc.d;
# exit status 101 means "not allowed"). An existing policy-rc.d (Docker images ship one)
# is left as it is. Sets the script's EXIT trap.
deny_service_starts() {
    local policy=/usr/sbin/policy-rc.d
    [ -e "$policy" ] && return 0
    as_root sh -c "printf '#!/bin/sh\n# mailroom scripts: installing packages without starting services\nexit 101\n' >$policy && chmod 755 $policy" ||
        return 1
    # shellcheck disable=SC2064 # expand now: the path is fixed
    trap "as_root rm -f '$policy'" EXIT
}

# port_open HOST PORT: can we open a TCP connection (2 s limit)?
port_open() {
    # shellcheck disable=SC2016 # $0 and $1 expand in the inner shell
    timeout 2 bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$1" "$2" 2>/dev/null
}

# wait_port HOST PORT SECONDS: poll until the port accepts connections.
wait_port() {
    local host=$1 port=$2 seconds=$3 waited=0
    while [ "$waited" -lt "$seconds" ]; do
        port_open "$host" "$port" && return 0
        sleep 1
        waited=$((waited + 1))
    done
    port_open "$host" "$port"
}

is_local_host() {
    case "$1" in
    localhost | 127.0.0.1 | ::1) return 0 ;;
    *) return 1 ;;
    esac
}

# env_setting NAME DEFAULT: the value from the environment, else from .env, else DEFAULT.
# (Like config.py: the process environment wins over .env.)
env_setting() {
    local name=$1 default=$2 value=""
    value="${!name-}"
    if [ -z "$value" ] && [ -f "$MAILROOM_ROOT/.env" ]; then
        value="$(sed -n -E "s/^[[:space:]]*(export[[:space:]]+)?${name}[[:space:]]*=[[:space:]]*//p" \
            "$MAILROOM_ROOT/.env" | tail -n 1 | sed -E 's/[[:space:]]+$//')"
        # Strip one pair of surrounding quotes, or a trailing " # comment".
        case "$value" in
        \"*\") value="${value:1:${#value}-2}" ;;
        \'*\') value="${value:1:${#value}-2}" ;;
        *) value="$(printf '%s' "$value" | sed -E 's/[[:space:]]+#.*$//')" ;;
        esac
    fi
    printf '%s\n' "${value:-$default}"
}
