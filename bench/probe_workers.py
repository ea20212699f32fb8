#!/usr/bin/env python3
"""
Probe: what the audit relay of C{--workers N} costs the supervisor.

Starts C{bench/slowmock.py} (answers at once) and the real daemon with
C{--workers N}, sends C{--requests} chat requests from C{--clients} threads,
each request on a new connection (so both workers get some), and reads the
processes' CPU time from C{/proc/<pid>/stat} before and after: the
supervisor's (the relay: it reads every worker's audit pipe, cuts whole
lines, tags them and writes them to its stdout) against the workers' (which
serve the requests).  The supervisor's idle CPU (its metrics snapshot every
second) is measured first and taken off.

    .venv/bin/python bench/probe_workers.py --workers 2 --requests 4000

Prints one JSON object.  Exit status 0 when every request was answered 200.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tests.support import AGENT, SECRET, write_agent  # noqa: E402

READY = re.compile(r"worker (\d+) \(pid (\d+)\) ready")
TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def chat(port: int) -> int:
    body = json.dumps({"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "ping"}]}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", "/v1/chat/completions", body=body, headers={
            "Authorization": f"Bearer {AGENT}:{SECRET}", "Content-Type": "application/json", "Connection": "close",
        })
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


class Reader(threading.Thread):
    """Reads a pipe to its end, counting lines and bytes (and keeping them if asked)."""

    def __init__(self, stream, keep: bool) -> None:
        super().__init__(daemon=True)
        self.stream = stream
        self.keep = keep
        self.text = bytearray()
        self.lines = 0
        self.bytes = 0
        self.by_worker: dict[int, int] = {}

    def run(self) -> None:
        while True:
            data = os.read(self.stream.fileno(), 65536)
            if not data:
                return
            self.lines += data.count(b"\n")
            self.bytes += len(data)
            for index in range(64):
                found = data.count(b',"worker":%d}\n' % index)
                if found:
                    self.by_worker[index] = self.by_worker.get(index, 0) + found
            if self.keep:
                self.text += data


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--requests", type=int, default=4000)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--idle", type=float, default=5.0, help="seconds of idle measurement first")
    args = ap.parse_args()

    base = tempfile.mkdtemp(prefix="cllama-probe-workers-")
    try:
        mock_port, api_port, ui_port = free_port(), free_port(), free_port()
        mock = subprocess.Popen(
            [sys.executable, os.path.join(REPO, "bench", "slowmock.py"), str(mock_port), "--delay-ms", "0"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        os.makedirs(os.path.join(base, "auth"))
        write_agent(os.path.join(base, "context"), AGENT, SECRET)
        env = dict(
            os.environ,
            PYTHONPATH=REPO,
            LISTEN_ADDR=f"127.0.0.1:{api_port}",
            UI_ADDR=f"127.0.0.1:{ui_port}",
            CLAW_CONTEXT_ROOT=os.path.join(base, "context"),
            CLAW_AUTH_DIR=os.path.join(base, "auth"),
            CLLAMA_STATE_DIR=os.path.join(base, "state"),
            CLLAMA_UI_TOKEN="probe-workers-ui-token",
            OPENAI_API_KEY="sk-probe",
            OPENAI_BASE_URL=f"http://127.0.0.1:{mock_port}/v1",
        )
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        daemon = subprocess.Popen(
            [twistd, "--pidfile=", "-n", "cllama", "--workers", str(args.workers)],
            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        out, err = Reader(daemon.stdout, keep=False), Reader(daemon.stderr, keep=True)
        out.start()
        err.start()
        deadline = time.monotonic() + 60
        while len(dict(READY.findall(err.text.decode(errors="replace")))) < args.workers:
            if time.monotonic() > deadline or daemon.poll() is not None:
                print(err.text.decode(errors="replace")[-3000:], file=sys.stderr)
                return 1
            time.sleep(0.05)
        workers = [int(pid) for _index, pid in READY.findall(err.text.decode())]
        supervisor = daemon.pid

        idle_start = cpu_seconds(supervisor)
        time.sleep(args.idle)
        idle_rate = (cpu_seconds(supervisor) - idle_start) / args.idle

        lines_before, bytes_before = out.lines, out.bytes
        sup_before = cpu_seconds(supervisor)
        work_before = sum(cpu_seconds(pid) for pid in workers)
        statuses: list[int] = []
        lock = threading.Lock()
        left = [args.requests]

        def client() -> None:
            while True:
                with lock:
                    if not left[0]:
                        return
                    left[0] -= 1
                status = chat(api_port)
                with lock:
                    statuses.append(status)

        started = time.monotonic()
        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        # Every settled request's lines have crossed the relay.
        while out.lines - lines_before < 2 * args.requests and time.monotonic() - started < 120:
            time.sleep(0.05)
        wall = time.monotonic() - started
        supervisor_cpu = cpu_seconds(supervisor) - sup_before
        workers_cpu = sum(cpu_seconds(pid) for pid in workers) - work_before
        lines = out.lines - lines_before
        relayed_bytes = out.bytes - bytes_before
        relay_cpu = max(0.0, supervisor_cpu - idle_rate * wall)

        daemon.terminate()
        daemon.wait(30)
        mock.terminate()
        mock.wait(10)
        ok = statuses.count(200) == args.requests
        print(json.dumps({
            "workers": args.workers,
            "requests": args.requests,
            "answered_200": statuses.count(200),
            "wall_s": round(wall, 2),
            "requests_per_s": round(args.requests / wall, 1),
            "audit_lines": lines,
            "audit_lines_by_worker": out.by_worker,
            "audit_bytes": relayed_bytes,
            "supervisor_idle_cpu_per_s_ms": round(idle_rate * 1000, 3),
            "supervisor_cpu_s": round(supervisor_cpu, 3),
            "relay_cpu_us_per_line": round(relay_cpu / max(lines, 1) * 1e6, 2),
            "relay_cpu_us_per_request": round(relay_cpu / args.requests * 1e6, 2),
            "workers_cpu_us_per_request": round(workers_cpu / args.requests * 1e6, 1),
            "relay_share_of_workers_cpu_pct": round(100 * relay_cpu / max(workers_cpu, 1e-9), 2),
            "supervisor_exit": daemon.returncode,
        }, indent=1))
        return 0 if ok else 1
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
