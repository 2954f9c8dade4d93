"""Runs direct loopback, HAProxy, nginx stream and Keel relays side by side; see relay.sh."""

import os
import random
import statistics
import sys
import time

from benchlib import (Sampler, free_port, iperf, options_and_workdir, rss_kib, start, start_origins, stop,
                      wait_port, wrk)


class Peer:
    def __init__(self, name, iperf_port, web_port, procs):
        self.name, self.iperf_port, self.web_port, self.procs = name, iperf_port, web_port, procs

    @property
    def pids(self):
        return [p.pid for p in self.procs]


def main():
    opts, work = options_and_workdir("keel-bench-")
    procs = []
    try:
        iperf_port, origin_port = start_origins(work, procs)

        peers = [Peer("direct", iperf_port, origin_port, [])]

        hp_iperf, hp_web = free_port(), free_port()
        with open(f"{work}/haproxy.cfg", "w") as f:
            f.write(f"""global
  maxconn 4000
defaults
  mode tcp
  timeout connect 5s
  timeout client 1h
  timeout server 1h
listen iperf
  bind 127.0.0.1:{hp_iperf}
  server s1 127.0.0.1:{iperf_port}
listen web
  bind 127.0.0.1:{hp_web}
  server s1 127.0.0.1:{origin_port}
""")
        haproxy = start(["haproxy", "-db", "-f", f"{work}/haproxy.cfg"], work, "haproxy")
        procs.append(haproxy)
        peers.append(Peer("haproxy", hp_iperf, hp_web, [haproxy]))

        ng_iperf, ng_web = free_port(), free_port()
        with open(f"{work}/nginx-stream.conf", "w") as f:
            f.write(f"""load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes auto; pid {work}/stream.pid; error_log {work}/stream.err;
events {{ worker_connections 4000; }}
stream {{
  server {{ listen 127.0.0.1:{ng_iperf}; proxy_pass 127.0.0.1:{iperf_port}; }}
  server {{ listen 127.0.0.1:{ng_web}; proxy_pass 127.0.0.1:{origin_port}; }}
}}
""")
        nginx = start(["nginx", "-e", f"{work}/stream.err", "-p", work, "-c", f"{work}/nginx-stream.conf",
                       "-g", "daemon off;"], work, "nginx-stream")
        procs.append(nginx)
        peers.append(Peer("nginx", ng_iperf, ng_web, [nginx]))

        kl_iperf, kl_web, kl_admin = free_port(), free_port(), free_port()
        with open(f"{work}/keel.yaml", "w") as f:
            f.write(f"""admin: {{address: "127.0.0.1:{kl_admin}"}}
listeners:
  - {{name: iperf, address: "127.0.0.1:{kl_iperf}", cluster: iperf}}
  - {{name: web, address: "127.0.0.1:{kl_web}", cluster: web}}
clusters:
  - {{name: iperf, endpoints: ["127.0.0.1:{iperf_port}"]}}
  - {{name: web, endpoints: ["127.0.0.1:{origin_port}"]}}
""")
        keel = start([opts.keel, "--config", f"{work}/keel.yaml", "--log-level", "warn"], work, "keel")
        procs.append(keel)
        peers.append(Peer("keel", kl_iperf, kl_web, [keel]))

        for peer in peers:
            wait_port(peer.iperf_port, work)
            wait_port(peer.web_port, work)
        time.sleep(1.0)
        idle = {p.name: rss_kib(p.pids) / 1024 for p in peers if p.procs}

        results = {p.name: {"iperf1": [], "iperf8": [], "rps": [], "p50": [], "p99": [], "loaded": []} for p in peers}
        samplers = {p.name: Sampler(p.pids) for p in peers}
        for sampler in samplers.values():
            sampler.start()
        # Each measurement runs every peer back to back, in a fresh random order per round, so that no
        # peer always follows the same load.
        rng = random.Random(7)
        for round_number in range(opts.rounds):
            print(f"round {round_number + 1}/{opts.rounds}", file=sys.stderr)
            for metric in ("iperf1", "iperf8", "wrk"):
                order = peers[:]
                rng.shuffle(order)
                for peer in order:
                    r = results[peer.name]
                    if metric == "iperf1":
                        r["iperf1"].append(iperf(peer.iperf_port, 1, opts.seconds))
                    elif metric == "iperf8":
                        r["iperf8"].append(iperf(peer.iperf_port, 8, opts.seconds))
                    else:
                        rps, p50, p99 = wrk(peer.web_port, opts.seconds)
                        r["rps"].append(rps)
                        r["p50"].append(p50)
                        r["p99"].append(p99)
        for name, sampler in samplers.items():
            sampler.stop.set()
            sampler.join()
            results[name]["loaded"].append(sampler.peak / 1024)

        med = {name: {k: statistics.median(v) if v else 0 for k, v in r.items()} for name, r in results.items()}
        print(f"\nrelay benchmark: {opts.rounds} rounds x {opts.seconds}s, medians, "
              f"{os.cpu_count()} cores, all peers in one run")
        print(f"{'peer':<8} {'iperf3 1x Gbit/s':>16} {'iperf3 8x Gbit/s':>16} {'wrk req/s':>10} "
              f"{'p50 ms':>7} {'p99 ms':>7} {'idle RSS MB':>11} {'loaded RSS MB':>13}")
        for peer in peers:
            m = med[peer.name]
            idle_rss = f"{idle[peer.name]:.1f}" if peer.name in idle else "-"
            loaded = f"{m['loaded']:.1f}" if peer.procs else "-"
            print(f"{peer.name:<8} {m['iperf1']:>16.2f} {m['iperf8']:>16.2f} {m['rps']:>10.0f} "
                  f"{m['p50']:>7.3f} {m['p99']:>7.3f} {idle_rss:>11} {loaded:>13}")
        k, h = med["keel"], med["haproxy"]
        print(f"keel/haproxy: iperf3 1x {k['iperf1'] / h['iperf1']:.2f}x, iperf3 8x {k['iperf8'] / h['iperf8']:.2f}x, "
              f"req/s {k['rps'] / h['rps']:.2f}x (bar >= 1.00), p99 {k['p99'] / h['p99']:.2f}x (bar <= 1.00), "
              f"idle RSS {idle['keel']:.1f} MB (bar < 5)")
    finally:
        stop(procs)

if __name__ == "__main__":
    main()
