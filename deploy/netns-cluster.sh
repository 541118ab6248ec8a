#!/usr/bin/env bash
# Usage: deploy/netns-cluster.sh up|down|status|exec NODE CMD... [--help]
#
# Try the multi-host deployment on one machine: NETNS_NODES Linux network namespaces, each with an
# address of its own on a bridge, stand in for separate hosts. Node 1 runs Redis (redis.sh) and the
# Ray head (ray-head.sh); nodes 2..N join it (ray-worker.sh). Nothing talks over loopback: every
# piece binds its node's bridge address, as on real hosts. Linux only; needs root (ip netns, veth,
# a bridge). Then run the scheduler on node 1 (the command `up` prints), and reach it from this
# shell at NODE1_IP (the bridge has an address in the root namespace).
#
#   up      build the network (removing a leftover one with the same prefix first), start Redis,
#           the head and the other nodes; print the addresses and the serve command
#   down    stop every process in the namespaces (in `ray stop`'s order; SIGKILL for what is left
#           after 15 s), then remove the namespaces, the veth pairs and the bridge. It also cleans
#           up after a crashed run: it needs nothing but the prefix.
#   status  the namespaces, their addresses and the number of processes in each
#   exec NODE CMD...   run CMD in node NODE's namespace (1..N), e.g. `exec 1 deploy/serve.sh ...`
#
# Environment (besides those of redis.sh, ray-head.sh, ray-worker.sh):
#   NETNS_PREFIX     name prefix of the namespaces (PREFIX1..N), veths (PREFIX-vI) and bridge
#                    (PREFIX-br); default smcnet. Keep it short: interface names are 15 chars at most.
#   NETNS_SUBNET     first three octets of the /24; node I is SUBNET.I, the bridge SUBNET.254
#                    (default 10.77.0)
#   NETNS_NODES      number of nodes (default 3)
#   RAY_NUM_CPUS     CPUs each Ray node offers (default 1: one smcserve worker per node at
#                    --worker-cpus 1, so the pools land on distinct nodes)
#   RAY_OBJECT_STORE_MEMORY  per node, bytes (default here 256 MiB; the KV goes through Redis)
#   SMCSERVE_RUN_DIR default /tmp/smcserve-netns; node I's Ray temp dir is $SMCSERVE_RUN_DIR/rI
set -euo pipefail
export SMCSERVE_RUN_DIR="${SMCSERVE_RUN_DIR:-/tmp/smcserve-netns}"
source "$(dirname "$0")/_common.sh"

