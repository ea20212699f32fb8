#!/usr/bin/env python3
"""
Probe: can slow or unauthenticated connections exhaust the daemon?

Starts an upstream mock (bench/slowmock.py, answers at once) and the real
daemon (C{twistd -n cllama}) with a hard descriptor limit (C{--fd-limit},
1,024 soft and hard, as systemd's default soft limit left the shipped unit
before it set C{LimitNOFILE=}), then, loopback only, bounded in time:

  1. baseline: an authenticated agent sends chat requests for C{--baseline}
     seconds, on a keep-alive connection and on a fresh connection each
     time, and the latencies are recorded;
  2. slowloris: C{--attackers} (1,100) connections each send the start of
     a request and then one byte a second of a header line that never
     ends; one the daemon closes is opened again at the next tick (as the
     classic tool does).  The agent keeps sending meanwhile, for
     C{--attack} seconds; its latencies, failures and the daemon's open
     descriptors are recorded, and how long the daemon held each attacker
     connection;
  3. big bodies: C{--bodies} (20) unauthenticated connections each declare a
     body just under the 32 MiB cap and send it as fast as the daemon reads
     it, for C{--body-seconds}; the daemon's RSS and the bytes it holds in
     temporary files (spooled bodies) are sampled.

    .venv/bin/python bench/probe_slowloris.py            # about 60 s
    .venv/bin/python bench/probe_slowloris.py --source /tmp/before   # an older tree

Prints a JSON report.  Exit status 0 when the agent's p99 under attack is
under 100 ms with no failed request and the big bodies held no temporary
file, 1 otherwise.
"""

from __future__ import annotations

import argparse
import errno
import http.client
import json
import multiprocessing
import os
import resource
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AGENT = "probe-agent"
SECRET = "5e1f" * 12
BODY = json.dumps({"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "ping"}]}).encode()
HEADERS = {"Authorization": f"Bearer {AGENT}:{SECRET}", "Content-Type": "application/json"}
PROFILE = os.environ.get("PROBE_TWISTD_ARGS", "").split()
SLOW_HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: probe\r\nX-Slow: "


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100 * len(values)))]


def ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 2)


# -- the processes -------------------------------------------------------------------------------


def start_upstream(port: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, os.path.join(REPO, "bench", "slowmock.py"), str(port), "--delay-ms", "0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )


def start_daemon(work: str, source: str, port: int, ui_port: int, upstream: int, fd_limit: int) -> subprocess.Popen:
    context = os.path.join(work, "context", AGENT)
    os.makedirs(context)
    with open(os.path.join(context, "metadata.json"), "w") as f:
        json.dump({"token": f"{AGENT}:{SECRET}", "pod": "probe", "service": AGENT}, f)
    os.makedirs(os.path.join(work, "auth"))
    spool = os.path.join(work, "spool")
    os.makedirs(spool)
    env = {
        "PATH": os.environ.get("PATH", ""),
        "PYTHONPATH": source,
        "LISTEN_ADDR": f"127.0.0.1:{port}",
        "UI_ADDR": f"127.0.0.1:{ui_port}",
        "CLAW_CONTEXT_ROOT": os.path.join(work, "context"),
        "CLAW_AUTH_DIR": os.path.join(work, "auth"),
        "CLLAMA_STATE_DIR": os.path.join(work, "state"),
        "CLLAMA_UI_TOKEN": "probe-ui-token-0000000",
        "OPENAI_API_KEY": "sk-probe-upstream",
        "OPENAI_BASE_URL": f"http://127.0.0.1:{upstream}/v1",
        "TMPDIR": spool,  # where twisted.web spools request bodies
    }

    def limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (fd_limit, fd_limit))

    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    return subprocess.Popen(
        [twistd, *PROFILE, "--pidfile=", "-n", "cllama"], env=env, cwd=work, preexec_fn=limit,
        stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "daemon.log"), "wb"), start_new_session=True,
    )


