"""The cost of probing: CPU and memory of one Keel proxy probing 100 and 1,000 targets every 5 s, by ICMP
(raw sockets: the bench runs as root, and a fresh system's ping_group_range is closed) to loopback
addresses, and by TCP connect to loopback ports a Python asyncio server holds open. Each configuration
runs for --seconds after a warm-up round; CPU is the proxy's user+system time over that window."""

import asyncio
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))
from benchlib import cpu_seconds, free_port, options_and_workdir, rss_kib, start, stop, wait_port  # noqa: E402


def tcp_targets(count):
    """Starts `count` listening ports (on ports the kernel picks) in a thread that accepts and closes;
    returns them."""
    ports = []
    ready = threading.Event()

    def serve():
        async def main():
            async def handle(reader, writer):
                writer.close()
            for _ in range(count):
                server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=256)
                ports.append(server.sockets[0].getsockname()[1])
            ready.set()
            await asyncio.Event().wait()
        asyncio.run(main())

    threading.Thread(target=serve, daemon=True).start()
    if not ready.wait(30) or len(ports) != count:
        sys.exit(f"could not open {count} target ports")
    return ports


def main():
    args, work = options_and_workdir("keel-probes-")
    counts = [100, 1000]
    ports = tcp_targets(max(counts))
    print(f"probing every 5 s, {args.seconds} s measured per line:")
    print(f"{'kind':<5} {'targets':>7} {'CPU %':>7} {'RSS MB':>7} {'checks/s':>9} {'failed':>7}")
    runs = [("none", 0)] + [(kind, count) for kind in ("icmp", "tcp") for count in counts]
    for kind, count in runs:
        admin = free_port()
        config = f"{work}/{kind}-{count}.yaml"
        with open(config, "w") as f:
            f.write(f'admin: {{address: "127.0.0.1:{admin}"}}\n')
            if count:
                if kind == "icmp":
                    targets = [f"127.0.{1 + i // 250}.{1 + i % 250}" for i in range(count)]
                else:
                    targets = [f'"127.0.0.1:{port}"' for port in ports[:count]]
                f.write(f"probes:\n  - name: bench\n    {kind}: {{targets: [{', '.join(targets)}]}}\n")
                f.write("    interval: 5s\n    timeout: 1s\n")
        proxy = start([args.keel, "--config", config, "--log-level", "warn"], work, f"keel-{kind}-{count}")
        try:
            wait_port(admin, work)
            time.sleep(6)  # one round done, the next due
            before_cpu, before = cpu_seconds(proxy.pid), time.time()
            time.sleep(args.seconds)
            cpu = (cpu_seconds(proxy.pid) - before_cpu) / (time.time() - before) * 100
            rss = rss_kib([proxy.pid]) / 1024
            checks, failed = metric_sum(admin, "keel_probe_checks_total")
            rate = checks / (6 + args.seconds)
            print(f"{kind:<5} {count:>7} {cpu:>7.2f} {rss:>7.1f} {rate:>9.1f} {failed:>7}")
        finally:
            stop([proxy])


def metric_sum(admin, name):
    """Total and failed checks from the proxy's metrics."""
    import urllib.request
    text = urllib.request.urlopen(f"http://127.0.0.1:{admin}/stats/prometheus", timeout=5).read().decode()
    total = failed = 0
    for line in text.splitlines():
        if line.startswith(name + "{"):
            value = float(line.rsplit(" ", 1)[1])
            total += value
            if 'result="failure"' in line:
                failed += value
    return total, int(failed)


if __name__ == "__main__":
    main()
