#!/usr/bin/env bash
# Make sure Postfix and Dovecot (with IMAP) are installed, for tests/test_mailserver.py.
# The tests run both as ordinary processes from configuration directories of their own,
# on free loopback ports; they need no mail service, so none is started or configured.
# When a package is missing and we are root (or have passwordless sudo) with apt-get,
# install postfix (as "No configuration"), dovecot-core and dovecot-imapd quietly while a
# policy-rc.d keeps them from starting their services.
# Exits 0 when all three are there, else 1; scripts/test.sh then warns and the tests skip.
# MAILROOM_SKIP_MAILSERVER=1: use installed packages, but never install them.
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

packages=(postfix dovecot-core dovecot-imapd)
# One file each package brings: the postfix command, the dovecot master, the IMAP server.
installed() {
    [ -x /usr/sbin/postfix ] && [ -x /usr/sbin/dovecot ] && [ -x /usr/lib/dovecot/imap ]
}

if installed; then
    say "Postfix and Dovecot are installed ($(/usr/sbin/postconf -d -h mail_version 2>/dev/null || echo '?'), dovecot $(/usr/sbin/dovecot --version 2>/dev/null || echo '?'))"
    exit 0
fi
if [ "${MAILROOM_SKIP_MAILSERVER:-}" = 1 ]; then
    warn "Postfix/Dovecot are not installed, and MAILROOM_SKIP_MAILSERVER=1: not installing them"
    exit 1
fi
if ! have apt-get || ! can_root; then
    warn "Postfix/Dovecot are not installed. To get them: sudo apt-get install -y ${packages[*]}"
    exit 1
fi

deny_service_starts || die "could not write /usr/sbin/policy-rc.d"
# The tests bring their own main.cf: the package should not write /etc/postfix/main.cf.
echo "postfix postfix/main_mailer_type select No configuration" |
    as_root debconf-set-selections 2>/dev/null || true

say "installing ${packages[*]} with apt-get (their services are not started)"
log="$(mktemp)"
if ! as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q </dev/null >"$log" 2>&1 ||
    ! as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        "${packages[@]}" </dev/null >>"$log" 2>&1; then
    tail -n 20 "$log" >&2
    rm -f "$log"
    warn "installing ${packages[*]} failed"
    exit 1
fi
rm -f "$log"
if systemd_running; then
    # Nor should they start at the next boot ('systemctl enable --now ...' undoes this).
    as_root systemctl disable postfix dovecot >/dev/null 2>&1 || true
fi
installed || {
    warn "${packages[*]} are installed, but /usr/sbin/postfix, /usr/sbin/dovecot or /usr/lib/dovecot/imap is missing"
    exit 1
}
say "Postfix and Dovecot are installed"
