"""
Billing for platforms that mint virtual keys: LiteLLM's spend endpoints
and the cursor feed a billing worker polls (L{cllama_tx.sites.spend}),
behind the master key, on the API port.  L{BillingApi} is what the API
site is handed; its methods are the spend endpoints it routes to.
"""

from __future__ import annotations

from typing import Any

from cllama_tx.sites.spend import SpendApi, spend_log

__all__ = ["BillingApi", "spend_log"]


class BillingApi:
    """
    @param keys_api: the key API (its master key check and key store).
    @param ledger: the ledger.
    @param directory: the directory (team names in reports), or None.
    """

    def __init__(self, *, keys_api: Any, ledger: Any, governance: Any = None, audit: Any = None,
                 directory: Any = None, clock: Any = None) -> None:
        self.governance = governance
        self.audit = audit
        self.spend = SpendApi(keys_api.auth, ledger, keys_api.store, clock or keys_api.clock, directory)

    async def spend_logs(self, request: Any) -> bytes:
        return await self.spend.logs(request)

    async def events(self, request: Any) -> bytes:
        return await self.spend.events(request)
