#!/usr/bin/env python3
"""
Probes of the ledger against the real daemon (issue 12, item 4), with a fake
provider (bench/slowmock.py, answering at once) in front of it.

  wal        Steady load (wrk, 32 connections, --duration seconds, default
             150) while the WAL's size is sampled every 50 ms; prints the
             largest WAL seen, the requests served and the rows committed.
             Needs wrk.
  full-disk  The state directory on a small tmpfs (root only: it mounts
             one), filled to the last byte once the daemon runs; --requests
             (26) metered requests are sent, readiness and /api/health are
             read, the space is freed, and the rows are counted: served,
             committed, lost.  Then a restart shows the spend was kept.

Usage:  .venv/bin/python bench/probe_ledger.py wal [--duration 150]
        .venv/bin/python bench/probe_ledger.py full-disk [--requests 26]
Everything it starts (processes, the mount) is stopped on exit.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PYTHON = REPO / ".venv" / "bin" / "python"
AGENT = "probe"
SECRET = "3c" * 24
TOKEN = f"{AGENT}:{SECRET}"
UI_TOKEN = "probe-ui-token-0001"
BODY = json.dumps({"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})

_children: list[subprocess.Popen] = []


def log(message: str) -> None:
    print(f"probe: {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], **kw) -> subprocess.Popen:
    p = subprocess.Popen(cmd, start_new_session=True, **kw)
    _children.append(p)
    return p


def stop(p: subprocess.Popen, grace: float = 20.0) -> int:
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    if p in _children:
        _children.remove(p)
    return p.returncode


def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None):
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise SystemExit(f"probe: timed out waiting for {what}")


class Daemon:
    """The mock and the real daemon (python -m twisted cllama), in a temp dir."""

    def __init__(self, tmp: Path, state: Path, extra_env: dict | None = None) -> None:
        self.tmp, self.state = tmp, state
        self.mock_port = free_port()
        self.mock = start([str(PYTHON), str(HERE / "slowmock.py"), str(self.mock_port), "--delay-ms", "0"])
        context = tmp / "context" / AGENT
        context.mkdir(parents=True, exist_ok=True)
        (context / "metadata.json").write_text(json.dumps({"token": TOKEN, "pod": "probe"}))
        (tmp / "auth").mkdir(exist_ok=True)
        prices = tmp / "prices.json"
        prices.write_text(json.dumps({"openai": {"gpt-4o-mini": {"input": 2.0, "output": 8.0}}}))
        self.env = {
            "PATH": os.environ.get("PATH", ""),
            "PYTHONPATH": str(REPO),
            "CLAW_CONTEXT_ROOT": str(tmp / "context"),
            "CLAW_AUTH_DIR": str(tmp / "auth"),
            "CLLAMA_STATE_DIR": str(state),
            "CLLAMA_PRICING_FILE": str(prices),
            "CLLAMA_UI_TOKEN": UI_TOKEN,
            "CLLAMA_LEDGER_SPILL_DIR": str(tmp / "spill"),
            "OPENAI_API_KEY": "sk-probe-not-real",
            "OPENAI_BASE_URL": f"http://127.0.0.1:{self.mock_port}/v1",
            **(extra_env or {}),
        }
        self.proxy: subprocess.Popen | None = None

    def start(self) -> None:
        self.api, self.ui = free_port(), free_port()
        env = dict(self.env, LISTEN_ADDR=f"127.0.0.1:{self.api}", UI_ADDR=f"127.0.0.1:{self.ui}")
        self.log_path = self.tmp / f"proxy-{time.monotonic_ns()}.log"
        self.proxy = start(
            [str(PYTHON), "-m", "twisted", "--log-file=+", "--log-format=text", "cllama"],
            cwd=str(REPO), env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=open(self.log_path, "wb"),
        )

        def up() -> bool:
            if self.proxy.poll() is not None:
                raise SystemExit(f"probe: the daemon exited:\n{self.log_path.read_text()[-2000:]}")
            try:
                return http("GET", f"http://127.0.0.1:{self.api}/health")[0] == 200
            except OSError:
                return False

        wait_for(up, 30, "the daemon to answer /health")

    def stop(self) -> int:
        assert self.proxy is not None
        return stop(self.proxy)

    def chat(self) -> tuple[int, bytes]:
        return http(
            "POST", f"http://127.0.0.1:{self.api}/v1/chat/completions", BODY.encode(),
            {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
        )

    def readiness(self) -> tuple[int, dict]:
        status, body = http("GET", f"http://127.0.0.1:{self.api}/health/readiness")
        return status, json.loads(body)

    def api_health(self) -> tuple[int, dict]:
        status, body = http("GET", f"http://127.0.0.1:{self.ui}/api/health", headers={"Authorization": f"Bearer {UI_TOKEN}"})
        return status, json.loads(body)

    def costs(self) -> dict:
        return json.loads(http("GET", f"http://127.0.0.1:{self.ui}/costs/api", headers={"Authorization": f"Bearer {UI_TOKEN}"})[1])

    def rows(self) -> int:
        db = sqlite3.connect(f"file:{self.state / 'ledger.sqlite3'}?mode=ro", uri=True)
        try:
            return db.execute("SELECT COUNT(*) FROM requests").fetchone()[0]
        finally:
            db.close()


def probe_wal(args) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="probe-ledger-"))
    state = tmp / "state"
    daemon = Daemon(tmp, state)
    daemon.start()
    wal = state / "ledger.sqlite3-wal"
    samples: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            try:
                samples.append(wal.stat().st_size)
            except FileNotFoundError:
                samples.append(0)
            done.wait(0.05)

    lua = tmp / "chat.lua"
    lua.write_text(
        'wrk.method = "POST"\nwrk.body = ' + json.dumps(BODY) + '\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["Authorization"] = "Bearer {TOKEN}"\n'
    )
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    log(f"steady load: wrk -c{args.connections} for {args.duration} s")
    out = subprocess.run(
        ["wrk", "-t1", f"-c{args.connections}", f"-d{args.duration}s", "--timeout", "10s", "--latency", "-s", str(lua),
         f"http://127.0.0.1:{daemon.api}/v1/chat/completions"],
        capture_output=True, text=True, check=False,
    ).stdout
    done.set()
    sampler.join()
    rows = daemon.rows()
    code = daemon.stop()
    import re

    served = re.search(r"(\d+) requests in", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    mib = 1024 * 1024
    print(out.strip())
    print(
        json.dumps(
            {
                "requests_served": int(served.group(1)) if served else None,
                "non_2xx": int(errors.group(1)) if errors else 0,
                "rows_committed": rows,
                "wal_max_mib": round(max(samples) / mib, 2),
                "wal_last_mib": round(samples[-1] / mib, 2),
                "wal_samples": len(samples),
                "daemon_exit": code,
            }
        )
    )
    return 0


def fill(directory: Path) -> Path:
    """Fill C{directory}'s filesystem to the last byte with one file."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (1 << 20, 65536, 4096, 512, 1):  # down to the last partial block
            block = b"\0" * size
            while True:
                try:
                    if os.write(fd, block) < size:
                        break
                except OSError:
                    break
    finally:
        os.close(fd)
    return filler


