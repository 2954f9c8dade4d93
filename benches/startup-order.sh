#!/usr/bin/env bash
# Regenerates proxy/startup-order.txt: the functions the proxy runs, as a relay (the embedded default)
# and then as a tunnel's router, publisher and visitor, in the order they first ran (valgrind's callgrind
# records them). First the steady state's: what runs after start-up memory was given back (the
# `resident` module drops the code pages once the config holds still), idling and relaying its first
# connections; then start-up's. The static build (`cargo build-static`) asks the linker to place them in
# that order (`--symbol-ordering-file`), so the 64 KiB windows the kernel maps around each page fault
# hold code the proxy runs, and the steady state's code, the part that stays resident, is packed
# together. Names that no longer exist are ignored, so a stale file only costs memory; run this after
# changes that move code around. Needs valgrind and curl.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build-static -q
binary=target/x86_64-unknown-linux-gnu/release/proxy
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# Runs the proxy under callgrind as ROLE with CONFIG (none: the embedded default), in the background,
# and waits until it has given its start-up memory back; then has callgrind write what ran so far to
# callgrind.ROLE.1 (start-up), so that callgrind.ROLE, written at exit, holds the steady state.
# Its process ID in $recorded.
record() {
    local role=$1
    shift
    valgrind --tool=callgrind --demangle=no --compress-strings=no --callgrind-out-file="$work/callgrind.$role" \
        "$binary" --log-level "info,keel_proxy::resident=debug" "$@" >"$work/$role.log" 2>&1 &
    recorded=$!
    for _ in $(seq 150); do grep -q "giving start-up memory back" "$work/$role.log" && break; sleep 0.2; done
    grep -q "giving start-up memory back" "$work/$role.log" || { echo "$role: no release in its log" >&2; exit 1; }
    callgrind_control --dump=startup "$recorded" >/dev/null 2>&1
}
wait_ready() { for _ in $(seq 150); do curl -fs "127.0.0.1:$1/ready" >/dev/null 2>&1 && return; sleep 0.2; done; }

# 1. The embedded default: a relay to the admin API.
record quickstart
pid=$recorded
wait_ready 9901
for _ in 1 2 3; do curl -fs 127.0.0.1:10000/ready >/dev/null; done   # through the relay
curl -fs 127.0.0.1:9901/stats/prometheus >/dev/null
sleep 2
kill -TERM "$pid"
wait "$pid" || true

# 2. A tunnel: router, publisher and visitor, a few requests through them to the router's admin API.
# (Fixed ports in the 19xxx range: this script is run by hand on a quiet machine.)
cat >"$work/router.yaml" <<'YAML'
admin: {address: "127.0.0.1:19811"}
tunnels:
  server: {listen: "127.0.0.1:19812", token: startup-order}
YAML
cat >"$work/publisher.yaml" <<'YAML'
admin: {address: "127.0.0.1:19813"}
tunnels:
  routers: [{name: r, address: "127.0.0.1:19812", token: startup-order}]
  publish: [{name: admin, local: "127.0.0.1:19811", secret: startup-order}]
YAML
cat >"$work/visitor.yaml" <<'YAML'
admin: {address: "127.0.0.1:19814"}
tunnels:
  routers: [{name: r, address: "127.0.0.1:19812", token: startup-order}]
  visit: [{name: admin, listen: "127.0.0.1:19815", secret: startup-order}]
YAML
# Each role starts once the one before has given its start-up memory back (`record` waits): the
# router's handling of the publisher's and the visitor's registrations is its steady state.
pids=()
for role in router publisher visitor; do
    record "$role" --config "$work/$role.yaml"
    pids+=("$recorded")
done
for port in 19811 19813 19814; do wait_ready "$port"; done
for _ in $(seq 30); do curl -fs 127.0.0.1:19815/ready >/dev/null 2>&1 && break; sleep 0.2; done
for _ in 1 2 3; do curl -fs 127.0.0.1:19815/stats/prometheus >/dev/null; done   # through the tunnel
sleep 12   # past a keepalive (tunnel::KEEPALIVE)
kill -TERM "${pids[@]}"
wait "${pids[@]}" || true

# callgrind names the C library's functions but gives the Rust ones as addresses (the static-pie binary
# is loaded at 0 under valgrind): map those to the symbols that contain them. The steady states are read
# first, then the start-ups, each in turn, so what the relay needs comes first, then what only the
# tunnel roles add.
for part in "" .1; do
    for role in quickstart router publisher visitor; do
        grep -E '^fn=' "$work/callgrind.$role$part" | sed -E 's/^fn=//' | grep -v '^$'
    done
done >"$work/executed"
nm -n --defined-only "$binary" | awk '$2 ~ /^[tTwW]$/ {print $1, $3}' >"$work/symbols"
# The release runs on after its own unmapping (the end of its loop, the task that called it), before
# callgrind's dump can land: its functions (`keel_proxy::resident`, and madvise) lead the steady state.
python3 - "$work/executed" "$work/symbols" >proxy/startup-order.txt <<'PY'
import bisect, sys
symbols = [(int(address, 16), name) for address, name in (line.split(" ", 1) for line in open(sys.argv[2]).read().splitlines())]
addresses = [address for address, _ in symbols]
seen = set()
for name in [name for _, name in symbols if "8resident" in name or name.endswith("madvise")]:
    if name not in seen:
        seen.add(name)
        print(name)
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
