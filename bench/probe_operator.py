#!/usr/bin/env python3
"""
Probe: how fast can a client guess an operator credential, and can the
guessing lock the operator out?

For each target it starts the real daemon (C{twistd -n cllama}, a fresh
one per target so they do not share the throttle), then guessers hammer
the target with wrong credentials for C{--seconds} from one loopback
address (C{--clients} keep-alive connections), or from 25 addresses for
the C{*-spread} targets.  Meanwhile an operator on another address
presents the right credential every 0.2 s.  Reported per target:

 - C{answers/s}: requests the daemon answered;
 - C{guesses/s}: wrong credentials it actually compared (each one is an
   C{auth_failed} or C{sign_in_failed} audit line): the guessing rate an
   attacker gets; the other answers are 429s given without comparing;
 - the operator's successes (and slowest answer) during the attack;
 - the right credential from the attacking address itself, and the
   C{Retry-After} it is told.

    .venv/bin/python bench/probe_operator.py --seconds 10

Targets: C{sign-in} (the UI's form), C{metrics} (UI bearer), C{history}
(C{/history/<agent>} on the API, UI token), C{key-info} and C{key-list}
(master key), C{history-spread} (25 addresses).  Exit status 0 when the
operator was never refused, 1 otherwise.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from urllib.parse import urlencode

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UI_TOKEN = "probe-operator-ui-token-3d4f9a1c2b"
MASTER_KEY = "sk-probe-operator-master-key-7e6d5c4b3a"
AGENT = "tiverton"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Daemon:
    def __init__(self, workdir: str) -> None:
        self.api = free_port()
        self.ui = free_port()
        context = os.path.join(workdir, "context", AGENT)
        os.makedirs(context)
        with open(os.path.join(context, "metadata.json"), "w") as f:
            json.dump({"token": f"{AGENT}:{'ab' * 24}"}, f)
        os.makedirs(os.path.join(workdir, "auth"))
        env = {
            "PATH": os.environ.get("PATH", ""),
            "PYTHONPATH": REPO,
            "LISTEN_ADDR": f"tcp:{self.api}:interface=127.0.0.1",
            "UI_ADDR": f"tcp:{self.ui}:interface=127.0.0.1",
            "CLAW_CONTEXT_ROOT": os.path.join(workdir, "context"),
            "CLAW_AUTH_DIR": os.path.join(workdir, "auth"),
            "CLLAMA_STATE_DIR": os.path.join(workdir, "state"),
            "CLAW_SESSION_HISTORY_DIR": os.path.join(workdir, "history"),
            "CLLAMA_UI_TOKEN": UI_TOKEN,
            "CLLAMA_MASTER_KEY": MASTER_KEY,
        }
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        self.stdout = open(os.path.join(workdir, "audit.jsonl"), "wb")
        self.process = subprocess.Popen(
            [twistd, "--pidfile=", "-n", "cllama"], env=env, cwd=REPO,
            stdout=self.stdout, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if call(self.api, "127.0.0.1", "GET", "/health", {})[0] == 200 and call(self.ui, "127.0.0.1", "GET", "/health", {})[0] == 200:
                    return
            except OSError:
                time.sleep(0.05)
        raise SystemExit("the daemon did not start")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(15)
        self.stdout.close()


def call(port: int, source: str, method: str, path: str, headers: dict, body: bytes | None = None, conn=None):
    """(status, headers, body); opens a connection from C{source} unless given one."""
    own = conn is None
    if own:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(source, 0))
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        if own:
            conn.close()


class Target:
    """One guessable thing: which port, and the request carrying a credential."""

    def __init__(self, name: str, site: str, method: str, path: str, kind: str) -> None:
        self.name, self.site, self.method, self.path, self.kind = name, site, method, path, kind

    def right(self) -> str:
        return MASTER_KEY if self.kind == "master" else UI_TOKEN

    def port(self, daemon: Daemon) -> int:
        return daemon.ui if self.site == "ui" else daemon.api

    def prepare(self, daemon: Daemon, source: str):
        """Per connection: the sign-in form's nonce (cookie and field), else nothing."""
        if self.name != "sign-in":
            return None
        status, headers, body = call(daemon.ui, source, "GET", "/signin", {"Accept": "text/html"})
        nonce = re.search(rb'name="csrf" value="([^"]+)"', body).group(1).decode()
        return nonce

    def request(self, credential: str, nonce) -> tuple[dict, bytes | None]:
        if self.name == "sign-in":
            body = urlencode({"csrf": nonce, "token": credential, "next": "/"}).encode()
            return {"Cookie": f"cllama_signin={nonce}", "Content-Type": "application/x-www-form-urlencoded", "Accept": "text/html"}, body
        return {"Authorization": f"Bearer {credential}"}, None

    def accepted(self, status: int) -> bool:
        return status == (303 if self.name == "sign-in" else 200)


