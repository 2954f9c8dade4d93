#!/usr/bin/env bash
# Load and soak: every role at once (control plane, router, publisher, sidecar, DDNS agent), as the
# release binaries, on loopback. 10,000 concurrent connections held through a tunnel; connection churn
# through the relay and the tunnel; DNS at saturation; then a soak of mixed load with every process's
# RSS and open file descriptors sampled (benches/soak.py says what is measured).
#
#   benches/soak.sh                              # 10,000 connections, a 10-minute soak
#   CONNECTIONS=2000 SOAK_SECONDS=120 benches/soak.sh
#
# Installs its peers (Debian: nginx-light wrk dnsperf). Raises the open-file limit where it may.
# Every load is bounded in time.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
for tool in nginx wrk dnsperf curl iperf3; do command -v "$tool" >/dev/null 2>&1 || need+=("$tool"); done
if [ ${#need[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends nginx-light wrk dnsperf curl iperf3 >/dev/null
fi
ulimit -n 1048576 2>/dev/null || ulimit -n "$(ulimit -Hn)"
# Each connection held through the tunnel is two sockets in the visitor and two in the router (one from
# the visitor, one from the publisher; pipes are taken only while bytes move); pools, spare pipes and the
# rest of a process need up to 2,000 more.
connections=${CONNECTIONS:-10000}
fits=$(( ($(ulimit -n) - 2000) / 2 ))
if [ "$connections" -gt "$fits" ]; then
    echo "note: $connections connections need $(( connections * 2 + 2000 )) descriptors per process; this" \
        "machine allows $(ulimit -n) (raising it needs CAP_SYS_RESOURCE): holding $fits instead" >&2
    connections=$fits
fi
cargo build-static -q
cargo build -q --release -p keel-control-plane --bin control-plane
exec python3 benches/soak.py --keel target/x86_64-unknown-linux-gnu/release/proxy \
    --control-plane target/release/control-plane \
    --connections "$connections" --soak-seconds "${SOAK_SECONDS:-600}"
