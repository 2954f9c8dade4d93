#!/usr/bin/env bash
# The cost of probing (issue 7): CPU and memory of one proxy probing 100 and 1,000 targets every 5 s, by
# ICMP and by TCP, beside the same proxy probing nothing. Needs root (raw ICMP sockets).
#
#   benches/probes.sh                 # 30 s per line
#   benches/probes.sh --seconds 60
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build-static -q
ulimit -n "$(ulimit -Hn)"
python3 benches/probes.py --keel target/x86_64-unknown-linux-gnu/release/proxy --seconds 30 "$@"
