"""
Model policy (ADR-019, CONTRACT section 4): which model an agent's request
really goes to, and where it may fail over.

Pure logic, no I/O.  L{parse_policy} turns C{metadata.model_policy} into a
L{ModelPolicy} (or refuses it with L{PolicyError}); L{decide} applies the
policy table to one request; L{models_for} lists what C{GET /v1/models} shows.

Definitions used below (all comparisons are on the requested name with
surrounding whitespace removed):

 - I{exact}: the requested name equals an allowed C{ref} exactly as the policy
   declares it (surrounding whitespace removed).
 - I{bare}: the requested name has no C{/}.
 - I{prefixed}: the requested name has a C{/}.
 - I{model part}: what follows the first C{/} of a ref
   (C{openrouter/anthropic/claude-sonnet-4} -> C{anthropic/claude-sonnet-4}).
   Model ids are compared case-sensitively: providers treat them so.
 - I{same upstream}: two refs name the same upstream model when, after
   L{canonical_provider} (lower case, aliases resolved: C{OpenAI} ->
   C{openai}, C{z.ai} -> C{zai}, C{kimi-code} -> C{kimi-coding}), their
   C{(provider, model)} pairs are equal.  As a second, weaker tier (the
   reference proxy's vendor bridge), a ref through a vendor-prefixed gateway
   (L{VENDOR_GATEWAYS}: C{openrouter/<vendor>/<model>}) names the same model
   as C{<vendor>/<model>} (vendor canonicalised the same way), and so do two
   gateways carrying the same C{<vendor>/<model>}.  The first tier wins: a
   prefixed request is matched on the second tier only when no allowed ref
   matches it on the first.
"""

from __future__ import annotations

import re
from typing import Any

import attrs

from cllama_tx.surfaces.errors import ProxyError
from cllama_tx.surfaces.matrix import (
    InvalidModelRef,
    ModelRef,
    canonical_provider,
    split_model_ref,
)

CLAMP = "clamp"
REJECT = "reject"
MODES = (CLAMP, REJECT)

PRIMARY = "primary"
FALLBACK = "fallback"

# Intervention names, as the audit log spells them (CONTRACT sections 4, 7).
MISSING = "missing"
BARE_MODEL_NORMALIZED = "bare_model_normalized"
AMBIGUOUS_CLAMPED = "ambiguous_clamped"
PROVIDER_NORMALIZED = "provider_normalized"
DISALLOWED_CLAMPED = "disallowed_clamped"
# A dated snapshot id of an allowed model (claude-haiku-4-5-20251001 for an
# allowed anthropic/claude-haiku-4-5): the allowed ref, as declared.
DATED_MODEL_NORMALIZED = "dated_model_normalized"

# The date suffixes providers give snapshot ids: Anthropic's -20251001,
# OpenAI's -2024-08-06, Vertex's @20250929.
_DATE_SUFFIX = re.compile(r"(?:-\d{8}|-\d{4}-\d{2}-\d{2}|@\d{8})$")

# Gateways whose model ids are themselves "<vendor>/<model>".
VENDOR_GATEWAYS = frozenset({"openrouter", "vercel"})

# Requested names are echoed in refusals; never echo an unbounded string.
_ECHO_LIMIT = 200


class PolicyError(ValueError):
    """C{model_policy} is malformed; the message says where and why."""


class PolicyRefusal(ProxyError):
    """
    The request is refused by model routing: C{400 invalid_model} (legacy
    agent without a usable C{provider/model}, or a non-string C{model}) or
    C{403 model_not_allowed} (C{mode: "reject"}).  A L{ProxyError}, so the
    web layer renders it in the surface's shape.
    """


@attrs.frozen
class AllowedModel:
    """
    One C{allowed} entry.  C{slot} is lower-cased and stripped; C{declared}
    is the ref as the policy spells it (stripped), used for exact matches.
    """

    slot: str
    ref: ModelRef
    declared: str = attrs.field(
        default=attrs.Factory(lambda self: str(self.ref), takes_self=True)
    )