TARGETS = {
    "sign-in": Target("sign-in", "ui", "POST", "/signin", "ui"),
    "metrics": Target("metrics", "ui", "GET", "/metrics", "ui"),
    "history": Target("history", "api", "GET", f"/history/{AGENT}", "ui"),
    "key-info": Target("key-info", "api", "GET", "/key/info", "master"),
    "key-list": Target("key-list", "api", "GET", "/key/list", "master"),
    "history-spread": Target("history", "api", "GET", f"/history/{AGENT}", "ui"),
}


def guesser(daemon: Daemon, target: Target, source: str, stop: threading.Event, counts: dict, lock: threading.Lock) -> None:
    port = target.port(daemon)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(source, 0))
    nonce = target.prepare(daemon, source)
    n = 0
    local: dict[int, int] = {}
    while not stop.is_set():
        n += 1
        headers, body = target.request(f"wrong-guess-{source}-{n}-{'x' * 24}", nonce)
        try:
            status, _, _ = call(port, source, target.method, target.path, headers, body, conn=conn)
        except (OSError, http.client.HTTPException):
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(source, 0))
            continue
        local[status] = local.get(status, 0) + 1
    conn.close()
    with lock:
        for status, count in local.items():
            counts[status] = counts.get(status, 0) + count


def operator(daemon: Daemon, target: Target, stop: threading.Event, results: list) -> None:
    source = "127.0.99.1"
    nonce = target.prepare(daemon, source)
    while not stop.is_set():
        headers, body = target.request(target.right(), nonce)
        started = time.monotonic()
        status, _, _ = call(target.port(daemon), source, target.method, target.path, headers, body)
        results.append((status, time.monotonic() - started))
        stop.wait(0.2)


def run(name: str, seconds: float, clients: int) -> dict:
    target = TARGETS[name]
    spread = name.endswith("-spread")
    with tempfile.TemporaryDirectory(prefix="cllama-probe-operator-") as workdir:
        daemon = Daemon(workdir)
        try:
            if target.name == "key-info":
                # A real key to look up, so the master key's answer is a 200.
                _, _, minted = call(daemon.api, "127.0.0.1", "POST", "/key/generate",
                                    {"Authorization": f"Bearer {MASTER_KEY}", "Content-Type": "application/json"}, b"{}")
                target = Target("key-info", "api", "GET", f"/key/info?key={json.loads(minted)['token_id']}", "master")
            sources = [f"127.0.1.{n}" for n in range(1, 26)] if spread else ["127.0.1.1"]
            per_source = max(1, clients // len(sources)) if spread else clients
            stop = threading.Event()
            counts: dict[int, int] = {}
            lock = threading.Lock()
            threads = [
                threading.Thread(target=guesser, args=(daemon, target, s, stop, counts, lock))
                for s in sources for _ in range(per_source)
            ]
            seen: list = []
            watcher = threading.Thread(target=operator, args=(daemon, target, stop, seen))
            started = time.monotonic()
            for t in threads:
                t.start()
            watcher.start()
            time.sleep(seconds)
            stop.set()
            for t in threads + [watcher]:
                t.join()
            elapsed = time.monotonic() - started
            # The right credential from the attacking address itself, now.
            nonce = target.prepare(daemon, sources[0])
            headers, body = target.request(target.right(), nonce)
            status, answer_headers, _ = call(target.port(daemon), sources[0], target.method, target.path, headers, body)
        finally:
            daemon.stop()
        audit = [json.loads(line) for line in open(os.path.join(workdir, "audit.jsonl"), "rb").read().splitlines() if line.strip()]
    answered = sum(counts.values())
    # Every compared wrong credential is an audit line (the sign-in form
    # answers a compared one with 429 too once the address must wait).
    compared = sum(1 for line in audit if line.get("action") in ("auth_failed", "sign_in_failed"))
    return {
        "target": name,
        "sources": len(sources),
        "connections": len(threads),
        "seconds": round(elapsed, 1),
        "answers_per_s": round(answered / elapsed, 1),
        "guesses_compared": compared,
        "guesses_per_s": round(compared / elapsed, 2),
        "refused_429": counts.get(429, 0),
        "answered_401": counts.get(401, 0),
        "other_statuses": {k: v for k, v in counts.items() if k not in (401, 403, 429)},
        "operator_accepted": sum(1 for s, _ in seen if target.accepted(s)),
        "operator_refused": sum(1 for s, _ in seen if not target.accepted(s)),
        "operator_slowest_ms": round(max((t for _, t in seen), default=0) * 1000, 1),
        "right_token_from_attacker": status,
        "attacker_retry_after": answer_headers.get("Retry-After"),
        "audit_auth_throttled": sum(1 for line in audit if line.get("action") in ("auth_throttled", "sign_in_throttled")),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="guessing time per target (default 10)")
    parser.add_argument("--clients", type=int, default=8, help="guessing connections per target (default 8; spread: 2 per address)")
    parser.add_argument("--targets", default=",".join(TARGETS), help="comma-separated, of: " + ", ".join(TARGETS))
    args = parser.parse_args()
    ok = True
    for name in args.targets.split(","):
        result = run(name.strip(), args.seconds, args.clients if not name.endswith("-spread") else 50)
        print(json.dumps(result), flush=True)
        ok = ok and result["operator_refused"] == 0 and result["operator_accepted"] > 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
