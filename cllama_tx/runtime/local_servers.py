"""
Wiring the discovery of local model servers (L{cllama_tx.discovery}) into
the daemon: its settings from the environment (a bad one stops the start),
an HTTP client of its own whose connections are neither kept nor logged
(probes touch many ports, once), and the proxy's own ports, which are
never probed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from twisted.web.client import HTTPConnectionPool

from cllama_tx.discovery import host
from cllama_tx.discovery.docker_client import DockerApi
from cllama_tx.discovery.probe import Prober, probe_agent
from cllama_tx.discovery.service import Discovery
from cllama_tx.discovery.settings import SettingsError, from_env
from cllama_tx.runtime.config import Config, endpoint_port
from cllama_tx.runtime.errors import ConfigError
from cllama_tx.runtime.twisted_private import quiet_pool

#: The Docker daemon may take a moment to list many containers.
DOCKER_TIMEOUT = 5.0


def own_ports(config: Config, listeners: Iterable) -> list[int]:
    """The API's and the UI's TCP ports: as configured, and as bound (port 0 is chosen at bind)."""
    ports = [p for p in (endpoint_port(config.api_endpoint), endpoint_port(config.ui_endpoint)) if p]
    for listener in listeners:
        bound = getattr(listener, "port", None)
        address = bound.getHost() if bound is not None else None
        if address is not None and hasattr(address, "port"):
            ports.append(address.port)
    return ports


def build_discovery(config: Config, reactor, registry, ports: Callable[[], Iterable[int]]) -> Discovery | None:
    """
    The discovery service when the operator turned it on (never in demo
    mode), else None.

    @raise ConfigError: a discovery setting cannot be understood.
    """
    try:
        settings = from_env(config.env)
    except SettingsError as e:
        raise ConfigError(str(e)) from None
    if not settings.enabled or config.demo:
        return None
    pool = HTTPConnectionPool(reactor, persistent=False)
    quiet_pool(pool)
    agent = probe_agent(reactor, pool, settings.probe_timeout)
    docker = None
    if settings.docker_socket is not None:
        docker = DockerApi(reactor, settings.docker_socket, max(settings.probe_timeout, DOCKER_TIMEOUT), pool=pool)
    method = host.method()
    listening = None
    if settings.port_scan and method is not None:
        listening = lambda: host.read_listening(reactor)  # noqa: E731
    return Discovery(
        settings,
        reactor,
        registry,
        Prober(reactor, agent, settings.probe_timeout),
        listening=listening,
        docker=docker,
        own_ports=ports,
        scan_method=method,
    )
