"""
Tests for L{cllama_tx.identity.agent_header}: the OR gate's X-Agent-ID,
trusted only from loopback, mapped to the policy file's agents.
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from cllama_tx.identity.agent_header import AgentHeaderIdentity, PolicyAgents, from_loopback
from cllama_tx.surfaces.errors import ProxyError


class _Governance:
    def __init__(self, agents) -> None:
        self._agents = {name: {"limit_usd": 1.0} for name in agents}

    def policy_agent_ids(self):
        return list(self._agents)

    def policy_budget(self, agent):
        return self._agents.get(agent)


class _Contexts:
    def __init__(self, known) -> None:
        self.known = known

    def get(self, agent):
        return self.known.get(agent)


class _Request:
    def __init__(self, address) -> None:
        self.address = address

    def getClientAddress(self):  # noqa: N802 (twisted.web's name)
        return self.address


LOCAL = _Request(IPv4Address("TCP", "127.0.0.1", 50000))
REMOTE = _Request(IPv4Address("TCP", "10.1.2.3", 50000))


def headers(**values) -> Headers:
    return Headers({name.replace("_", "-").encode(): [value.encode()] for name, value in values.items()})


class LoopbackTests(SynchronousTestCase):
    def test_addresses(self) -> None:
        self.assertTrue(from_loopback(IPv4Address("TCP", "127.0.0.1", 1)))
        self.assertTrue(from_loopback(IPv4Address("TCP", "127.8.9.10", 1)))
        self.assertTrue(from_loopback(IPv6Address("TCP", "::1", 1)))
        self.assertTrue(from_loopback(IPv6Address("TCP", "::ffff:127.0.0.1", 1)))
        self.assertTrue(from_loopback(UNIXAddress(b"/run/cllama.sock")))
        self.assertFalse(from_loopback(IPv4Address("TCP", "192.168.1.5", 1)))
        self.assertFalse(from_loopback(IPv6Address("TCP", "fe80::1", 1)))
        self.assertFalse(from_loopback(None))


class IdentityTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.real = object()
        self.agents = PolicyAgents(_Contexts({"agent-1": self.real}), _Governance(["agent-1", "default", "worker"]))
        self.identity = AgentHeaderIdentity(self.agents)

    def test_the_named_agent(self) -> None:
        # An agent with a context keeps it; one without gets a context of its own, kept.
        self.assertIs(self.identity.identify(headers(x_agent_id="agent-1"), LOCAL), self.real)
        worker = self.identity.identify(headers(x_agent_id="worker"), LOCAL)
        self.assertEqual((worker.agent_id, worker.model_policy, worker.budget, worker.path), ("worker", None, None, ""))
        self.assertIs(self.identity.identify(headers(x_agent_id="worker"), LOCAL), worker)

    def test_no_header_or_an_unknown_one_is_the_default(self) -> None:
        self.assertEqual(self.identity.identify(Headers(), LOCAL).agent_id, "default")
        self.assertEqual(self.identity.identify(headers(x_agent_id="nobody"), LOCAL).agent_id, "default")
        self.assertEqual(self.identity.identify(headers(x_agent_id="../etc"), LOCAL).agent_id, "default")

    def test_without_a_default_an_unknown_agent_is_refused(self) -> None:
        identity = AgentHeaderIdentity(PolicyAgents(_Contexts({}), _Governance(["agent-1"])))
        error = self.assertRaises(ProxyError, identity.identify, headers(x_agent_id="nobody"), LOCAL)
        self.assertEqual((error.status, error.code), (403, "invalid_credentials"))
        self.assertNotIn("agent-1", error.message)  # the file's agents are not listed

    def test_credentials_without_the_header_are_checked_as_ever(self) -> None:
        self.assertIsNone(self.identity.identify(headers(authorization="Bearer a:b"), LOCAL))
        self.assertIsNone(self.identity.identify(headers(x_api_key="a:b"), LOCAL))
        # With it, the header names the agent (an SDK's placeholder key is not a credential here).
        named = self.identity.identify(headers(authorization="Bearer sk-anything", x_agent_id="worker"), LOCAL)
        self.assertEqual(named.agent_id, "worker")

    def test_never_from_another_host(self) -> None:
        self.assertIsNone(self.identity.identify(headers(x_agent_id="agent-1"), REMOTE))
        self.assertIsNone(self.identity.identify(Headers(), REMOTE))
