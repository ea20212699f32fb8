"""
The discovery settings, read from the environment once at start-up.

Discovery is off unless C{CLLAMA_DISCOVERY} turns it on: probing the
host's ports and containers is the operator's choice, never a default.
Pure: a mapping in, a frozen L{DiscoverySettings} (or L{SettingsError})
out.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping

import attrs

ENABLED = "CLLAMA_DISCOVERY"
TARGETS = "CLLAMA_DISCOVERY_TARGETS"
PORT_SCAN = "CLLAMA_DISCOVERY_PORT_SCAN"
PORTS = "CLLAMA_DISCOVERY_PORTS"
EXCLUDE_PORTS = "CLLAMA_DISCOVERY_EXCLUDE_PORTS"
DOCKER_SOCKET = "CLLAMA_DISCOVERY_DOCKER_SOCKET"
DOCKER_PROJECT = "CLLAMA_DISCOVERY_DOCKER_PROJECT"
INTERVAL = "CLLAMA_DISCOVERY_INTERVAL"
PROBE_TIMEOUT = "CLLAMA_DISCOVERY_PROBE_TIMEOUT"
CONCURRENCY = "CLLAMA_DISCOVERY_CONCURRENCY"

DEFAULT_INTERVAL = 60.0
MIN_INTERVAL = 1.0
DEFAULT_PROBE_TIMEOUT = 1.0
MAX_PROBE_TIMEOUT = 30.0
DEFAULT_CONCURRENCY = 16
DEFAULT_DOCKER_SOCKET = "/var/run/docker.sock"
# Model servers listen on unprivileged ports (Ollama 11434, LM Studio 1234,
# vLLM 8000, llama.cpp 8080); below 1024 live the system's own services.
DEFAULT_PORTS = ((1024, 65535),)
# Well-known ports of services that do not speak HTTP and may log an HTTP
# request as an attack or an error (Redis does): never probed.
DEFAULT_EXCLUDED = frozenset(
    {
        1433,  # SQL Server
        1521,  # Oracle
        2049,  # NFS
        3306,  # MySQL, MariaDB
        4369,  # Erlang port mapper
        5432,  # PostgreSQL
        5672,  # AMQP
        6379,  # Redis
        9042,  # Cassandra
        9092,  # Kafka
        11211,  # memcached
        25672,  # RabbitMQ distribution
        27017,  # MongoDB
    }
)

_OFF = ("0", "false", "no", "off")
_ON = ("1", "true", "yes", "on")
_HOST = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


class SettingsError(ValueError):
    """A discovery setting that cannot be understood; the message names it."""


@attrs.frozen
class DiscoverySettings:
    """What discovery does; see docs/DISCOVERY.md for each setting."""

    enabled: bool = False
    # host:port pairs the operator lists (any host: the operator's choice).
    targets: tuple[tuple[str, int], ...] = ()
    port_scan: bool = True
    ports: tuple[tuple[int, int], ...] = DEFAULT_PORTS
    excluded: frozenset[int] = DEFAULT_EXCLUDED
    # None: no Docker discovery.  Used only while the socket exists.
    docker_socket: str | None = DEFAULT_DOCKER_SOCKET
    docker_project: str | None = None
    interval: float = DEFAULT_INTERVAL
    probe_timeout: float = DEFAULT_PROBE_TIMEOUT
    concurrency: int = DEFAULT_CONCURRENCY

    def port_allowed(self, port: int) -> bool:
        """Whether the port scan may probe C{port} (the range, minus exclusions)."""
        return port not in self.excluded and any(low <= port <= high for low, high in self.ports)


def _switch(env: Mapping[str, str], name: str, default: bool) -> bool:
    value = (env.get(name) or "").strip().lower()
    if not value:
        return default
    if value in _ON:
        return True
    if value in _OFF:
        return False
    raise SettingsError(f"{name} must be on or off (1 or 0), not {value!r}")


def parse_target(text: str) -> tuple[str, int]:
    """
    One C{host:port} (C{127.0.0.1:11434}, C{gpu-box:8000},
    C{[::1]:1234}); the host lower-cased.

    @raise SettingsError: anything else.
    """
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise SettingsError(f"cannot read {text!r}: write an IPv6 address as [::1]:8000")
        port_text = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise SettingsError(f"{host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host or ":" in host:
            raise SettingsError(f"cannot read {text!r}: write host:port (e.g. 127.0.0.1:11434, [::1]:8000)")
        if not _HOST.match(host):
            raise SettingsError(f"{host!r} is not a host name or an IPv4 address")
    port = _port(port_text, text)
    return host.lower(), port


def _port(text: str, where: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise SettingsError(f"the port of {where!r} must be a number from 1 to 65535")
    return int(text)


def parse_targets(text: str) -> tuple[tuple[str, int], ...]:
    """Comma- or space-separated C{host:port} pairs, each once, in order."""
    found = [parse_target(item) for item in re.split(r"[,\s]+", text) if item]
    return tuple(dict.fromkeys(found))


def parse_ports(text: str, name: str) -> tuple[tuple[int, int], ...]:
    """C{11434,8000-8100} as C{((11434, 11434), (8000, 8100))}."""
    ranges = []
    for item in re.split(r"[,\s]+", text):
        if not item:
            continue
        low_text, dash, high_text = item.partition("-")
        low = _port(low_text, f"{name}={item}")
        high = _port(high_text, f"{name}={item}") if dash else low
        if high < low:
            raise SettingsError(f"{name}: the range {item!r} ends before it starts")
        ranges.append((low, high))
    return tuple(ranges)


def parse_duration(text: str, name: str) -> float:
    """C{60}, C{30s}, C{5m}, C{500ms} -> seconds (positive)."""
    match = _DURATION.match(text)
    if not match or float(match.group(1)) <= 0:
        raise SettingsError(f"{name} must be a positive duration (e.g. 60, 30s, 5m, 500ms), not {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def _docker_socket(env: Mapping[str, str]) -> str | None:
    value = (env.get(DOCKER_SOCKET) or "").strip()
    if not value:
        return DEFAULT_DOCKER_SOCKET
    if value.lower() in _OFF:
        return None
    if value.startswith("unix://"):
        value = value[len("unix://"):]
    if not value.startswith("/"):
        raise SettingsError(f"{DOCKER_SOCKET} must be the absolute path of the Docker API socket, or off")
    return value


def from_env(env: Mapping[str, str]) -> DiscoverySettings:
    """
    The settings in C{env}.  When discovery is off the other settings are
    still checked, so a typo is found before the day it is turned on.

    @raise SettingsError: a setting that cannot be understood.
    """
    targets = parse_targets(env.get(TARGETS) or "")
    ports = parse_ports(env[PORTS], PORTS) if (env.get(PORTS) or "").strip() else DEFAULT_PORTS
    extra = parse_ports(env.get(EXCLUDE_PORTS) or "", EXCLUDE_PORTS)
    excluded = set(DEFAULT_EXCLUDED)
    for low, high in extra:
        excluded.update(range(low, high + 1))
    project = (env.get(DOCKER_PROJECT) or "").strip() or None
    if project is not None and not re.match(r"^[a-z0-9][a-z0-9_-]*$", project):
        raise SettingsError(f"{DOCKER_PROJECT} must be a compose project name (a-z, 0-9, _ and -)")
    concurrency_text = (env.get(CONCURRENCY) or "").strip()
    if concurrency_text and (not concurrency_text.isdigit() or not 1 <= int(concurrency_text) <= 256):
        raise SettingsError(f"{CONCURRENCY} must be a whole number from 1 to 256")
    interval = parse_duration(env[INTERVAL], INTERVAL) if (env.get(INTERVAL) or "").strip() else DEFAULT_INTERVAL
    if interval < MIN_INTERVAL:
        raise SettingsError(f"{INTERVAL} must be at least {MIN_INTERVAL:g} seconds")
    timeout = (
        parse_duration(env[PROBE_TIMEOUT], PROBE_TIMEOUT)
        if (env.get(PROBE_TIMEOUT) or "").strip()
        else DEFAULT_PROBE_TIMEOUT
    )
    if timeout > MAX_PROBE_TIMEOUT:
        raise SettingsError(f"{PROBE_TIMEOUT} must be at most {MAX_PROBE_TIMEOUT:g} seconds: probes are meant to be short")
    return DiscoverySettings(
        enabled=_switch(env, ENABLED, False),
        targets=targets,
        port_scan=_switch(env, PORT_SCAN, True),
        ports=ports,
        excluded=frozenset(excluded),
        docker_socket=_docker_socket(env),
        docker_project=project,
        interval=interval,
        probe_timeout=timeout,
        concurrency=int(concurrency_text) if concurrency_text else DEFAULT_CONCURRENCY,
    )
