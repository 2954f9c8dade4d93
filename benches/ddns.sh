#!/usr/bin/env bash
# DDNS detection latency: from an address change in the kernel to the report arriving at the control
# plane, for Keel's reporter (netlink events) and a poll-every-5-seconds baseline (seed 000's agent loop),
# in a network namespace of its own. Needs root and iproute2.
#
#   benches/ddns.sh            # 10 changes
#   CHANGES=20 benches/ddns.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p keel-proxy --bin proxy -p keel-control-plane --bin control-plane
ns="keel-ddns-bench-$$"
cleanup() { ip netns delete "$ns" 2>/dev/null || true; }
trap cleanup EXIT
ip netns add "$ns"
ip -n "$ns" link set lo up
ip -n "$ns" link add kdb0 type veth peer name kdb1
ip -n "$ns" link set kdb0 up
ip -n "$ns" link set kdb1 up
ip netns exec "$ns" python3 benches/ddns.py --proxy target/release/proxy \
    --control-plane target/release/control-plane --interface kdb0 --changes "${CHANGES:-10}"
