"""Keel's tunnel chain (visitor -> router -> publisher) against rathole (server + client); see tunnel.sh."""

import os
import random
import socket
import statistics
import sys
import time

from benchlib import Sampler, free_port, iperf, options_and_workdir, rss_kib, start, start_origins, stop, wait_port, wrk

TOKEN = "bench-token"
SECRET = "bench-secret"


class Chain:
    def __init__(self, name, iperf_port, web_port, procs):
        self.name, self.iperf_port, self.web_port, self.procs = name, iperf_port, web_port, procs

    @property
    def pids(self):
        return [p.pid for p in self.procs]


def first_byte_ms(port, attempts=50):
    """Milliseconds from connect() to the first byte of an HTTP answer, on fresh connections: what a
    new connection through the chain costs. Returns the median and the worst."""
    samples = []
    for _ in range(attempts):
        started = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"GET / HTTP/1.0\r\nHost: bench\r\n\r\n")
            if not s.recv(1):
                raise RuntimeError(f"no answer through port {port}")
            samples.append((time.perf_counter() - started) * 1000)
        time.sleep(0.01)
    return statistics.median(samples), max(samples)


def rathole_chain(rathole, work, iperf_port, origin_port):
    control, r_iperf, r_web = free_port(), free_port(), free_port()
    with open(f"{work}/rathole-server.toml", "w") as f:
        f.write(f"""[server]
bind_addr = "127.0.0.1:{control}"
[server.services.iperf]
token = "{SECRET}"
bind_addr = "127.0.0.1:{r_iperf}"
[server.services.web]
token = "{SECRET}"
bind_addr = "127.0.0.1:{r_web}"
""")
    with open(f"{work}/rathole-client.toml", "w") as f:
        f.write(f"""[client]
remote_addr = "127.0.0.1:{control}"
[client.services.iperf]
token = "{SECRET}"
local_addr = "127.0.0.1:{iperf_port}"
[client.services.web]
token = "{SECRET}"
local_addr = "127.0.0.1:{origin_port}"
""")
    server = start([rathole, "--server", f"{work}/rathole-server.toml"], work, "rathole-server")
    wait_port(control, work)
    client = start([rathole, "--client", f"{work}/rathole-client.toml"], work, "rathole-client")
    return Chain("rathole", r_iperf, r_web, [server, client])


def keel_chain(keel, work, iperf_port, origin_port):
    router_port, k_iperf, k_web = free_port(), free_port(), free_port()
    configs = {
        "router": f"""node: {{id: router}}
admin: {{address: "127.0.0.1:{free_port()}"}}
tunnels:
  server: {{listen: "127.0.0.1:{router_port}", token: {TOKEN}}}
""",
        "publisher": f"""node: {{id: publisher}}
admin: {{address: "127.0.0.1:{free_port()}"}}
tunnels:
  routers: [{{name: r, address: "127.0.0.1:{router_port}", token: {TOKEN}}}]
  publish:
    - {{name: iperf, local: "127.0.0.1:{iperf_port}", secret: {SECRET}}}
    - {{name: web, local: "127.0.0.1:{origin_port}", secret: {SECRET}}}
""",
        "visitor": f"""node: {{id: visitor}}
admin: {{address: "127.0.0.1:{free_port()}"}}
tunnels:
  routers: [{{name: r, address: "127.0.0.1:{router_port}", token: {TOKEN}}}]
  visit:
    - {{name: iperf, listen: "127.0.0.1:{k_iperf}", secret: {SECRET}}}
    - {{name: web, listen: "127.0.0.1:{k_web}", secret: {SECRET}}}
""",
    }
    procs = []
    for role, text in configs.items():
        with open(f"{work}/keel-{role}.yaml", "w") as f:
            f.write(text)
        procs.append(start([keel, "--config", f"{work}/keel-{role}.yaml", "--log-level", "warn"], work,
                           f"keel-{role}"))
        if role == "router":
            wait_port(router_port, work)
    return Chain("keel", k_iperf, k_web, procs)


def floor_chain(relay, work, hops, iperf_port):
    """`hops` minimal splice relays in a row in front of the iperf3 server (benches/floor_relay.rs): what
    a chain of that many TCP connections costs on this machine with the cheapest relay there is. Only
    iperf3 runs through it (a thread per direction serves requests poorly, and that is not what it
    measures)."""
    procs, port = [], iperf_port
    for hop in range(hops):
        listen = free_port()
        procs.append(start([relay, str(listen), str(port)], work, f"floor{hops}-{hop}"))
        wait_port(listen, work)
        port = listen
    return Chain(f"floor{hops}", port, None, procs)


def wait_through(chain, limit=10.0):
    """Waits until a request goes through the chain end to end (tunnels register in the background)."""
    deadline = time.time() + limit
    while True:
        try:
            first_byte_ms(chain.web_port, attempts=1)
            return
        except (OSError, RuntimeError):
            if time.time() > deadline:
                raise RuntimeError(f"{chain.name}: nothing gets through")
            time.sleep(0.1)


