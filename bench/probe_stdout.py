#!/usr/bin/env python3
"""
Probe: does the daemon keep serving when nobody reads its stdout?

Starts the real daemon (C{twistd -n cllama --demo}, so no provider
is needed) with stdout (and, with C{--stall both}, stderr too) connected to
a pipe that nobody reads, the way a stalled log shipper leaves it.  Then it
sends C{--requests} chat requests one after the other, each with a
C{--timeout}, and times C{GET /health} along the way.  A daemon that blocks
on its own output stops answering once the pipe (64 KiB on Linux) is full.

Finally it starts reading the pipe (the shipper comes back) and reports the
C{audit_gap} line and C{cllama_audit_lines_dropped_total}.

    .venv/bin/python bench/probe_stdout.py --requests 3000 --buffer 256KiB

Exit status 0 when every request and health check was answered, 1 otherwise.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_TOKEN = "demo:cllama-demo"
UI_TOKEN = "probe-ui-token-000000"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(port: int, method: str, path: str, body: bytes | None, headers: dict, timeout: float):
    """(status, body) or raises (socket.timeout when the daemon does not answer)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def chat(port: int, timeout: float):
    body = json.dumps({"model": "demo/echo-1", "messages": [{"role": "user", "content": "ping"}]}).encode()
    headers = {"Authorization": f"Bearer {DEMO_TOKEN}", "Content-Type": "application/json"}
    return request(port, "POST", "/v1/chat/completions", body, headers, timeout)


def wait_healthy(port: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            if request(port, "GET", "/health", None, {}, 1.0)[0] == 200:
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError("the daemon did not answer /health in time")


def drain(fd: int, into: bytearray, stop: threading.Event) -> None:
    """Read C{fd} until EOF or C{stop} (the shipper that came back)."""
    while not stop.is_set():
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            data = os.read(fd, 65536)
            if not data:
                return
            into.extend(data)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000, help="chat requests to send (default 2000)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds each request may take (default 3)")
    parser.add_argument("--health-every", type=int, default=100, help="time GET /health every N requests")
    parser.add_argument("--buffer", default=None, help="CLLAMA_AUDIT_BUFFER for the daemon (default: its own)")
    parser.add_argument("--stall", choices=("stdout", "both"), default="stdout",
                        help="which output nobody reads: stdout (the audit) or both stdout and stderr")
    args = parser.parse_args()

    api, ui = free_port(), free_port()
    state = tempfile.mkdtemp(prefix="probe-stdout-")
    env = {
        "PATH": os.environ.get("PATH", ""),
        "PYTHONPATH": REPO,
        "LISTEN_ADDR": f"127.0.0.1:{api}",
        "UI_ADDR": f"127.0.0.1:{ui}",
        "CLLAMA_STATE_DIR": state,
        "CLLAMA_UI_TOKEN": UI_TOKEN,
    }
    if args.buffer:
        env["CLLAMA_AUDIT_BUFFER"] = args.buffer
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    daemon = subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "twistd"), "--pidfile=", "-n", "cllama", "--demo"],
        stdin=subprocess.DEVNULL, stdout=out_w, stderr=err_w, env=env, cwd=state,
    )
    os.close(out_w)
    os.close(err_w)
    stop_reading = threading.Event()
    err_text = bytearray()
    if args.stall == "stdout":
        threading.Thread(target=drain, args=(err_r, err_text, threading.Event()), daemon=True).start()
    try:
        try:
            wait_healthy(api, time.monotonic() + 30)
        except TimeoutError as e:
            time.sleep(0.5)
            raise SystemExit(f"{e}; its stderr:\n{bytes(err_text).decode(errors='replace')}") from None
        served, failed_at, health = 0, None, []
        started = time.monotonic()
        for i in range(args.requests):
            try:
                status, body = chat(api, args.timeout)
            except OSError as e:
                failed_at = (i, f"{type(e).__name__}: {e}")
                break
            if status != 200 or b"chat.completion" not in body:
                failed_at = (i, f"status {status}: {body[:200]!r}")
                break
            served += 1
            if i % args.health_every == 0:
                t0 = time.monotonic()
                try:
                    ok = request(api, "GET", "/health", None, {}, args.timeout)[0] == 200
                except OSError:
                    ok = False
                health.append((time.monotonic() - t0) * 1000 if ok else None)
        elapsed = time.monotonic() - started
        try:
            t0 = time.monotonic()
            request(api, "GET", "/health", None, {}, args.timeout)
            health.append((time.monotonic() - t0) * 1000)
        except OSError:
            health.append(None)
        answered = [h for h in health if h is not None]
        print(f"stalled: {args.stall}; buffer: {args.buffer or 'default'}")
        print(f"requests served: {served}/{args.requests} in {elapsed:.1f} s"
              + (f"; first failure at request {failed_at[0] + 1}: {failed_at[1]}" if failed_at else ""))
        print(f"health checks answered: {len(answered)}/{len(health)}"
              + (f"; latency ms max {max(answered):.1f}, median {sorted(answered)[len(answered) // 2]:.1f}" if answered else ""))

        # The shipper comes back: read everything and look for the gap line.
        audit = bytearray()
        reader = threading.Thread(target=drain, args=(out_r, audit, stop_reading), daemon=True)
        reader.start()
        if args.stall == "both":
            threading.Thread(target=drain, args=(err_r, err_text, threading.Event()), daemon=True).start()
        metric = None
        deadline = time.monotonic() + 15
        gap, seen, quiet_since = None, -1, time.monotonic()
        while time.monotonic() < deadline and gap is None:
            time.sleep(0.1)
            for line in bytes(audit).splitlines():
                if b'"audit_gap"' in line:
                    gap = json.loads(line)
                    break
            if len(audit) != seen:
                seen, quiet_since = len(audit), time.monotonic()
            elif time.monotonic() - quiet_since > 2:
                break  # everything read, and no gap line
        try:
            status, text = request(ui, "GET", "/metrics", None, {"Authorization": f"Bearer {UI_TOKEN}"}, args.timeout)
            for line in text.decode().splitlines():
                if line.startswith("cllama_audit_lines_dropped_total"):
                    metric = float(line.split()[-1])
        except OSError as e:
            metric = f"unreachable ({e})"
        lines = bytes(audit).count(b"\n")
        print(f"after reading resumed: {lines} audit lines read; gap line: {json.dumps(gap) if gap else 'none'}")
        print(f"cllama_audit_lines_dropped_total: {metric}")
        if args.stall == "both":
            gaps = [line for line in bytes(err_text).decode(errors="replace").splitlines() if "log lines dropped" in line]
            print(f"stderr gap lines: {gaps[:3]}")
        return 0 if failed_at is None and len(answered) == len(health) else 1
    finally:
        stop_reading.set()
        daemon.send_signal(signal.SIGKILL)
        daemon.wait()
        shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
