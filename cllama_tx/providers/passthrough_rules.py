"""
Where a passthrough request may go: C{/_proxy/<provider>/<path>} parsed,
normalised and checked against the operator's allow-list of paths per
provider, and the provider-native base URL and credential header it is
sent with.

The passthrough carries provider-native endpoints the surfaces do not
translate (embeddings, images, audio, token counting, Gemini's own API).
Agents are not trusted with the path: it is decoded once, strictly
(printable URL characters only, no empty, C{.} or C{..} segment, no encoded
slash, backslash or percent, no absolute URL), so what the allow-list
matched is exactly what the provider receives, below the provider's base
URL and nowhere else.  Pure data and pure functions: no I/O.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from types import MappingProxyType

import attrs

__all__ = [
    "DEFAULT_PATHS",
    "PREFIX",
    "AllowList",
    "AllowListError",
    "PathRefused",
    "PathRule",
    "Target",
    "native_base_url",
    "native_key_header",
    "parse_allow_list",
    "parse_target",
    "path_model",
    "relative_segments",
    "upstream_url",
]

PREFIX = b"/_proxy/"

#: The documented safe set: what each provider's passthrough allows unless
#: the operator says otherwise (C{CLLAMA_PASSTHROUGH_PATHS}).  Paths are
#: relative to the provider's base URL.
DEFAULT_PATHS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "openai": (
            "POST embeddings",
            "POST moderations",
            "POST images/generations",
            "POST audio/*",
        ),
        "anthropic": (
            "POST messages/count_tokens",
            "GET models",
            "GET models/*",
        ),
        "google": (
            "POST models/*:generateContent",
            "POST models/*:streamGenerateContent",
            "POST models/*:countTokens",
        ),
    }
)

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"})

# A decoded path segment: RFC 3986 path characters without "%" (no
# encoding survives decoding) and without "/" (a segment never splits).
_SEGMENT = re.compile(r"^[A-Za-z0-9._~:@!$&'()*+,;=-]+$")
_PROVIDER = re.compile(r"^[a-z0-9][a-z0-9._@-]{0,127}$")
_ESCAPE = re.compile(rb"%([0-9A-Fa-f]{2})")
MAX_PATH = 2048
MAX_SEGMENTS = 32

# Providers whose native API sits above the base URL the surfaces use, and
# the header their native API reads the key from.  Google's OpenAI
# compatibility layer is <native>/openai; its native API takes the key in
# x-goog-api-key (a bearer token there is an OAuth token, not an API key).
_NATIVE_SUFFIX = {"google": "/openai"}
_NATIVE_KEY_HEADER = {"google": b"x-goog-api-key"}


class PathRefused(Exception):
    """A passthrough target the proxy will not send anywhere; 400 unless said."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


class AllowListError(ValueError):
    """The operator's allow-list setting is malformed; the message says where."""


@attrs.frozen
class Target:
    """
    A passthrough request target, decoded and checked: the provider (lower
    case), the path's segments below it, and the raw query (without C{?}).
    """

    provider: str
    segments: tuple[str, ...]
    query: bytes = b""

    @property
    def path(self) -> str:
        """The agent's path below the provider, as the allow-list sees it."""
        return "/".join(self.segments)

    @property
    def display(self) -> str:
        """The whole passthrough path, for audit lines, ledger rows and messages."""
        return f"/_proxy/{self.provider}/{self.path}"


def _decode_segment(raw: bytes) -> str:
    if not raw:
        raise PathRefused("invalid_path", "the path has an empty segment ('//' or a trailing '/')")
    if b"\\" in raw:
        raise PathRefused("invalid_path", "the path contains a backslash")
    if b"%" in raw:
        if _ESCAPE.sub(b"", raw).find(b"%") >= 0:
            raise PathRefused("invalid_path", "the path has a malformed percent escape")
        raw = _ESCAPE.sub(lambda m: bytes([int(m.group(1), 16)]), raw)
        if any(c in raw for c in b"/\\%"):
            raise PathRefused(
                "invalid_path", "the path encodes '/', '\\' or '%': send the path as the provider spells it"
            )
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise PathRefused("invalid_path", "the path has characters outside ASCII") from None
    if text in (".", ".."):
        raise PathRefused("invalid_path", "the path has a '.' or '..' segment")
    if not _SEGMENT.match(text):
        raise PathRefused("invalid_path", "the path has characters a provider path never has")
    return text


