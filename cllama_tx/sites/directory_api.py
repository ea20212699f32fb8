"""
What the team, user, organisation and customer endpoints share: the
master key check, the directory and the key store they change, spend read
and set through L{cllama_tx.sites.scope_budget}, the audit line of each
change, and ids made when a body brings none (LiteLLM makes UUIDs).
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from cllama_tx.identity.directory import RecordNotFound
from cllama_tx.identity.litellm_fields import money, text
from cllama_tx.sites.admin_http import KeyApiError, answers, write_error
from cllama_tx.store.shared import scope_name

__all__ = ["RecordApi", "new_id", "record_answers"]

_NAMES = {"team": "team", "user": "user", "org": "organization", "customer": "customer", "model": "model"}


def new_id() -> str:
    """An id for a record created without one (as LiteLLM: a UUID)."""
    return str(uuid.uuid4())


def record_answers(method: Callable[..., Awaitable[bytes]]) -> Callable[..., Awaitable[bytes]]:
    """L{answers}, and a missing record as LiteLLM's 404."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, *args: Any, **kwargs: Any) -> bytes:
        try:
            return await method(self, request, *args, **kwargs)
        except RecordNotFound as e:
            return write_error(request, KeyApiError(404, f"{_NAMES.get(e.kind, e.kind)} not found: {e.record_id}",
                                                    _ID_PARAMS.get(e.kind)))

    return answers(wrapper)


_ID_PARAMS = {"team": "team_id", "user": "user_id", "org": "organization_id", "customer": "user_id",
              "model": "model_id"}


class RecordApi:
    """
    @param auth: the management API's L{cllama_tx.sites.admin_http.AdminAuth}.
    @param directory: the L{cllama_tx.identity.directory.Directory}.
    @param keys: the key API (its store, and minting keys for new users).
    @param budgets: L{cllama_tx.sites.scope_budget.ScopeBudgets}.
    """

    kind = ""

    def __init__(self, auth: Any, directory: Any, keys: Any, budgets: Any, audit: Any = None) -> None:
        self.auth = auth
        self.directory = directory
        self.keys = keys
        self.budgets = budgets
        self._audit = audit

    def master(self, request: Any) -> None:
        self.auth.require_master(request)

    def found(self, record_id: Any, kind: str | None = None) -> Any:
        kind = kind or self.kind
        if not isinstance(record_id, str) or not record_id:
            raise KeyApiError(400, f"'{_ID_PARAMS[kind]}' is required", _ID_PARAMS[kind])
        record = self.directory.get(kind, record_id)
        if record is None:
            raise RecordNotFound(kind, record_id)
        return record

    def id_of(self, doc: dict, field: str) -> str:
        """The id a new record is given: the body's, else a new UUID."""
        given = text(field, doc.get(field))
        return given.strip() if given is not None and given.strip() else new_id()

    def scope(self, record: Any) -> str:
        return scope_name(self.kind, record.id)

    async def spend(self, record: Any) -> float | None:
        return await self.budgets.spend(self.scope(record), record.budget_duration,
                                        record.budget_anchor or record.created_at)

    def reset_at(self, record: Any) -> str | None:
        return self.budgets.reset_at(record.budget_duration, record.budget_anchor or record.created_at)

    async def set_spend_from(self, record: Any, doc: dict) -> None:
        """LiteLLM's C{spend} in a body: the spend counted from now on starts there."""
        if doc.get("spend") is not None:
            amount = money("spend", doc["spend"])
            await self.budgets.set_spend(self.scope(record), amount or 0.0)

    def operator(self, action: str, **fields: Any) -> None:
        if self._audit is not None:
            self._audit.emit("operator", None, None, action=action, actor="master-key", **fields)

    async def keys_of(self, **filters: str) -> list[dict]:
        """The info objects of the live keys matching C{filters} (team_id, user_id, organization_id)."""
        page = self.keys.store.list(page=1, size=10**9, **filters)
        return [await self.keys.describe(vk) for vk in page.keys]

    async def delete_keys_of(self, **filters: str) -> int:
        """Delete every key matching C{filters} (a deleted team's or user's keys, as LiteLLM does)."""
        page = self.keys.store.list(page=1, size=10**9, **filters)
        hashes = [vk.token_hash for vk in page.keys]
        if not hashes:
            return 0
        return len(await self.keys.store.delete(hashes))

