"""Load and soak: every role at once, as separate processes on loopback; see soak.sh.

Roles: a control plane (SQLite), a router, a publisher (nginx and an echo service behind it), a sidecar
(DNS hijack with a forwarding upstream, two visitors, a relay listener, TCP and HTTP probes) and a DDNS
agent (an HTTP echo source reported to the control plane every few seconds).

1. Concurrent connections through the tunnel: N connections opened to the visitor and held, each
   echoing twice (once when opened, once with all of them open).
2. Connection churn: wrk with `Connection: close` (a new connection per request) through the relay and
   through the tunnel, then the file descriptors of every process, which must return to where they were.
3. DNS at saturation: dnsperf as fast as it goes against the sidecar's hijacked names.
4. Soak: light mixed load (wrk with and without keep-alive, dnsperf at a fixed rate) for the given time,
   RSS and open file descriptors of every process sampled every 10 s. Flat means the last minute's
   samples are within 10% (RSS) and 16 descriptors of the second minute's.
"""

import argparse
import asyncio
import http.server
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from benchlib import free_port, rss_kib, start, start_origins, stop, wait_port

TOKEN = "soak-token"
SECRET = "soak-secret"
CP_TOKEN = "soak-proxy-token"


def fds(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except FileNotFoundError:
        return 0


def echo_server(port):
    """An asyncio echo service in a thread of its own (the publisher's second local service)."""

    async def handle(reader, writer):
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def serve():
        server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=4096)
        async with server:
            await server.serve_forever()

    threading.Thread(target=lambda: asyncio.run(serve()), daemon=True).start()


def address_echo(port):
    """What the DDNS agent's HTTP source asks: the body is an address (a documentation one)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = b"203.0.113.7\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()


def start_roles(args, work, procs):
    _, origin = start_origins(work, procs)
    echo_port, address_port = free_port(), free_port()
    echo_server(echo_port)
    address_echo(address_port)
    cp_port, router_port, dns_port = free_port(), free_port(), free_port()
    web_visit, echo_visit, relay_port = free_port(), free_port(), free_port()
    with open(f"{work}/cp-token", "w") as f:
        f.write(CP_TOKEN)
    env = dict(os.environ, KEEL_CP_PROXY_TOKENS=CP_TOKEN, KEEL_CP_OPERATOR_TOKENS="soak-operator-token")
    cp = subprocess.Popen(
        [args.control_plane, "--listen", f"127.0.0.1:{cp_port}", "--database", f"{work}/cp.db"],
        stdout=open(f"{work}/control-plane.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
        env=dict(env, KEEL_LOG="warn"))
    procs.append(cp)
    wait_port(cp_port, work)
    admin = {role: free_port() for role in ("router", "publisher", "sidecar", "ddns")}
    # The soak asks hijacked names only: the upstream is a port nobody serves.
    unserved_port = free_port()
    configs = {
        "router": f"""node: {{id: router}}
admin: {{address: "127.0.0.1:{admin['router']}"}}
tunnels:
  server: {{listen: "127.0.0.1:{router_port}", token: {TOKEN}}}
""",
        "publisher": f"""node: {{id: publisher}}
admin: {{address: "127.0.0.1:{admin['publisher']}"}}
tunnels:
  routers: [{{name: r, address: "127.0.0.1:{router_port}", token: {TOKEN}}}]
  publish:
    - {{name: web, local: "127.0.0.1:{origin}", secret: {SECRET}}}
    - {{name: echo, local: "127.0.0.1:{echo_port}", secret: {SECRET}}}
""",
        "sidecar": f"""node: {{id: sidecar}}
admin: {{address: "127.0.0.1:{admin['sidecar']}"}}
dns:
  listen: ["127.0.0.1:{dns_port}"]
  namespace: default
  ip_range: 127.0.66.0/24
  hijack:
    - service: web
    - service: echo
    - name: "*.internal.example"
  upstreams: ["127.0.0.1:{unserved_port}"]
tunnels:
  routers: [{{name: r, address: "127.0.0.1:{router_port}", token: {TOKEN}}}]
  visit:
    - {{name: web, listen: "127.0.0.1:{web_visit}", secret: {SECRET}}}
    - {{name: echo, listen: "127.0.0.1:{echo_visit}", secret: {SECRET}}}
