#!/usr/bin/env bash
# Usage: deploy/ray-head.sh [--help] [EXTRA 'ray start' ARGS...]
#
# Starts the Ray head node (GCS + raylet) on this machine and prints the address that
# workers (deploy/ray-worker.sh) and deploy/serve.sh (RAY_ADDRESS) need, HOST:PORT, on stdout;
# `ray start`'s own output goes to stderr. The node's session id is recorded under
# $SMCSERVE_RUN_DIR so deploy/local-cluster.sh down can stop it (or: `ray stop`, which stops
# every Ray node of this user on the machine).
#
# Environment:
#   RAY_PORT                 GCS port (default 6380: Ray's default, 6379, is Redis's)
#   RAY_NODE_IP              this node's address (default 127.0.0.1, a single-machine cluster).
#                            For several machines set it to an IP the other machines can reach.
#                            Ray itself swaps 127.0.0.1 for this host's routable IP; another
#                            127.x address (e.g. 127.0.0.2) keeps a one-machine cluster on loopback.
#   RAY_NUM_CPUS             CPUs Ray may schedule here (default: nproc). smcserve workers take 1 each.
#   RAY_OBJECT_STORE_MEMORY  object store size in bytes (default: Ray's, 30% of RAM)
#   RAY_TEMP_DIR             Ray's temp/session/log root; worker nodes use the head's unless they
#                            set their own (default $SMCSERVE_RUN_DIR/ray, not Ray's /tmp/ray: a
#                            `ray start` there records the cluster in /tmp/ray/ray_current_cluster,
#                            and every later plain ray.init() on this machine, such as a plain
#                            `smcserve serve` without --ray-address, would try to join it)
#   RAY_AUTH_MODE            token (default here) or disabled; see ~/.ray/auth_token (made 0600 here)
#   RAY_DASHBOARD            1: start Ray's dashboard and job API (default 0: neither runs)
#   RAY_DASHBOARD_HOST       the address they listen on (default 127.0.0.1: reach them through an SSH
#                            tunnel); RAY_DASHBOARD_PORT (default 8265)
#   RAY_WORKER_NICENESS      the nice value of the node's Ray workers (default 0; Ray's own default,
#                            15, lets any busy process on the node starve the model's workers)
#   SMCSERVE_RUN_DIR         where the session-id file goes (default /tmp/smcserve-deploy)
set -euo pipefail
source "$(dirname "$0")/_common.sh"

case "${1:-}" in -h|--help|help) usage; exit 0 ;; esac

PORT="${RAY_PORT:-6380}"
NODE_IP="${RAY_NODE_IP:-127.0.0.1}"
RAY="$(venv_bin ray)"
warn_if_ray_rewrites "$NODE_IP"

args=(start --head --port "$PORT" --node-ip-address "$NODE_IP" --num-cpus "${RAY_NUM_CPUS:-$(num_cpus)}"
      --disable-usage-stats)
if [[ "${RAY_DASHBOARD:-0}" == 1 ]]; then  # the address given explicitly, not left to Ray's default
    args+=(--include-dashboard=true --dashboard-host "${RAY_DASHBOARD_HOST:-127.0.0.1}"
           --dashboard-port "${RAY_DASHBOARD_PORT:-8265}")
else
    args+=(--include-dashboard=false)
fi
[[ -n "${RAY_OBJECT_STORE_MEMORY:-}" ]] && args+=(--object-store-memory "$RAY_OBJECT_STORE_MEMORY")
args+=(--temp-dir "${RAY_TEMP_DIR:-$RUN_DIR/ray}")

in_new_session "$RUN_DIR/ray-head-$PORT.sid" "$RAY" "${args[@]}" "$@" >&2
restrict_ray_token
log "Ray head at $NODE_IP:$PORT (logs: ${RAY_TEMP_DIR:-$RUN_DIR/ray}/session_latest/logs)."
log "Add nodes: deploy/ray-worker.sh $NODE_IP:$PORT; serve: RAY_ADDRESS=$NODE_IP:$PORT deploy/serve.sh"
if [[ "${RAY_AUTH_MODE,,}" == token ]]; then
    log "Token authentication is on: nodes on other machines need this machine's ~/.ray/auth_token (or RAY_AUTH_TOKEN)"
fi
if [[ "${RAY_DASHBOARD:-0}" == 1 ]]; then
    log "Dashboard and job API at http://${RAY_DASHBOARD_HOST:-127.0.0.1}:${RAY_DASHBOARD_PORT:-8265} (token-protected when auth is on)"
fi
echo "$NODE_IP:$PORT"