def probe_full_disk(args) -> int:
    if os.geteuid() != 0:
        raise SystemExit("probe: full-disk mounts a tmpfs and must run as root")
    tmp = Path(tempfile.mkdtemp(prefix="probe-ledger-"))
    state = tmp / "state"
    state.mkdir(mode=0o700)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={args.size_kib}k,mode=0700", "tmpfs", str(state)], check=True)
    try:
        daemon = Daemon(tmp, state)
        daemon.start()
        rows_before = daemon.rows()
        filler = fill(state)
        log(f"state directory full ({filler.stat().st_size} bytes of filler); sending {args.requests} requests")
        statuses = [daemon.chat()[0] for _ in range(args.requests)]
        served = statuses.count(200)
        ready = daemon.readiness()
        health = daemon.api_health()
        rows_while_full = daemon.rows()
        filler.unlink()
        log("space freed")
        wait_for(lambda: daemon.readiness()[0] == 200, 30, "readiness to turn green")
        committed = daemon.rows() - rows_before
        costs_before = daemon.costs()
        code = daemon.stop()
        daemon.start()
        costs_after = daemon.costs()
        daemon.stop()
        stop(daemon.mock)
        print(
            json.dumps(
                {
                    "requests": args.requests,
                    "served": served,
                    "refused": {str(s): statuses.count(s) for s in sorted(set(statuses)) if s != 200},
                    "rows_committed_while_full": rows_while_full - rows_before,
                    "readiness_while_full": [ready[0], ready[1].get("db"), ready[1].get("ledger")],
                    "api_health_while_full": [health[0], health[1].get("ledger"), (health[1].get("ledger_storage") or {}).get("pending_rows")],
                    "committed_after_space_returned": committed,
                    "lost": served - committed,
                    "costs_total_requests_before_restart": costs_before["total_requests"],
                    "costs_total_requests_after_restart": costs_after["total_requests"],
                    "daemon_exit": code,
                },
                indent=1,
            )
        )
        return 0 if served == committed else 1
    finally:
        for p in reversed(list(_children)):
            stop(p)
        subprocess.run(["umount", "-l", str(state)], check=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="probe", required=True)
    wal = sub.add_parser("wal")
    wal.add_argument("--duration", type=int, default=150)
    wal.add_argument("--connections", type=int, default=32)
    full = sub.add_parser("full-disk")
    full.add_argument("--requests", type=int, default=26)
    full.add_argument("--size-kib", type=int, default=4096)
    args = parser.parse_args()
    try:
        return probe_wal(args) if args.probe == "wal" else probe_full_disk(args)
    finally:
        for p in reversed(list(_children)):
            stop(p)


if __name__ == "__main__":
    sys.exit(main())
