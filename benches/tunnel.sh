#!/usr/bin/env bash
# Tunnel benchmark: Keel's chain (visitor -> router -> publisher, three processes) against rathole
# (server + client), in one run on this machine.
#
# Installs its peers (Debian: nginx-light iperf3 wrk; rathole with cargo, built outside the workspace
# into $RATHOLE_ROOT, default /opt/rathole), builds Keel in release mode, then runs benches/tunnel.py:
# for each round and each chain, iperf3 throughput (1 and 8 streams) to a local iperf3 server, wrk
# (requests/s, p50, p99) to a local nginx page, the time to the first byte on fresh connections, and the
# RSS of every process, idle and loaded. Prints the medians and Keel's ratios to rathole. Also runs
# iperf3 through chains of the cheapest relay there is (benches/floor_relay.rs: a thread per direction,
# blocking splice), three in a row as in Keel's chain and two as in rathole's: what the topology alone
# costs on this machine, and how far Keel is from it.
#
#   benches/tunnel.sh                 # 5 rounds, 4 s per measurement
#   ROUNDS=3 SECONDS_EACH=5 benches/tunnel.sh
#
# Everything listens on 127.0.0.1 ports chosen by the kernel; every load is bounded in time.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
for tool in nginx iperf3 wrk; do command -v "$tool" >/dev/null 2>&1 || need+=("$tool"); done
if [ ${#need[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends nginx-light iperf3 wrk >/dev/null
fi
rathole_root="${RATHOLE_ROOT:-/opt/rathole}"
if [ ! -x "$rathole_root/bin/rathole" ]; then
    (cd /tmp && cargo install --quiet rathole --no-default-features --features server,client --root "$rathole_root")
fi
cargo build-static -q   # the static binary, as shipped (.cargo/config.toml)
rustc --edition 2024 -O -o target/floor-relay benches/floor_relay.rs   # the yardstick: std only
exec python3 benches/tunnel.py --keel target/x86_64-unknown-linux-gnu/release/proxy --rathole "$rathole_root/bin/rathole" \
    --floor-relay target/floor-relay \
    --rounds "${ROUNDS:-5}" --seconds "${SECONDS_EACH:-4}"
