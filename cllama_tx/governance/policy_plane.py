"""
The policy plane (ADR-025): what a policy is asked about one request and
what it answers, in the words of the reference's sidecar protocol, and the
pure steps that carry an answer out (a tool filter, a decoration, an
amendment).

No I/O here.  The HTTP sidecar client (L{cllama_tx.governance.policy_sidecar}),
the plugin loader (L{cllama_tx.governance.policy_plugin}) and the
pipeline's hooks (L{cllama_tx.pipeline.policy_hooks}) do that, and all of
them speak through these objects, so a plugin and a sidecar are judged by
the same rules.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import attrs

# Verdicts.  Anything else a policy says (or nothing) is an allow, as in the reference.
ALLOW = "allow"
DENY = "deny"
AMEND = "amend"

# Tool filter modes.
ALLOW_LIST = "allow_list"
DENY_LIST = "deny_list"

# The reference's intervention names (its audit lines), and ours for a tool filter.
POLICY_DENIED = "policy_denied"
POLICY_UNAVAILABLE = "policy_unavailable"
POLICY_DECORATED = "policy_decorated"
POLICY_AMENDED = "policy_amended"
POLICY_TOOLS_FILTERED = "policy_tools_filtered"

# The wire families a call names in its "format", and the request modes.
FORMAT_OPENAI = "openai"
FORMAT_ANTHROPIC = "anthropic"
MODE_PLAIN = "plain"  # cllama_tx injects no managed tools: every request is plain

# The hooks, and the sidecar paths they are POSTed to.
GATE_REQUEST = "gate-request"
DECORATE = "decorate"
GATE_RESPONSE = "gate-response"
SCORE = "score"
PATHS = {
    GATE_REQUEST: "/policy/gate-request",
    DECORATE: "/policy/decorate",
    GATE_RESPONSE: "/policy/gate-response",
    SCORE: "/policy/score",
}

# A reason or intervention name longer than this is cut: it goes into an
# agent's error body and the audit stream.
MAX_REASON = 2000
MAX_INTERVENTION = 200


class PolicyAnswerError(ValueError):
    """A policy's answer that cannot be understood; the message never quotes it whole."""


@attrs.frozen
class PolicyPlane:
    """The evaluator the proxy consults, and how it is consulted."""

    evaluator: Any  # provides IRequestPolicy
    timeout: float  # seconds each hook may take
    fail_open: bool = False  # a gate that fails lets the request through


@attrs.frozen
class RulesRef:
    """The agent's compiled rules (C{rules.json}), by path and SHA-256, for the sidecar to read."""

    path: str = ""
    digest: str = ""

    def wire(self) -> dict:
        doc = {}
        if self.path:
            doc["path"] = self.path
        if self.digest:
            doc["digest"] = self.digest
        return doc


@attrs.frozen
class RequestMeta:
    """What every call says about the request: who, which wire family, streamed, which model."""

    agent_id: str
    format: str
    mode: str = MODE_PLAIN
    stream: bool = False
    model: str = ""
    rules: RulesRef = RulesRef()
    # Not in the body: the sidecar gets it as the X-Cllama-Request-Id header.
    request_id: str | None = None

    def wire(self) -> dict:
        """The reference's fields, in its order; C{model} left out when empty, as Go's omitempty does."""
        doc: dict[str, Any] = {"agent_id": self.agent_id, "format": self.format, "mode": self.mode, "stream": self.stream}
        if self.model:
            doc["model"] = self.model
        doc["rules"] = self.rules.wire()
        return doc


@attrs.frozen
class GateRequestCall:
    """POST /policy/gate-request: the request as the agent sent it."""

    meta: RequestMeta
    request: dict

    hook = GATE_REQUEST

    def wire(self) -> dict:
        return {**self.meta.wire(), "request": self.request}


@attrs.frozen
class DecorateCall:
    """POST /policy/decorate: the request about to be sent (its tools filtered)."""

    meta: RequestMeta
    request: dict

    hook = DECORATE

    def wire(self) -> dict:
        return {**self.meta.wire(), "request": self.request}


@attrs.frozen
class GateResponseCall:
    """
    POST /policy/gate-response: the answer about to be delivered.  A stream
    is gated on its head: C{response_body} is empty and only a deny counts.
    """

    meta: RequestMeta
    request_body: str
    response_status: int
    response_header: dict[str, list[str]]
    response_body: str = ""

    hook = GATE_RESPONSE

    def wire(self) -> dict:
        doc = self.meta.wire()
        if self.request_body:
            doc["request_body"] = self.request_body
        doc["response_status"] = self.response_status
        if self.response_header:
            doc["response_header"] = self.response_header
        if self.response_body:
            doc["response_body"] = self.response_body
        return doc


