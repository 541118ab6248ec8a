#!/usr/bin/env bash
# Usage: deploy/ray-worker.sh [--help] HEAD_ADDRESS [EXTRA 'ray start' ARGS...]
#
# Joins this machine to the Ray cluster whose head (deploy/ray-head.sh) is at HEAD_ADDRESS
# (HOST:PORT, as ray-head.sh printed it; default $RAY_ADDRESS). smcserve's prefill and decode
# actors are scheduled on any node with a free CPU, so every node needs this repo and its venv
# at the same path, the model in its cache (~/.cache/smcserve or $SMCSERVE_CACHE), and a route
# to Redis.
#
# Environment:
#   RAY_NODE_IP              this node's address (default 127.0.0.1). On a real multi-machine
#                            cluster set it to this machine's IP, reachable from the head and
#                            from the machine running deploy/serve.sh: decode workers listen for
#                            gRPC on it (smcserve's --worker-host defaults to the Ray node IP).
#   RAY_NUM_CPUS             CPUs Ray may schedule here (default: nproc)
#   RAY_OBJECT_STORE_MEMORY  object store size in bytes (default: Ray's)
#   RAY_TEMP_DIR             Ray's temp root here (default: the head's)
#   RAY_AUTH_MODE            token (default here) or disabled. With token, this machine needs the
#                            head's ~/.ray/auth_token (copy it, or set RAY_AUTH_TOKEN; made 0600 here).
#   RAY_WORKER_NICENESS      the nice value of the node's Ray workers (default 0, as ray-head.sh)
#   SMCSERVE_RUN_DIR         where the session-id file goes (default /tmp/smcserve-deploy)
#
# A second node on the head's own machine needs its own dashboard-agent port and worker-port
# range, and no second log monitor; deploy/local-cluster.sh passes those as EXTRA ARGS.
set -euo pipefail
source "$(dirname "$0")/_common.sh"

case "${1:-}" in -h|--help|help) usage; exit 0 ;; esac

if [[ -n "${1:-}" && "$1" != -* ]]; then
    HEAD="$1"
    shift
else
    HEAD="${RAY_ADDRESS:-}"
fi
[[ -n "$HEAD" ]] || { usage >&2; exit 2; }
NODE_IP="${RAY_NODE_IP:-127.0.0.1}"
RAY="$(venv_bin ray)"
warn_if_ray_rewrites "$NODE_IP"

args=(start --address "$HEAD" --node-ip-address "$NODE_IP" --num-cpus "${RAY_NUM_CPUS:-$(num_cpus)}"
      --disable-usage-stats)
[[ -n "${RAY_OBJECT_STORE_MEMORY:-}" ]] && args+=(--object-store-memory "$RAY_OBJECT_STORE_MEMORY")
[[ -n "${RAY_TEMP_DIR:-}" ]] && args+=(--temp-dir "$RAY_TEMP_DIR")

mkdir -p "$RUN_DIR"
sid_file="$(mktemp "$RUN_DIR/ray-worker.XXXXXX.sid")"
in_new_session "$sid_file" "$RAY" "${args[@]}" "$@" >&2
restrict_ray_token
log "Ray node $NODE_IP joined $HEAD"
