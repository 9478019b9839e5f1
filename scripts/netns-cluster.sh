#!/usr/bin/env bash
# A cluster of N "nodes" on one machine, for multi-node tests and demos.
#
#   scripts/netns-cluster.sh up N [--prefix P] [--subnet 10.77.0] [--rate 200mbit] [--delay 2ms]
#   scripts/netns-cluster.sh down N [--prefix P]
#   scripts/netns-cluster.sh qdiscs            # which tc qdiscs this kernel offers
#
# Each node is a Linux network namespace P-n<i> with its own loopback (fast,
# unshaped: traffic between ranks of one node) and one veth into a bridge P-br
# in the root namespace, at SUBNET.<i+1>/24 (traffic between nodes). --rate
# shapes the egress of every node's veth with a token bucket (tc-tbf(8)), so
# the inter-node link is slower than the intra-node loopback; --delay adds
# latency with netem (tc-netem(8)) where the kernel has it and fails loudly
# where it does not (netem is a module many container kernels lack).
#
# Run a command on a node:  ip netns exec P-n1 env GLOO_SOCKET_IFNAME=P-n1v ...
# "up" tears down what it made if any step fails; "down" removes whatever of
# the cluster exists and is safe to run twice. Needs root (CAP_NET_ADMIN).
set -euo pipefail

usage() { echo "usage: $0 {up N|down N|qdiscs} [--prefix P] [--subnet A.B.C] [--rate RATE] [--delay DELAY]" >&2; exit 2; }

cmd=${1:-}; shift || true
n=0
if [[ $cmd == up || $cmd == down ]]; then
    n=${1:-}; shift || true
    [[ $n =~ ^[0-9]+$ ]] && (( n >= 1 && n <= 16 )) || { echo "error: N must be 1..16 (got '${n}')" >&2; exit 2; }
fi
prefix=st subnet=10.77.0 rate="" delay=""
while (( $# )); do
    case $1 in
        --prefix) prefix=$2; shift 2 ;;
        --subnet) subnet=$2; shift 2 ;;
        --rate) rate=$2; shift 2 ;;
        --delay) delay=$2; shift 2 ;;
        *) usage ;;
    esac
done
# Interface names are at most 15 bytes: "<prefix>-n<i>v" and "<prefix>-n<i>p".
(( ${#prefix} <= 8 )) || { echo "error: --prefix '$prefix' is longer than 8 characters" >&2; exit 2; }
bridge="$prefix-br"

has_qdisc() {  # try the qdisc on a throwaway dummy link in a throwaway namespace
    local probe="$prefix-probe" ok=1
    ip netns add "$probe" 2>/dev/null || return 1
    ip -n "$probe" link add qd0 type veth peer name qd1 && case $1 in
        tbf) ip netns exec "$probe" tc qdisc add dev qd0 root tbf rate 1mbit burst 32kb latency 50ms ;;
        htb) ip netns exec "$probe" tc qdisc add dev qd0 root handle 1: htb default 1 ;;
        netem) ip netns exec "$probe" tc qdisc add dev qd0 root netem delay 1ms ;;
    esac 2>/dev/null && ok=0
    ip netns del "$probe"
    return $ok
}

down() {
    local i
    for (( i = 0; i < n; i++ )); do
        ip netns del "$prefix-n$i" 2>/dev/null || true   # takes its veth end (and the peer) with it
        ip link del "$prefix-n${i}p" 2>/dev/null || true
    done
    ip link del "$bridge" 2>/dev/null || true
}

up() {
    if [[ -n $delay ]] && ! has_qdisc netem; then
        echo "error: --delay needs the netem qdisc, which this kernel does not offer (has: $(qdiscs))" >&2
        exit 2
    fi
    if ip link show "$bridge" >/dev/null 2>&1; then
        echo "error: a cluster with prefix '$prefix' is up already (run: $0 down $n --prefix $prefix)" >&2
        exit 2
    fi
    trap 'echo "netns-cluster: setup failed at line $LINENO; tearing down" >&2; down' ERR
    ip link add "$bridge" type bridge
    ip link set "$bridge" up
    local i node
    for (( i = 0; i < n; i++ )); do
        node="$prefix-n$i"
        ip netns add "$node"
        ip link add "${node}v" type veth peer name "${node}p"
        ip link set "${node}v" netns "$node"
        ip link set "${node}p" master "$bridge" up
        ip -n "$node" addr add "$subnet.$((i + 1))/24" dev "${node}v"
        ip -n "$node" link set lo up
        ip -n "$node" link set "${node}v" up
        if [[ -n $delay ]]; then
            ip netns exec "$node" tc qdisc add dev "${node}v" root netem delay "$delay" ${rate:+rate "$rate"}
        elif [[ -n $rate ]]; then
            # burst: at least rate/HZ bytes or the bucket cannot reach the rate (tc-tbf(8)); 64 KiB covers 5 Gbit/s at HZ=1000.
            ip netns exec "$node" tc qdisc add dev "${node}v" root tbf rate "$rate" burst 64kb latency 100ms
        fi
        echo "$node $subnet.$((i + 1)) ${node}v"
    done
    trap - ERR
}

qdiscs() {
    local q out=()
    for q in tbf htb netem; do has_qdisc $q && out+=("$q"); done
    echo "${out[*]:-none}"
}

case $cmd in
    up) up ;;
    down) down ;;
    qdiscs) qdiscs ;;
    *) usage ;;
esac
