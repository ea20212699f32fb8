#!/usr/bin/env python3
"""
What a discovery round costs (docs/DISCOVERY.md): run with the project's
virtualenv from the work tree, C{.venv/bin/python bench/probe_discovery.py}.

It starts fake local model servers (Ollama and vLLM, alternately) on
loopback ports and lists them, with as many ports nothing listens on, as
discovery targets; then runs rounds back to back and prints each round's
duration and the longest turn the reactor took meanwhile (the fakes answer
from the same reactor, so their own work is in that figure too).  And the
per-request cost the registry's discovered layer adds: C{resolve} of a
catalog provider with and without the layer, and of a discovered server.

Options: C{--servers 8 --models 20 --closed 200 --rounds 5}.
"""

from __future__ import annotations

import argparse
import socket
import time
import timeit

from twisted.internet import defer, task
from twisted.web.client import HTTPConnectionPool

from cllama_tx.discovery.probe import Prober, probe_agent
from cllama_tx.discovery.registered import DiscoveredProviders, Served
from cllama_tx.discovery.service import Discovery
from cllama_tx.discovery.settings import DiscoverySettings
from cllama_tx.providers.registry import ProviderRegistry
from cllama_tx.runtime.twisted_private import quiet_pool
from cllama_tx.testing.local_servers import FakeLocalServer


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request_path_cost() -> None:
    clock = task.Clock()
    plain = ProviderRegistry({"OPENAI_API_KEY": "sk-bench"}, None, clock)
    layered = ProviderRegistry({"OPENAI_API_KEY": "sk-bench"}, None, clock)
    layered.discovered = DiscoveredProviders(clock)
    layered.discovered.update([Served(f"local-ollama-{11434 + i}", f"http://127.0.0.1:{11434 + i}/v1", ("m",))
                               for i in range(3)], {})
    n = 1_000_000
    for label, registry, name in (("catalog, no layer", plain, "openai"), ("catalog, with layer", layered, "openai"),
                                  ("discovered server", layered, "local-ollama-11435")):
        seconds = timeit.timeit(lambda r=registry, p=name: r.resolve(p), number=n)
        print(f"registry.resolve ({label}): {seconds / n * 1e9:.0f} ns")


@defer.inlineCallbacks
def rounds(reactor, options):
    fakes = []
    for i in range(options.servers):
        fake = FakeLocalServer(reactor, ("ollama", "vllm")[i % 2], [f"model-{j}:latest" for j in range(options.models)])
        yield fake.start()
        fakes.append(fake)
    pool = HTTPConnectionPool(reactor, persistent=False)
    quiet_pool(pool)
    targets = tuple(("127.0.0.1", f.port) for f in fakes) + tuple(("127.0.0.1", _closed_port()) for _ in range(options.closed))
    settings = DiscoverySettings(enabled=True, targets=targets, port_scan=False, docker_socket=None)
    discovery = Discovery(settings, reactor, None, Prober(reactor, probe_agent(reactor, pool, 1.0), 1.0))
    last, gaps = [time.perf_counter()], []

    def tick():
        now = time.perf_counter()
        gaps.append(now - last[0])
        last[0] = now

    ticker = task.LoopingCall(tick)
    ticker.start(0.001)
    took = []
    for _ in range(options.rounds):
        yield discovery.rediscover()
        took.append(discovery.status()["last_round"]["duration_ms"])
    ticker.stop()
    found = discovery.status()["last_round"]["found"]
    print(f"round over {options.servers} servers x {options.models} models + {options.closed} closed ports: "
          f"{', '.join(f'{t:.1f}' for t in took)} ms ({found} found)")
    print(f"longest reactor turn meanwhile: {max(gaps) * 1000:.1f} ms")
    for fake in fakes:
        yield fake.stop()
    yield pool.closeCachedConnections()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", type=int, default=8)
    parser.add_argument("--models", type=int, default=20)
    parser.add_argument("--closed", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    options = parser.parse_args()
    request_path_cost()
    task.react(rounds, [options])


if __name__ == "__main__":
    main()
