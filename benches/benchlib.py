"""Helpers shared by the benchmark scripts: ports, processes, and waiting for listeners."""

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time


def free_port():
    """A port the kernel hands out now (for peers that need a number in their config)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port, udp=False):
    """Whether a socket is bound to the port, read from /proc so no probe reaches a peer."""
    tables = ("/proc/net/udp", "/proc/net/udp6") if udp else ("/proc/net/tcp", "/proc/net/tcp6")
    for table in tables:
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                local_port = int(fields[1].split(":")[1], 16)
                # TCP must be LISTEN (0A); a bound UDP socket shows state 07.
                if local_port == port and (udp or fields[3] == "0A"):
                    return True
    return False


def wait_port(port, work, udp=False, limit=10.0):
    deadline = time.time() + limit
    while time.time() < deadline:
        if listening(port, udp):
            return
        time.sleep(0.05)
    logs = "".join(
        open(os.path.join(work, f)).read()[-2000:] for f in os.listdir(work) if f.endswith((".log", ".err"))
    )
    raise RuntimeError(f"nothing listening on {port}; logs:\n{logs}")


def start(cmd, work, name):
    """Starts a peer in its own session, logging to WORK/NAME.log."""
    log = open(os.path.join(work, f"{name}.log"), "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def stop(procs):
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def rss_kib(pids):
    """Resident memory of processes and their children, in KiB."""
    total, seen, todo = 0, set(), list(pids)
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                todo.extend(int(c) for c in f.read().split())
        except FileNotFoundError:
            pass
    return total


def options_and_workdir(prefix, binaries=()):
    """The options every benchmark takes (--keel, --rounds, --seconds), plus a required path option for
    each of `binaries` (name and help: `("rathole", "the rathole binary")` gives `opts.rathole`), and a
    fresh work directory that peers running as nobody (nginx workers) can read."""
    args = argparse.ArgumentParser()
    args.add_argument("--keel", required=True, help="the proxy binary")
    args.add_argument("--rounds", type=int, default=5)
    args.add_argument("--seconds", type=int, default=4)
    for name, help_text in binaries:
        args.add_argument(f"--{name}", required=True, help=help_text)
    work = tempfile.mkdtemp(prefix=prefix)
    os.chmod(work, 0o755)
    return args.parse_args(), work


def cpu_seconds(pid):
    """User plus system CPU time of a process, all its threads together, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Sampler(threading.Thread):
    """Records the peak RSS of a relay while a load runs."""

    def __init__(self, pids):
        super().__init__(daemon=True)
        self.pids, self.peak, self.stop = pids, 0, threading.Event()

    def run(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, rss_kib(self.pids))
            time.sleep(0.1)


def iperf(port, streams, seconds):
    out = subprocess.run(
        ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds), "-P", str(streams), "-J"],
        capture_output=True, text=True, timeout=seconds + 30,
    )
    result = json.loads(out.stdout)
    if "error" in result:
        raise RuntimeError(result["error"])
    return result["end"]["sum_received"]["bits_per_second"] / 1e9


def to_ms(value):
    number, unit = re.match(r"([\d.]+)(\w+)", value).groups()
    return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def wrk(port, seconds):
    out = subprocess.run(
        ["wrk", "-t2", "-c64", f"-d{seconds}s", "--latency", f"http://127.0.0.1:{port}/"],
        capture_output=True, text=True, timeout=seconds + 30,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p50 = to_ms(re.search(r"\s50%\s+(\S+)", out).group(1))
    p99 = to_ms(re.search(r"\s99%\s+(\S+)", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: (.*)", out)
    if errors:
        print(f"  wrk reported: {errors.group(0)}", file=sys.stderr)
    return rps, p50, p99


def start_origins(work, procs):
    """Starts the upstreams every relay benchmark uses: an iperf3 server and an nginx serving a 1 KiB page.
    Returns their ports; the processes are appended to `procs`."""
    iperf_port, origin_port = free_port(), free_port()
    procs.append(start(["iperf3", "-s", "-p", str(iperf_port)], work, "iperf3"))
    os.makedirs(f"{work}/www")
    with open(f"{work}/www/index.html", "w") as f:
        f.write("k" * 1024)
    with open(f"{work}/origin.conf", "w") as f:
        f.write(f"""worker_processes 1; pid {work}/origin.pid; error_log {work}/origin.err;
events {{ worker_connections 4096; }}
http {{ access_log off; keepalive_requests 1000000;
  server {{ listen 127.0.0.1:{origin_port}; root {work}/www; }} }}
""")
    procs.append(start(["nginx", "-e", f"{work}/origin.err", "-p", work, "-c", f"{work}/origin.conf",
                        "-g", "daemon off;"], work, "origin"))
    wait_port(iperf_port, work)
    wait_port(origin_port, work)
    return iperf_port, origin_port


class CpuLimit:
    """A CPU limit on a set of processes, the way a pod's `resources.limits.cpu` is enforced: a CFS quota
    on a cgroup of their own (cgroup v2 `cpu.max`, or v1 `cpu.cfs_quota_us`). A short period (10 ms)
    spreads the quota evenly, so a limited server is throttled in small steps rather than stopped for
    tens of milliseconds.

    `CpuLimit.available()` says whether this machine lets the benchmark make cgroups (as root, with the
    cpu controller mounted). Removing the limit moves the processes back to the cgroup they came from."""

    PERIOD_US = 10_000

    def __init__(self, name, cores, pids):
        self.root, self.version = self._root()
        self.path = os.path.join(self.root, f"keel-bench-{name}-{os.getpid()}")
        quota = int(cores * self.PERIOD_US)
        self.origins = {pid: self._cgroup_of(pid) for pid in pids}
        os.mkdir(self.path)
        if self.version == 2:
            self._write("cpu.max", f"{quota} {self.PERIOD_US}")
        else:
            self._write("cpu.cfs_period_us", str(self.PERIOD_US))
            self._write("cpu.cfs_quota_us", str(quota))
        for pid in pids:
            self._write("cgroup.procs", str(pid))

    @staticmethod
    def _root():
        v2 = "/sys/fs/cgroup"
        try:
            with open(os.path.join(v2, "cgroup.subtree_control")) as f:
                if "cpu" in f.read().split():
                    return v2, 2
        except OSError:
            pass
        v1 = "/sys/fs/cgroup/cpu"
        if os.path.exists(os.path.join(v1, "cpu.cfs_quota_us")):
            return v1, 1
        raise OSError("no cgroup cpu controller: neither /sys/fs/cgroup (v2, cpu enabled) nor /sys/fs/cgroup/cpu")

    @staticmethod
    def available():
        try:
            root, _ = CpuLimit._root()
        except OSError:
            return False
        return os.access(root, os.W_OK)

    def _cgroup_of(self, pid):
        controller = "" if self.version == 2 else "cpu"
        with open(f"/proc/{pid}/cgroup") as f:
            for line in f:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                if controller in controllers.split(",") or (self.version == 2 and controllers == ""):
                    return os.path.join(self.root, path.lstrip("/"))
        return self.root

    def _write(self, name, value):
        with open(os.path.join(self.path, name), "w") as f:
            f.write(value)

    def remove(self):
        for pid, origin in self.origins.items():
            try:
                with open(os.path.join(origin, "cgroup.procs"), "w") as f:
                    f.write(str(pid))
            except (OSError, ProcessLookupError):
                pass  # the process has exited
        os.rmdir(self.path)
