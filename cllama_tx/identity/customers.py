"""
LiteLLM's customers (end users: C{/customer/new}, C{/customer/update},
C{/customer/info}, C{/customer/list}, C{/customer/block}): someone a
platform serves, named by the C{user} field of an inference request,
without a key of their own.  What governs (a budget and its schedule,
rate and parallel limits, models, blocked) applies to every request that
names the customer, whatever key (or the master key) sends it.
Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cllama_tx.identity import litellm_fields as f
from cllama_tx.identity.entities import COMMON_FIELDS, Entity, validate_fields
from cllama_tx.identity.litellm_fields import InvalidField

__all__ = ["REGIONS", "customer_info", "validate_customer"]

REGIONS = ("eu", "us")

GOVERNED = {
    **COMMON_FIELDS,
    "alias": lambda v: f.text("alias", v),
}

STORED = {
    name: f.json_value
    for name in ("default_model", "allowed_model_region", "budget_id", "object_permission", "model_max_budget",
                 "tpd_limit", "budget_reset_at")
}

#: Names the API handles itself: the id and spend.
HANDLED = frozenset({"user_id", "spend"})


def validate_customer(doc: Mapping[str, Any], *, update: bool) -> dict[str, Any]:
    """
    The fields of a C{/customer/new} or C{/customer/update} body, checked.

    @raise InvalidField: naming the first bad field; C{max_budget} and
        C{budget_id} together are refused, as LiteLLM refuses them.
    """
    if doc.get("max_budget") is not None and doc.get("budget_id") is not None:
        raise InvalidField("budget_id", "set either 'max_budget' or 'budget_id', not both")
    region = doc.get("allowed_model_region")
    if region is not None and region not in REGIONS:
        raise InvalidField("allowed_model_region", f"'allowed_model_region' must be one of {', '.join(REGIONS)}")
    return validate_fields(doc, GOVERNED, STORED, HANDLED, update=update)


def customer_info(customer: Entity, spend: float | None, reset_at: str | None) -> dict[str, Any]:
    """LiteLLM's customer object (C{LiteLLM_EndUserTable}), its budget under C{litellm_budget_table}."""
    budget = {
        "max_budget": customer.max_budget,
        "soft_budget": customer.soft_budget,
        "max_parallel_requests": customer.max_parallel_requests,
        "tpm_limit": customer.tpm_limit,
        "rpm_limit": customer.rpm_limit,
        "budget_duration": customer.budget_duration,
        "budget_reset_at": reset_at,
        "model_max_budget": customer.extra.get("model_max_budget"),
    }
    return {
        "user_id": customer.id,
        "alias": customer.alias,
        "blocked": customer.blocked,
        "spend": spend,
        "allowed_model_region": customer.extra.get("allowed_model_region"),
        "default_model": customer.extra.get("default_model"),
        "models": list(customer.models),
        "budget_id": customer.extra.get("budget_id"),
        "litellm_budget_table": budget if customer.max_budget is not None or customer.tpm_limit is not None
        or customer.rpm_limit is not None or customer.budget_duration is not None else None,
        "object_permission": customer.extra.get("object_permission"),
        "metadata": dict(customer.metadata),
    }
