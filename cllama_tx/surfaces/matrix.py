"""
The ingress surface matrix (ADR-023): which ingress surface a runner uses to
reach a provider, the provider aliases, and how a model ref splits.

This module is the one place that decides these things.  It is pure data and
pure functions; `GET /v1/surfaces` serves L{describe}.
"""

from __future__ import annotations

import attrs

OPENAI_CHAT = "openai-chat-completions"
ANTHROPIC_MESSAGES = "anthropic-messages"
# The third ingress surface: no provider is reached "through" it by the
# matrix (a runner still picks chat or messages by provider), but every
# provider answers it: natively where the provider serves the Responses
# API (cllama_tx.providers.catalog), translated everywhere else.
OPENAI_RESPONSES = "openai-responses"

SURFACE_PATHS = {
    OPENAI_CHAT: "/v1/chat/completions",
    ANTHROPIC_MESSAGES: "/v1/messages",
    OPENAI_RESPONSES: "/v1/responses",
}

#: Which providers each surface reaches.
SURFACE_REACH = {
    OPENAI_CHAT: "the providers below marked openai-chat-completions, and every other provider translated",
    ANTHROPIC_MESSAGES: "the providers below marked anthropic-messages, and every other provider translated",
    OPENAI_RESPONSES: (
        "every provider: natively where the provider catalog says it serves the Responses API, "
        "translated to chat completions or messages everywhere else"
    ),
}

# Providers that runners reach through the Anthropic Messages surface.  Every
# other provider uses the OpenAI Chat Completions surface.
ANTHROPIC_MESSAGES_PROVIDERS = frozenset(
    {
        "anthropic",
        "synthetic",
        "minimax-portal",
        "kimi-coding",
        "cloudflare-ai-gateway",
        "xiaomi",
    }
)

# Providers the matrix names explicitly on the chat surface.  Unknown names
# also land there (DEFAULT_SURFACE); listing these pins them in tests.
OPENAI_CHAT_PROVIDERS = frozenset(
    {
        "openai",
        "openrouter",
        "google",
        "xai",
        "ollama",
        "vercel",
        "zai",
        "volcengine",
        "qwen-portal",
        "opencode",
    }
)

DEFAULT_SURFACE = OPENAI_CHAT

ALIASES = {
    "z.ai": "zai",
    "z-ai": "zai",
    "opencode-zen": "opencode",
    "qwen": "qwen-portal",
    "kimi-code": "kimi-coding",
    "bytedance": "volcengine",
    "doubao": "volcengine",
}

# A bare ref (no "/") names a model of this provider.
BARE_REF_PROVIDER = "anthropic"

# Prefixes that are this proxy's own name, never a provider: a runner must
# not invent them ("cllama/google/..." is rejected).
SYNTHETIC_PREFIXES = frozenset({"cllama", "cllama_tx", "cllama-tx"})


class InvalidModelRef(ValueError):
    """The model ref cannot be routed; the message says why."""


@attrs.frozen
class ModelRef:
    provider: str
    model: str

    def __str__(self) -> str:
        return f"{self.provider}/{self.model}"


def canonical_provider(name: str) -> str:
    """Lower-case C{name} and resolve aliases."""
    lowered = name.strip().lower()
    return ALIASES.get(lowered, lowered)


def surface_for(provider: str) -> str:
    """The ingress surface a runner must use for C{provider}."""
    provider = canonical_provider(provider)
    if provider in ANTHROPIC_MESSAGES_PROVIDERS:
        return ANTHROPIC_MESSAGES
    return DEFAULT_SURFACE


def split_model_ref(ref: str) -> ModelRef:
    """
    Split C{provider/model} on the first C{/}; the provider is lower-cased and
    de-aliased, the model keeps everything after the first C{/}.

    @raise InvalidModelRef: no provider part, an empty part, or a synthetic
        prefix.
    """
    provider, sep, model = ref.partition("/")
    if not sep:
        raise InvalidModelRef(
            f"model {ref!r} must be '<provider>/<model>', e.g. 'openai/gpt-4o'"
        )
    provider = canonical_provider(provider)
    if not provider or not model:
        raise InvalidModelRef(f"model {ref!r} must be '<provider>/<model>' with both parts")
    if provider in SYNTHETIC_PREFIXES:
        raise InvalidModelRef(
            f"model {ref!r} uses the synthetic prefix {provider!r}: name the real "
            "provider instead, e.g. 'google/gemini-2.5-flash'"
        )
    return ModelRef(provider, model)


def describe() -> dict:
    """The matrix as a JSON-ready document."""
    providers = {p: ANTHROPIC_MESSAGES for p in sorted(ANTHROPIC_MESSAGES_PROVIDERS)}
    providers.update({p: OPENAI_CHAT for p in sorted(OPENAI_CHAT_PROVIDERS)})
    return {
        "surfaces": [
            {"name": name, "path": path, "reaches": SURFACE_REACH[name]} for name, path in SURFACE_PATHS.items()
        ],
        "providers": dict(sorted(providers.items())),
        "aliases": dict(sorted(ALIASES.items())),
        "default_surface": DEFAULT_SURFACE,
        "unknown_provider_rule": (
            "a provider not listed here uses the default surface "
            f"({DEFAULT_SURFACE}); the proxy answers 400 if it has no such provider configured"
        ),
        "bare_ref_provider": BARE_REF_PROVIDER,
        "synthetic_prefixes_rejected": sorted(SYNTHETIC_PREFIXES),
    }