def wait_healthy(port: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit("the daemon did not answer /health in time")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def daemon_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of C{pid} so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def daemon_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return -1


def spooled_bytes(pid: int, spool: str) -> tuple[int, int]:
    """(files, bytes) the daemon holds open under its spool directory (deleted temp files included)."""
    files = size = 0
    directory = f"/proc/{pid}/fd"
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        try:
            if os.readlink(path).startswith(spool):
                files += 1
                size += os.stat(path).st_blocks * 512
        except OSError:
            pass
    return files, size


# -- the agent -----------------------------------------------------------------------------------


class Agent(threading.Thread):
    """Sequential chat requests, 20 a second: keep-alive, or a fresh connection each."""

    def __init__(self, port: int, keepalive: bool, timeout: float = 5.0) -> None:
        super().__init__(daemon=True)
        self.port, self.keepalive, self.timeout = port, keepalive, timeout
        self.phase = "baseline"
        self.latencies: dict[str, list[float]] = {}
        self.failures: dict[str, list[str]] = {}
        self.stopped = threading.Event()

    def run(self) -> None:
        conn = None
        while not self.stopped.is_set():
            phase = self.phase
            started = time.monotonic()
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
                conn.request("POST", "/v1/chat/completions", body=BODY, headers=HEADERS)
                response = conn.getresponse()
                doc = json.loads(response.read())
                if response.status != 200 or doc.get("object") != "chat.completion":
                    raise ValueError(f"status {response.status}")
                self.latencies.setdefault(phase, []).append(time.monotonic() - started)
            except (OSError, ValueError, http.client.HTTPException) as e:
                self.failures.setdefault(phase, []).append(f"{type(e).__name__}: {e}"[:120])
                if conn is not None:
                    conn.close()
                conn = None
            if not self.keepalive and conn is not None:
                conn.close()
                conn = None
            time.sleep(0.05)


# -- the attackers -------------------------------------------------------------------------------


class Slowloris(threading.Thread):
    """C{count} connections, a byte a second each, reopened at the next tick when closed."""

    def __init__(self, port: int, count: int, interval: float = 1.0, stopped=None) -> None:
        super().__init__(daemon=True)
        self.port, self.count, self.interval = port, count, interval
        self.stopped = stopped or threading.Event()
        self.opened = 0
        self.connect_failures = 0
        self.held: list[float] = []  # seconds the daemon kept each connection it closed
        self.max_open = 0

    def run(self) -> None:
        selector = selectors.DefaultSelector()
        slots: dict[int, tuple[socket.socket, float] | None] = {i: None for i in range(self.count)}
        next_tick = time.monotonic()
        while not self.stopped.is_set():
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + self.interval
                for i, entry in slots.items():
                    if entry is None:
                        slots[i] = self._open(selector, i)
                        continue
                    sock, _ = entry
                    try:
                        sock.send(b"a")
                    except OSError:
                        self._closed(selector, slots, i)
                self.max_open = max(self.max_open, sum(e is not None for e in slots.values()))
            for key, _ in selector.select(timeout=max(0.0, min(0.1, next_tick - time.monotonic()))):
                i = key.data
                entry = slots.get(i)
                if entry is None:
                    continue
                try:
                    data = entry[0].recv(4096)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    self._closed(selector, slots, i)
        for i in list(slots):
            if slots[i] is not None:
                selector.unregister(slots[i][0])
                slots[i][0].close()

    def _open(self, selector, i: int):
        sock = socket.socket()
        sock.setblocking(False)
        err = sock.connect_ex(("127.0.0.1", self.port))
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            self.connect_failures += 1
            return None
        self.opened += 1
        try:
            sock.send(SLOW_HEAD)
        except OSError:
            pass  # not connected yet: the head goes with the first tick's byte
        selector.register(sock, selectors.EVENT_READ, i)
        return sock, time.monotonic()

    def _closed(self, selector, slots, i: int) -> None:
        sock, since = slots[i]
        self.held.append(time.monotonic() - since)
        selector.unregister(sock)
        sock.close()
        slots[i] = None


class BigBodies(threading.Thread):
    """Unauthenticated connections declaring a body just under the cap and sending it flat out."""

    def __init__(self, port: int, count: int, seconds: float, size: int = 33_000_000) -> None:
        super().__init__(daemon=True)
        self.port, self.count, self.seconds, self.size = port, count, seconds, size
        self.sent = 0
        self.answers: dict[str, int] = {}

    def run(self) -> None:
        threads = [threading.Thread(target=self._one, daemon=True) for _ in range(self.count)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def _one(self) -> None:
        deadline = time.monotonic() + self.seconds
        chunk = b"x" * 65536
        sock = socket.create_connection(("127.0.0.1", self.port))
        sock.settimeout(1.0)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: probe\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % self.size)
        sent, answer = 0, b""
        try:
            while sent < self.size and time.monotonic() < deadline:
                sent += sock.send(chunk)
        except OSError:
            pass
        try:
            answer = sock.recv(200)
        except OSError:
            pass
        sock.close()
        self.sent += sent
        status = answer.split(b" ", 2)[1].decode() if answer.startswith(b"HTTP/") else "none"
        self.answers[status] = self.answers.get(status, 0) + 1


def in_process(target, *args):
    """
    Run C{target} (one of the attacker functions below) in a process of its
    own, so the attackers' Python never holds the agent's GIL: the agent's
    latencies are the daemon's.  Returns (process, stop event, result queue).
    """
    context = multiprocessing.get_context("fork")
    stopped, results = context.Event(), context.Queue()
    process = context.Process(target=target, args=(*args, stopped, results), daemon=True)
    process.start()
    return process, stopped, results


def run_slowloris(port: int, count: int, stopped, results) -> None:
    loris = Slowloris(port, count, stopped=stopped)
    loris.run()
    held = sorted(loris.held)
    results.put({
        "connections_opened": loris.opened,
        "connect_failures": loris.connect_failures,
        "max_open_at_a_tick": loris.max_open,
        "closed_by_daemon": len(held),
        "held_p50_s": round(pct(held, 50), 2) if held else None,
        "held_max_s": round(held[-1], 2) if held else None,
    })


def run_bodies(port: int, count: int, seconds: float, stopped, results) -> None:
    bodies = BigBodies(port, count, seconds)
    bodies.run()
    results.put({"connections": count, "bytes_sent": bodies.sent, "answers": bodies.answers})


# -- the run -------------------------------------------------------------------------------------


def summary(agent: Agent, phase: str) -> dict:
    lat = agent.latencies.get(phase, [])
    failures = agent.failures.get(phase, [])
    return {
        "requests": len(lat) + len(failures),
        "failed": len(failures),
        "p50_ms": ms(pct(lat, 50)),
        "p99_ms": ms(pct(lat, 99)),
        "max_ms": ms(max(lat) if lat else None),
        "first_failures": failures[:3],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--attackers", type=int, default=1100)
    ap.add_argument("--fd-limit", type=int, default=1024)
    ap.add_argument("--baseline", type=float, default=5.0)
    ap.add_argument("--attack", type=float, default=40.0)
    ap.add_argument("--bodies", type=int, default=20)
    ap.add_argument("--body-seconds", type=float, default=10.0)
    ap.add_argument("--source", default=REPO, help="the tree whose daemon runs (PYTHONPATH)")
    args = ap.parse_args()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = args.attackers + args.bodies + 200
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, need), hard))
    work = tempfile.mkdtemp(prefix="probe-slowloris-")
    upstream_port, port, ui_port = free_port(), free_port(), free_port()
    upstream = start_upstream(upstream_port)
    daemon = start_daemon(work, os.path.abspath(args.source), port, ui_port, upstream_port, args.fd_limit)
    report: dict = {"source": os.path.abspath(args.source), "fd_limit": args.fd_limit, "attackers": args.attackers}
    try:
        wait_healthy(port, time.monotonic() + 30)
        agents = {"keepalive": Agent(port, keepalive=True), "fresh_connection": Agent(port, keepalive=False)}
        for agent in agents.values():
            agent.start()
        time.sleep(args.baseline)
        report["idle_rss_kib"] = daemon_rss_kib(daemon.pid)

        for agent in agents.values():
            agent.phase = "ramp"
        loris, loris_stop, loris_results = in_process(run_slowloris, port, args.attackers)
        time.sleep(5)  # the attackers' first ticks
        for agent in agents.values():
            agent.phase = "attack"
        fds = []
        cpu_before = cpu_seconds(daemon.pid)
        until = time.monotonic() + args.attack
        while time.monotonic() < until:
            fds.append(daemon_fds(daemon.pid))
            time.sleep(1)
        daemon_cpu = (cpu_seconds(daemon.pid) - cpu_before) / args.attack
        loris_stop.set()
        slowloris = loris_results.get(timeout=30)
        loris.join(10)
        for agent in agents.values():
            agent.phase = "bodies"
        bodies, _, bodies_results = in_process(run_bodies, port, args.bodies, args.body_seconds)
        rss, spooled = [], []
        while bodies.is_alive() and bodies_results.empty():
            rss.append(daemon_rss_kib(daemon.pid))
            spooled.append(spooled_bytes(daemon.pid, os.path.join(work, "spool")))
            time.sleep(0.5)
        big_bodies = bodies_results.get(timeout=30)
        bodies.join(10)
        for agent in agents.values():
            agent.stopped.set()
            agent.join(10)
        report["agent"] = {
            name: {phase: summary(agent, phase) for phase in ("baseline", "ramp", "attack", "bodies")}
            for name, agent in agents.items()
        }
        report["slowloris"] = {
            **slowloris, "daemon_fds_max": max(fds) if fds else None,
            "daemon_cpu_share": round(daemon_cpu, 3),  # CPU seconds per second of attack
            "host_load_1m": round(os.getloadavg()[0], 2),
        }
        report["big_bodies"] = {
            **big_bodies,
            "daemon_rss_max_kib": max(rss) if rss else None,
            "spooled_files_max": max((f for f, _ in spooled), default=0),
            "spooled_bytes_max": max((b for _, b in spooled), default=0),
        }
        with open(os.path.join(work, "daemon.log"), "rb") as f:
            log = f.read().decode(errors="replace")
        report["daemon_log"] = [line.split(" ", 1)[-1] for line in log.splitlines()
                                if "descriptor" in line or "listener: closed" in line][:6]
    finally:
        stop(daemon)
        stop(upstream)
    print(json.dumps(report, indent=2))
    attack = [report["agent"][name]["attack"] for name in report["agent"]]
    ok = all(a["failed"] == 0 and a["p99_ms"] is not None and a["p99_ms"] < 100 for a in attack)
    ok = ok and report["big_bodies"]["spooled_files_max"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
