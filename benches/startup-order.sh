#!/usr/bin/env bash
# Regenerates proxy/startup-order.txt: the functions the proxy runs when it starts, while it idles, and on
# its first relayed connections, in the order they first ran (valgrind's callgrind records them). The
# static build (`cargo build-static`) asks the linker to place them next to each other
# (`--symbol-ordering-file`), so the 64 KiB windows the kernel maps around each page fault hold code the
# proxy uses: less idle memory. Names that no longer exist are ignored, so a stale file only costs
# memory; run this after changes that move start-up code around. Needs valgrind and curl.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build-static -q
binary=target/x86_64-unknown-linux-gnu/release/proxy
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
valgrind --tool=callgrind --demangle=no --callgrind-out-file="$work/callgrind.out" "$binary" >"$work/log" 2>&1 &
pid=$!
for _ in $(seq 150); do curl -fs 127.0.0.1:9901/ready >/dev/null 2>&1 && break; sleep 0.2; done
for _ in 1 2 3; do curl -fs 127.0.0.1:10000/ready >/dev/null; done   # through the relay
curl -fs 127.0.0.1:9901/stats/prometheus >/dev/null
sleep 2
kill -TERM "$pid"
wait "$pid" || true
# callgrind names the C library's functions but gives the Rust ones as addresses (the static-pie binary
# is loaded at 0 under valgrind): map those to the symbols that contain them.
grep -E '^fn=' "$work/callgrind.out" | sed -E 's/^fn=\([0-9]+\) ?//' | grep -v '^$' >"$work/executed"
nm -n --defined-only "$binary" | awk '$2 ~ /^[tTwW]$/ {print $1, $3}' >"$work/symbols"
python3 - "$work/executed" "$work/symbols" >proxy/startup-order.txt <<'PY'
import bisect, sys
symbols = [(int(address, 16), name) for address, name in (line.split(" ", 1) for line in open(sys.argv[2]).read().splitlines())]
addresses = [address for address, _ in symbols]
seen = set()
for line in open(sys.argv[1]).read().splitlines():
    line = line.split("'")[0]  # callgrind marks recursion levels as name'2
    if line.startswith("0x"):
        index = bisect.bisect_right(addresses, int(line, 16)) - 1
        name = symbols[index][1] if index >= 0 else None
    else:
        name = None if line.startswith("(") else line
    if name and name not in seen:
        seen.add(name)
        print(name)
PY
echo "$(wc -l <proxy/startup-order.txt) functions in proxy/startup-order.txt; rebuild with: touch proxy/src/main.rs && cargo build-static"
