"""
Reasoning controls and output schemas across the two wire formats: OpenAI's
C{reasoning_effort} as Anthropic thinking (a budget, or adaptive thinking
with C{output_config.effort}) and back, and an OpenAI JSON schema in the
subset Anthropic's structured output takes.

Each mapping asks the target model's L{ModelTraits}: a control the model
does not take is dropped (it is advice on how hard to think, not what to
answer).  Pure logic.
"""

from __future__ import annotations

from typing import Any

from cllama_tx.surfaces.model_traits import ADAPTIVE, BUDGET, ModelTraits

__all__ = [
    "EFFORT_ORDER",
    "MIN_THINKING_BUDGET",
    "anthropic_schema",
    "anthropic_thinking",
    "effort_from_anthropic",
    "nearest_effort",
]

#: OpenAI's effort values, least to most.
EFFORT_ORDER = ("none", "minimal", "low", "medium", "high", "xhigh")

#: Anthropic's smallest thinking budget.
MIN_THINKING_BUDGET = 1024

#: The thinking budget each OpenAI effort becomes (for models that take a budget).
_BUDGETS = {"minimal": 1024, "low": 2048, "medium": 8192, "high": 24576, "xhigh": 32000}

#: Anthropic's C{output_config.effort} for each OpenAI effort.
_ANTHROPIC_EFFORT = {"minimal": "low", "low": "low", "medium": "medium", "high": "high", "xhigh": "high"}

#: Budget thresholds back to an effort: below 4096 low, below 16384 medium, else high.
_FROM_BUDGET = ((4096, "low"), (16384, "medium"))


def effort_from_anthropic(thinking: Any, effort: Any) -> str | None:
    """
    The OpenAI effort an Anthropic request asks for: C{output_config.effort}
    when given (C{max} is C{high}), else from the thinking budget, C{medium}
    for adaptive thinking, C{none} for thinking disabled; None when it asks
    nothing.
    """
    if isinstance(effort, str) and effort:
        return "high" if effort == "max" else effort
    kind = thinking.get("type") if isinstance(thinking, dict) else None
    if kind == "disabled":
        return "none"
    if kind == "adaptive":
        return "medium"
    if kind == "enabled":
        budget = thinking.get("budget_tokens")
        if type(budget) is int:
            for limit, name in _FROM_BUDGET:
                if budget < limit:
                    return name
        return "high"
    return None


def nearest_effort(wanted: str, allowed: frozenset[str]) -> str | None:
    """
    C{wanted} when the model takes it, else the nearest value it takes (the
    closest below first, then above); None when it takes none.
    """
    if wanted in allowed:
        return wanted
    if not allowed or wanted not in EFFORT_ORDER:
        return None
    at = EFFORT_ORDER.index(wanted)
    below = [e for e in EFFORT_ORDER[:at] if e in allowed]
    if below and wanted not in ("none", "minimal"):
        return below[-1]
    above = [e for e in EFFORT_ORDER[at + 1 :] if e in allowed]
    if wanted in ("none", "minimal"):
        return above[0] if above else None
    return above[0] if above else (below[-1] if below else None)


def anthropic_thinking(effort: str, traits: ModelTraits, max_tokens: int) -> tuple[dict | None, str | None]:
    """
    C{(thinking, output_config.effort)} for an OpenAI effort on an Anthropic
    model: adaptive thinking with its effort, or a budget below
    C{max_tokens} (Anthropic wants it smaller, and at least 1024).
    C{(None, None)} when the effort asks for no thinking; raises
    L{ValueError} when the model cannot think as asked (the caller drops
    the field).
    """
    if effort == "none":
        return None, None
    level = _ANTHROPIC_EFFORT.get(effort, "medium") if traits.effort else None
    if traits.thinking == ADAPTIVE:
        return {"type": "adaptive"}, level
    if traits.thinking == BUDGET:
        budget = min(_BUDGETS.get(effort, _BUDGETS["medium"]), max_tokens - 1)
        if budget < MIN_THINKING_BUDGET:
            raise ValueError(f"max_tokens {max_tokens} leaves no room for a thinking budget")
        return {"type": "enabled", "budget_tokens": budget}, level
    raise ValueError("the model does not think")


# Keywords Anthropic's structured output takes, by the type they apply to.
_KEEP_ANY = ("type", "description", "title", "enum", "const", "$ref", "$defs", "definitions", "default")
_KEEP = {
    "object": ("properties", "required"),
    "array": ("items", "minItems"),
    "string": ("format",),
    "integer": (),
    "number": (),
    "boolean": (),
    "null": (),
}
_STRING_FORMATS = frozenset({"date-time", "time", "date", "duration", "email", "hostname", "uri", "ipv4", "ipv6", "uuid"})


def anthropic_schema(schema: Any) -> Any:
    """
    An OpenAI JSON schema in the subset Anthropic's structured output takes,
    as the C{anthropic} SDK's own C{transform_schema} does: every object
    closed (C{additionalProperties: false}), unions as C{anyOf}, and the
    constraints it does not take (lengths, bounds, patterns) written into
    the C{description} so the model still reads them.
    """
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    leftover: list[str] = []
    kind = schema.get("type")
    kinds = kind if isinstance(kind, list) else [kind]
    for key, value in schema.items():
        if key in ("anyOf", "oneOf"):
            out["anyOf"] = [anthropic_schema(v) for v in value] if isinstance(value, list) else value
        elif key == "allOf":
            out["allOf"] = [anthropic_schema(v) for v in value] if isinstance(value, list) else value
        elif key in ("$defs", "definitions") and isinstance(value, dict):
            out[key] = {name: anthropic_schema(v) for name, v in value.items()}
        elif key == "properties" and isinstance(value, dict):
            out[key] = {name: anthropic_schema(v) for name, v in value.items()}
        elif key == "items":
            out[key] = anthropic_schema(value)
        elif key == "additionalProperties":
            continue
        elif key == "format" and value not in _STRING_FORMATS:
            leftover.append(f"{key}: {value}")
        elif key == "minItems" and value not in (0, 1):
            leftover.append(f"{key}: {value}")
        elif key in _KEEP_ANY or any(key in _KEEP.get(k, ()) for k in kinds if isinstance(k, str)):
            out[key] = value
        else:
            leftover.append(f"{key}: {value}")
    if "object" in kinds:
        out["additionalProperties"] = False
    if leftover:
        note = "{" + ", ".join(leftover) + "}"
        described = out.get("description")
        out["description"] = f"{described}\n\n{note}" if isinstance(described, str) and described else note
    return out
