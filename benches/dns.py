"""Keel's DNS server against dnsmasq and unbound under dnsperf; see dns.sh."""

import os
import random
import re
import statistics
import subprocess
import sys

from benchlib import CpuLimit, cpu_seconds, free_port, options_and_workdir, start, stop, wait_port

SERVICES = 50


def dnsperf(port, queries, seconds, verbose=False):
    """Runs dnsperf; returns (qps, average latency ms, latencies in ms when verbose, queries completed)."""
    cmd = ["dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", queries, "-l", str(seconds),
           "-c", "8", "-T", "2", "-q", "200"]
    if verbose:
        cmd.append("-v")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60).stdout
    qps = float(re.search(r"Queries per second:\s+([\d.]+)", out).group(1))
    completed = int(re.search(r"Queries completed:\s+(\d+)", out).group(1))
    average = float(re.search(r"Average Latency \(s\):\s+([\d.]+)", out).group(1)) * 1000
    lost = re.search(r"Queries lost:\s+(\d+)", out)
    if lost and int(lost.group(1)) > 0:
        print(f"  dnsperf: {lost.group(0)} on port {port}", file=sys.stderr)
    latencies = []
    for line in out.splitlines():
        # "> NOERROR name A 0.000123"; lost queries ("> T name A") carry no latency.
        if line.startswith("> "):
            try:
                latencies.append(float(line.split()[-1]) * 1000)
            except ValueError:
                pass
    return qps, average, latencies, completed


def p99(latencies):
    if not latencies:
        return float("nan")
    ordered = sorted(latencies)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


LIMIT_CORES = 0.5


def measure(scenarios, pids, opts):
    """Runs every scenario once a round, in a shuffled order; returns the medians per scenario."""
    results = {(s, n): {"qps": [], "avg": [], "p99": [], "cpu": []} for s, n, _, _ in scenarios}
    rng = random.Random(11)
    for round_number in range(opts.rounds):
        print(f"round {round_number + 1}/{opts.rounds}", file=sys.stderr)
        order = scenarios[:]
        rng.shuffle(order)
        for scenario, name, port, queries in order:
            cpu_before = cpu_seconds(pids[name])
            qps, average, _, completed = dnsperf(port, queries, opts.seconds)
            # The server's own CPU time per answered query: what QPS cannot show once the client,
            # sharing the cores, is the bottleneck.
            cpu_us = (cpu_seconds(pids[name]) - cpu_before) * 1e6 / max(completed, 1)
            # p99 from a shorter run with per-query output, which slows dnsperf, so QPS is not taken from it.
            _, _, latencies, _ = dnsperf(port, queries, 2, verbose=True)
            r = results[(scenario, name)]
            r["qps"].append(qps)
            r["avg"].append(average)
            r["p99"].append(p99(latencies))
            r["cpu"].append(cpu_us)
    return {key: {k: statistics.median(v) for k, v in r.items()} for key, r in results.items()}


def report(med, title, suffix):
    print(title)
    print(f"{'scenario':<10} {'server':<8} {'QPS':>9} {'avg ms':>8} {'p99 ms':>8} {'CPU us/query':>13}")
    for (scenario, name), m in med.items():
        print(f"{scenario:<10} {name:<8} {m['qps']:>9.0f} {m['avg']:>8.3f} {m['p99']:>8.3f} {m['cpu']:>13.2f}")
    k_h, d_h, u_h = (med[("hijacked", n)]["qps"] for n in ("keel", "dnsmasq", "unbound"))
    k_c, u_c = (med[("cache-hit", n)]["qps"] for n in ("keel", "unbound"))
    print(f"keel hijacked QPS{suffix}: {k_h / d_h:.2f}x dnsmasq, {k_h / u_h:.2f}x unbound (bar >= 1.50 both); "
          f"keel cache-hit QPS{suffix}: {k_c / u_c:.2f}x unbound (bar >= 1.00)")
    k_hc, d_hc, u_hc = (med[("hijacked", n)]["cpu"] for n in ("keel", "dnsmasq", "unbound"))
    k_cc, u_cc = (med[("cache-hit", n)]["cpu"] for n in ("keel", "unbound"))
    print(f"server CPU per query, hijacked: dnsmasq/keel {d_hc / k_hc:.2f}x, unbound/keel {u_hc / k_hc:.2f}x; "
          f"cache-hit: unbound/keel {u_cc / k_cc:.2f}x (higher is better for keel)")


