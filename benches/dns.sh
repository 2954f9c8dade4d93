#!/usr/bin/env bash
# DNS benchmark: Keel against dnsmasq and unbound, in one run on this machine.
#
# Installs its peers (Debian: dnsperf dnsmasq-base unbound), builds Keel in release mode, then runs
# benches/dns.py: the same hijacked service names answered by Keel (dns.hijack), dnsmasq (address=) and
# unbound (local-data), and cache-hit forwarding by Keel and unbound to the same local upstream (a
# dnsmasq), each loaded with dnsperf. Prints QPS, average and p99 latency per server, medians over the
# rounds, and Keel's ratios; then the same with every server held to one CFS quota of half a core (as a
# sidecar's resources.limits.cpu), where dnsperf no longer competes with the server for the cores (needs
# root and the cgroup cpu controller, v1 or v2; skipped with a line saying so otherwise).
#
#   benches/dns.sh                    # 5 rounds, 4 s per measurement
#   ROUNDS=3 SECONDS_EACH=5 benches/dns.sh
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
for tool in dnsperf dnsmasq unbound; do command -v "$tool" >/dev/null 2>&1 || need+=("$tool"); done
if [ ${#need[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends dnsperf dnsmasq-base unbound >/dev/null
fi
cargo build-static -q   # the static binary, as shipped (.cargo/config.toml)
exec python3 benches/dns.py --keel target/x86_64-unknown-linux-gnu/release/proxy --rounds "${ROUNDS:-5}" --seconds "${SECONDS_EACH:-4}"
