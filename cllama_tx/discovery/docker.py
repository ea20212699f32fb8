"""
The Docker Engine API's container list (C{GET /containers/json}), read
for the addresses a container's servers can be reached at.

For each running container (of the operator's compose project, when one
is named: the label C{com.docker.compose.project}) and each TCP port it
exposes (C{Ports[].PrivatePort}), the candidates, in order: the
container's address on each of its networks
(C{NetworkSettings.Networks.*.IPAddress}) with the exposed port, then the
port published on this host's loopback or wildcard address
(C{PublicPort}, when C{IP} is one of those), through loopback.  The first
candidate that answers is the server's address.  A container on the host's
network (C{HostConfig.NetworkMode} C{host}) has no addresses of its own:
its servers are this host's ports, for the port scan.  Pure, no I/O.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import attrs

PROJECT_LABEL = "com.docker.compose.project"
SERVICE_LABEL = "com.docker.compose.service"
NUMBER_LABEL = "com.docker.compose.container-number"

#: Exposed ports looked at per container (a container exposing a range is not a model server).
MAX_PORTS = 16
_LOOPBACK_FOR = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "127.0.0.1": "127.0.0.1", "::": "::1", "::1": "::1"}


@attrs.frozen
class ContainerPort:
    """One exposed TCP port and the addresses to try it at, in order."""

    port: int
    endpoints: tuple[tuple[str, int], ...]


@attrs.frozen
class Container:
    """A running container: its names and the ports that may serve models."""

    id: str
    name: str
    base: str  # the compose service, else the container name
    number: str | None
    project: str | None
    ports: tuple[ContainerPort, ...]


def containers_path(project: str | None) -> str:
    """The list request: running containers, of C{project} when given."""
    filters: dict[str, list[str]] = {"status": ["running"]}
    if project:
        filters["label"] = [f"{PROJECT_LABEL}={project}"]
    return "/containers/json?filters=" + quote(json.dumps(filters, separators=(",", ":")), safe="")


def _port(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= 65535 else None


def _addresses(item: dict) -> list[str]:
    networks = ((item.get("NetworkSettings") or {}).get("Networks") or {}) if isinstance(item, dict) else {}
    found = []
    if isinstance(networks, dict):
        for network in networks.values():
            if isinstance(network, dict):
                for key in ("IPAddress", "GlobalIPv6Address"):
                    address = network.get(key)
                    if isinstance(address, str) and address:
                        found.append(address)
    return list(dict.fromkeys(found))


def _ports(item: dict, addresses: list[str]) -> tuple[ContainerPort, ...]:
    endpoints: dict[int, list[tuple[str, int]]] = {}
    for entry in item.get("Ports") or ():
        if not isinstance(entry, dict) or entry.get("Type", "tcp") != "tcp":
            continue
        private = _port(entry.get("PrivatePort"))
        if private is None:
            continue
        candidates = endpoints.setdefault(private, [(address, private) for address in addresses])
        public = _port(entry.get("PublicPort"))
        loopback = _LOOPBACK_FOR.get(entry.get("IP") or "")
        if public is not None and loopback is not None and (loopback, public) not in candidates:
            candidates.append((loopback, public))
    ports = [ContainerPort(port, tuple(found)) for port, found in sorted(endpoints.items()) if found]
    return tuple(ports[:MAX_PORTS])


def parse_containers(doc: Any, project: str | None = None) -> list[Container]:
    """
    The running containers of a C{/containers/json} answer (of C{project}
    when given: checked here too, whatever filter the daemon applied),
    sorted by name; malformed entries are skipped.
    """
    if not isinstance(doc, list):
        return []
    found = []
    for item in doc:
        if not isinstance(item, dict):
            continue
        state = item.get("State")
        if isinstance(state, str) and state.lower() != "running":
            continue
        raw_labels = item.get("Labels")
        labels: dict[str, Any] = raw_labels if isinstance(raw_labels, dict) else {}
        if project is not None and labels.get(PROJECT_LABEL) != project:
            continue
        if ((item.get("HostConfig") or {}).get("NetworkMode")) == "host":
            continue
        names = [n.lstrip("/") for n in item.get("Names") or () if isinstance(n, str) and n.strip("/")]
        raw_id = item.get("Id")
        container_id = raw_id if isinstance(raw_id, str) else ""
        name = names[0] if names else container_id[:12]
        if not name:
            continue
        service = labels.get(SERVICE_LABEL)
        number = labels.get(NUMBER_LABEL)
        found.append(
            Container(
                id=container_id[:12],
                name=name,
                base=service if isinstance(service, str) and service else name,
                number=number if isinstance(number, str) else None,
                project=labels[PROJECT_LABEL] if isinstance(labels.get(PROJECT_LABEL), str) else None,
                ports=_ports(item, _addresses(item)),
            )
        )
    return sorted(found, key=lambda c: c.name)