def main():
    opts, work = options_and_workdir("keel-dns-bench-")
    procs = []
    try:
        names = [f"svc{i}.default.svc.cluster.local" for i in range(SERVICES)]
        vips = [f"127.0.66.{i + 1}" for i in range(SERVICES)]
        hijack_file = os.path.join(work, "hijacked.txt")
        with open(hijack_file, "w") as f:
            f.writelines(f"{name} A\n" for name in names)
        cached_file = os.path.join(work, "cached.txt")
        with open(cached_file, "w") as f:
            f.writelines(f"host{i}.bench.example A\n" for i in range(SERVICES))

        # The upstream every forwarder uses: a dnsmasq answering *.bench.example with a long TTL.
        upstream = free_port()
        procs.append(start(["dnsmasq", "-k", "-p", str(upstream), "--listen-address=127.0.0.1", "--bind-interfaces",
                            "--no-resolv", "--no-hosts", "--local-ttl=3600", "--address=/bench.example/10.9.9.9",
                            f"--pid-file={work}/upstream.pid"], work, "upstream"))

        dnsmasq = free_port()
        addresses = [f"--address=/{name}/{vip}" for name, vip in zip(names, vips)]
        procs.append(start(["dnsmasq", "-k", "-p", str(dnsmasq), "--listen-address=127.0.0.1", "--bind-interfaces",
                            "--no-resolv", "--no-hosts", "--local-ttl=30", "--cache-size=10000",
                            f"--server=127.0.0.1#{upstream}", f"--pid-file={work}/dnsmasq.pid", *addresses],
                           work, "dnsmasq"))

        unbound = free_port()
        local_data = "".join(f'  local-data: "{name}. 30 IN A {vip}"\n' for name, vip in zip(names, vips))
        with open(f"{work}/unbound.conf", "w") as f:
            f.write(f"""server:
  interface: 127.0.0.1
  port: {unbound}
  num-threads: 2
  username: ""
  chroot: ""
  directory: "{work}"
  pidfile: "{work}/unbound.pid"
  logfile: "{work}/unbound.err"
  use-syslog: no
  verbosity: 0
  do-not-query-localhost: no
  access-control: 127.0.0.0/8 allow
  module-config: "iterator"
  local-zone: "cluster.local." transparent
{local_data}forward-zone:
  name: "."
  forward-addr: 127.0.0.1@{upstream}
""")
        procs.append(start(["unbound", "-d", "-c", f"{work}/unbound.conf"], work, "unbound"))
        unbound_proc = procs[-1]

        keel, admin = free_port(), free_port()
        hijack = "".join(f"    - {{service: svc{i}, address: {vip}}}\n" for i, vip in enumerate(vips))
        with open(f"{work}/keel.yaml", "w") as f:
            f.write(f"""admin: {{address: "127.0.0.1:{admin}"}}
dns:
  listen: ["127.0.0.1:{keel}"]
  upstreams: ["127.0.0.1:{upstream}"]
  hijack:
{hijack}""")
        procs.append(start([opts.keel, "--config", f"{work}/keel.yaml", "--log-level", "warn"], work, "keel"))
        pids = {"keel": procs[-1].pid, "dnsmasq": procs[1].pid, "unbound": unbound_proc.pid}

        for port in (upstream, dnsmasq, unbound, keel):
            wait_port(port, work, udp=True)
        # Warm the forwarders' caches.
        for port in (unbound, keel):
            subprocess.run(["dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", cached_file, "-n", "2"],
                           capture_output=True, timeout=60)

        scenarios = [("hijacked", "keel", keel, hijack_file), ("hijacked", "dnsmasq", dnsmasq, hijack_file),
                     ("hijacked", "unbound", unbound, hijack_file), ("cache-hit", "keel", keel, cached_file),
                     ("cache-hit", "unbound", unbound, cached_file)]
        med = measure(scenarios, pids, opts)
        report(med, f"dns benchmark: {opts.rounds} rounds x {opts.seconds}s, medians, {os.cpu_count()} cores, "
                    f"all servers in one run (dnsperf -c 8 -T 2 -q 200)", "")

        # The same load with every server held to the same CPU limit, as a sidecar's
        # resources.limits.cpu holds it. Unlimited, the servers share two cores with dnsperf, which needs
        # more than one of them: QPS then measures the client as much as the server. Limited, dnsperf has
        # the rest of the machine and each server's QPS is what its limit buys.
        if CpuLimit.available():
            limits = [CpuLimit(name, LIMIT_CORES, [pid]) for name, pid in pids.items()]
            try:
                med = measure(scenarios, pids, opts)
            finally:
                for limit in limits:
                    limit.remove()
            report(med, f"\nthe same, each server limited to {LIMIT_CORES} core (CFS quota, as "
                        f"resources.limits.cpu: {int(LIMIT_CORES * 1000)}m)", " at the limit")
        else:
            print("\n(no writable cgroup cpu controller here: the run at an equal CPU limit is skipped)")
    finally:
        stop(procs)


if __name__ == "__main__":
    main()
