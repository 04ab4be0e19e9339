#!/usr/bin/env bash
# Make sure the nginx binary is installed. The tests (tests/test_nginx.py) run it as an
# ordinary process on a free loopback port with nginx/mailroom.conf; they need no nginx
# service, so none is started. When nginx is missing and we are root (or have passwordless
# sudo) with apt-get, install nginx-light (or nginx where there is no nginx-light) while
# a policy-rc.d keeps the package from starting its service on port 80.
# Prints the path of the nginx binary on stdout (everything else goes to stderr), or
# exits 1 when nginx cannot be had; scripts/test.sh then warns and the nginx tests skip.
# MAILROOM_SKIP_NGINX=1: use an installed nginx, but never install one.
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# /usr/sbin is not on every user's PATH; the tests look there too.
find_nginx() {
    command -v nginx 2>/dev/null || {
        [ -x /usr/sbin/nginx ] && echo /usr/sbin/nginx
    }
}

if binary="$(find_nginx)"; then
    say "nginx is installed: $binary ($("$binary" -v 2>&1))"
    echo "$binary"
    exit 0
fi
if [ "${MAILROOM_SKIP_NGINX:-}" = 1 ]; then
    warn "nginx is not installed, and MAILROOM_SKIP_NGINX=1: not installing it"
    exit 1
fi

if ! have apt-get || ! can_root; then
    warn "nginx is not installed. To get it: sudo apt-get install -y nginx-light"
    exit 1
fi

# The master pid of a system nginx, if one runs (the Debian package's pid file).
system_nginx_pid() {
    local pid
    pid="$(cat /run/nginx.pid 2>/dev/null)" || return 1
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}
running_before="$(system_nginx_pid || true)"

# No service start while the package installs (see lib.sh).
deny_service_starts || die "could not write /usr/sbin/policy-rc.d"

say "installing nginx with apt-get (the binary only; its service is not started)"
as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q </dev/null >&2 || {
    warn "apt-get update failed"
    exit 1
}
# Bookworm's nginx-light is nginx plus one small module; elsewhere it may be missing.
# (No pipe into grep -q here: with pipefail, apt-cache's SIGPIPE would read as "no".)
package=nginx
candidate="$(apt-cache policy nginx-light 2>/dev/null || true)"
if [[ "$candidate" =~ Candidate:[[:space:]]*[0-9] ]]; then
    package=nginx-light
fi
as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$package" </dev/null >&2 || {
    warn "installing $package failed"
    exit 1
}

# Should the package have started a system nginx anyway (a policy-rc.d that allows it),
# stop it: we installed it for its binary, and it would hold port 80.
pid="$(system_nginx_pid || true)"
if [ -n "$pid" ] && [ "$pid" != "$running_before" ]; then
    say "stopping the system nginx the package started (pid $pid)"
    if systemd_running; then
        as_root systemctl stop nginx || warn "systemctl stop nginx failed"
    else
        as_root kill -QUIT "$pid" || warn "could not stop nginx (pid $pid)"
    fi
fi
if systemd_running && [ -z "$running_before" ]; then
    # Nor should it start at the next boot; 'systemctl enable --now nginx' undoes this.
    as_root systemctl disable nginx >/dev/null 2>&1 || true
fi

binary="$(find_nginx)" || {
    warn "$package is installed, but there is no nginx binary on PATH or in /usr/sbin"
    exit 1
}
say "nginx is installed: $binary ($("$binary" -v 2>&1))"
echo "$binary"