@attrs.frozen
class ModelPolicy:
    mode: str
    allowed: tuple[AllowedModel, ...]
    # The decisions that land on an allowed ref, made once per policy:
    # (ref, intervention) -> Decision (bounded by the allowed refs).
    _decisions: dict = attrs.field(init=False, factory=dict, eq=False, repr=False)

    @property
    def refs(self) -> tuple[ModelRef, ...]:
        """The distinct allowed refs, in declaration order."""
        return _unique(a.ref for a in self.allowed)

    @property
    def default(self) -> ModelRef:
        """The first C{primary} ref, else the first entry's ref."""
        for a in self.allowed:
            if a.slot == PRIMARY:
                return a.ref
        return self.allowed[0].ref

    @property
    def failover_chain(self) -> tuple[ModelRef, ...]:
        """The C{primary} ref, then every C{fallback} ref in order (distinct)."""
        primaries = [a.ref for a in self.allowed if a.slot == PRIMARY]
        fallbacks = [a.ref for a in self.allowed if a.slot == FALLBACK]
        return _unique(primaries + fallbacks)


@attrs.frozen
class Decision:
    """
    Where one request goes.  C{ref} is the chosen model; C{intervention} the
    audit intervention name, or C{None} when the request was used as asked;
    C{candidates} the refs to try in order (C{ref} first), all of them
    declared by the policy (or just C{ref} for a legacy agent).
    """

    ref: ModelRef
    intervention: str | None
    candidates: tuple[ModelRef, ...]


def _unique(refs) -> tuple[ModelRef, ...]:
    seen: set[ModelRef] = set()
    out = []
    for ref in refs:
        if ref not in seen:
            seen.add(ref)
            out.append(ref)
    return tuple(out)


def parse_policy(raw: Any) -> ModelPolicy | None:
    """
    Parse C{metadata.model_policy}.

    Returns C{None} when there is no policy: C{raw} is C{None}, or its
    C{allowed} is absent, C{null} or empty (legacy routing).

    Rules (anything else raises L{PolicyError}; the identity layer treats the
    agent as misconfigured, failing closed):
     - C{raw} is an object; unknown keys are ignored.
     - C{mode} is absent/C{null} (meaning C{"clamp"}) or the string
       C{"clamp"} or C{"reject"} (case and surrounding space ignored).
     - C{allowed} is a list of objects, each with C{slot} and C{ref}
       non-empty strings; C{slot} is compared case-insensitively.
     - C{ref} is a routable C{<provider>/<model>} (L{split_model_ref}): no bare
       names, no synthetic C{cllama/} prefix.
     - At most one entry has slot C{primary}.
     - The same ref may appear more than once (e.g. as a named slot and as a
       fallback); it is counted once everywhere.

    @raise PolicyError: the policy is malformed.
    """
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise PolicyError("model_policy must be an object")

    mode = raw.get("mode")
    if mode is None:
        mode = CLAMP
    elif isinstance(mode, str) and mode.strip().lower() in MODES:
        mode = mode.strip().lower()
    else:
        raise PolicyError(
            f"model_policy.mode must be 'clamp' or 'reject', not {_echo(mode)}"
        )

    entries = raw.get("allowed")
    if entries is None:
        return None
    if not isinstance(entries, list):
        raise PolicyError("model_policy.allowed must be a list")
    if not entries:
        return None

    allowed = []
    primaries = 0
    for index, entry in enumerate(entries):
        where = f"model_policy.allowed[{index}]"
        if not isinstance(entry, dict):
            raise PolicyError(f"{where} must be an object with 'slot' and 'ref'")
        slot = entry.get("slot")
        if not isinstance(slot, str) or not slot.strip():
            raise PolicyError(f"{where}.slot must be a non-empty string")
        slot = slot.strip().lower()
        declared = entry.get("ref")
        if not isinstance(declared, str) or not declared.strip():
            raise PolicyError(f"{where}.ref must be a non-empty string")
        declared = declared.strip()
        try:
            ref = split_model_ref(declared)
        except InvalidModelRef as e:
            raise PolicyError(f"{where}.ref: {e}") from None
        if slot == PRIMARY:
            primaries += 1
            if primaries > 1:
                raise PolicyError(
                    f"{where}: model_policy.allowed has more than one 'primary' slot"
                )
        allowed.append(AllowedModel(slot=slot, ref=ref, declared=declared))
    return ModelPolicy(mode=mode, allowed=tuple(allowed))


def _echo(value: Any) -> str:
    """C{value} for a message: repr, shortened."""
    text = repr(value)
    if len(text) > _ECHO_LIMIT:
        text = text[: _ECHO_LIMIT - 3] + "..."
    return text


