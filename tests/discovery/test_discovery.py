"""
Discovery over real sockets: fake Ollama, vLLM, LM Studio and
OpenAI-compatible servers on loopback ports, found on the listed
addresses, by the port scan reading this machine's real /proc/net/tcp
(restricted to the fakes' ports, so no one else's server is probed), and
through a fake Docker API on a UNIX socket; what is not a model server
(an SSH-like banner, a silent port, a web server) quietly skipped; a
server that goes away marked gone and its provider refused clearly, then
served again; the registry, resolution and /v1/models listing seeing it.
And, with a clock, that probing is bounded and rounds never overlap.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from twisted.internet import defer, protocol, reactor, task
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import HTTPConnectionPool

from cllama_tx.discovery import host
from cllama_tx.discovery.docker_client import DockerApi
from cllama_tx.discovery.netstat import ListeningSocket
from cllama_tx.discovery.probe import Found, Miss, Prober, probe_agent
from cllama_tx.discovery.service import Discovery
from cllama_tx.discovery.settings import DiscoverySettings
from cllama_tx.governance.resolution import Router
from cllama_tx.providers.registry import ProviderNotConfigured, ProviderRegistry, UnknownProvider
from cllama_tx.testing.local_servers import FakeDockerApi, FakeLocalServer, container

OLLAMA_MODELS = ["llama3.2:latest", "nomic-embed-text:latest"]
VLLM_MODELS = ["Qwen/Qwen2.5-7B-Instruct"]


class _Banner(protocol.Protocol):
    """An SSH-like service: it speaks first, and not HTTP."""

    def connectionMade(self):
        self.transport.write(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n")


class _Silent(protocol.Protocol):
    """Accepts and never says a word."""


class _Tracking(protocol.Factory):
    noisy = False

    def __init__(self, proto):
        self.protocol = proto
        self.open = []

    def buildProtocol(self, addr):
        p = super().buildProtocol(addr)
        self.open.append(p)
        return p


def _listen(testcase, proto) -> int:
    factory = _Tracking(proto)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    testcase.addCleanup(port.stopListening)
    testcase.addCleanup(lambda: [p.transport.abortConnection() for p in factory.open if p.transport.connected])
    return port.getHost().port


class DiscoveryTests(TestCase):
    timeout = 30

    def setUp(self):
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(self.pool.closeCachedConnections)
        self.registry = ProviderRegistry({}, None, reactor)

    @defer.inlineCallbacks
    def fake(self, kind, models, port=0):
        server = FakeLocalServer(reactor, kind, models, port=port)
        yield server.start()
        self.addCleanup(server.stop)
        return server

    def discovery(self, settings, **kwargs):
        prober = Prober(reactor, probe_agent(reactor, self.pool, settings.probe_timeout), settings.probe_timeout)
        found = Discovery(settings, reactor, self.registry, prober, **kwargs)
        # Not started: each test asks for its rounds (rediscover), nothing scheduled behind its back.
        return found

    @defer.inlineCallbacks
    def test_listed_pairs_become_keyless_providers_with_their_models(self):
        ollama = yield self.fake("ollama", OLLAMA_MODELS)
        vllm = yield self.fake("vllm", VLLM_MODELS)
        settings = DiscoverySettings(
            enabled=True, targets=(("127.0.0.1", ollama.port), ("localhost", vllm.port)), port_scan=False,
            docker_socket=None,
        )
        discovery = self.discovery(settings)
        snapshot = yield discovery.rediscover()
        by_name = {s["name"]: s for s in snapshot}
        o, v = f"local-ollama-{ollama.port}", f"local-vllm-{vllm.port}"
        self.assertEqual(sorted(by_name), sorted([o, v]))
        self.assertEqual(
            {k: by_name[o][k] for k in ("kind", "base_url", "found_by", "models", "state", "container")},
            {"kind": "ollama", "base_url": f"http://127.0.0.1:{ollama.port}/v1", "found_by": "listed",
             "models": OLLAMA_MODELS, "state": "up", "container": None},
        )
        self.assertEqual((by_name[v]["kind"], by_name[v]["base_url"], by_name[v]["models"]),
                         ("vllm", f"http://localhost:{vllm.port}/v1", VLLM_MODELS))
        self.assertLess(abs(by_name[o]["last_seen"] - reactor.seconds()), 5)
        # Ollama is known by its tags; vLLM by its list's owner (no third GET).
        self.assertEqual(ollama.probed, ["/api/tags"])
        self.assertEqual(vllm.probed, ["/api/tags", "/v1/models"])
        self.assertEqual(ollama.received, [])  # nothing but GETs, and no credential anywhere

        # The registry serves them as keyless OpenAI-format providers.
        resolved = self.registry.resolve(o)
        self.assertEqual((resolved.spec.base_url, resolved.spec.auth, resolved.spec.api_format),
                         (f"http://127.0.0.1:{ollama.port}/v1", "none", "openai"))
        self.assertTrue(resolved.pool.keyless)
        self.assertTrue(self.registry.configured(v))
        self.assertTrue(self.registry.known(v))
        self.assertIn(o, self.registry.names())
        self.assertEqual(self.registry.discovered_models(), {o: tuple(OLLAMA_MODELS), v: tuple(VLLM_MODELS)})
        # Resolution: <provider>/<model> is exact (rule 4), and the lists name them.
        router = Router(providers=self.registry)
        resolution = router.resolve(None, f"{o}/llama3.2:latest", None, None)
        self.assertEqual((str(resolution.ref), resolution.steps), (f"{o}/llama3.2:latest", ()))
        listed = router.models_for(None, None)
        self.assertEqual(
            [m for m in listed if m.startswith("local-")],
            sorted([f"{o}/{m}" for m in OLLAMA_MODELS]) + [f"{v}/{m}" for m in VLLM_MODELS]
            if o < v else [f"{v}/{m}" for m in VLLM_MODELS] + [f"{o}/{m}" for m in OLLAMA_MODELS],
        )

    @defer.inlineCallbacks
    def test_port_scan_reads_this_hosts_socket_table(self):
        if host.method() != "proc":
            raise AssertionError("these tests read Linux's /proc/net/tcp")
        ollama = yield self.fake("ollama", OLLAMA_MODELS)
        generic = yield self.fake("openai", ["phi-4"])
        lmstudio = yield self.fake("lmstudio", ["qwen2.5-7b-instruct"])
        llamacpp = yield self.fake("llamacpp", ["qwen2.5-7b-instruct-q4_k_m.gguf"])
        web = yield self.fake("web", [])  # an HTTP server that is not a model server
        own = yield self.fake("ollama", ["must-not-be-probed"])  # stands for the proxy's own port
        banner, silent = _listen(self, _Banner), _listen(self, _Silent)
        ports = [s.port for s in (ollama, generic, lmstudio, llamacpp, web, own)] + [banner, silent]
        settings = DiscoverySettings(
            enabled=True, ports=tuple((p, p) for p in ports), excluded=frozenset(), docker_socket=None,
            probe_timeout=0.5,
        )
        read = []

        def listening():
            d = host.read_listening(reactor)
            d.addCallback(lambda sockets: read.append(sockets) or sockets)
            return d

        discovery = self.discovery(settings, listening=listening, own_ports=lambda: [own.port], scan_method="proc")
        snapshot = yield discovery.rediscover()
        # The real table was read: it holds every fake's listening socket (and others').
        self.assertTrue({ListeningSocket("127.0.0.1", p).port for p in ports} <= {s.port for s in read[0]})
        found = {s["name"]: (s["kind"], s["found_by"], s["models"]) for s in snapshot}
        self.assertEqual(
            found,
            {
                f"local-ollama-{ollama.port}": ("ollama", "port_scan", OLLAMA_MODELS),
                f"local-openai-{generic.port}": ("openai", "port_scan", ["phi-4"]),
                f"local-lmstudio-{lmstudio.port}": ("lmstudio", "port_scan", ["qwen2.5-7b-instruct"]),
                f"local-llamacpp-{llamacpp.port}": ("llamacpp", "port_scan", ["qwen2.5-7b-instruct-q4_k_m.gguf"]),
            },
        )
        self.assertEqual(own.probed, [])
        self.assertEqual(web.probed, ["/api/tags", "/v1/models"])
        self.assertEqual(generic.probed, ["/api/tags", "/v1/models", "/api/v0/models"])
        last = discovery.status()["last_round"]
        self.assertEqual((last["probed"], last["found"], last["problems"], last["forced"]), (7, 4, {}, True))

        # A scheduled round leaves alone what is no model server (and lasts).
        yield discovery.rediscover(forced=False)
        self.assertEqual(web.probed, ["/api/tags", "/v1/models"])
        self.assertEqual(discovery.status()["last_round"]["probed"], 4)
        # An operator's round probes everything again.
        yield discovery.rediscover()
        self.assertEqual(web.probed, ["/api/tags", "/v1/models"] * 2)
        self.assertEqual(len(discovery.snapshot()), 4)

    @defer.inlineCallbacks
    def test_a_server_that_goes_away_is_gone_then_back(self):
        ollama = yield self.fake("ollama", OLLAMA_MODELS)
        port = ollama.port
        name = f"local-ollama-{port}"
        settings = DiscoverySettings(enabled=True, targets=(("127.0.0.1", port),), port_scan=False, docker_socket=None)
        discovery = self.discovery(settings)
        yield discovery.rediscover()
        yield ollama.stop()
        snapshot = yield discovery.rediscover()
        self.assertEqual([(s["name"], s["state"]) for s in snapshot], [(name, "gone")])
        self.assertIsNotNone(snapshot[0]["gone_since"])
        # Disabled, not forgotten: a clear refusal, never another provider.
        with self.assertRaises(ProviderNotConfigured) as caught:
            self.registry.resolve(name)
        self.assertIn(f"the local model server {name} (http://127.0.0.1:{port}/v1) has not answered since",
                      caught.exception.message)
        self.assertTrue(self.registry.configured(name))
        self.assertNotIn(name, self.registry.names())
        self.assertEqual(self.registry.discovered_models(), {})
        self.assertEqual(Router(providers=self.registry).models_for(None, None), [])
        with self.assertRaises(UnknownProvider):
            self.registry.resolve("local-ollama-1")

        again = yield self.fake("ollama", OLLAMA_MODELS, port=port)
        snapshot = yield discovery.rediscover()
        self.assertEqual([(s["name"], s["state"], s["gone_since"]) for s in snapshot], [(name, "up", None)])
        self.assertEqual(self.registry.resolve(name).spec.base_url, f"http://127.0.0.1:{again.port}/v1")

    @defer.inlineCallbacks
    def test_docker_containers_of_the_compose_project(self):
        ollama = yield self.fake("ollama", OLLAMA_MODELS)
        vllm = yield self.fake("vllm", VLLM_MODELS)
        web = yield self.fake("web", [])
        directory = tempfile.mkdtemp(prefix="cllama-docker-", dir="/tmp")  # a UNIX socket path is short
        self.addCleanup(shutil.rmtree, directory, True)
        api = FakeDockerApi(reactor, os.path.join(directory, "docker.sock"), [
            # Reached at its network address (the proxy on the same network).
            container("pod-ollama-1", ports=[(ollama.port, None)], address="127.0.0.1", project="pod", service="ollama"),
            # Its network address does not answer here: reached at the port published on loopback.
            container("pod-vllm-1", ports=[(8000, vllm.port)], address="127.0.0.9", project="pod", service="vllm"),
            container("pod-web-1", ports=[(web.port, None)], address="127.0.0.1", project="pod", service="web"),
            container("other-ollama-1", ports=[(ollama.port, None)], address="127.0.0.1", project="other"),
        ])
        yield api.start()
        self.addCleanup(api.stop)
        settings = DiscoverySettings(enabled=True, port_scan=False, docker_socket=api.path, docker_project="pod")
        docker = DockerApi(reactor, api.path, 2.0, pool=self.pool)
        discovery = self.discovery(settings, docker=docker)
        snapshot = yield discovery.rediscover()
        found = {s["name"]: (s["kind"], s["found_by"], s["container"], s["base_url"]) for s in snapshot}
        self.assertEqual(
            found,
            {
                "docker-ollama": ("ollama", "docker", "pod-ollama-1", f"http://127.0.0.1:{ollama.port}/v1"),
                "docker-vllm": ("vllm", "docker", "pod-vllm-1", f"http://127.0.0.1:{vllm.port}/v1"),
            },
        )
        self.assertEqual(len(api.requests), 1)
        self.assertIn("com.docker.compose.project%3Dpod", api.requests[0])
        self.assertEqual(web.probed, ["/api/tags", "/v1/models"])
        self.assertEqual(discovery.status()["docker"], {"socket": api.path, "present": True, "project": "pod"})

        # The API failing is said; the containers' servers are probed where they were.
        yield api.stop()
        with open(api.path, "w"):
            pass  # a file where the socket was: present, but nobody answers
        snapshot = yield discovery.rediscover()
        self.assertIn("cannot reach the Docker API", discovery.status()["last_round"]["problems"]["docker"])
        self.assertEqual({s["name"]: s["state"] for s in snapshot}, {"docker-ollama": "up", "docker-vllm": "up"})
        yield vllm.stop()
        snapshot = yield discovery.rediscover()
        self.assertEqual({s["name"]: s["state"] for s in snapshot}, {"docker-ollama": "up", "docker-vllm": "gone"})

    @defer.inlineCallbacks
    def test_the_proxys_own_ports_are_never_probed(self):
        own = yield self.fake("ollama", OLLAMA_MODELS)
        settings = DiscoverySettings(
            enabled=True, targets=(("127.0.0.1", own.port),), ports=((own.port, own.port),), docker_socket=None,
        )
        discovery = self.discovery(
            settings, listening=lambda: defer.succeed([ListeningSocket("0.0.0.0", own.port)]),
            own_ports=lambda: [own.port],
        )
        self.assertEqual((yield discovery.rediscover()), [])
        self.assertEqual(own.probed, [])


class _ControlledProber:
    """Probes that answer when the test says."""

    def __init__(self):
        self.pending: list[tuple[str, int, defer.Deferred]] = []
        self.most = 0

    def probe(self, host, port):
        d = defer.Deferred()
        self.pending.append((host, port, d))
        self.most = max(self.most, len([p for p in self.pending if not p[2].called]))
        return d

    def answer_all(self, kind="openai"):
        for _host, port, d in list(self.pending):
            if not d.called:
                d.callback(Found(kind, ("m",)) if port % 2 == 0 else Miss("no", True))


class ScheduleTests(SynchronousTestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.prober = _ControlledProber()
        self.registry = ProviderRegistry({}, None, self.clock)
        sockets = [ListeningSocket("127.0.0.1", 20000 + i, inode=i) for i in range(10)]
        self.settings = DiscoverySettings(enabled=True, ports=((20000, 20009),), docker_socket=None, concurrency=3,
                                          interval=30.0)
        self.discovery = Discovery(self.settings, self.clock, self.registry, self.prober,
                                   listening=lambda: defer.succeed(sockets))

    def test_probes_are_capped_and_rounds_follow_the_interval(self):
        self.discovery.startService()
        self.addCleanup(self.discovery.stopService)
        self.assertEqual(self.prober.pending, [])
        self.clock.advance(0)
        self.assertEqual(len(self.prober.pending), 3)  # the cap
        while len([p for p in self.prober.pending if not p[2].called]):
            self.prober.answer_all()
        self.assertEqual(self.prober.most, 3)
        self.assertEqual(len(self.prober.pending), 10)
        self.assertEqual(sorted(s["name"] for s in self.discovery.snapshot()),
                         sorted(f"local-openai-{20000 + i}" for i in range(0, 10, 2)))
        self.assertEqual(self.discovery.status()["next_round_at"], 30.0)
        self.clock.advance(30)
        # The next round skips the five sockets that are no model server.
        self.assertEqual(len(self.prober.pending), 13)

    def test_asking_during_a_round_runs_one_more_after_it(self):
        first = self.discovery.rediscover()
        second = self.discovery.rediscover()
        third = self.discovery.rediscover()
        self.assertEqual(len(self.prober.pending), 3)
        self.prober.answer_all()
        self.prober.answer_all()
        self.prober.answer_all()
        self.prober.answer_all()
        self.assertEqual(len(self.successResultOf(first)), 5)
        self.assertNoResult(second)
        self.assertEqual(len(self.prober.pending), 13)  # one round after, not two
        while not second.called:
            self.prober.answer_all()
        self.assertEqual(self.successResultOf(second), self.successResultOf(third))
        self.assertEqual(self.discovery.rounds, 2)

    def test_stopping_cancels_what_is_in_flight(self):
        self.discovery.startService()
        self.clock.advance(0)
        waiting = self.discovery.rediscover()
        self.discovery.stopService()
        self.assertTrue(all(d.called for _, _, d in self.prober.pending))
        self.assertEqual(self.successResultOf(waiting), [])
        self.assertEqual(self.clock.getDelayedCalls(), [])
