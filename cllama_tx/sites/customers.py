"""
LiteLLM's customer (end user) endpoints: C{/customer/new},
C{/customer/info?end_user_id=}, C{/customer/update}, C{/customer/delete},
C{/customer/list}, C{/customer/block}, C{/customer/unblock} (also under
C{/end_user/}, LiteLLM's older name).  A customer is named by the C{user}
field of an inference request; its budget covers every such request,
whatever key sends it.
"""

from __future__ import annotations

from typing import Any

from cllama_tx.identity.customers import customer_info, validate_customer
from cllama_tx.sites.admin_http import KeyApiError, arg, json_answer, read_body, string_list
from cllama_tx.sites.directory_api import RecordApi, record_answers

__all__ = ["CustomersApi"]


class CustomersApi(RecordApi):
    kind = "customer"

    async def info_of(self, customer: Any) -> dict[str, Any]:
        return customer_info(customer, await self.spend(customer), self.reset_at(customer))

    @record_answers
    async def new(self, request: Any) -> bytes:
        """C{POST /customer/new} C{{"user_id", "max_budget", ...}}."""
        self.master(request)
        doc = read_body(request)
        user_id = doc.get("user_id")
        if not isinstance(user_id, str) or not user_id.strip():
            raise KeyApiError(400, "'user_id' is required: the id requests name in 'user'", "user_id")
        fields = validate_customer(doc, update=False)
        customer = await self.directory.create("customer", user_id, fields)
        await self.set_spend_from(customer, doc)
        self.operator("customer_created", user_id=user_id)
        return json_answer(request, 200, await self.info_of(customer))

    @record_answers
    async def info(self, request: Any) -> bytes:
        """C{GET /customer/info?end_user_id=}."""
        self.master(request)
        customer = self.found(arg(request, "end_user_id") or arg(request, "user_id"))
        return json_answer(request, 200, await self.info_of(customer))

    @record_answers
    async def update(self, request: Any) -> bytes:
        """C{POST /customer/update} C{{"user_id", ...}}."""
        self.master(request)
        doc = read_body(request)
        customer = self.found(doc.get("user_id"))
        fields = validate_customer(doc, update=True)
        if fields:
            customer = await self.directory.update("customer", customer.id, fields)
        await self.set_spend_from(customer, doc)
        self.operator("customer_updated", user_id=customer.id, fields=sorted(doc))
        return json_answer(request, 200, await self.info_of(customer))

    @record_answers
    async def delete(self, request: Any) -> bytes:
        """C{POST /customer/delete} C{{"user_ids": [...]}}."""
        self.master(request)
        ids = string_list(read_body(request), "user_ids")
        missing = [i for i in ids if self.directory.customer(i) is None]
        if missing:
            raise KeyApiError(404, f"customer not found: {', '.join(missing)}", "user_ids")
        deleted = await self.directory.delete("customer", ids)
        self.operator("customers_deleted", user_ids=deleted)
        return json_answer(request, 200, {"deleted_customers": deleted})

    @record_answers
    async def list(self, request: Any) -> bytes:
        """C{GET /customer/list}: every customer."""
        self.master(request)
        return json_answer(request, 200, [await self.info_of(c) for c in self.directory.all("customer")])

    async def _set_blocked(self, request: Any, blocked: bool) -> bytes:
        self.master(request)
        ids = string_list(read_body(request), "user_ids")
        for user_id in ids:
            self.found(user_id)
        for user_id in ids:
            await self.directory.update("customer", user_id, {"blocked": blocked})
        self.operator("customers_blocked" if blocked else "customers_unblocked", user_ids=ids)
        return json_answer(request, 200, {"blocked_users" if blocked else "unblocked_users": ids})

    @record_answers
    async def block(self, request: Any) -> bytes:
        """C{POST /customer/block} C{{"user_ids": [...]}}: their requests are refused until unblocked."""
        return await self._set_blocked(request, True)

    @record_answers
    async def unblock(self, request: Any) -> bytes:
        """C{POST /customer/unblock} C{{"user_ids": [...]}}."""
        return await self._set_blocked(request, False)