def _same_model_key(ref: ModelRef) -> tuple[str, str]:
    """
    The second-tier identity of C{ref}: a vendor-prefixed gateway's
    C{<vendor>/<model>} becomes C{(canonical vendor, model)}.
    """
    if ref.provider in VENDOR_GATEWAYS:
        vendor, sep, model = ref.model.partition("/")
        if sep and vendor.strip() and model:
            return canonical_provider(vendor), model
    return ref.provider, ref.model


def _last_segment(model: str) -> str:
    return model.rpartition("/")[2]


def undated(model: str) -> str | None:
    """
    C{model} without its snapshot date (C{claude-haiku-4-5-20251001} ->
    C{claude-haiku-4-5}, C{gpt-4o-2024-08-06} -> C{gpt-4o}), or None when
    it has none.
    """
    match = _DATE_SUFFIX.search(model)
    if match is None or match.start() == 0:
        return None
    return model[: match.start()]


def _candidates(policy: ModelPolicy, chosen: ModelRef) -> tuple[ModelRef, ...]:
    """C{chosen}, then the failover chain without C{chosen} or repeats."""
    return _unique((chosen, *policy.failover_chain))


def _legacy(name: str, bare_provider: str | None) -> Decision:
    if not name:
        raise PolicyRefusal(
            status=400,
            code="invalid_model",
            message="the request names no model: send 'model' as '<provider>/<model>', "
            "e.g. 'openai/gpt-4o'",
        )
    if "/" not in name and bare_provider is not None:
        ref = ModelRef(canonical_provider(bare_provider), name)
    else:
        try:
            ref = split_model_ref(name)
        except InvalidModelRef:
            raise PolicyRefusal(
                status=400,
                code="invalid_model",
                message=f"model {_echo(name)} must be '<provider>/<model>' with a real "
                "provider, e.g. 'openai/gpt-4o' (not 'cllama/...')",
            ) from None
    return Decision(ref=ref, intervention=None, candidates=(ref,))


def _allowed_list(policy: ModelPolicy) -> str:
    return ", ".join(str(r) for r in policy.refs)


def _refuse(policy: ModelPolicy, name: str, intervention: str, matches) -> PolicyRefusal:
    allowed = _allowed_list(policy)
    if intervention == MISSING:
        message = (
            "the request names no model and this agent's model policy (mode "
            f"'reject') does not choose one; name one of: {allowed}"
        )
    elif intervention == AMBIGUOUS_CLAMPED:
        message = (
            f"model {_echo(name)} matches several allowed models "
            f"({', '.join(str(r) for r in matches)}); name one of them in full. "
            f"Allowed: {allowed}"
        )
    else:
        message = (
            f"model {_echo(name)} is not allowed for this agent (model policy mode "
            f"'reject'); allowed: {allowed}"
        )
    return PolicyRefusal(status=403, code="model_not_allowed", message=message)


def _clamp(policy: ModelPolicy, name: str, intervention: str, matches=()) -> Decision:
    if policy.mode == REJECT:
        raise _refuse(policy, name, intervention, matches)
    return _chosen(policy, policy.default, intervention)


def _chosen(policy: ModelPolicy, ref: ModelRef, intervention: str | None) -> Decision:
    key = (ref, intervention)
    found = policy._decisions.get(key)
    if found is None:
        found = policy._decisions[key] = Decision(ref=ref, intervention=intervention,
                                                  candidates=_candidates(policy, ref))
    return found


