"""
The Execwall OR gate's identity: the caller says who it is in C{X-Agent-ID}.

The gate trusts that header from anyone who can reach it (it listens on
loopback beside its agents), and serves a request without it, or naming an
agent it does not know, as its C{default} agent.  cllama_tx keeps
authentication (C{Authorization: Bearer agent:secret}) and offers the
gate's way only by explicit choice (C{CLLAMA_TRUST_X_AGENT_ID}), only on an
API listener bound to loopback (the daemon refuses to start otherwise), and
only for connections that come from loopback:

  - a request with C{X-Agent-ID} is that agent of the policy file (else
    its C{default} agent; else 403);
  - a request with credentials and no C{X-Agent-ID} is authenticated as
    ever;
  - a request with neither is the policy file's C{default} agent.

An agent so named need not have a context directory: it then gets a
context of its own with no token, model policy or metadata (its budget
is the policy file's).  Agents with a context keep theirs.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.web.http_headers import Headers

from cllama_tx.identity.contexts import AgentContext
from cllama_tx.surfaces.errors import ProxyError

AGENT_ID_HEADER = b"x-agent-id"
#: The agent a request without (or with an unknown) X-Agent-ID is, when the policy file has it (the gate's).
DEFAULT_AGENT = "default"
MAX_AGENT_ID = 128


def from_loopback(address: Any) -> bool:
    """Whether a peer address is this host's: a loopback IP, or a UNIX socket."""
    if isinstance(address, UNIXAddress):
        return True
    if isinstance(address, (IPv4Address, IPv6Address)):
        try:
            ip = ipaddress.ip_address(address.host.split("%", 1)[0])
        except ValueError:
            return False
        mapped = getattr(ip, "ipv4_mapped", None)
        return ip.is_loopback or (mapped is not None and mapped.is_loopback)
    return False


class PolicyAgents:
    """
    The contexts of the policy file's agents: the real one when the agent
    has a context directory, else one made for it (kept, so that what is
    cached per context stays cached).
    """

    def __init__(self, contexts: Any, governance: Any) -> None:
        self._contexts = contexts
        self._governance = governance
        self._made: dict[str, AgentContext] = {}

    def names(self) -> list[str]:
        return self._governance.policy_agent_ids()

    def known(self, agent_id: str) -> bool:
        return self._governance.policy_budget(agent_id) is not None

    def resolve(self, wanted: str | None) -> str | None:
        """The agent a request naming C{wanted} is served as (the file's C{default} when it names none it has)."""
        if wanted and self.known(wanted):
            return wanted
        return DEFAULT_AGENT if self.known(DEFAULT_AGENT) else None

    def context(self, agent_id: str) -> AgentContext | None:
        """The agent's context (its own, or one made for it); None when the policy file does not name it."""
        real = self._contexts.get(agent_id) if self._contexts is not None else None
        if real is not None:
            return real
        if not self.known(agent_id):
            return None
        made = self._made.get(agent_id)
        if made is None:
            made = self._made[agent_id] = AgentContext(agent_id=agent_id, path="", metadata={}, secret="")
        return made


class AgentHeaderIdentity:
    """
    Who a request on the trusted loopback listener is (see the module
    docstring).  L{identify} answers None when the request must be
    authenticated as usual.
    """

    def __init__(self, agents: PolicyAgents) -> None:
        self._agents = agents

    def identify(self, headers: Headers, request: Any = None) -> AgentContext | None:
        named = headers.getRawHeaders(AGENT_ID_HEADER)
        credentials = headers.hasHeader(b"authorization") or headers.hasHeader(b"x-api-key")
        if not named and credentials:
            return None
        if request is not None and not from_loopback(request.getClientAddress()):
            # The listener is loopback-only; a forwarded connection is not trusted either.
            return None
        wanted = named[0].decode("utf-8", "replace").strip()[:MAX_AGENT_ID] if named else None
        agent = self._agents.resolve(wanted)
        context = self._agents.context(agent) if agent is not None else None
        if context is None:
            raise ProxyError(403, "invalid_credentials", "unknown agent (X-Agent-ID) and no default agent")
        return context
