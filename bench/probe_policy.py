"""
What the policy plane costs a request, in the real daemon: three daemons
side by side against one fake provider (no policy; the fake policy sidecar
allowing everything; an in-process plugin allowing everything), requests
sent to them in turn so that the machine's noise falls on all three alike.
Then a sidecar that holds one agent's gate: what another agent's requests
take meanwhile.

    .venv/bin/python bench/probe_policy.py [--requests 300]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import treq  # noqa: E402
from probe_daemon import Daemon  # noqa: E402
from twisted.internet import defer, reactor, task  # noqa: E402
from twisted.web.client import Agent, HTTPConnectionPool  # noqa: E402

from cllama_tx.testing import FakeProvider  # noqa: E402
from cllama_tx.testing.policy import FakePolicySidecar, PolicyReply, allow  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
AGENTS = {"bench": "9f1c" * 12, "other": "5b5b" * 12}
PLUGIN = """
from zope.interface import implementer
from cllama_tx.interfaces import IRequestPolicy


@implementer(IRequestPolicy)
class AllowAll:
    def gate_request(self, call):
        return None

    def decorate(self, call):
        return None

    def gate_response(self, call):
        return None


def make(host):
    return AllowAll()
"""
BODY = json.dumps({"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello"}]}).encode()


def contexts(root: str) -> None:
    for agent, secret in AGENTS.items():
        os.makedirs(os.path.join(root, agent))
        with open(os.path.join(root, agent, "metadata.json"), "w") as f:
            json.dump({"token": f"{agent}:{secret}"}, f)


@defer.inlineCallbacks
def spawn(base: str, name: str, provider: FakeProvider, env: dict) -> defer.Deferred:
    state = os.path.join(base, name)
    os.makedirs(state)
    full = {
        "PATH": os.environ.get("PATH", ""), "PYTHONPATH": f"{REPO}{os.pathsep}{base}",
        "LISTEN_ADDR": "tcp:0:interface=127.0.0.1", "UI_ADDR": "127.0.0.1:0",
        "CLAW_CONTEXT_ROOT": os.path.join(base, "context"), "CLAW_AUTH_DIR": state, "CLLAMA_STATE_DIR": state,
        "OPENAI_API_KEY": "sk-bench-provider", "OPENAI_BASE_URL": provider.base_url,
        "CLLAMA_UI_TOKEN": "bench-ui-token-000000", **env,
    }
    daemon = Daemon()
    transport = reactor.spawnProcess(daemon, TWISTD, [TWISTD, "--pidfile=", "-n", "cllama"], env=full, path=REPO)
    ports = yield daemon.ready
    return daemon, transport, f"http://127.0.0.1:{ports['API']}/v1/chat/completions"


@defer.inlineCallbacks
def timed(http, url: str, agent: str = "bench") -> defer.Deferred:
    started = time.perf_counter()
    response = yield http.post(url, data=BODY, headers={
        "Authorization": [f"Bearer {agent}:{AGENTS[agent]}"], "Content-Type": ["application/json"]})
    yield response.content()
    if response.code != 200:
        raise RuntimeError(f"{url}: {response.code}")
    return (time.perf_counter() - started) * 1000


def summary(samples: list[float]) -> str:
    samples = sorted(samples)
    p95 = samples[int(len(samples) * 0.95) - 1]
    return f"median {statistics.median(samples):6.2f} ms   p95 {p95:6.2f} ms   (n={len(samples)})"


@defer.inlineCallbacks
def main(reactor_, requests: int) -> defer.Deferred:
    base = tempfile.mkdtemp(prefix="cllama-policy-bench-")
    contexts(os.path.join(base, "context"))
    with open(os.path.join(base, "bench_allow_all.py"), "w") as f:
        f.write(PLUGIN)
    provider = FakeProvider(reactor, strict=False)
    yield provider.start()
    sidecar = FakePolicySidecar(reactor)
    yield sidecar.start()
    pool = HTTPConnectionPool(reactor, persistent=True)
    http = treq.client.HTTPClient(Agent(reactor, pool=pool))
    configs = {
        "no policy": {},
        "sidecar (allow all)": {"CLLAMA_POLICY_URL": sidecar.url, "CLLAMA_POLICY_TIMEOUT_MS": "2000"},
        "plugin (allow all)": {"CLLAMA_POLICY_PLUGIN": "bench_allow_all:make"},
    }
    daemons = {}
    try:
        for name, env in configs.items():
            daemons[name] = yield spawn(base, name.split()[0], provider, env)
        samples: dict[str, list[float]] = {name: [] for name in configs}
        for _ in range(20):  # warm up every path
            for name in configs:
                yield timed(http, daemons[name][2])
        for _ in range(requests):
            for name in configs:
                samples[name].append((yield timed(http, daemons[name][2])))
        print(f"sequential chat requests, keep-alive, {requests} per daemon, in turn:")
        for name in configs:
            print(f"  {name:22} {summary(samples[name])}")
        print(f"  sidecar calls: {len(sidecar.received)} (gate-request, decorate, gate-response, score per request)")

        # One agent's gate held by the sidecar: the other agent's requests meanwhile,
        # next to the same requests just before.
        url = daemons["sidecar (allow all)"][2]
        before = []
        for _ in range(min(requests, 200)):
            before.append((yield timed(http, url, "other")))
        held = defer.Deferred()
        sidecar.answer("gate-request", lambda call: PolicyReply(json={"verdict": "allow"}, hold_until=held)
                       if call.json["agent_id"] == "bench" else allow())
        stuck = [timed(http, url, "bench") for _ in range(10)]
        for d in stuck:
            d.addErrback(lambda _: None)
        yield sidecar.arrived("gate-request", count=len(sidecar.calls("gate-request")) + 10)
        during = []
        for _ in range(min(requests, 200)):
            during.append((yield timed(http, url, "other")))
        held.callback(None)
        yield defer.DeferredList(stuck)
        print("another agent's requests on the sidecar daemon:")
        print(f"  {'just before':22} {summary(before)}")
        print(f"  {'while 10 wait on a held gate':22} {summary(during)}")
    finally:
        for daemon, transport, _ in daemons.values():
            transport.signalProcess("TERM")
            yield daemon.ended
        yield pool.closeCachedConnections()
        yield sidecar.stop()
        yield provider.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    task.react(main, [args.requests])
