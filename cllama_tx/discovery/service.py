"""
The discovery scheduler: a round every C{interval} seconds (and one on
demand, L{Discovery.rediscover}) gathers candidates, probes them, names
what answers and updates the registry's layer of discovered providers.

One round:

 1. candidates: the listed C{host:port} pairs, then each running
    container's exposed ports (when the Docker socket is mounted), then
    this host's listening ports the settings allow (never the proxy's own);
    an address is probed once, as the first of these found it;
 2. probes, at most C{concurrency} at a time, each GET bounded by the
    probe timeout (L{cllama_tx.discovery.probe}); a container's port is
    tried at each of its addresses until one answers;
 3. the servers that answered are named (L{cllama_tx.discovery.servers})
    and served; those of earlier rounds that did not answer are marked
    C{gone} (their provider disabled: L{cllama_tx.discovery.registered}),
    and forgotten after L{FORGET_AFTER} seconds.

A scanned socket that is no model server (no HTTP, no model list, a key
wanted, no answer) is not probed again for L{NEGATIVE_TTL} seconds, unless
it is a new socket on that port or the round was asked for by an operator.
Rounds never overlap: asking during a round runs one more right after it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger

from cllama_tx.discovery import servers as naming
from cllama_tx.discovery.docker import Container
from cllama_tx.discovery.docker_client import DockerUnavailable
from cllama_tx.discovery.netstat import scan_targets
from cllama_tx.discovery.probe import Found, Miss
from cllama_tx.discovery.registered import DiscoveredProviders, Served
from cllama_tx.discovery.settings import DiscoverySettings

LISTED = "listed"
DOCKER = "docker"
PORT_SCAN = "port_scan"
UP = "up"
GONE = "gone"

#: Seconds a gone server is remembered (shown, its name refused clearly).
FORGET_AFTER = 86400.0
#: Seconds a scanned socket that is no model server is left alone.
NEGATIVE_TTL = 600.0
#: Ports the scan probes at most per round (the lowest first).
MAX_SCAN_PORTS = 1024


@attrs.define
class Server:
    """One discovered server, as the operator sees it."""

    name: str
    kind: str
    host: str
    port: int
    found_by: str
    models: tuple[str, ...]
    first_seen: float
    last_seen: float
    state: str = UP
    gone_since: float | None = None
    container: str | None = None
    # How it was found (its candidate): probed again there when Docker cannot be asked.
    origin: Any = attrs.field(default=None, eq=False, repr=False)

    @property
    def base_url(self) -> str:
        return naming.base_url(self.host, self.port)

    def view(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "base_url": self.base_url,
            "found_by": self.found_by,
            "models": list(self.models),
            "last_seen": self.last_seen,
            "state": self.state,
            "first_seen": self.first_seen,
            "gone_since": self.gone_since,
            "host": self.host,
            "port": self.port,
            "container": self.container,
        }


@attrs.frozen
class _Candidate:
    found_by: str
    endpoints: tuple[tuple[str, int], ...]
    container: Container | None = None
    container_port: int | None = None
    identity: tuple | None = None  # a scanned socket's


def _utc(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def _ports_text(ranges: Iterable[tuple[int, int]]) -> str:
    return ",".join(str(low) if low == high else f"{low}-{high}" for low, high in ranges)


class Discovery(Service):
    """
    See the module docstring.

    @param registry: the provider registry; its C{discovered} layer is set here.
    @param prober: a L{cllama_tx.discovery.probe.Prober}.
    @param listening: a callable returning a Deferred of this host's
        listening sockets (L{cllama_tx.discovery.host.read_listening}), or
        None when the port scan cannot run.
    @param docker: a L{cllama_tx.discovery.docker_client.DockerApi}, or None.
    @param own_ports: a callable returning the proxy's own ports (never probed).
    @param scan_method: how the sockets are read (C{proc}, C{lsof}), for the status.
    """

    name = "discovery"

    def __init__(
        self,
        settings: DiscoverySettings,
        clock,
        registry,
        prober,
        *,
        listening: Callable[[], defer.Deferred] | None = None,
        docker=None,
        own_ports: Callable[[], Iterable[int]] = tuple,
        scan_method: str | None = None,
        log: Logger | None = None,
    ) -> None:
        self.settings = settings
        self._clock = clock
        self._registry = registry
        self._prober = prober
        self._listening = listening
        self._docker = docker
        self._own_ports = own_ports
        self._scan_method = scan_method
        self._log = log if log is not None else Logger(namespace="cllama_tx.discovery")
        self.providers = DiscoveredProviders(clock)
        if registry is not None and hasattr(registry, "discovered"):
            registry.discovered = self.providers
        self._servers: dict[str, Server] = {}
        self._negative: dict[tuple, float] = {}
        self._timer: Any = None
        self._round: defer.Deferred | None = None
        self._probes: set[defer.Deferred] = set()
        self._again = False
        self._again_forced = False
        self._stopped = False
        self._waiters: list[defer.Deferred] = []
        self._next_waiters: list[defer.Deferred] = []
        self._last: dict[str, Any] | None = None
        self.rounds = 0

    # --- what the operator and the other parts read ---------------------------

    def snapshot(self) -> list[dict[str, Any]]:
        """
        Every server discovered (answering, then gone), each: C{name},
        C{kind}, C{base_url}, C{found_by}, C{models}, C{last_seen} (epoch
        seconds), C{state} (C{up}, C{gone}), and C{first_seen},
        C{gone_since}, C{host}, C{port}, C{container}.
        """
        servers = sorted(self._servers.values(), key=lambda s: (s.state != UP, s.name))
        return [server.view() for server in servers]

    def status(self) -> dict[str, Any]:
        """The settings in force and the last round, for the operator UI."""
        s = self.settings
        docker_present = self._docker.present() if self._docker is not None else False
        return {
            "enabled": True,
            "interval_s": s.interval,
            "probe_timeout_s": s.probe_timeout,
            "concurrency": s.concurrency,
            "targets": [f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in s.targets],
            "port_scan": {
                "on": s.port_scan and self._listening is not None,
                "method": self._scan_method,
                "ports": _ports_text(s.ports),
                "excluded": len(s.excluded),
            },
            "docker": {
                "socket": s.docker_socket,
                "present": docker_present,
                "project": s.docker_project,
            },
            "running": self._round is not None,
            "last_round": self._last,
            "next_round_at": self._timer.getTime() if self._timer is not None and self._timer.active() else None,
        }

    # --- the schedule ----------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._stopped = False
        # The first round once the reactor turns (the listeners are bound by then).
        self._schedule(0)

    def stopService(self):
        super().stopService()
        self._stopped = True
        self._cancel_timer()
        for probe in list(self._probes):
            probe.cancel()
        if self._round is not None:
            self._round.cancel()
        return None

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _schedule(self, delay: float) -> None:
        self._cancel_timer()
        if self.running:
            self._timer = self._clock.callLater(delay, self._start, False)

    def rediscover(self, forced: bool = True) -> defer.Deferred:
        """
        Run a round now (or right after the one running); a Deferred firing
        with L{snapshot} once it is over.  C{forced} (an operator asking):
        sockets earlier rounds found to be no model server are probed too.
        """
        d: defer.Deferred = defer.Deferred()
        if self._round is not None:
            self._again = True
            self._again_forced = self._again_forced or forced
            self._next_waiters.append(d)
        else:
            self._waiters.append(d)
            self._start(forced)
        return d

    def _start(self, forced: bool) -> None:
        self._cancel_timer()
        if self._round is not None:
            return
        self._round = defer.ensureDeferred(self._run(forced))
        self._round.addErrback(self._failed)
        self._round.addBoth(self._ended)

    def _failed(self, failure) -> None:
        if failure.check(defer.CancelledError) or not self.running:
            return None  # stopped mid-round
        self._log.failure("discovery round failed; the servers found before stay as they were", failure)
        return None

    def _ended(self, _: Any) -> None:
        # The finished round's answer, taken before anything else starts; the
        # waiters are told last, since one may ask for another round at once.
        self._round = None
        snapshot = self.snapshot()
        waiters, self._waiters = self._waiters, []
        if self._stopped:
            waiters += self._next_waiters
            self._next_waiters = []
            self._again = self._again_forced = False
        elif self._again:
            forced = self._again_forced
            self._again = self._again_forced = False
            self._waiters, self._next_waiters = self._next_waiters, []
            self._start(forced)
        else:
            self._schedule(self.settings.interval)
        for d in waiters:
            if not d.called:  # an operator who went away cancelled it
                d.callback(snapshot)

    # --- one round -----------------------------------------------------------------

    async def _run(self, forced: bool) -> None:
        started = self._clock.seconds()
        problems: dict[str, str] = {}
        candidates = await self._candidates(forced, problems)
        results = await self._probe_all(candidates)
        found = self._name(results)
        self._apply(found, started)
        self.rounds += 1
        self._last = {
            "started_at": started,
            "duration_ms": round((self._clock.seconds() - started) * 1000, 1),
            "forced": forced,
            "probed": len(candidates),
            "found": len(found),
            "problems": problems,
        }

    async def _candidates(self, forced: bool, problems: dict[str, str]) -> list[_Candidate]:
        own = set(self._own_ports())
        candidates: list[_Candidate] = []
        seen: set[tuple[str, int]] = set()

        def add(candidate: _Candidate) -> None:
            endpoints = tuple(e for e in candidate.endpoints if e not in seen)
            if endpoints:
                seen.update(endpoints)
                candidates.append(attrs.evolve(candidate, endpoints=endpoints))

        for host, port in self.settings.targets:
            if port in own and naming.is_loopback(host):
                continue  # the proxy itself
            add(_Candidate(LISTED, ((host, port),)))
        if self._docker is not None:
            if self._docker.present():
                try:
                    containers = await self._docker.containers(self.settings.docker_project)
                except DockerUnavailable as e:
                    problems[DOCKER] = str(e)
                    self._log.warn("discovery: {problem}", problem=str(e))
                    containers = []
                    # Not knowing is not gone: the containers' servers are asked where they were.
                    for server in self._servers.values():
                        if server.found_by == DOCKER and server.state == UP and server.origin is not None:
                            add(attrs.evolve(server.origin, endpoints=((server.host, server.port),)))
                for container in containers:
                    for exposed in container.ports:
                        add(_Candidate(DOCKER, exposed.endpoints, container, exposed.port))
        if self.settings.port_scan and self._listening is not None:
            try:
                sockets = await self._listening()
            except Exception as e:
                problems[PORT_SCAN] = f"cannot read this host's listening sockets: {e}"
                self._log.warn("discovery: {problem}", problem=problems[PORT_SCAN])
                sockets = []
            targets = scan_targets(sockets, self.settings.port_allowed, own)
            if len(targets) > MAX_SCAN_PORTS:
                problems[PORT_SCAN] = f"{len(targets)} listening ports: only the lowest {MAX_SCAN_PORTS} were probed"
                targets = targets[:MAX_SCAN_PORTS]
            now = self._clock.seconds()
            self._negative = {k: until for k, until in self._negative.items() if until > now}
            for target in targets:
                if not forced and target.identity in self._negative:
                    continue
                add(_Candidate(PORT_SCAN, ((target.host, target.port),), identity=target.identity))
        return candidates

    async def _probe_all(self, candidates: list[_Candidate]) -> list[tuple[_Candidate, tuple[str, int], Found]]:
        semaphore = defer.DeferredSemaphore(self.settings.concurrency)

        async def one(candidate: _Candidate) -> tuple[_Candidate, tuple[str, int], Found] | None:
            for host, port in candidate.endpoints:
                d = semaphore.run(self._prober.probe, host, port)
                self._probes.add(d)
                try:
                    outcome = await d
                finally:
                    self._probes.discard(d)
                if isinstance(outcome, Found):
                    return candidate, (host, port), outcome
                if isinstance(outcome, Miss) and outcome.lasting and candidate.identity is not None:
                    self._negative[candidate.identity] = self._clock.seconds() + NEGATIVE_TTL
            return None

        outcomes = await defer.gatherResults([defer.ensureDeferred(one(c)) for c in candidates], consumeErrors=True)
        return [o for o in outcomes if o is not None]

    def _name(self, results: list[tuple[_Candidate, tuple[str, int], Found]]) -> list[Server]:
        """Name what answered: listed first, then containers, then the scan."""
        now = self._clock.seconds()
        known = getattr(self._registry, "known_names", None)
        taken: set[str] = set(known()) if known is not None else set()
        per_container: dict[str, int] = {}
        for candidate, _, _ in results:
            if candidate.container is not None:
                per_container[candidate.container.name] = per_container.get(candidate.container.name, 0) + 1
        order = {LISTED: 0, DOCKER: 1, PORT_SCAN: 2}
        results = sorted(
            results,
            key=lambda r: (order[r[0].found_by], r[0].container.name if r[0].container else "", r[1][1], r[1][0]),
        )
        servers = []
        for candidate, (host, port), found in results:
            container = candidate.container
            if container is not None:
                name = naming.container_server_name(
                    container.base, candidate.container_port or port, container.number,
                    several=per_container[container.name] > 1,
                )
            else:
                name = naming.host_server_name(found.kind, host, port)
            name = naming.unique_name(name, taken)
            taken.add(name)
            servers.append(
                Server(
                    name=name, kind=found.kind, host=host, port=port, found_by=candidate.found_by,
                    models=found.models, first_seen=now, last_seen=now,
                    container=container.name if container is not None else None, origin=candidate,
                )
            )
        return servers

    def _apply(self, found: list[Server], started: float) -> None:
        now = self._clock.seconds()
        current = {server.name: server for server in found}
        for name, server in current.items():
            before = self._servers.get(name)
            if before is None or before.state != UP or before.base_url != server.base_url:
                self._log.info(
                    "discovery: {kind} server {name} at {url} ({found_by}) serves {count} model(s)",
                    kind=server.kind, name=name, url=server.base_url, found_by=server.found_by,
                    count=len(server.models),
                )
            elif before.models != server.models:
                self._log.info("discovery: {name} now serves {count} model(s)", name=name, count=len(server.models))
            if before is not None:
                server.first_seen = before.first_seen
            self._servers[name] = server
        for name, server in list(self._servers.items()):
            if name in current:
                continue
            if server.state == UP:
                server.state = GONE
                server.gone_since = now
                self._log.info(
                    "discovery: {name} ({url}) did not answer: marked gone, its provider disabled",
                    name=name, url=server.base_url,
                )
            elif server.gone_since is not None and now - server.gone_since > FORGET_AFTER:
                del self._servers[name]
        up = [Served(s.name, s.base_url, s.models) for s in self._servers.values() if s.state == UP]
        gone = {
            s.name: (
                f"the local model server {s.name} ({s.base_url}) has not answered since "
                f"{_utc(s.gone_since or started)}; it is served again once discovery finds it"
            )
            for s in self._servers.values()
            if s.state == GONE
        }
        self.providers.update(up, gone)