def parse_target(target: bytes) -> Target:
    """
    The L{Target} of a request target (C{/_proxy/<provider>/<path>[?query]}),
    or L{PathRefused} (C{invalid_path}) for anything that is not a plain
    relative path: an absolute URL, a fragment, empty or dot segments,
    encoded slashes, backslashes or percents, characters outside the URL
    path set, more than 2,048 bytes or 32 segments.
    """
    if not target.startswith(PREFIX):
        raise PathRefused("invalid_path", "a passthrough path is /_proxy/<provider>/<path>")
    if b"#" in target:
        raise PathRefused("invalid_path", "the request target has a fragment")
    path, _, query = target.partition(b"?")
    if len(path) > MAX_PATH:
        raise PathRefused("invalid_path", f"the path is longer than {MAX_PATH} bytes")
    raw_segments = path[len(PREFIX):].split(b"/")
    if len(raw_segments) < 2:
        raise PathRefused("invalid_path", "a passthrough path is /_proxy/<provider>/<path>")
    if len(raw_segments) > MAX_SEGMENTS + 1:
        raise PathRefused("invalid_path", f"the path has more than {MAX_SEGMENTS} segments")
    provider = raw_segments[0].decode("ascii", "replace").lower()
    if not _PROVIDER.match(provider):
        raise PathRefused("invalid_path", "the provider part of the path is not a provider name")
    segments = tuple(_decode_segment(raw) for raw in raw_segments[1:])
    return Target(provider, segments, query)


def _base_path_segments(base_url: str) -> list[str]:
    rest = base_url.split("://", 1)[-1]
    _, _, path = rest.partition("/")
    return [s for s in path.split("/") if s]


def native_base_url(provider: str, base_url: str) -> str:
    """
    The base URL of C{provider}'s native API: its configured base URL,
    without the OpenAI compatibility suffix where the catalog's URL has one
    (Google's C{…/v1beta/openai} gives C{…/v1beta}).
    """
    base = base_url.rstrip("/")
    suffix = _NATIVE_SUFFIX.get(provider.partition("@")[0])
    if suffix is not None and base.endswith(suffix):
        base = base[: -len(suffix)]
    return base


def native_key_header(provider: str) -> bytes | None:
    """The header C{provider}'s native API reads its key from, when not the surfaces' one."""
    return _NATIVE_KEY_HEADER.get(provider.partition("@")[0])


def relative_segments(segments: tuple[str, ...], base_url: str) -> tuple[str, ...]:
    """
    The path below the native base URL: a first segment repeating the base
    URL's version (C{v1}, C{v1beta}) is dropped, so an SDK pointed at
    C{/_proxy/<provider>} that adds its own version reaches the same
    endpoint as one pointed at C{/_proxy/<provider>/v1}.
    """
    base = _base_path_segments(base_url)
    if base and len(segments) > 1 and segments[0] == base[-1]:
        return segments[1:]
    return segments


def upstream_url(base_url: str, segments: Iterable[str], query: bytes = b"") -> bytes:
    """The provider URL: the native base URL, the checked segments, the (filtered) query."""
    url = base_url.rstrip("/") + "/" + "/".join(segments)
    out = url.encode("ascii")
    if query:
        out += b"?" + query
    return out


def path_model(segments: tuple[str, ...]) -> str | None:
    """
    The model a path names (Gemini's C{models/<model>:<method>}), or None.
    """
    if len(segments) >= 2 and segments[0] == "models" and ":" in segments[1]:
        model = segments[1].partition(":")[0]
        return model or None
    return None