def decide(
    policy: ModelPolicy | None,
    requested: Any,
    *,
    legacy_bare_provider: str | None = None,
) -> Decision:
    """
    Apply the policy table (CONTRACT section 4) to the request's C{model}.
    The first matching rule wins:

     1. C{model} present but not a string: C{400 invalid_model}, whatever the
        policy (a malformed request, not a policy question).
     2. No policy (C{None}): legacy.  The name must be a routable
        C{<provider>/<model>}, else C{400 invalid_model}; a missing name is
        refused the same way.  With C{legacy_bare_provider} set (e.g.
        C{"anthropic"} on the Messages surface, CONTRACT section 3.1), a bare
        name is taken as a model of that provider instead of refused.
        Candidates: just that ref.
     3. Missing (C{None}, empty or blank): the default, C{missing}.
     4. Exactly an allowed ref as declared: that ref, no intervention.
     5. Bare: allowed refs whose model part equals the name; if none, those
        whose model part's last C{/}-segment equals it
        (C{claude-sonnet-4} -> C{openrouter/anthropic/claude-sonnet-4}, as the
        reference proxy does).  One: that ref, C{bare_model_normalized}.
        Several (in the first tier that has any): the default,
        C{ambiguous_clamped}.  None: the same two tiers again with the
        name's snapshot date removed (L{undated}:
        C{claude-haiku-4-5-20251001} -> C{anthropic/claude-haiku-4-5}),
        C{dated_model_normalized}; else the default, C{disallowed_clamped}.
     6. Prefixed and I{same upstream} (module docstring) as allowed refs:
        one: that ref, C{provider_normalized}; several: the default,
        C{ambiguous_clamped}; then the same with the model's snapshot date
        removed, C{dated_model_normalized}.  A prefixed name that is not a
        routable ref (e.g. C{cllama/...}) matches nothing.
     7. Anything else: the default, C{disallowed_clamped}.

    In C{mode: "reject"} every outcome that would land on the default
    (C{missing}, C{ambiguous_clamped}, C{disallowed_clamped}) raises
    C{403 model_not_allowed} instead; a missing model is refused too, since
    picking a model the agent did not name is exactly a clamp.  The
    normalisations (rules 4-6 with one match) are allowed in both modes: they
    name the same model the agent asked for.

    Candidates: the chosen ref, then the failover chain (primary, fallbacks
    in order) without the chosen ref and without repeats.  Every candidate is
    a declared ref.

    @raise PolicyRefusal: see above.
    """
    if requested is not None and not isinstance(requested, str):
        raise PolicyRefusal(
            status=400,
            code="invalid_model",
            message="the 'model' field must be a string",
        )
    name = (requested or "").strip()
    if policy is None:
        return _legacy(name, legacy_bare_provider)

    if not name:
        return _clamp(policy, name, MISSING)

    for entry in policy.allowed:
        if entry.declared == name:
            return _chosen(policy, entry.ref, None)

    refs = policy.refs
    if "/" not in name:
        tiers: tuple[list[ModelRef], ...] = (
            [r for r in refs if r.model == name],
            [r for r in refs if _last_segment(r.model) == name],
        )
        base = undated(name)
        if base is not None:
            tiers += (
                [r for r in refs if r.model == base],
                [r for r in refs if _last_segment(r.model) == base],
            )
        for index, matches in enumerate(tiers):
            if len(matches) == 1:
                return _chosen(policy, matches[0], BARE_MODEL_NORMALIZED if index < 2 else DATED_MODEL_NORMALIZED)
            if matches:
                return _clamp(policy, name, AMBIGUOUS_CLAMPED, matches)
        return _clamp(policy, name, DISALLOWED_CLAMPED)

    try:
        wanted = split_model_ref(name)
    except InvalidModelRef:
        return _clamp(policy, name, DISALLOWED_CLAMPED)
    key = _same_model_key(wanted)
    tiers = (
        [r for r in refs if r == wanted],
        [r for r in refs if _same_model_key(r) == key],
    )
    base = undated(wanted.model)
    if base is not None:
        plain = ModelRef(wanted.provider, base)
        plain_key = _same_model_key(plain)
        tiers += (
            [r for r in refs if r == plain],
            [r for r in refs if _same_model_key(r) == plain_key],
        )
    for index, matches in enumerate(tiers):
        if len(matches) == 1:
            return _chosen(policy, matches[0], PROVIDER_NORMALIZED if index < 2 else DATED_MODEL_NORMALIZED)
        if matches:
            return _clamp(policy, name, AMBIGUOUS_CLAMPED, matches)
    return _clamp(policy, name, DISALLOWED_CLAMPED)


def models_for(policy: ModelPolicy | None) -> list[ModelRef]:
    """
    The models an agent may name, for C{GET /v1/models}: the default first,
    then the rest of the failover chain, then every other allowed ref in
    declaration order; each once.  No policy: an empty list (a legacy agent
    may name any routable ref; the caller decides what to list).
    """
    if policy is None:
        return []
    return list(_unique((policy.default, *policy.failover_chain, *policy.refs)))
