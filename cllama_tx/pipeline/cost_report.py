"""
What an answer tells its caller of its cost and budget.

Every answer carries headers: C{x-cllama-agent-id}, C{x-cllama-models-allowed}
(the models the request could be served by: a budget tier's OpenRouter list,
else its candidates) and, under a dollar budget,
C{x-cllama-budget-remaining-usd}.  A JSON answer is held whole until its
row is committed, so it also has C{x-cllama-cost-usd} and what is left
once its own cost is counted; a stream's headers leave before its cost is
known: they say what was left when it was admitted (its cost comes in the
usage chunk when the agent asks for usage).

For the agents of the Execwall OR gate's policy file, a JSON answer also
carries the gate's C{_execwall} object (C{agent_id}, C{cost},
C{budget_remaining}, C{models_allowed}, C{original_model}), as the gate
adds it.

And a request sent to OpenRouter with C{models} + C{route: "fallback"} is
metered with the model OpenRouter says answered (L{use_answering_model}).
"""

from __future__ import annotations

import json
from typing import Any

from cllama_tx.governance.kept import KeptByIdentity

AGENT_HEADER = b"x-cllama-agent-id"
MODELS_HEADER = b"x-cllama-models-allowed"
REMAINING_HEADER = b"x-cllama-budget-remaining-usd"
EXECWALL_FIELD = "_execwall"
MAX_MODEL_ID = 200


def money(value: float) -> str:
    """Dollars as the cost header writes them: up to ten decimals, no trailing zeros."""
    return f"{value:.10f}".rstrip("0").rstrip(".") or "0"


def _header_text(values: list[str]) -> bytes:
    text = ", ".join(values).encode("utf-8", "replace")
    return text[:4000]


#: The models header of a candidates tuple, kept per tuple (a kept policy
#: decision or resolution hands the same tuple to every request of a name).
_candidates_header: KeptByIdentity[tuple, bytes] = KeptByIdentity(
    lambda candidates: _header_text([str(ref) for ref in candidates])
)


def start_headers(request: Any, ex: Any) -> None:
    """The headers known before the answer's body: who, which models, what was left at admission."""
    if ex.claw_id:
        request.setHeader(AGENT_HEADER, ex.claw_id.encode("utf-8", "replace")[:200])
    admission = ex.admission
    if admission is None:
        return
    if admission.openrouter_models:
        request.setHeader(MODELS_HEADER, _header_text(list(admission.openrouter_models)))
    elif admission.candidates:
        request.setHeader(MODELS_HEADER, _candidates_header(admission.candidates))
    if admission.remaining_usd is not None:
        request.setHeader(REMAINING_HEADER, money(admission.remaining_usd).encode())


def finish_json(request: Any, ex: Any, cost_usd: float, status: int, doc: Any, body: bytes) -> bytes:
    """
    A whole JSON answer's last headers (what is left after its cost), and
    its body: with the gate's C{_execwall} for an OR gate agent's 2xx
    answer, else as it was.
    """
    report = ex.budget_report
    if report is None:
        return body
    if report.remaining_usd is not None:
        request.setHeader(REMAINING_HEADER, money(report.remaining_usd).encode())
    if not report.gate or not 200 <= status < 300 or not isinstance(doc, dict) or ex.crossing is not None:
        return body
    original = ex.original.get("model") if isinstance(ex.original, dict) else None
    doc = dict(doc)
    doc[EXECWALL_FIELD] = {
        "agent_id": report.agent,
        "cost": round(cost_usd, 6),
        "budget_remaining": round(report.remaining_usd, 6) if report.remaining_usd is not None else None,
        "models_allowed": list(report.models_allowed),
        "original_model": original if isinstance(original, str) else "",
    }
    return json.dumps(doc, separators=(",", ":")).encode("utf-8")


def use_answering_model(ex: Any, reported: Any) -> None:
    """
    Meter a C{models} + C{route: "fallback"} request with the model
    OpenRouter says answered (its C{model}), which may be any of the list.
    """
    admission = ex.admission
    if ex.provider != "openrouter" or admission is None or not admission.openrouter_models:
        return
    if isinstance(reported, str) and reported.strip() and len(reported) <= MAX_MODEL_ID:
        ex.upstream_model = reported.strip()
