"""
The contracts between the rooms of cllama_tx.

Each interface has (or will have) two implementations: the real one and a
verified fake in L{cllama_tx.testing}, or two real ones (file-backed and
in-memory).  The web apps depend only on these.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface


class IAuditLog(Interface):
    """
    The structured JSON-lines audit stream (CONTRACT section 7).
    """

    def emit(event_type, claw_id, model, request_id=None, intervention=None, **fields):
        """
        Write one audit line.  C{fields} are added verbatim; they must never
        contain a secret.
        """


class IContextRegistry(Interface):
    """
    Agent contexts under C{CLAW_CONTEXT_ROOT}, cached and reloaded on change.
    """

    def authenticate(agent_id, secret):
        """
        Return the agent's L{cllama_tx.identity.contexts.AgentContext} when
        C{secret} is right, else L{None}.  Unknown agents, invalid ids, broken
        metadata and wrong secrets are indistinguishable to the caller and
        take the same time.
        """

    def get(agent_id):
        """
        Return the current context of C{agent_id} or L{None}.
        """

    def agent_ids():
        """
        Return the sorted ids of the agents that have a readable context.
        """


class IProviderRegistry(Interface):
    """
    Resolves a provider name to where and how to send a request, and owns the
    key pools.
    """

    def resolve(name):
        """
        Return a L{cllama_tx.providers.registry.ResolvedProvider} for the
        canonical provider C{name}.

        @raise cllama_tx.providers.registry.UnknownProvider: no such provider.
        @raise cllama_tx.providers.registry.ProviderNotConfigured: known, but
            without a base URL or without any key while it needs one.
        """

    def names():
        """
        Return the sorted names of all providers that could be resolved.
        """


class IFakeProvider(Interface):
    """
    A loopback HTTP server that speaks a provider's wire format, for tests
    and the demo.
    """

    base_url = Attribute("The URL to use as the provider's base URL, ending in /v1.")
    received = Attribute("The list of L{cllama_tx.testing.ReceivedRequest} it got.")

    def start():
        """
        Listen on 127.0.0.1, an ephemeral port.  Return a Deferred that fires
        with the server once it listens.
        """

    def stop():
        """
        Stop listening and drop open connections.  Return a Deferred.
        """


class ILedger(Interface):
    """
    The durable record of every client request and the totals derived from
    it.  Writes happen off the reactor thread.
    """

    def record(row):
        """
        Add one L{cllama_tx.store.records.LedgerRow}.  Return a Deferred
        that fires (with None) once the row is durably committed; the proxy
        waits for it before sending the agent the response's final byte.
        When the disk refuses it, the row is held in memory until it can be
        written and the Deferred fires with a marker instead (C{"held"}).
        """

    def totals():
        """
        Return the running totals (kept in memory, rebuilt from the database
        at start): a L{cllama_tx.store.ledger.Totals}.
        """

    def close():
        """Flush pending rows and close the database.  Return a Deferred."""


class IPricing(Interface):
    """USD prices per million tokens, by provider and model."""

    def price(provider, model):
        """
        Return the L{cllama_tx.accounting.pricing.Price} of C{model} at
        C{provider} (exact id, else the longest priced prefix), or L{None}.
        """

    def cost(provider, model, usage):
        """
        Return C{(cost_usd, priced)} for a L{Usage}: C{priced} is false when
        the model has no price (cost 0.0, counted as unpriced).
        """


class IRequestPolicy(Interface):
    """
    The policy plane (ADR-025): an evaluator the proxy consults about each
    governed request, over HTTP (L{cllama_tx.governance.policy_sidecar}) or
    in process (an operator's plugin, L{cllama_tx.governance.policy_plugin}).

    Each hook takes one call object of L{cllama_tx.governance.policy_plane}
    and returns a Deferred (a plugin may also return the value itself, or a
    coroutine) of that module's decision: a L{GateDecision}, a
    L{Decoration}, a L{ResponseDecision}, or a dict in the sidecar's wire
    shape, or None for "no opinion".  A failure, or no answer within the
    operator's timeout, makes the proxy treat the policy as unavailable.
    """

    def gate_request(call):
        """Allow or deny a request before it is dispatched, optionally filtering its tools."""

    def decorate(call):
        """Messages or a system text to add to the request before it is sent."""

    def gate_response(call):
        """Allow, deny or amend a whole answer (for a stream: allow or deny its head)."""

    # Optional, and so not declared here: score(call), told each answer
    # delivered, fire and forget (the reference's /policy/score).
