#!/usr/bin/env bash
# Usage: deploy/ray-head.sh [--help] [EXTRA 'ray start' ARGS...]
#
# Starts the Ray head node (GCS + raylet) on this machine and prints the address that
# workers (deploy/ray-worker.sh) and deploy/serve.sh (RAY_ADDRESS) need, HOST:PORT, on stdout;
# `ray start`'s own output goes to stderr. Stop with `ray stop` (deploy/local-cluster.sh down).
#
# Environment:
#   RAY_PORT                 GCS port (default 6380: Ray's default, 6379, is Redis's)
#   RAY_NODE_IP              this node's address (default 127.0.0.1, a single-machine cluster).
#                            For several machines set it to an IP the other machines can reach.
#   RAY_NUM_CPUS             CPUs Ray may schedule here (default: nproc). smcserve workers take 1 each.
#   RAY_OBJECT_STORE_MEMORY  object store size in bytes (default: Ray's, 30% of RAM)
#   RAY_TEMP_DIR             Ray's temp/session/log root (default: Ray's, /tmp/ray)
set -euo pipefail
source "$(dirname "$0")/_common.sh"

case "${1:-}" in -h|--help|help) usage; exit 0 ;; esac

PORT="${RAY_PORT:-6380}"
NODE_IP="${RAY_NODE_IP:-127.0.0.1}"
RAY="$(venv_bin ray)"

args=(start --head --port "$PORT" --node-ip-address "$NODE_IP" --num-cpus "${RAY_NUM_CPUS:-$(num_cpus)}"
      --disable-usage-stats --include-dashboard=false)
[[ -n "${RAY_OBJECT_STORE_MEMORY:-}" ]] && args+=(--object-store-memory "$RAY_OBJECT_STORE_MEMORY")
[[ -n "${RAY_TEMP_DIR:-}" ]] && args+=(--temp-dir "$RAY_TEMP_DIR")

"$RAY" "${args[@]}" "$@" >&2
log "Ray head at $NODE_IP:$PORT. Add nodes: deploy/ray-worker.sh $NODE_IP:$PORT; serve: RAY_ADDRESS=$NODE_IP:$PORT deploy/serve.sh"
echo "$NODE_IP:$PORT"
