#!/usr/bin/env python3
"""
Probe: bad request bodies, and what a single request tells about which
agents exist.

1. Starts the real daemon (C{twistd -n cllama}) over a context root of
   C{--agents} agents plus one with a budget, and sends it the bodies that
   used to answer 500 or to be forwarded (JSON nested 1,000 levels, a
   C{max_tokens} of 1e400 or of 10**400 for the budgeted agent, C{NaN},
   C{"stream": "true"}) on both surfaces: each should be a 400 in the
   surface's shape, with no traceback in the daemon's log.
2. Over the same daemon, times the first request of each existing agent
   (never asked for before, wrong secret) against a request for a missing
   agent, interleaved on one keep-alive connection, and reports the median
   of each and their difference.
3. In process: the same comparison on L{ContextRegistry.authenticate}
   alone (and, with C{--before <git revision>}, on that revision's
   registry), and the cost of reading a body (C{json.loads} before, the
   strict parse, depth bound and field checks now) for a small, a
   4 KiB and a 140 KiB chat request.

    .venv/bin/python bench/probe_input.py --agents 300 --before 3e9330b

With C{--daemon-tree} the daemon runs from another source tree, so parts 1
and 2 can be compared with an older revision:

    mkdir /tmp/before && git archive 3e9330b | tar -x -C /tmp/before
    .venv/bin/python bench/probe_input.py --daemon-tree /tmp/before

Exit status 0 when every bad body got its 400, 1 otherwise.  Takes about
half a minute.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
import types

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

SECRET = "5e" * 24
WRONG = "00" * 24
BUDGETED = "budgeted"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_root(root: str, agents: list[str]) -> None:
    for agent in agents + [BUDGETED]:
        os.makedirs(os.path.join(root, agent))
        metadata = {"token": f"{agent}:{SECRET}", "pod": "probe", "service": agent}
        if agent == BUDGETED:
            metadata["budget"] = {"limit_usd": 5, "window": "1h", "behavior": "hard_stop"}
        with open(os.path.join(root, agent, "metadata.json"), "w") as f:
            json.dump(metadata, f)


def start_daemon(root: str, state: str, tree: str) -> tuple[subprocess.Popen, int, str]:
    api, ui = free_port(), free_port()
    env = {
        "PATH": os.environ.get("PATH", ""),
        "PYTHONPATH": tree,
        "LISTEN_ADDR": f"127.0.0.1:{api}",
        "UI_ADDR": f"127.0.0.1:{ui}",
        "CLAW_CONTEXT_ROOT": root,
        "CLAW_AUTH_DIR": os.path.join(state, "auth"),
        "CLLAMA_STATE_DIR": os.path.join(state, "state"),
        # Never reached: every probe request is refused before it goes upstream.
        "OPENAI_API_KEY": "sk-probe-not-real",
        "OPENAI_BASE_URL": "http://127.0.0.1:9/v1",
        "ANTHROPIC_API_KEY": "sk-ant-probe-not-real",
        "ANTHROPIC_BASE_URL": "http://127.0.0.1:9/v1",
    }
    os.makedirs(env["CLAW_AUTH_DIR"])
    log_path = os.path.join(state, "daemon.log")
    daemon = subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "twistd"), "--pidfile=", "-n", "cllama"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=open(log_path, "wb"), env=env, cwd=state,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", api, timeout=1)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                conn.close()
                return daemon, api, log_path
        except OSError:
            time.sleep(0.05)
    daemon.kill()
    raise SystemExit("the daemon did not answer /health in time")


def post(conn: http.client.HTTPConnection, path: str, body: bytes, agent: str, secret: str) -> tuple[int, bytes]:
    conn.request("POST", path, body=body, headers={
        "Authorization": f"Bearer {agent}:{secret}", "Content-Type": "application/json",
    })
    response = conn.getresponse()
    return response.status, response.read()


def bad_bodies() -> list[tuple[str, str, bytes]]:
    chat = b'{"model":"openai/gpt-4o-mini","messages":[{"role":"user","content":"hi"}],'
    messages = b'{"model":"anthropic/claude-sonnet-4-5","max_tokens":64,"messages":[{"role":"user","content":"hi"}],'
    cases = [
        ("nested 1,000 levels", b'"x":' + b"[" * 1000 + b"]" * 1000 + b"}"),
        ("max_tokens 1e400", b'"max_tokens":1e400}'),
        ("max_tokens 10**400", b'"max_tokens":1' + b"0" * 400 + b"}"),
        ("temperature NaN", b'"temperature":NaN}'),
        ("top_p Infinity", b'"top_p":Infinity}'),
        ('stream "true"', b'"stream":"true"}'),
    ]
    out = []
    for name, tail in cases:
        out.append(("/v1/chat/completions", name, chat + tail))
        if name != "max_tokens 10**400":
            out.append(("/v1/messages", name, messages + tail))
        else:
            # The messages body already has max_tokens: replace it.
            out.append(("/v1/messages", name, messages.replace(b'"max_tokens":64,', b"") + tail))
    return out


def probe_bodies(api: int, log_path: str) -> bool:
    print("1. bad bodies, budgeted agent, real daemon")
    conn = http.client.HTTPConnection("127.0.0.1", api, timeout=10)
    ok = True
    for path, name, body in bad_bodies():
        status, answer = post(conn, path, body, BUDGETED, SECRET)
        try:
            doc = json.loads(answer)
        except ValueError:
            doc = {}
        error = doc.get("error", {})
        shape = "openai" if "code" in error else ("anthropic" if doc.get("type") == "error" else "?")
        good = status == 400 and shape == ("openai" if path.endswith("completions") else "anthropic")
        ok = ok and good
        print(f"   {path:22} {name:20} {status} {shape:9} {error.get('code', error.get('type'))}: {error.get('message')}")
    conn.close()
    with open(log_path, "rb") as f:
        tracebacks = f.read().count(b"Traceback")
    print(f"   tracebacks in the daemon's log: {tracebacks}")
    return ok and tracebacks == 0


def probe_daemon_timing(api: int, agents: list[str]) -> None:
    print(f"2. first request of an existing agent vs a missing one, real daemon, {len(agents)} pairs")
    conn = http.client.HTTPConnection("127.0.0.1", api, timeout=10)
    body = json.dumps({"model": "openai/gpt-4o-mini", "messages": []}).encode()
    for i in range(50):  # warm the connection and the code paths
        post(conn, "/v1/chat/completions", body, f"warm{i}", WRONG)
    known, missing = [], []
    clock = time.perf_counter_ns
    for i, agent in enumerate(agents):
        pair = [(agent, known), (f"ghost{i:05d}", missing)]
        if i % 2:
            pair.reverse()
        for name, into in pair:
            start = clock()
            status, _ = post(conn, "/v1/chat/completions", body, name, WRONG)
            into.append(clock() - start)
            assert status == 403, status
    conn.close()
    report(known, missing)


def report(known: list[int], missing: list[int]) -> None:
    k, m = statistics.median(known) / 1000, statistics.median(missing) / 1000
    print(f"   median existing {k:.1f} us, missing {m:.1f} us, difference {k - m:+.1f} us")


def load_registry_module(revision: str | None):
    from cllama_tx.identity import contexts

    if revision is None:
        return contexts
    source = subprocess.run(
        ["git", "-C", REPO, "show", f"{revision}:cllama_tx/identity/contexts.py"],
        check=True, capture_output=True, text=True,
    ).stdout
    module = types.ModuleType(f"contexts_at_{revision}")
    exec(compile(source, module.__name__, "exec"), module.__dict__)
    return module


def probe_registry(agents: int, revision: str | None) -> None:
    from twisted.internet.task import Clock
    from twisted.logger import Logger

    module = load_registry_module(revision)
    root = tempfile.mkdtemp(prefix="probe-contexts-")
    try:
        names = [f"agent{i:05d}" for i in range(agents)]
        write_root(root, names)
        registry = module.ContextRegistry(root, Clock(), log=Logger(observer=lambda event: None))
        known, missing = [], []
        clock = time.perf_counter_ns
        for i, agent in enumerate(names):
            for name, into in ((agent, known), (f"ghost{i:05d}", missing)):
                start = clock()
                registry.authenticate(name, WRONG)
                into.append(clock() - start)
        label = revision or "this tree"
        print(f"3a. authenticate() in process, {agents} first requests each ({label})")
        report(known, missing)
        if hasattr(registry, "scan_slices"):
            slices, start = [], clock()
            for _ in registry.scan_slices():
                slices.append(clock() - start)
                start = clock()
            slices.append(clock() - start)
            print(f"   one background scan of {agents + 1} agents (nothing changed): {sum(slices) / 1e6:.2f} ms "
                  f"in {len(slices)} reactor turns, the longest {max(slices) / 1e6:.2f} ms")
    finally:
        shutil.rmtree(root)


def probe_parse() -> None:
    from cllama_tx.surfaces.validate import check_fields, parse_body

    small = json.dumps({"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello"}],
                        "temperature": 0.2}).encode()
    turns = []
    for i in range(150):
        turns.append({"role": "user", "content": f"look at file {i} and fix the bug " * 5})
        turns.append({"role": "assistant", "content": None, "tool_calls": [{
            "id": f"c{i}", "type": "function",
            "function": {"name": "read", "arguments": json.dumps({"path": f"/x/{i}", "o": {"a": [1, {"b": 3}]}})}}]})
        turns.append({"role": "tool", "tool_call_id": f"c{i}", "content": "result " * 40})
    tools = [{"type": "function", "function": {"name": f"t{i}", "description": "d" * 100, "parameters": {
        "type": "object", "properties": {"a": {"type": "array", "items": {"type": "object", "properties": {
            "b": {"type": "string"}}}}}, "required": ["a"]}}} for i in range(20)]
    medium = json.dumps({"model": "openai/gpt-4o", "messages": turns[:12], "tools": tools[:4], "max_tokens": 500}).encode()
    large = json.dumps({"model": "openai/gpt-4o", "messages": turns, "tools": tools, "max_tokens": 1000}).encode()
    print("3b. reading a request body: json.loads (before) vs parse_body + check_fields (now)")
    for name, raw in (("small", small), ("4 KiB", medium), ("140 KiB", large)):
        number = 20000 if len(raw) < 1000 else (2000 if len(raw) < 10000 else 100)

        def best(fn, number=number) -> float:
            return min(timeit.repeat(fn, number=number, repeat=7)) / number * 1e6

        before = best(lambda raw=raw: json.loads(raw))
        now = best(lambda raw=raw: check_fields(parse_body(raw), "openai"))
        print(f"   {name:8} ({len(raw):>7} bytes): before {before:8.2f} us, now {now:8.2f} us, "
              f"added {now - before:+7.2f} us ({(now - before) / before * 100:+.0f}%)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", type=int, default=300, help="agents in the context root (default 300)")
    parser.add_argument("--before", default=None, help="a git revision whose registry to time in process too")
    parser.add_argument("--daemon-tree", default=REPO,
                        help="run the daemon from this source tree, e.g. an older revision from "
                             "'git archive REV | tar -x -C DIR' (default: this one)")
    args = parser.parse_args()

    state = tempfile.mkdtemp(prefix="probe-input-")
    root = os.path.join(state, "context")
    agents = [f"agent{i:05d}" for i in range(args.agents)]
    write_root(root, agents)
    daemon, api, log_path = start_daemon(root, state, os.path.abspath(args.daemon_tree))
    try:
        ok = probe_bodies(api, log_path)
        probe_daemon_timing(api, agents)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait()
        shutil.rmtree(state, ignore_errors=True)
    probe_registry(args.agents, None)
    if args.before:
        probe_registry(args.agents, args.before)
    probe_parse()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