@attrs.frozen
class ScoreCall(GateResponseCall):
    """
    POST /policy/score: the answer as delivered, once it was (the whole
    JSON, or the first bytes of a stream); fire and forget, its answer
    unread.
    """

    hook = SCORE


@attrs.frozen
class ToolFilter:
    """Which of the request's tools may stay: only those listed, or all but those listed."""

    mode: str
    tools: tuple[str, ...] = ()


@attrs.frozen
class GateDecision:
    verdict: str = ""
    reason: str = ""
    intervention: str = ""
    tool_filter: ToolFilter | None = None

    @property
    def denied(self) -> bool:
        return self.verdict.strip().lower() == DENY


@attrs.frozen
class Decoration:
    intervention: str = ""
    messages_patch: tuple[dict, ...] = ()
    system_patch: str = ""

    @property
    def decorates(self) -> bool:
        return bool(self.messages_patch) or bool(self.system_patch.strip())


@attrs.frozen
class ResponseDecision:
    verdict: str = ""
    reason: str = ""
    intervention: str = ""
    # The body to deliver instead (a JSON string's text, or the JSON itself).
    amended_body: bytes | None = None

    @property
    def action(self) -> str:
        """C{deny}, C{amend} (with a non-empty body) or C{allow}."""
        verdict = self.verdict.strip().lower()
        if verdict == DENY:
            return DENY
        if verdict == AMEND and self.amended_body:
            return AMEND
        return ALLOW


# -- reading answers (a sidecar's JSON, or what a plugin returns)


def _string(doc: dict, name: str, limit: int | None = None) -> str:
    value = doc.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise PolicyAnswerError(f"{name!r} is not a string")
    return value[:limit] if limit is not None else value


