"""DDNS detection latency inside a network namespace; see ddns.sh (which creates it and runs this in it)."""

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

OPERATOR = "bench-operator"
PROXY = "bench-proxy"


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def current(cp, node):
    request = urllib.request.Request(f"http://{cp}/api/v1/public-ip", headers={"Authorization": f"Bearer {OPERATOR}"})
    with urllib.request.urlopen(request, timeout=2) as response:
        for entry in json.load(response)["nodes"]:
            if entry["node"] == node:
                return entry["address"]
    return None


def global_address(interface):
    """What seed 000's agent did: the interface's global IPv6 address (here: usable ones only)."""
    out = subprocess.run(["ip", "-6", "addr", "show", "dev", interface, "scope", "global"],
                         capture_output=True, text=True).stdout
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("inet6") and "deprecated" not in line and "tentative" not in line:
            return line.split()[1].split("/")[0]
    return None


def baseline(cp, interface, interval, stop):
    """Seed 000's loop: every `interval` seconds, read the address; if it changed, POST it."""
    last = None
    while not stop.is_set():
        address = global_address(interface)
        if address and address != last:
            body = json.dumps({"ipAddress": address}).encode()
            request = urllib.request.Request(f"http://{cp}/api/v1/public-ip", data=body, method="POST", headers={
                "X-API-Token": PROXY, "Content-Type": "application/json", "X-Keel-Node": "baseline"})
            try:
                urllib.request.urlopen(request, timeout=2).read()
                last = address
            except OSError as error:
                print(f"baseline: {error}", file=sys.stderr)
        stop.wait(interval)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--proxy", required=True)
    parser.add_argument("--control-plane", required=True)
    parser.add_argument("--interface", required=True)
    parser.add_argument("--changes", type=int, default=10)
    parser.add_argument("--poll-interval", type=float, default=5.0)
    args = parser.parse_args()

    work = tempfile.mkdtemp()
    cp = f"127.0.0.1:{free_port()}"
    env = dict(os.environ, KEEL_CP_OPERATOR_TOKENS=OPERATOR, KEEL_CP_PROXY_TOKENS=PROXY)
    control = subprocess.Popen([args.control_plane, "--listen", cp, "--database", f"{work}/cp.db",
                                "--log-level", "warn"], env=env)
    config = f"{work}/keel.yaml"
    with open(config, "w") as f:
        f.write(f"""node: {{id: keel}}
admin: {{address: "127.0.0.1:0"}}
reporters:
  - name: public-ip
    source: {{interface: {{name: {args.interface}, family: ipv6, policy: any}}}}
    sink: {{control_plane: {{url: "http://{cp}", token: {PROXY}}}}}
    interval: 60s
    state_file: {work}/reporter.state
""")
    proxy = subprocess.Popen([args.proxy, "--config", config, "--log-level", "warn"])
    stop = threading.Event()
    poller = threading.Thread(target=baseline, args=(cp, args.interface, args.poll_interval, stop), daemon=True)
    time.sleep(1.0)
    poller.start()

    keel_times, baseline_times = [], []
    previous = None
    try:
        for change in range(1, args.changes + 1):
            # Changes land at a random moment of the poller's cycle, as real ones do.
            time.sleep(random.uniform(0, args.poll_interval))
            address = f"2001:db8:77::{change:x}"
            # Add the new address, then drop the old one: the interface's only usable address changes.
            subprocess.run(["ip", "-6", "addr", "add", f"{address}/64", "dev", args.interface, "nodad"], check=True)
            start = time.monotonic()
            if previous:
                subprocess.run(["ip", "-6", "addr", "del", f"{previous}/64", "dev", args.interface], check=True)
            previous = address
            keel_done = base_done = None
            while keel_done is None or base_done is None:
                now = time.monotonic() - start
                if now > 30:
                    raise SystemExit(f"change {change}: not reported within 30 s")
                if keel_done is None and current(cp, "keel") == address:
                    keel_done = now
                if base_done is None and current(cp, "baseline") == address:
                    base_done = now
                time.sleep(0.002)
            keel_times.append(keel_done * 1000)
            baseline_times.append(base_done * 1000)
            print(f"change {change:>2}: keel {keel_done * 1000:7.1f} ms   poll every {args.poll_interval:g} s {base_done * 1000:7.1f} ms",
                  flush=True)
    finally:
        stop.set()
        proxy.terminate()
        control.terminate()
        proxy.wait()
        control.wait()
    print(f"detection latency over {args.changes} changes (address change in the kernel -> report stored by the control plane):")
    print(f"  keel (netlink events, 200 ms debounce): median {statistics.median(keel_times):.1f} ms, max {max(keel_times):.1f} ms (bar < 1000 ms)")
    print(f"  baseline (poll every {args.poll_interval:g} s, seed 000): median {statistics.median(baseline_times):.1f} ms, max {max(baseline_times):.1f} ms")


if __name__ == "__main__":
    main()