def main():
    opts, work = options_and_workdir("keel-tunnel-bench-", [
        ("rathole", "the rathole binary"),
        ("floor-relay", "benches/floor_relay.rs, built"),
    ])
    procs = []
    try:
        iperf_port, origin_port = start_origins(work, procs)
        chains = [Chain("direct", iperf_port, origin_port, [])]
        for build in (rathole_chain, keel_chain):
            binary = opts.rathole if build is rathole_chain else opts.keel
            chain = build(binary, work, iperf_port, origin_port)
            procs.extend(chain.procs)
            chains.append(chain)
        for chain in chains:
            wait_through(chain)
        # The yardsticks: Keel's topology (three relays, four TCP connections) and rathole's (two, three).
        floors = [floor_chain(opts.floor_relay, work, hops, iperf_port) for hops in (3, 2)]
        for chain in floors:
            procs.extend(chain.procs)
        time.sleep(1.0)
        idle = {c.name: rss_kib(c.pids) / 1024 for c in chains if c.procs}
        per_process = {c.name: [rss_kib([p.pid]) / 1024 for p in c.procs] for c in chains if c.procs}

        keys = ("iperf1", "iperf8", "rps", "p50", "p99", "first", "first_max", "loaded")
        results = {c.name: {k: [] for k in keys} for c in chains + floors}
        samplers = {c.name: Sampler(c.pids) for c in chains}
        for sampler in samplers.values():
            sampler.start()
        rng = random.Random(5)
        for round_number in range(opts.rounds):
            print(f"round {round_number + 1}/{opts.rounds}", file=sys.stderr)
            for metric in ("iperf1", "iperf8", "wrk", "first"):
                # The yardsticks carry iperf3 only.
                order = chains + floors if metric in ("iperf1", "iperf8") else chains[:]
                rng.shuffle(order)
                for chain in order:
                    r = results[chain.name]
                    if metric == "iperf1":
                        r["iperf1"].append(iperf(chain.iperf_port, 1, opts.seconds))
                    elif metric == "iperf8":
                        r["iperf8"].append(iperf(chain.iperf_port, 8, opts.seconds))
                    elif metric == "wrk":
                        rps, p50, p99 = wrk(chain.web_port, opts.seconds)
                        r["rps"].append(rps)
                        r["p50"].append(p50)
                        r["p99"].append(p99)
                    else:
                        median, worst = first_byte_ms(chain.web_port)
                        r["first"].append(median)
                        r["first_max"].append(worst)
        for name, sampler in samplers.items():
            sampler.stop.set()
            sampler.join()
            results[name]["loaded"].append(sampler.peak / 1024)

        med = {name: {k: statistics.median(v) if v else 0 for k, v in r.items()} for name, r in results.items()}
        print(f"\ntunnel benchmark: {opts.rounds} rounds x {opts.seconds}s, medians, {os.cpu_count()} cores, "
              "all chains in one run")
        print(f"{'chain':<8} {'iperf3 1x Gbit/s':>16} {'iperf3 8x Gbit/s':>16} {'wrk req/s':>10} {'p50 ms':>7} "
              f"{'p99 ms':>7} {'1st byte ms':>11} {'idle RSS MB':>11} {'loaded RSS MB':>13}")
        for chain in chains:
            m = med[chain.name]
            idle_rss = f"{idle[chain.name]:.1f}" if chain.procs else "-"
            loaded = f"{m['loaded']:.1f}" if chain.procs else "-"
            print(f"{chain.name:<8} {m['iperf1']:>16.2f} {m['iperf8']:>16.2f} {m['rps']:>10.0f} {m['p50']:>7.3f} "
                  f"{m['p99']:>7.3f} {m['first']:>11.3f} {idle_rss:>11} {loaded:>13}")
        for chain in floors:
            m = med[chain.name]
            print(f"{chain.name:<8} {m['iperf1']:>16.2f} {m['iperf8']:>16.2f} {'-':>10} {'-':>7} {'-':>7} {'-':>11} "
                  f"{'-':>11} {'-':>13}")
        for name, sizes in per_process.items():
            roles = ["server", "client"] if name == "rathole" else ["router", "publisher", "visitor"]
            print(f"  idle RSS of {name}: " + ", ".join(f"{role} {size:.1f} MB" for role, size in zip(roles, sizes)))
        k, r = med["keel"], med["rathole"]
        print(f"keel/rathole: iperf3 1x {k['iperf1'] / r['iperf1']:.2f}x, iperf3 8x {k['iperf8'] / r['iperf8']:.2f}x "
              f"(bar >= 1.50), req/s {k['rps'] / r['rps']:.2f}x, idle RSS {idle['keel'] / idle['rathole']:.2f}x, "
              f"loaded RSS {k['loaded'] / r['loaded']:.2f}x (bar <= 1.00); "
              f"keel first byte {k['first']:.3f} ms median (bar < 1)")
        f3, f2 = med["floor3"], med["floor2"]
        print(f"minimal splice relays (benches/floor_relay.rs), to rathole: three in a row (keel's topology) "
              f"iperf3 1x {f3['iperf1'] / r['iperf1']:.2f}x, 8x {f3['iperf8'] / r['iperf8']:.2f}x; two (rathole's) "
              f"1x {f2['iperf1'] / r['iperf1']:.2f}x, 8x {f2['iperf8'] / r['iperf8']:.2f}x; "
              f"keel/three: 1x {k['iperf1'] / f3['iperf1']:.2f}x, 8x {k['iperf8'] / f3['iperf8']:.2f}x")
        d = med["direct"]
        print(f"first byte added to a direct connection: keel {k['first'] - d['first']:.3f} ms, "
              f"rathole {r['first'] - d['first']:.3f} ms (the direct figure, {d['first']:.3f} ms, is the "
              "client's and nginx's own time)")
    finally:
        stop(procs)


if __name__ == "__main__":
    main()
