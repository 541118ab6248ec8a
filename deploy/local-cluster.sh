#!/usr/bin/env bash
# Usage: deploy/local-cluster.sh up|down|status [--help]
#
# The whole deployment on one machine, for trying it out: a standalone Redis (redis.sh),
# a Ray head (ray-head.sh) and EXTRA_NODES more Ray nodes on the same host (ray-worker.sh).
# Then run deploy/serve.sh (with the same RAY_NODE_IP, if you changed it: RAY_ADDRESS defaults
# to 127.0.0.1:6380).
#
#   up      start Redis, the head, the extra nodes; print what to run next
#   down    stop the Ray nodes started by ray-head.sh / ray-worker.sh on this machine (every process
#           of their sessions, recorded in $SMCSERVE_RUN_DIR, in `ray stop`'s order: SIGTERM, then
#           SIGKILL for what is left after 15 s), then Redis.
#           Other Ray clusters on the machine are left alone; `ray stop --force` would stop
#           every Ray process of this user instead. Stop deploy/serve.sh first.
#   status  Redis status and `ray status`
#
# Environment (besides those of redis.sh, ray-head.sh, ray-worker.sh):
#   EXTRA_NODES              Ray nodes besides the head (default 1)
#   RAY_NODE_IP              default 127.0.0.1, which Ray swaps for this host's routable IP;
#                            RAY_NODE_IP=127.0.0.2 (with RAY_ADDRESS=127.0.0.2:6380 for serve.sh)
#                            keeps everything on loopback
#   RAY_NUM_CPUS             CPUs per node (default nproc: each node claims every core, so Ray
#                            sees (EXTRA_NODES+1)*nproc CPUs; torch threads still share them)
#   RAY_OBJECT_STORE_MEMORY  per node, bytes (default here 1 GiB; smcserve's KV goes through Redis)
#   RAY_TEMP_DIR             default $SMCSERVE_RUN_DIR/ray (as ray-head.sh), apart from /tmp/ray
#
# Nodes on the head's host each get their own dashboard-agent port (52365+i), worker-port range
# (head 10002-10999, node i 10002+1000i to 10999+1000i) and no second log monitor; Ray picks
# the node-manager, object-manager, agent and metrics ports at random.
set -euo pipefail
source "$(dirname "$0")/_common.sh"

export RAY_TEMP_DIR="${RAY_TEMP_DIR:-$RUN_DIR/ray}"
export RAY_OBJECT_STORE_MEMORY="${RAY_OBJECT_STORE_MEMORY:-$((1024 * 1024 * 1024))}"
NODE_IP="${RAY_NODE_IP:-127.0.0.1}"
PORT="${RAY_PORT:-6380}"
EXTRA="${EXTRA_NODES:-1}"
[[ "$EXTRA" =~ ^[0-9]+$ ]] || die "EXTRA_NODES must be a number"

up() {
    local redis_url head i
    redis_url="$("$DEPLOY_DIR/redis.sh" start)"
    head="$("$DEPLOY_DIR/ray-head.sh" --min-worker-port 10002 --max-worker-port 10999)"
    for ((i = 1; i <= EXTRA; i++)); do
        "$DEPLOY_DIR/ray-worker.sh" "$head" \
            --dashboard-agent-listen-port $((52365 + i)) \
            --min-worker-port $((10002 + 1000 * i)) --max-worker-port $((10999 + 1000 * i)) \
            --include-log-monitor false
    done
    cat <<EOF
Local cluster up: Redis $redis_url, Ray head $head + $EXTRA more node(s).
  status:  $0 status
  serve:   RAY_ADDRESS=$head REDIS_URL=$redis_url $DEPLOY_DIR/serve.sh --port 50051
  stop:    $0 down
EOF
}

# session_pids SID [raylet|gcs_server|other]: live (non-zombie) processes of session SID, all or
# only those of one kind.
session_pids() {
    ps -eo sid=,pid=,stat=,comm= | awk -v s="$1" -v k="${2:-}" '
        $1 == s && $3 !~ /^Z/ && (k == "" || (k == "other" ? ($4 != "raylet" && $4 != "gcs_server") : $4 == k)) {
            print $2
        }'
}

# terminate SID KIND SECONDS: SIGTERM those processes, wait up to SECONDS for them to exit.
terminate() {
    local pids i
    pids="$(session_pids "$1" "$2")"
    [[ -n "$pids" ]] || return 0
    # shellcheck disable=SC2086
    kill -s TERM $pids 2>/dev/null || true
    for ((i = 0; i < $3 * 10; i++)); do
        [[ -n "$(session_pids "$1" "$2")" ]] || return 0
        sleep 0.1
    done
}

# stop_session SID: the order of `ray stop` (raylet, then the agents, workers and the rest, then the
# GCS), 5 s each, then SIGKILL for whatever is left.
stop_session() {
    local sid="$1" pids cmds
    [[ -n "$(session_pids "$sid")" ]] || return 0
    # A recycled session id would not be Ray's: check before signalling anything.
    cmds="$(ps -eo sid=,args= | awk -v s="$sid" '$1 == s')"
    if ! grep -q -e ray -e raylet -e gcs_server <<<"$cmds"; then
        log "session $sid no longer runs Ray; leaving it alone"
        return 0
    fi
    terminate "$sid" raylet 5
    terminate "$sid" other 5
    terminate "$sid" gcs_server 5
    pids="$(session_pids "$sid")"
    [[ -n "$pids" ]] || return 0
    log "still running: $(ps -o comm= -p "${pids//$'\n'/,}" | tr '\n' ' '); SIGKILL"
    # shellcheck disable=SC2086
    kill -s KILL $pids 2>/dev/null || true
}

down() {
    local f sid found=0
    # Worker nodes first, then the head(s), like `ray stop`.
    for f in "$RUN_DIR"/ray-worker.*.sid "$RUN_DIR"/ray-head-*.sid; do
        [[ -f "$f" ]] || continue
        found=1
        sid="$(cat "$f")"
        if [[ "$sid" =~ ^[0-9]+$ ]]; then
            log "stopping Ray node $(basename "$f" .sid) (session $sid)"
            stop_session "$sid"
        fi
        rm -f "$f"
    done
    ((found)) || log "no Ray nodes recorded in $RUN_DIR"
    rm -f "$RAY_TEMP_DIR/ray_current_cluster"  # as `ray stop` does: no stale address for ray.init()
    "$DEPLOY_DIR/redis.sh" stop
}

status() {
    local rc=0 out
    out="$("$DEPLOY_DIR/redis.sh" status)" || rc=1
    echo "redis: $out"
    "$(venv_bin ray)" status --address "$NODE_IP:$PORT" || rc=1
    return "$rc"
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    -h|--help|help) usage ;;
    *) usage >&2; exit 2 ;;
esac
