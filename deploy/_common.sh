# Shared helpers for the deploy/ scripts. Sourced, not run: `source "$(dirname "$0")/_common.sh"`.
# shellcheck shell=bash

DEPLOY_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(cd "$DEPLOY_DIR/.." && pwd)"
VENV_BIN="$REPO_DIR/.venv/bin"
RUN_DIR="${SMCSERVE_RUN_DIR:-/tmp/smcserve-deploy}"

# Never phone home from anything these scripts start (ray start gets --disable-usage-stats too).
export RAY_USAGE_STATS_ENABLED=0

die() { echo "$(basename "$0"): $*" >&2; exit 1; }
log() { echo "[$(basename "$0")] $*" >&2; }

# venv_bin NAME: the repo venv's NAME if there is one, else NAME from PATH.
venv_bin() {
    if [[ -x "$VENV_BIN/$1" ]]; then
        echo "$VENV_BIN/$1"
    elif command -v "$1" >/dev/null 2>&1; then
        command -v "$1"
    else
        die "cannot find '$1' in $VENV_BIN or on PATH"
    fi
}

# Print the usage comment at the top of the calling script (the leading '#' lines after the shebang).
usage() {
    sed -n '2,/^[^#]/{/^#/!q;s/^# \{0,1\}//;p}' "$0"
}

# nproc, with fallbacks.
num_cpus() {
    nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1
}

# is_loopback ADDR: 127.0.0.0/8, ::1, localhost.
is_loopback() {
    case "$1" in
        127.*|::1|-::1|localhost) return 0 ;;
        *) return 1 ;;
    esac
}
