# Shared helpers for the deploy/ scripts. Sourced, not run: `source "$(dirname "$0")/_common.sh"`.
# shellcheck shell=bash

DEPLOY_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(cd "$DEPLOY_DIR/.." && pwd)"
VENV_BIN="$REPO_DIR/.venv/bin"
RUN_DIR="${SMCSERVE_RUN_DIR:-/tmp/smcserve-deploy}"

# Never phone home from anything these scripts start (ray start gets --disable-usage-stats too).
export RAY_USAGE_STATS_ENABLED=0

# A raylet started by `ray start` runs its workers (our prefill and decode actors) at nice 15, so any
# other busy process on the node (Ray's own GCS, raylet and agents among them) takes their cores first.
# The raylet reads its system config from RAY_<name>; run the workers at the raylet's own priority.
export RAY_worker_niceness="${RAY_WORKER_NICENESS:-0}"

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

# Ray (this venv's version) turns on token authentication for a cluster started with `ray start --head`
# when ~/.ray/auth_token exists (and creates that file when RAY_AUTH_MODE=token), but clients such as
# `ray status` and smcserve's ray.init() send the token only when RAY_AUTH_MODE=token. Make every
# piece agree. Nodes on other machines need the same token: copy ~/.ray/auth_token or set
# RAY_AUTH_TOKEN. RAY_AUTH_MODE=disabled turns it off everywhere (then anyone who can reach the
# GCS port can run code on the cluster).
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"

# Ray writes ~/.ray/auth_token with the umask's mode (often 0644: any local user could read it and
# run code on the cluster). Keep it to its owner.
restrict_ray_token() {
    local f="${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"
    if [[ -f "$f" ]]; then chmod 600 "$f"; fi
}

# Ray replaces 127.0.0.1/localhost/::1, given as a node IP or as a cluster address, with this host's
# routable IP (what a UDP socket "connected" to a public address would use), so a "127.0.0.1"
# cluster actually runs on that address. Any other 127.x.y.z address is kept as it is.
warn_if_ray_rewrites() {
    case "$1" in
        127.0.0.1|localhost|::1)
            log "note: Ray replaces $1 with this host's routable IP; for a loopback-only cluster use e.g. 127.0.0.2" ;;
    esac
}

# in_new_session SIDFILE CMD...: run CMD (waiting for it) as leader of a new session and write the
# session id to SIDFILE. Every process `ray start` leaves behind (GCS, raylet, agents, and the
# raylet's workers, which get process groups of their own) stays in that session, so
# local-cluster.sh down can stop exactly those processes.
in_new_session() {
    local file="$1"
    shift
    mkdir -p "$(dirname "$file")"
    setsid --wait bash -c 'echo $$ >"$0"; exec "$@"' "$file" "$@"
}