@attrs.frozen
class PathRule:
    """One allow-list entry: an optional method and a path pattern."""

    method: str | None
    pattern: str
    _segments: tuple[re.Pattern, ...] = attrs.field(repr=False, eq=False)

    def matches(self, method: str, segments: tuple[str, ...]) -> bool:
        if self.method is not None and method != self.method:
            return False
        if len(segments) != len(self._segments):
            return False
        return all(p.fullmatch(s) for p, s in zip(self._segments, segments, strict=True))

    def __str__(self) -> str:
        return f"{self.method} {self.pattern}" if self.method else self.pattern


def parse_rule(text: str) -> PathRule:
    """
    C{"[METHOD ]path/pattern"}: segments separated by C{/}; a C{*} matches
    any characters of one segment (C{audio/*}, C{models/*:generateContent}).
    """
    if not isinstance(text, str):
        raise AllowListError("a path pattern must be a string")
    parts = text.split()
    if len(parts) == 2:
        method, pattern = parts[0].upper(), parts[1]
        if method not in METHODS:
            raise AllowListError(f"{text!r}: unknown method {parts[0]!r}")
    elif len(parts) == 1:
        method, pattern = None, parts[0]
    else:
        raise AllowListError(f"{text!r}: write '[METHOD ]path', e.g. 'POST embeddings'")
    pattern = pattern.strip("/")
    pieces = pattern.split("/")
    compiled = []
    for piece in pieces:
        if not piece or piece in (".", ".."):
            raise AllowListError(f"{text!r}: empty, '.' or '..' segment")
        if not _SEGMENT.match(piece.replace("*", "x")):
            raise AllowListError(f"{text!r}: characters a provider path never has")
        compiled.append(re.compile("[^/]*".join(re.escape(p) for p in piece.split("*"))))
    return PathRule(method, pattern, tuple(compiled))


@attrs.frozen
class AllowList:
    """The passthrough's allow-list: provider -> its rules (nothing else passes)."""

    rules: Mapping[str, tuple[PathRule, ...]]

    def for_provider(self, provider: str) -> tuple[PathRule, ...]:
        """A provider's rules; a model-table deployment (C{openai@name}) without its own has its provider's."""
        rules = self.rules.get(provider)
        if rules is None and "@" in provider:
            rules = self.rules.get(provider.partition("@")[0])
        return rules or ()

    def match(self, provider: str, method: str, segments: tuple[str, ...]) -> PathRule | None:
        for rule in self.for_provider(provider):
            if rule.matches(method, segments):
                return rule
        return None


def _rules(provider: str, patterns: Iterable[str]) -> tuple[PathRule, ...]:
    out = []
    for text in patterns:
        try:
            out.append(parse_rule(text))
        except AllowListError as e:
            raise AllowListError(f"provider {provider!r}: {e}") from None
    return tuple(out)


def parse_allow_list(text: str | None) -> AllowList:
    """
    The allow-list from C{CLLAMA_PASSTHROUGH_PATHS}: a JSON object mapping
    provider names to lists of patterns.  A provider named there gets
    exactly its list (an empty list: nothing); the others keep
    L{DEFAULT_PATHS}.
    """
    rules = {provider: _rules(provider, patterns) for provider, patterns in DEFAULT_PATHS.items()}
    if text is None or not text.strip():
        return AllowList(MappingProxyType(rules))
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise AllowListError(f"not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise AllowListError('write a JSON object: {"<provider>": ["POST <path>", ...]}')
    for name, patterns in doc.items():
        provider = str(name).strip().lower()
        if not _PROVIDER.match(provider):
            raise AllowListError(f"{name!r} is not a provider name")
        if not isinstance(patterns, list):
            raise AllowListError(f"provider {provider!r}: the patterns must be a list of strings")
        rules[provider] = _rules(provider, patterns)
    return AllowList(MappingProxyType(rules))
