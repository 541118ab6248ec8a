#!/usr/bin/env bash
# Usage: deploy/serve.sh [--help] [EXTRA 'smcserve serve' ARGS...]
#
# Runs `smcserve serve` (in the foreground; SIGINT/SIGTERM stop it cleanly) against an existing
# Ray cluster (deploy/ray-head.sh) and a standalone Redis (deploy/redis.sh). Extra arguments go
# to `smcserve serve` as they are, e.g. --port 50051 --host 0.0.0.0 --dtype float32 --threads 1.
# The prefill and decode actors run wherever Ray places them (1 CPU each); decode workers listen
# for the scheduler's gRPC on their Ray node's IP unless --worker-host says otherwise.
#
# Environment:
#   RAY_ADDRESS      Ray head, HOST:PORT (default 127.0.0.1:6380)
#   REDIS_URL        Redis, as redis.sh printed it (default redis://127.0.0.1:6379). Every Ray
#                    node must reach it at this address, so not 127.0.0.1 across machines.
#   PREFILL_WORKERS  prefill actors (default 1)
#   DECODE_WORKERS   decode actors (default 1)
#   RAY_AUTH_MODE    token (default here) or disabled, as for ray-head.sh
set -euo pipefail
source "$(dirname "$0")/_common.sh"

case "${1:-}" in
    -h|--help|help)
        usage
        echo
        "$(venv_bin smcserve)" serve --help
        exit 0 ;;
esac

exec "$(venv_bin smcserve)" serve \
    --ray-address "${RAY_ADDRESS:-127.0.0.1:6380}" \
    --redis-url "${REDIS_URL:-redis://127.0.0.1:6379}" \
    --prefill-workers "${PREFILL_WORKERS:-1}" \
    --decode-workers "${DECODE_WORKERS:-1}" \
    "$@"
