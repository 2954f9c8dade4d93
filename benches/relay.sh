#!/usr/bin/env bash
# Relay benchmark: direct loopback, HAProxy, nginx stream and Keel, side by side in one run.
#
# Installs its peers (Debian: haproxy nginx-light libnginx-mod-stream iperf3 wrk), builds Keel in release
# mode, then runs benches/relay.py, which for each round and each peer measures iperf3 throughput (1 and 8
# streams), wrk through the relay to a local nginx page (requests/s, p50, p99) and the relay's idle and
# loaded RSS, and prints the medians and Keel's ratios to HAProxy.
#
#   benches/relay.sh                 # 5 rounds, 4 s per measurement
#   ROUNDS=5 SECONDS_EACH=8 benches/relay.sh
#
# Everything listens on 127.0.0.1 ports chosen by the kernel; every load is bounded in time.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
for tool in haproxy nginx iperf3 wrk; do command -v "$tool" >/dev/null 2>&1 || need+=("$tool"); done
if [ ! -e /usr/lib/nginx/modules/ngx_stream_module.so ]; then need+=(libnginx-mod-stream); fi
if [ ${#need[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends haproxy nginx-light libnginx-mod-stream iperf3 wrk >/dev/null
fi
cargo build-static -q   # the static binary, as shipped (.cargo/config.toml)
exec python3 benches/relay.py --keel target/x86_64-unknown-linux-gnu/release/proxy --rounds "${ROUNDS:-5}" --seconds "${SECONDS_EACH:-4}"
