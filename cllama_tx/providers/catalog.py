"""
The provider catalog (CONTRACT 3.2): where each known provider lives, how it
wants its key, which wire format it speaks, and which environment variables
seed it.

Pure data and tiny pure functions: no I/O, no clock.  The registry layers
C{providers.json} and the environment on top of this table.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import attrs

BEARER = "bearer"
X_API_KEY = "x-api-key"
NO_AUTH = "none"
AUTH_MODES = frozenset({BEARER, X_API_KEY, NO_AUTH})

OPENAI_FORMAT = "openai"
ANTHROPIC_FORMAT = "anthropic"
API_FORMATS = frozenset({OPENAI_FORMAT, ANTHROPIC_FORMAT})

# Where a provider's rate limits apply: to each model separately ("model":
# a 429 for one model cools the key for that model only) or to the whole
# key ("key", the contract's default for providers we know nothing about).
PER_MODEL = "model"
PER_KEY = "key"
RATE_LIMIT_SCOPES = frozenset({PER_MODEL, PER_KEY})

# The cheap authenticated GET that tells whether a key is valid, as an
# ingress-style path (upstream_url() maps it onto the base URL).
DEFAULT_PROBE_PATH = "/v1/models"


def _one_of(allowed: frozenset):
    def check(instance, attribute, value):
        if value not in allowed:
            raise ValueError(
                f"{attribute.name} must be one of {sorted(allowed)}, got {value!r}"
            )

    return check


@attrs.frozen
class ProviderSpec:
    """
    Where and how to reach one provider.  C{base_url} is L{None} when there is
    no public default and the operator must configure one.
    """

    name: str
    base_url: str | None
    auth: str = attrs.field(validator=_one_of(AUTH_MODES))
    api_format: str = attrs.field(validator=_one_of(API_FORMATS))
    rate_limit_scope: str = attrs.field(default=PER_KEY, validator=_one_of(RATE_LIMIT_SCOPES))
    probe_path: str | None = DEFAULT_PROBE_PATH
    # The operator's OpenAI organization and project (openai format only).
    organization: str | None = attrs.field(default=None, repr=False)
    project: str | None = attrs.field(default=None, repr=False)


def _spec(
    name: str,
    base_url: str | None,
    auth: str,
    api_format: str,
    rate_limit_scope: str = PER_KEY,
    probe_path: str | None = DEFAULT_PROBE_PATH,
) -> ProviderSpec:
    return ProviderSpec(
        name=name,
        base_url=base_url,
        auth=auth,
        api_format=api_format,
        rate_limit_scope=rate_limit_scope,
        probe_path=probe_path,
    )


CATALOG: Mapping[str, ProviderSpec] = MappingProxyType(
    {
        # --- CONTRACT 3.2 table (exact) -------------------------------------
        # Rate limits per model: OpenAI (per model, per organization),
        # Anthropic (per model class), Gemini (per model), xAI (per model),
        # OpenRouter (per model; its 429s for paid models come from that
        # model's upstream).  Probes: GET /models needs the key on all five,
        # except OpenRouter's, which is public: its /key is not.
        # CONTRACT 3.2.
        "openai": _spec(
            "openai", "https://api.openai.com/v1", BEARER, OPENAI_FORMAT, PER_MODEL
        ),
        # CONTRACT 3.2.
        "anthropic": _spec(
            "anthropic", "https://api.anthropic.com/v1", X_API_KEY, ANTHROPIC_FORMAT, PER_MODEL
        ),
        # CONTRACT 3.2.
        "openrouter": _spec(
            "openrouter", "https://openrouter.ai/api/v1", BEARER, OPENAI_FORMAT, PER_MODEL, "/v1/key"
        ),
        # CONTRACT 3.2 (Gemini's OpenAI-compatible endpoint).
        "google": _spec(
            "google",
            "https://generativelanguage.googleapis.com/v1beta/openai",
            BEARER,
            OPENAI_FORMAT,
            PER_MODEL,
        ),
        # CONTRACT 3.2.
        "xai": _spec("xai", "https://api.x.ai/v1", BEARER, OPENAI_FORMAT, PER_MODEL),
        # CONTRACT 3.2.  The gateway's model list is public; its credit
        # balance is the key's own.
        "vercel": _spec(
            "vercel", "https://ai-gateway.vercel.sh/v1", BEARER, OPENAI_FORMAT, PER_KEY, "/v1/credits"
        ),
        # CONTRACT 3.2 (the pod's ollama service; keyless).
        "ollama": _spec("ollama", "http://ollama:11434/v1", NO_AUTH, OPENAI_FORMAT, PER_KEY, None),
        # --- Anthropic Messages surface (CONTRACT 3.1) -----------------------
        # Base URLs below end in /v1 because upstream_url() strips the ingress
        # path's /v1 (Anthropic SDK clients append /v1/messages to the
        # documented base).
        # Synthetic documents its Anthropic-compatible base as
        # https://api.synthetic.new/anthropic (docs.openclaw.ai/providers/synthetic).
        "synthetic": _spec(
            "synthetic", "https://api.synthetic.new/anthropic/v1", X_API_KEY, ANTHROPIC_FORMAT
        ),
        # MiniMax's global Anthropic-compatible base is
        # https://api.minimax.io/anthropic (platform.minimax.io, "Anthropic API");
        # operators in mainland China set https://api.minimaxi.com/anthropic/v1.
        "minimax-portal": _spec(
            "minimax-portal", "https://api.minimax.io/anthropic/v1", X_API_KEY, ANTHROPIC_FORMAT
        ),
        # Kimi For Coding: base https://api.kimi.com/coding, messages at
        # /coding/v1/messages with x-api-key (kimi.com Code docs, "other
        # coding agents").
        "kimi-coding": _spec(
            "kimi-coding", "https://api.kimi.com/coding/v1", X_API_KEY, ANTHROPIC_FORMAT
        ),
        # Cloudflare AI Gateway URLs contain the operator's account and gateway
        # ids (https://gateway.ai.cloudflare.com/v1/<account>/<gateway>/anthropic):
        # there is no public default, the operator must configure it.
        "cloudflare-ai-gateway": _spec(
            "cloudflare-ai-gateway", None, X_API_KEY, ANTHROPIC_FORMAT
        ),
        # Xiaomi MiMo's Anthropic-compatible base
        # https://api.xiaomimimo.com/anthropic (platform.xiaomimimo.com docs).
        "xiaomi": _spec(
            "xiaomi", "https://api.xiaomimimo.com/anthropic/v1", X_API_KEY, ANTHROPIC_FORMAT
        ),
        # --- OpenAI Chat Completions surface (CONTRACT 3.1) ------------------
        # Z.AI general (pay-as-you-go) OpenAI-compatible endpoint
        # (docs.z.ai); GLM Coding Plan subscribers set
        # https://api.z.ai/api/coding/paas/v4 instead.
        "zai": _spec("zai", "https://api.z.ai/api/paas/v4", BEARER, OPENAI_FORMAT),
        # Volcengine Ark (Doubao) OpenAI-compatible endpoint, Beijing region
        # (volcengine.com/docs/82379, "Base URL").
        "volcengine": _spec(
            "volcengine", "https://ark.cn-beijing.volces.com/api/v3", BEARER, OPENAI_FORMAT
        ),
        # Qwen Portal (OAuth token) endpoint https://portal.qwen.ai/v1
        # (docs.openclaw.ai/providers/qwen-oauth).
        "qwen-portal": _spec(
            "qwen-portal", "https://portal.qwen.ai/v1", BEARER, OPENAI_FORMAT
        ),
        # OpenCode Zen gateway, https://opencode.ai/zen/v1 (opencode.ai/docs/zen).
        "opencode": _spec("opencode", "https://opencode.ai/zen/v1", BEARER, OPENAI_FORMAT),
    }
)


# --- The Responses API ------------------------------------------------------

#: Providers that serve the OpenAI Responses API (C{POST /v1/responses}) at
#: their base URL.  A request on the Responses surface goes to them as it
#: came (the agent's key swapped, nothing translated); any other provider
#: gets it translated to its own wire format.
RESPONSES_PROVIDERS = frozenset({"openai"})

#: Models that only the Responses API serves, by provider: exact ids or
#: prefixes ending in C{*} (dated snapshots).  A chat or Messages request
#: for one goes upstream as a Responses call (the upstream adapter); a model
#: missing here is still caught by the provider's own answer (a 400/404
#: saying it needs /v1/responses), and retried that way once.
RESPONSES_ONLY_MODELS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "openai": (
            "o1-pro*",
            "o3-pro*",
            "o3-deep-research*",
            "o4-mini-deep-research*",
            "computer-use-preview*",
            "codex-mini*",
            "gpt-5-codex*",
            "gpt-5-pro*",
            "gpt-5.1-codex*",
            "gpt-5.2-codex*",
            "gpt-5.2-pro*",
            "gpt-5.3-codex*",
            "gpt-5.4-pro*",
            "gpt-5.5-pro*",
        ),
    }
)


def base_provider(name: str) -> str:
    """The catalog provider of a configured one (a model table deployment C{openai@x} is C{openai})."""
    return name.partition("@")[0].lower()


def serves_responses(provider: str, api_format: str) -> bool:
    """Whether C{provider} (of wire format C{api_format}) answers C{/v1/responses} itself."""
    return api_format == OPENAI_FORMAT and base_provider(provider) in RESPONSES_PROVIDERS


# Per provider: the exact ids and the prefixes, matched once per request.
_RESPONSES_ONLY = {
    provider: (
        frozenset(p for p in patterns if not p.endswith("*")),
        tuple(p[:-1] for p in patterns if p.endswith("*")),
    )
    for provider, patterns in RESPONSES_ONLY_MODELS.items()
}


def responses_only(provider: str, model: str) -> bool:
    """Whether the catalog says only the Responses API serves C{model} at C{provider}."""
    patterns = _RESPONSES_ONLY.get(base_provider(provider))
    if patterns is None:
        return False
    exact, prefixes = patterns
    return model in exact or model.startswith(prefixes)


#: What a provider's 400/404 says when a model is served by the Responses
#: API only ("This model is only supported in v1/responses and not in
#: v1/chat/completions."): one of these, and a word saying it is the only way.
NEEDS_RESPONSES_HINTS = (b"v1/responses", b"responses api")


def needs_responses(status: int, body: bytes) -> bool:
    """Whether an upstream refusal says the model must be called through the Responses API."""
    if status not in (400, 404) or not body:
        return False
    text = body[:4096].lower()
    return any(hint in text for hint in NEEDS_RESPONSES_HINTS) and (
        b"only" in text or b"not supported" in text or b"not available" in text
    )


@attrs.frozen
class EnvNames:
    """
    The environment variables that seed one provider.

    C{key_prefixes} are tried in priority order; each prefix C{P} gives
    C{P_API_KEY}, C{P_API_KEY_1}, C{P_API_KEY_2}.  C{base_url} names the
    variable overriding the base URL, or L{None}.
    """

    key_prefixes: tuple[str, ...]
    base_url: str | None
    # Variables naming the operator's organization and project (the
    # official OpenAI SDK's names), or None.
    organization: str | None = None
    project: str | None = None

    def key_vars(self) -> tuple[str, ...]:
        """Every key variable, highest priority first."""
        return tuple(
            f"{prefix}_API_KEY{suffix}"
            for prefix in self.key_prefixes
            for suffix in KEY_SUFFIXES
        )


KEY_SUFFIXES = ("", "_1", "_2")

ENV_NAMES: Mapping[str, EnvNames] = MappingProxyType(
    {
        "openai": EnvNames(("OPENAI",), "OPENAI_BASE_URL", "OPENAI_ORG_ID", "OPENAI_PROJECT_ID"),
        "anthropic": EnvNames(("ANTHROPIC",), "ANTHROPIC_BASE_URL"),
        "openrouter": EnvNames(("OPENROUTER",), "OPENROUTER_BASE_URL"),
        "xai": EnvNames(("XAI",), "XAI_BASE_URL"),
        # GOOGLE_API_KEY is a lower-priority alias of GEMINI_API_KEY.
        "google": EnvNames(("GEMINI", "GOOGLE"), "GOOGLE_BASE_URL"),
        "vercel": EnvNames(("AI_GATEWAY",), "AI_GATEWAY_BASE_URL"),
        # Keyless: base URL only.
        "ollama": EnvNames((), "OLLAMA_BASE_URL"),
    }
)


def seed_key_id(env_var: str) -> str:
    """The id of the key read from environment variable C{env_var}."""
    return f"seed:{env_var}"


def upstream_url(base_url: str, ingress_path: str) -> str:
    """
    The upstream URL for a request that arrived on C{ingress_path}: the base
    URL plus the path without its leading C{/v1} segment, so
    C{https://openrouter.ai/api/v1} + C{/v1/chat/completions} gives
    C{https://openrouter.ai/api/v1/chat/completions}.
    """
    if not ingress_path.startswith("/"):
        ingress_path = "/" + ingress_path
    if ingress_path == "/v1":
        rest = ""
    elif ingress_path.startswith("/v1/"):
        rest = ingress_path[3:]
    else:
        rest = ingress_path
    return base_url.rstrip("/") + rest


#: Checked credential headers by (auth mode, key): a key is checked and
#: encoded once, not on every request it signs.  Bounded (cleared whole).
_CHECKED_AUTH: dict[tuple[str, str], tuple[tuple[bytes, bytes], ...]] = {}
MAX_CHECKED_AUTH = 1024


def auth_headers(spec_auth: str, secret: str | None) -> list[tuple[bytes, bytes]]:
    """
    The upstream credential headers for auth mode C{spec_auth}.

    @raise ValueError: unknown mode, or a mode that needs a key without one,
        or a key that cannot be a header value.  Messages never contain the
        key.
    """
    if type(secret) is str:
        checked = _CHECKED_AUTH.get((spec_auth, secret))
        if checked is not None:
            return list(checked)
    headers = _auth_headers(spec_auth, secret)
    if type(secret) is str and type(spec_auth) is str:
        if len(_CHECKED_AUTH) >= MAX_CHECKED_AUTH:
            _CHECKED_AUTH.clear()
        _CHECKED_AUTH[(spec_auth, secret)] = tuple(headers)
    return headers


def _auth_headers(spec_auth: str, secret: str | None) -> list[tuple[bytes, bytes]]:
    if spec_auth == NO_AUTH:
        return []
    if spec_auth not in AUTH_MODES:
        raise ValueError(f"unknown upstream auth mode {spec_auth!r}")
    if not secret:
        raise ValueError(f"upstream auth mode {spec_auth!r} needs a key")
    try:
        value = secret.encode("ascii")
    except UnicodeEncodeError:
        raise ValueError("provider key contains non-ASCII characters") from None
    if any(c < 0x21 or c == 0x7F for c in value):
        raise ValueError("provider key contains whitespace or control characters")
    if spec_auth == BEARER:
        return [(b"Authorization", b"Bearer " + value)]
    return [(b"x-api-key", value)]