listeners:
  - {{name: relay, address: "127.0.0.1:{relay_port}", cluster: origin}}
clusters:
  - {{name: origin, endpoints: ["127.0.0.1:{origin}"]}}
probes:
  - name: router
    tcp: {{targets: ["127.0.0.1:{router_port}"]}}
    interval: 2s
  - name: origin
    http: {{targets: ["http://127.0.0.1:{origin}/"]}}
    interval: 2s
""",
        "ddns": f"""node: {{id: ddns-agent}}
admin: {{address: "127.0.0.1:{admin['ddns']}"}}
reporters:
  - name: public-ip
    source: {{http: {{urls: ["http://127.0.0.1:{address_port}/"], family: ipv4}}}}
    sink: {{control_plane: {{url: "http://127.0.0.1:{cp_port}", token_file: {work}/cp-token}}}}
    interval: 3s
    state_file: {work}/ddns.state
""",
    }
    roles = {"control-plane": cp}
    for role, text in configs.items():
        path = f"{work}/keel-{role}.yaml"
        with open(path, "w") as f:
            f.write(text)
        proc = start([args.keel, "--config", path, "--log-level", "warn"], work, f"keel-{role}")
        procs.append(proc)
        roles[role] = proc
        if role == "router":
            wait_port(router_port, work)
    wait_port(dns_port, work, udp=True)
    ports = {"web": web_visit, "echo": echo_visit, "relay": relay_port, "dns": dns_port, "cp": cp_port}
    deadline = time.time() + 15
    while subprocess.run(["curl", "-sf", "-o", "/dev/null", f"http://127.0.0.1:{web_visit}/"]).returncode:
        if time.time() > deadline:
            raise RuntimeError("nothing gets through the tunnel")
        time.sleep(0.2)
    return roles, ports


def census(roles):
    return {role: (rss_kib([proc.pid]), fds(proc.pid)) for role, proc in roles.items()}


def show(label, snapshot):
    cells = ", ".join(f"{role} {rss / 1024:.1f} MiB/{n} fds" for role, (rss, n) in snapshot.items())
    print(f"  {label}: {cells}")


async def hold_connections(port, count, roles):
    """Opens `count` connections through the tunnel, each echoing once, holds them all, echoes on each
    again, and closes them. Returns (established, echoed twice, census while held)."""
    connections, failed = [], 0
    gate = asyncio.Semaphore(512)

    async def open_one(index):
        nonlocal failed
        async with gate:
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 20)
                message = f"{index:08d}".encode()
                writer.write(message)
                await writer.drain()
                if await asyncio.wait_for(reader.readexactly(len(message)), 20) != message:
                    raise RuntimeError("wrong echo")
                connections.append((reader, writer, message))
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, RuntimeError):
                failed += 1

    await asyncio.gather(*(open_one(index) for index in range(count)))
    held = census(roles)
    echoed = 0

    async def again(reader, writer, message):
        nonlocal echoed
        async with gate:
            try:
                writer.write(message)
                await writer.drain()
                if await asyncio.wait_for(reader.readexactly(len(message)), 20) == message:
                    echoed += 1
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
                pass

    await asyncio.gather(*(again(*connection) for connection in connections))
    for _, writer, _ in connections:
        writer.close()
    return len(connections), echoed, failed, held


def wrk(port, seconds, connections, close):
    command = ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", f"http://127.0.0.1:{port}/"]
    if close:
        command[1:1] = ["-H", "Connection: close"]
    out = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    errors = re.search(r"Socket errors: (.*)|Non-2xx or 3xx responses: (\d+)", out)
    return rps, errors.group(0) if errors else "no errors"


def dnsperf(port, seconds, names, rate=None):
    with tempfile.NamedTemporaryFile("w", suffix=".queries", delete=False) as f:
        for name in names:
            f.write(f"{name} A\n")
    command = ["dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", f.name, "-l", str(seconds), "-c", "8"]
    if rate:
        command += ["-Q", str(rate)]
    out = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60).stdout
    os.unlink(f.name)
    qps = float(re.search(r"Queries per second:\s+([\d.]+)", out).group(1))
    lost = re.search(r"Queries lost:\s+(\d+) \(([\d.]+)%\)", out)
    return qps, f"{lost.group(1)} lost ({lost.group(2)}%)"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--keel", required=True)
    parser.add_argument("--control-plane", required=True)
    parser.add_argument("--connections", type=int, default=10000)
    parser.add_argument("--soak-seconds", type=int, default=600)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="keel-soak-")
    os.chmod(work, 0o755)  # nginx's workers run as nobody
    procs = []
    try:
        roles, ports = start_roles(args, work, procs)
        time.sleep(2)
        idle = census(roles)
        print("idle:")
        show("every role", idle)

        print(f"\n1. {args.connections} concurrent connections through the tunnel (visitor -> router -> publisher):")
        started = time.time()
        opened, echoed, failed, held = asyncio.run(hold_connections(ports["echo"], args.connections, roles))
        print(f"  established {opened}, echoed twice {echoed}, failed {failed}, in {time.time() - started:.1f} s")
        show("while held", {role: held[role] for role in ("sidecar", "router", "publisher")})
        time.sleep(3)
        show("after closing", {role: v for role, v in census(roles).items() if role in ("sidecar", "router", "publisher")})

        print("\n2. connection churn (wrk, a new connection per request, 10 s each):")
        before = census(roles)
        for name in ("relay", "web"):
            rps, errors = wrk(ports[name], 10, 32, close=True)
            path = "relay" if name == "relay" else "tunnel"
            print(f"  through the {path}: {rps:.0f} connections/s ({errors})")
        time.sleep(3)
        after = census(roles)
        leaked = {role: after[role][1] - before[role][1] for role in roles}
        print(f"  descriptors after minus before: {leaked}")

        print("\n3. DNS at saturation (dnsperf, 10 s, hijacked names):")
        names = ["web.default.svc.cluster.local", "echo", "a.internal.example", "web.default"]
        qps, lost = dnsperf(ports["dns"], 10, names)
        print(f"  {qps:.0f} queries/s, {lost}")

        print(f"\n4. soak: {args.soak_seconds} s of mixed load, every role sampled every 10 s:")
        samples = []
        stop_at = time.time() + args.soak_seconds
        loads = []
        cycle = 0
        while time.time() < stop_at:
            remaining = max(1, int(stop_at - time.time()))
            chunk = min(10, remaining)
            close = cycle % 2 == 0
            loads = [
                threading.Thread(target=wrk, args=(ports["web"], chunk, 8, close)),
                threading.Thread(target=wrk, args=(ports["relay"], chunk, 8, not close)),
                threading.Thread(target=dnsperf, args=(ports["dns"], chunk, names, 5000)),
            ]
            for load in loads:
                load.start()
            for load in loads:
                load.join()
            samples.append((time.time(), census(roles)))
            cycle += 1
        for role in roles:
            code = roles[role].poll()
            if code is not None:
                print(f"  {role} EXITED with {code}")
        per_minute = {}
        first = samples[0][0]
        for at, snapshot in samples:
            per_minute.setdefault(int((at - first) // 60), []).append(snapshot)
        print("  minute: " + "; ".join(f"{role} RSS MiB/fds" for role in roles))
        for minute, snapshots in sorted(per_minute.items()):
            cells = []
            for role in roles:
                rss = statistics.median(s[role][0] for s in snapshots) / 1024
                n = statistics.median(s[role][1] for s in snapshots)
                cells.append(f"{rss:.1f}/{n:.0f}")
            print(f"  {minute:>6}: " + "; ".join(cells))
        minutes = sorted(per_minute)
        if len(minutes) >= 3:
            base, last = per_minute[minutes[1]], per_minute[minutes[-1]]
            verdicts = []
            for role in roles:
                rss0 = statistics.median(s[role][0] for s in base)
                rss1 = statistics.median(s[role][0] for s in last)
                fd0 = statistics.median(s[role][1] for s in base)
                fd1 = statistics.median(s[role][1] for s in last)
                flat = rss1 <= rss0 * 1.10 and fd1 <= fd0 + 16
                verdicts.append(f"{role} RSS {rss0 / 1024:.1f} -> {rss1 / 1024:.1f} MiB, fds {fd0:.0f} -> {fd1:.0f}: "
                                f"{'flat' if flat else 'GROWING'}")
            print("  second minute -> last minute: " + "; ".join(verdicts))
    finally:
        stop(procs)


if __name__ == "__main__":
    main()
