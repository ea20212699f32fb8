#!/usr/bin/env python3
"""
Probe: can one agent harm the others through the shared provider key?

Starts the real daemon (C{twistd -n cllama}) with one OpenAI key in front of
a fake provider that judges requests as OpenAI does (401
C{mismatched_organization} for a foreign C{OpenAI-Organization}, 401
C{invalid_api_key} for a revoked key), then:

1. the issue's probe: one agent sends a bogus C{OpenAI-Organization}; then
   C{--agents} other agents send a request each; prints every status and the
   key's state;
2. a provider error that echoes the request's headers: does the agent get
   the operator's key?
3. a 429 for C{gpt-4o}: is C{gpt-4o-mini} still served by the same key?
4. with C{--recovery}: the provider revokes the key, a request dies on it,
   the provider restores it; how long until the key is back by itself
   (the first re-probe is 30 s after the death)?

    .venv/bin/python bench/probe_keys.py --agents 5 --recovery

With C{--daemon-tree} the daemon runs from another source tree, e.g. the
revision before the fix, to see the issue's behaviour:

    mkdir /tmp/before && git archive 3e9330b | tar -x -C /tmp/before
    .venv/bin/python bench/probe_keys.py --daemon-tree /tmp/before

Exit status 0 when every probe came out as it should, 1 otherwise.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

KEY = "sk-probe-shared-key-0123456789abcdef"
UI_TOKEN = "probe-keys-ui-token-0042"
SECRET = "3b" * 24


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Provider:
    """The fake provider in a reactor thread, with switches the probes flip."""

    def __init__(self) -> None:
        from twisted.internet import reactor
        from twisted.internet.threads import blockingCallFromThread

        from cllama_tx.testing import (
            FakeProvider,
            Reply,
            echo_headers_error,
            openai_error,
            presented_key,
            strict_provider,
        )

        self.valid = {KEY}
        self.limited: set[str] = set()
        strict = strict_provider(self.valid)
        echo = echo_headers_error(400)

        def respond(received):
            doc = received.json if isinstance(received.json, dict) else {}
            if doc.get("user") == "echo":
                return echo(received)
            if doc.get("model") in self.limited and presented_key(received) in self.valid:
                return Reply(
                    status=429,
                    headers={"retry-after": "20"},
                    json=openai_error(f"Rate limit reached for {doc['model']}", "requests", "rate_limit_exceeded"),
                )
            return strict(received)

        self._reactor = reactor
        self._thread = threading.Thread(target=reactor.run, kwargs={"installSignalHandlers": False}, daemon=True)
        self._thread.start()
        self.fake = FakeProvider(reactor, responder=respond)
        blockingCallFromThread(reactor, self.fake.start)
        self.base_url = self.fake.base_url

    def received(self) -> list:
        return list(self.fake.received)

    def stop(self) -> None:
        from twisted.internet.threads import blockingCallFromThread

        blockingCallFromThread(self._reactor, self.fake.stop)
        self._reactor.callFromThread(self._reactor.stop)
        self._thread.join(5)


def start_daemon(tree: str, base_url: str, agents: list[str], work: str) -> tuple[subprocess.Popen, int, int, str]:
    root = os.path.join(work, "context")
    for agent in agents:
        os.makedirs(os.path.join(root, agent))
        with open(os.path.join(root, agent, "metadata.json"), "w") as f:
            json.dump({"token": f"{agent}:{SECRET}", "pod": "probe", "service": agent}, f)
    api, ui = free_port(), free_port()
    env = {
        "PATH": os.environ.get("PATH", ""),
        "PYTHONPATH": tree,
        "LISTEN_ADDR": f"127.0.0.1:{api}",
        "UI_ADDR": f"127.0.0.1:{ui}",
        "CLAW_CONTEXT_ROOT": root,
        "CLAW_AUTH_DIR": os.path.join(work, "auth"),
        "CLLAMA_STATE_DIR": os.path.join(work, "state"),
        "CLLAMA_UI_TOKEN": UI_TOKEN,
        "OPENAI_API_KEY": KEY,
        "OPENAI_BASE_URL": base_url,
    }
    os.makedirs(env["CLAW_AUTH_DIR"])
    log_path = os.path.join(work, "daemon.log")
    daemon = subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "twistd"), "--pidfile=", "-n", "cllama"],
        stdin=subprocess.DEVNULL, stdout=open(os.path.join(work, "audit.jsonl"), "wb"),
        stderr=open(log_path, "wb"), env=env, cwd=work,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", api, timeout=1)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                conn.close()
                return daemon, api, ui, log_path
        except OSError:
            time.sleep(0.05)
    daemon.kill()
    raise SystemExit("the daemon did not answer /health in time")


def chat(api: int, agent: str, model: str = "openai/gpt-4o-mini", headers=None, **extra) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", api, timeout=30)
    body = {"model": model, "messages": [{"role": "user", "content": "hello"}], **extra}
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={
        "Authorization": f"Bearer {agent}:{SECRET}", "Content-Type": "application/json", **(headers or {}),
    })
    response = conn.getresponse()
    data = response.read()
    out = (response.status, dict(response.getheaders()), data)
    conn.close()
    return out


def key_state(ui: int) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", ui, timeout=10)
    conn.request("GET", "/api/status", headers={"Authorization": f"Bearer {UI_TOKEN}"})
    doc = json.loads(conn.getresponse().read())
    conn.close()
    for provider in doc.get("providers", []):
        if provider["name"] == "openai" and provider["keys"]:
            return provider["keys"][0]
    return {}


def code_of(data: bytes) -> str:
    try:
        error = json.loads(data).get("error") or {}
    except ValueError:
        return "?"
    return error.get("code") or error.get("type") or "-"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=5, help="other agents served after the hostile one")
    parser.add_argument("--recovery", action="store_true", help="also time a dead key's recovery (about 30 s)")
    parser.add_argument("--daemon-tree", default=REPO, help="source tree the daemon runs from")
    args = parser.parse_args()

    provider = Provider()
    others = [f"agent-{i:02d}" for i in range(args.agents)]
    someone = others[0] if others else "hostile"
    ok = True
    audit: list[dict] = []
    leaked_in_logs = False

    def fresh_daemon():
        """Each part gets its own daemon: one part's dead key must not hide the next."""
        work = tempfile.mkdtemp(prefix="probe-keys-")
        daemon, api, ui, log_path = start_daemon(args.daemon_tree, provider.base_url, ["hostile", *others], work)

        def stop() -> None:
            nonlocal leaked_in_logs
            daemon.terminate()
            daemon.wait(15)
            with open(os.path.join(work, "audit.jsonl"), "rb") as f:
                audit.extend(json.loads(line) for line in f if b'"provider_pool"' in line)
            with open(log_path, "rb") as f:
                leaked_in_logs = leaked_in_logs or KEY.encode() in f.read()
            shutil.rmtree(work, ignore_errors=True)

        return api, ui, stop

    print(f"daemon from {args.daemon_tree}; one shared key; fake provider at {provider.base_url}")
    try:
        print("1. the issue's probe: a bogus OpenAI-Organization, then everyone else")
        api, ui, stop = fresh_daemon()
        try:
            status, _, data = chat(api, "hostile", headers={"OpenAI-Organization": "org-bogus"})
            forwarded = [r.header("openai-organization") for r in provider.received()]
            print(f"   hostile agent (OpenAI-Organization: org-bogus): {status} {code_of(data)}")
            print(f"   organization headers the provider saw: {forwarded}")
            statuses = []
            for agent in others:
                status_o, _, data_o = chat(api, agent)
                statuses.append((status_o, code_of(data_o)))
            served = sum(1 for s, _ in statuses if s == 200)
            print(f"   other agents: {served}/{len(others)} served; statuses {sorted(set(statuses))}")
            state = key_state(ui)
            print(f"   the key: {state.get('state')} (last error {state.get('last_error_code')} {state.get('last_error_reason')})")
            ok = ok and served == len(others) and state.get("state") == "ready" and not any(forwarded)
        finally:
            stop()

        print("2. a provider error that echoes the request's headers")
        api, ui, stop = fresh_daemon()
        try:
            status, headers, data = chat(api, someone, user="echo")
            leaked = KEY.encode() in data or any(KEY in v for v in headers.values())
            print(f"   status {status}; the key in what the agent got: {'YES' if leaked else 'no'}; "
                  f"'[redacted]' in the body: {b'[redacted]' in data}")
            ok = ok and not leaked
        finally:
            stop()

        print("3. a 429 for gpt-4o, then gpt-4o-mini on the same key")
        api, ui, stop = fresh_daemon()
        try:
            provider.limited.add("gpt-4o")
            status_a, headers_a, data_a = chat(api, "hostile", model="openai/gpt-4o")
            status_b, _, data_b = chat(api, someone, model="openai/gpt-4o-mini")
            retry = headers_a.get("Retry-After") or headers_a.get("retry-after")
            print(f"   gpt-4o: {status_a} {code_of(data_a)} Retry-After {retry}")
            print(f"   gpt-4o-mini: {status_b} {code_of(data_b) if status_b != 200 else 'served'}")
            ok = ok and status_b == 200
        finally:
            provider.limited.clear()
            stop()

        if args.recovery:
            print("4. the provider revokes the key, then restores it")
            api, ui, stop = fresh_daemon()
            try:
                provider.valid.clear()
                status, headers, data = chat(api, "hostile")
                died = time.monotonic()
                retry = headers.get("Retry-After") or headers.get("retry-after")
                print(f"   request on the revoked key: {status} {code_of(data)} Retry-After {retry}")
                state = key_state(ui)
                print(f"   the key: {state.get('state')}, next re-probe {state.get('next_probe_at')}")
                provider.valid.add(KEY)
                back = None
                while time.monotonic() - died < 45:
                    if key_state(ui).get("state") == "ready":
                        back = time.monotonic() - died
                        break
                    time.sleep(0.5)
                status, _, _ = chat(api, someone)
                print(f"   back by itself after {back:.1f} s; next request {status}" if back is not None
                      else f"   still not back after 45 s; next request {status}")
                ok = ok and back is not None and status == 200
            finally:
                provider.valid.add(KEY)
                stop()

        print("provider_pool audit lines: " + (", ".join(
            f"{line['action']}" + (f"({line['model']})" if line.get("model") else "") for line in audit
        ) or "none"))
        print(f"the key in the daemons' logs: {'YES' if leaked_in_logs else 'no'}")
        ok = ok and not leaked_in_logs
    finally:
        provider.stop()
    print("result:", "every agent kept its service and no key leaked" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
