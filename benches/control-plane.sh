#!/usr/bin/env bash
# Control-plane fleet benchmark: the time from a REST write to the last ACK, and the control plane's
# memory per connected proxy, for 100, 1,000 and 10,000 simulated proxies (see
# control-plane/benches/fleet.rs). Usage: benches/control-plane.sh [--sizes 100,1000,10000] [--writes 5]
# [--probe-results 10] (each simulated proxy also streams that many probe results every 5 s)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p keel-control-plane --bin control-plane
# 10,000 streams need 10,000 descriptors on each side.
ulimit -n "$(ulimit -Hn)"
cargo bench -p keel-control-plane --bench fleet -- --control-plane "$PWD/target/release/control-plane" "$@"