def _object(value: Any, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise PolicyAnswerError(f"the {what} answer is not a JSON object")
    return value


def _intervention(doc: dict) -> str:
    """The intervention a policy names itself: printable, short."""
    name = _string(doc, "intervention").strip()
    return "".join(c for c in name if c.isprintable())[:MAX_INTERVENTION]


def parse_gate_decision(value: Any) -> GateDecision:
    """A gate-request answer (C{null} is an answer with nothing in it: an allow)."""
    if isinstance(value, GateDecision):
        return value
    doc = _object(value, GATE_REQUEST)
    raw_filter = doc.get("tool_filter")
    tool_filter = None
    if raw_filter is not None:
        if not isinstance(raw_filter, dict):
            raise PolicyAnswerError("'tool_filter' is not an object")
        tools = raw_filter.get("tools")
        if tools is None:
            tools = []
        if not isinstance(tools, list) or not all(isinstance(t, str) for t in tools):
            raise PolicyAnswerError("'tool_filter.tools' is not a list of strings")
        tool_filter = ToolFilter(_string(raw_filter, "mode"), tuple(tools))
    return GateDecision(
        verdict=_string(doc, "verdict"),
        reason=_string(doc, "reason", MAX_REASON),
        intervention=_intervention(doc),
        tool_filter=tool_filter,
    )


def parse_decoration(value: Any) -> Decoration:
    """A decorate answer."""
    if isinstance(value, Decoration):
        return value
    doc = _object(value, DECORATE)
    patch = doc.get("messages_patch")
    if patch is None:
        patch = []
    if not isinstance(patch, list) or not all(m is None or isinstance(m, dict) for m in patch):
        raise PolicyAnswerError("'messages_patch' is not a list of message objects")
    return Decoration(
        intervention=_intervention(doc),
        messages_patch=tuple(m for m in patch if m is not None),
        system_patch=_string(doc, "system_patch"),
    )


def amended_bytes(value: Any) -> bytes | None:
    """
    The body an amendment delivers: a JSON string stands for its text (an
    SSE transcript, say), anything else for itself, as JSON.
    """
    if value is None:
        return None
    if isinstance(value, bytes):
        return value or None
    if isinstance(value, str):
        return value.encode("utf-8") or None
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def parse_response_decision(value: Any) -> ResponseDecision:
    """A gate-response answer."""
    if isinstance(value, ResponseDecision):
        return value
    doc = _object(value, GATE_RESPONSE)
    return ResponseDecision(
        verdict=_string(doc, "verdict"),
        reason=_string(doc, "reason", MAX_REASON),
        intervention=_intervention(doc),
        amended_body=amended_bytes(doc.get("amended_body")),
    )


PARSERS = {
    GATE_REQUEST: parse_gate_decision,
    DECORATE: parse_decoration,
    GATE_RESPONSE: parse_response_decision,
}


def denial_message(reason: str) -> str:
    """The agent's error message for a denial, in the reference's words."""
    reason = "".join(c for c in reason if c.isprintable() or c in "\n\t").strip()
    return "policy denied request: " + reason if reason else "policy denied request"


# -- carrying answers out (pure: new dicts, the caller's are left alone)


def apply_decoration(doc: dict, api_format: str, decoration: Decoration) -> dict:
    """
    The request with the decoration added, as the reference adds it: an
    OpenAI-family request gets C{messages_patch} appended to its messages
    (a Responses request to its C{input}), an Anthropic one gets
    C{system_patch} appended to its system prompt (a paragraph of a string
    system, a text block of a list).  The other patch is ignored.
    """
    if api_format == "anthropic":
        patch = decoration.system_patch.strip()
        if not patch:
            return doc
        system = doc.get("system")
        out = dict(doc)
        if isinstance(system, str):
            out["system"] = system + "\n\n" + patch if system.strip() else patch
        elif isinstance(system, list):
            out["system"] = [*system, {"type": "text", "text": patch}]
        else:
            out["system"] = patch
        return out
    if not decoration.messages_patch:
        return doc
    patch_messages = [dict(m) for m in decoration.messages_patch]
    out = dict(doc)
    if api_format == "responses":
        given = doc.get("input")
        if isinstance(given, str):
            out["input"] = [{"role": "user", "content": given}, *patch_messages]
        elif isinstance(given, list):
            out["input"] = [*given, *patch_messages]
        else:
            out["input"] = patch_messages
        return out
    messages = doc.get("messages")
    out["messages"] = [*(messages if isinstance(messages, list) else []), *patch_messages]
    return out


def tool_name(tool: Any) -> str | None:
    """
    The name a tool of any surface goes by: a function's name (OpenAI chat
    nests it), an Anthropic tool's name, else a built-in tool's type.
    """
    if not isinstance(tool, dict):
        return None
    kind = tool.get("type")
    nested = tool.get(kind) if isinstance(kind, str) else None
    if isinstance(nested, dict) and isinstance(nested.get("name"), str):
        return nested["name"]
    name = tool.get("name")
    if isinstance(name, str):
        return name
    return kind if isinstance(kind, str) else None


def _forced_name(choice: Any) -> str | None:
    """The tool a C{tool_choice} (or legacy C{function_call}) forces, if it names one."""
    if not isinstance(choice, dict):
        return None
    return tool_name(choice)


def filter_tools(doc: dict, tool_filter: ToolFilter) -> tuple[dict, tuple[str, ...]]:
    """
    The request with only the tools C{tool_filter} lets through, and the
    names of those it removed.  A C{tool_choice} that forces a removed tool
    is removed too, and with no tool left so are C{tool_choice} and
    C{parallel_tool_calls} (providers refuse them without tools).

    @raise PolicyAnswerError: an unknown filter mode.
    """
    mode = tool_filter.mode.strip().lower()
    if mode not in (ALLOW_LIST, DENY_LIST):
        raise PolicyAnswerError(f"unknown policy tool filter mode {tool_filter.mode[:50]!r}")
    listed = {t.strip() for t in tool_filter.tools if t.strip()}

    def keep(tool: Any) -> bool:
        name = tool_name(tool)
        return (name in listed) if mode == ALLOW_LIST else (name not in listed)

    out = dict(doc)
    removed: list[str] = []
    for field, choice_field in (("tools", "tool_choice"), ("functions", "function_call")):
        tools = doc.get(field)
        if not isinstance(tools, list):
            continue
        kept = [t for t in tools if keep(t)]
        if len(kept) == len(tools):
            continue
        removed.extend(str(tool_name(t)) for t in tools if not keep(t))
        forced = _forced_name(doc.get(choice_field))
        if forced is not None and forced not in {tool_name(t) for t in kept}:
            out.pop(choice_field, None)
        if kept:
            out[field] = kept
        else:
            out.pop(field, None)
            out.pop(choice_field, None)
            if field == "tools":
                out.pop("parallel_tool_calls", None)
    return (out, tuple(removed)) if removed else (doc, ())


def go_header_key(name: str) -> str:
    """A header name as Go's http.Header spells it (C{content-type} -> C{Content-Type})."""
    return "-".join(part[:1].upper() + part[1:].lower() for part in name.split("-"))


def header_map(headers: Iterable[tuple[bytes, list[bytes]]]) -> dict[str, list[str]]:
    """Raw headers as the reference's C{response_header}: Go-spelled names to lists of values."""
    out: dict[str, list[str]] = {}
    for name, values in headers:
        key = go_header_key(name.decode("latin-1"))
        out.setdefault(key, []).extend(v.decode("latin-1") for v in values)
    return out