PREFIX="${NETNS_PREFIX:-smcnet}"
SUBNET="${NETNS_SUBNET:-10.77.0}"
NODES="${NETNS_NODES:-3}"
BRIDGE="$PREFIX-br"
[[ "$NODES" =~ ^[1-9][0-9]?$ && "$NODES" -le 50 ]] || die "NETNS_NODES must be 1..50"
[[ "$SUBNET" =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || die "NETNS_SUBNET must look like 10.77.0"
((${#BRIDGE} <= 15)) || die "NETNS_PREFIX is too long for interface names"
export RAY_NUM_CPUS="${RAY_NUM_CPUS:-1}"
export RAY_OBJECT_STORE_MEMORY="${RAY_OBJECT_STORE_MEMORY:-$((256 * 1024 * 1024))}"
export RAY_PORT="${RAY_PORT:-6380}"
export REDIS_PORT="${REDIS_PORT:-6379}"

ns() { echo "$PREFIX$1"; }
ip_of() { echo "$SUBNET.$1"; }
in_ns() {
    local n="$1"
    shift
    ip netns exec "$(ns "$n")" "$@"
}

# our_namespaces: every namespace with this prefix followed by a number (also a crashed run's).
our_namespaces() {
    ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^${PREFIX}[0-9]+$" || true
}

# ns_pids NS [raylet|gcs_server|other]: live processes in namespace NS, all or only those of one kind.
ns_pids() {
    local pids
    pids="$(ip netns pids "$1" 2>/dev/null | paste -sd, -)"
    [[ -n "$pids" ]] || return 0
    ps -o pid=,stat=,comm= -p "$pids" 2>/dev/null | awk -v k="${2:-}" '
        $2 !~ /^Z/ && (k == "" || (k == "other" ? ($3 != "raylet" && $3 != "gcs_server") : $3 == k)) { print $1 }'
}

# terminate KIND SECONDS NS...: SIGTERM those processes, wait up to SECONDS for them to exit.
terminate() {
    local kind="$1" secs="$2" n pids i left
    shift 2
    for n in "$@"; do
        pids="$(ns_pids "$n" "$kind")"
        # shellcheck disable=SC2086
        [[ -z "$pids" ]] || kill -TERM $pids 2>/dev/null || true
    done
    for ((i = 0; i < secs * 10; i++)); do
        left=""
        for n in "$@"; do left+="$(ns_pids "$n" "$kind")"; done
        [[ -n "$left" ]] || return 0
        sleep 0.1
    done
}

# stop_processes NS...: every process in these namespaces, in `ray stop`'s order (raylets, then the
# rest, Redis included, then the GCS), 5 s each, then SIGKILL for whatever is left.
stop_processes() {
    local n pids a
    terminate raylet 5 "$@"
    terminate other 5 "$@"
    terminate gcs_server 5 "$@"
    for n in "$@"; do
        pids="$(ns_pids "$n")"
        [[ -z "$pids" ]] && continue
        log "$n: still running: $(ps -o comm= -p "${pids//$'\n'/,}" | tr '\n' ' '); SIGKILL"
        # shellcheck disable=SC2086
        kill -KILL $pids 2>/dev/null || true
    done
    for ((n = 0; n < 50; n++)); do  # gone (a namespace with a process in it outlives `ip netns del`)
        pids=""
        for a in "$@"; do pids+="$(ns_pids "$a")"; done
        [[ -n "$pids" ]] || return 0
        sleep 0.1
    done
}

net_down() {
    local spaces n
    mapfile -t spaces < <(our_namespaces)
    # worker nodes first, the head's namespace last (as `ray stop`: workers, then the head)
    local workers=() head=()
    for n in "${spaces[@]}"; do
        if [[ "$n" == "$(ns 1)" ]]; then head+=("$n"); else workers+=("$n"); fi
    done
    ((${#workers[@]})) && stop_processes "${workers[@]}"
    ((${#head[@]})) && stop_processes "${head[@]}"
    for n in "${spaces[@]}"; do
        ip netns del "$n" 2>/dev/null || log "could not delete namespace $n"
    done
    # a veth goes with its peer's namespace; remove any left in the root namespace, and the bridge
    for n in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | sed 's/@.*//' | grep -E "^${PREFIX}-v[0-9]+$" || true); do
        ip link del "$n" 2>/dev/null || true
    done
    if ip link show "$BRIDGE" >/dev/null 2>&1; then ip link del "$BRIDGE"; fi
    rm -f "$RUN_DIR"/ray-worker.*.sid "$RUN_DIR"/ray-head-*.sid "$RUN_DIR"/redis-*.pid
}

net_up() {
    local i
    if ip -o -4 addr show | awk '{print $4}' | grep -q "^${SUBNET}\."; then
        die "$SUBNET.0/24 is already in use on this machine; set NETNS_SUBNET"
    fi
    ip link add "$BRIDGE" type bridge
    ip addr add "$(ip_of 254)/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    for ((i = 1; i <= NODES; i++)); do
        ip netns add "$(ns "$i")"
        ip link add "$PREFIX-v$i" type veth peer name "$PREFIX-p$i"
        ip link set "$PREFIX-v$i" master "$BRIDGE" up
        ip link set "$PREFIX-p$i" netns "$(ns "$i")"
        in_ns "$i" ip link set lo up
        in_ns "$i" ip link set "$PREFIX-p$i" name eth0
        in_ns "$i" ip addr add "$(ip_of "$i")/24" dev eth0
        in_ns "$i" ip link set eth0 up
        # a default route, as a real host has: Ray finds a node's own address by routing towards
        # a public one; nothing is forwarded beyond the bridge
        in_ns "$i" ip route add default via "$(ip_of 254)"
    done
}

up() {
    local redis_url head i
    net_down
    net_up
    mkdir -p "$RUN_DIR"
    redis_url="$(REDIS_BIND="$(ip_of 1)" in_ns 1 "$DEPLOY_DIR/redis.sh" start)"
    head="$(RAY_NODE_IP="$(ip_of 1)" RAY_TEMP_DIR="$RUN_DIR/r1" in_ns 1 "$DEPLOY_DIR/ray-head.sh")"
    for ((i = 2; i <= NODES; i++)); do
        RAY_NODE_IP="$(ip_of "$i")" RAY_TEMP_DIR="$RUN_DIR/r$i" in_ns "$i" "$DEPLOY_DIR/ray-worker.sh" "$head"
    done
    cat <<EOF
Namespaces $(ns 1)..$(ns "$NODES") at $(ip_of 1)..$(ip_of "$NODES") (bridge $BRIDGE, $(ip_of 254) here):
Redis $redis_url and the Ray head $head on node 1, $((NODES - 1)) more Ray node(s), $RAY_NUM_CPUS CPU(s) each.
  serve:   RAY_ADDRESS=$head REDIS_URL=$redis_url DECODE_WORKERS=$((NODES - 1)) \\
             $0 exec 1 $DEPLOY_DIR/serve.sh --host $(ip_of 1) --port 50051 --worker-cpus 1
  client:  $VENV_BIN/smcserve generate "What is the capital of France?" --address $(ip_of 1):50051
  stop:    $0 down
EOF
}

status() {
    local n
    for n in $(our_namespaces); do
        echo "$n: $(ip netns exec "$n" ip -o -4 addr show dev eth0 2>/dev/null | awk '{print $4}')," \
            "$(ip netns pids "$n" 2>/dev/null | wc -l) processes"
    done
}

case "${1:-}" in
    up) up ;;
    down) net_down ;;
    status) status ;;
    exec)
        [[ "${2:-}" =~ ^[0-9]+$ && $# -ge 3 ]] || { usage >&2; exit 2; }
        n="$2"
        shift 2
        exec ip netns exec "$(ns "$n")" "$@" ;;
    -h|--help|help) usage ;;
    *) usage >&2; exit 2 ;;
esac
