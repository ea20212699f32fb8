"""
Health endpoints with LiteLLM's answers: C{/health/liveliness} (and
C{/health/liveness}) the JSON string C{"I'm alive!"};
C{/health/readiness} C{{"status", "db", "cache", "litellm_version",
"success_callbacks", ...}}, 503 until the key store is loaded and while
the ledger cannot answer or write; C{/health} the contract's
C{{"ok": true}} for probes, and with the master key also LiteLLM's
C{healthy_endpoints} / C{unhealthy_endpoints} of every configured model
(from the key pools' state: cllama_tx learns a provider's health from
every request, so it makes no calls of its own to say so).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer

from cllama_tx import __version__
from cllama_tx.sites.admin_http import json_answer, presented_credential

__all__ = ["ALIVE", "READINESS_TIMEOUT", "HealthApi"]

READINESS_TIMEOUT = 5.0
ALIVE = "I'm alive!"


class HealthApi:
    """
    @param store: the virtual key store (C{running}, C{loaded}).
    @param ledger: anything with C{ready() -> Deferred[bool]} (and
        C{health()}); L{None} reports the database as not connected.
    @param auth: the management API's L{cllama_tx.sites.admin_http.AdminAuth}.
    @param providers: the provider registry (its C{snapshot()}), for C{/health}.
    """

    def __init__(self, store: Any, ledger: Any, clock: Any, auth: Any, readiness_timeout: float = READINESS_TIMEOUT,
                 providers: Any = None) -> None:
        self._store = store
        self._ledger = ledger
        self._clock = clock
        self._auth = auth
        self._timeout = readiness_timeout
        self.providers = providers

    async def liveliness(self, request: Any) -> bytes:
        """C{GET /health/liveliness} (and C{/health/liveness}): LiteLLM's JSON string."""
        return json_answer(request, 200, ALIVE)

    async def readiness(self, request: Any) -> bytes:
        """
        C{GET /health/readiness}: 200 when the key store runs and the ledger
        answers a query (within the timeout) and writes its rows, else 503.
        C{ledger} says how it stands: C{failing} while rows are held in
        memory because the disk refuses them.
        """
        store_ok = bool(getattr(self._store, "running", False)) and bool(getattr(self._store, "loaded", True))
        ledger = None
        if self._ledger is None:
            db = "Not connected"
            db_ok = True
        else:
            try:
                d = self._ledger.ready()
                if self._clock is not None:
                    d.addTimeout(self._timeout, self._clock)
                db_ok = bool(await d)
            except defer.CancelledError:
                raise
            except Exception:
                db_ok = False
            db = "connected" if db_ok else "disconnected"
            if hasattr(self._ledger, "health"):
                storage = self._ledger.health()
                ledger = {"state": storage["state"], "pending_rows": storage["pending_rows"]}
                if storage["state"] == "failing":
                    db = "failing"
        healthy = store_ok and db_ok
        running = getattr(self._store, "running", False)
        doc: dict[str, Any] = {
            "status": "healthy" if healthy else "unhealthy",
            "db": db,
            "cache": None,
            "litellm_version": __version__,
            "success_callbacks": [],
            "ledger": ledger,
            "virtual_keys": "loaded" if store_ok else "loading" if running else "not running",
            "key_administration": "on" if self._auth.enabled else "off",
            "cllama_tx_version": __version__,
        }
        return json_answer(request, 200 if healthy else 503, doc)

    def endpoints(self) -> tuple[list[dict], list[dict]]:
        """LiteLLM's healthy and unhealthy endpoints: each configured provider and its key pool's state."""
        healthy: list[dict] = []
        unhealthy: list[dict] = []
        snapshot = getattr(self.providers, "snapshot", None)
        for provider in (snapshot() if snapshot is not None else []):
            if not provider.get("configured"):
                continue
            keys = provider.get("keys") or []
            usable = provider.get("keyless") or any(k.get("state") == "ready" for k in keys)
            entry = {
                "model": f"{provider['name']}/*",
                "custom_llm_provider": provider["name"],
                "api_base": provider.get("base_url"),
            }
            if usable:
                healthy.append(entry)
            else:
                states = sorted({str(k.get("state")) for k in keys}) or ["no keys"]
                unhealthy.append({**entry, "error": f"no usable key ({', '.join(states)})"})
        return healthy, unhealthy

    async def health(self, request: Any) -> bytes:
        """
        C{GET /health}: C{{"ok": true}} for anyone (the Docker probe reads
        that); with the master key, LiteLLM's fields as well.
        """
        doc: dict[str, Any] = {"ok": True}
        token = presented_credential(request)
        # An agent's credentials (agent:secret) are not a guess at the master key.
        if token is not None and ":" not in token and self._auth.enabled \
                and self._auth.check_token(request, token, "health"):
            healthy, unhealthy = self.endpoints()
            doc.update(
                healthy_endpoints=healthy,
                unhealthy_endpoints=unhealthy,
                healthy_count=len(healthy),
                unhealthy_count=len(unhealthy),
            )
        return json_answer(request, 200, doc)
