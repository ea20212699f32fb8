"""
HTTP headers for the inference paths: twisted.web's L{Headers} with the
same behaviour, at a third of the cost.

A request through the proxy makes about forty header operations (the
agent's request parsed, the upstream request built and copied, the
provider's answer parsed and copied to the agent's): in twisted.web's
class each one canonicalises the name through a shared encoder and
rewrites every value with C{splitlines} and C{join}, a tenth of the
request's Python time.  L{LeanHeaders} is a L{Headers} (so every caller
and type stays as it is) that keeps its own table: names canonicalised
once per distinct spelling (through twisted.web's own class, so
C{getAllRawHeaders} names are Twisted's), values rewritten only when they
hold a line break.  Every public method of L{Headers} is its own; the
test module checks that none is inherited.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from twisted.web.http_headers import Headers

__all__ = ["LeanHeaders"]

# Spelling as given (bytes or str) -> the canonical bytes name, as twisted.web
# stores it.  Bounded as twisted.web bounds its own: names an attacker makes
# up are canonicalised each time once it is full.
_CANONICAL: dict[Any, bytes] = {}
_MAX_NAMES = 10_000


def _canonical(name: str | bytes) -> bytes:
    known = _CANONICAL.get(name)
    if known is not None:
        return known
    probe = Headers()
    probe.setRawHeaders(name, [b""])  # twisted.web's checks (InvalidHeaderName) and spelling
    [(canonical, _)] = probe.getAllRawHeaders()
    if len(_CANONICAL) < _MAX_NAMES:
        _CANONICAL[name] = canonical
    return canonical


def _value(value: str | bytes) -> bytes:
    """A value as stored: UTF-8 bytes, any line break turned into a space (no header injection)."""
    if isinstance(value, str):
        value = value.encode("utf8")
    if 10 in value or 13 in value:  # LF, CR (an int is searched with memchr, a bytes needle far slower)
        return b" ".join(value.splitlines())
    return value


class LeanHeaders(Headers):
    """L{Headers}, with its own table of canonical names to lists of bytes values."""

    __slots__ = ("_fields",)

    def __init__(self, rawHeaders: Mapping[Any, Sequence[Any]] | None = None) -> None:
        self._fields: dict[bytes, list[bytes]] = {}
        if rawHeaders is not None:
            for name, values in rawHeaders.items():
                self.setRawHeaders(name, values)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self._fields!r})"

    def __cmp__(self, other: object) -> Any:
        """As twisted.web's: by the sorted headers, against any L{Headers}."""
        if isinstance(other, Headers):
            mine: list[Any] = sorted(self._fields.items())
            theirs: list[Any] = sorted((name, list(values)) for name, values in other.getAllRawHeaders())
            return (mine > theirs) - (mine < theirs)
        return NotImplemented

    # Defined here (not only inherited): a subclass's own comparison is the
    # one Python asks first when the other side is a twisted.web Headers.
    def __eq__(self, other: object) -> bool:
        result = self.__cmp__(other)
        return result if result is NotImplemented else result == 0

    def __ne__(self, other: object) -> bool:
        result = self.__cmp__(other)
        return result if result is NotImplemented else result != 0

    __hash__ = Headers.__hash__  # identity, as twisted.web's

    def copy(self) -> LeanHeaders:
        copied = LeanHeaders()
        copied._fields = {name: list(values) for name, values in self._fields.items()}
        return copied

    def hasHeader(self, name: Any) -> bool:
        return (_CANONICAL.get(name) or _canonical(name)) in self._fields

    def removeHeader(self, name: Any) -> None:
        self._fields.pop(_CANONICAL.get(name) or _canonical(name), None)

    def setRawHeaders(self, name: str | bytes, values: Sequence[str | bytes]) -> None:
        self._fields[_CANONICAL.get(name) or _canonical(name)] = [_value(v) for v in values]

    def addRawHeader(self, name: str | bytes, value: str | bytes) -> None:
        key = _CANONICAL.get(name) or _canonical(name)
        stored = self._fields.get(key)
        if stored is None:
            self._fields[key] = [_value(value)]
        else:
            stored.append(_value(value))

    def getRawHeaders(self, name: Any, default: Any = None) -> Any:
        values = self._fields.get(_CANONICAL.get(name) or _canonical(name))
        if not values:
            return default
        if isinstance(name, str):
            return [v.decode("utf8") for v in values]
        return values

    def getAllRawHeaders(self) -> Iterator[tuple[bytes, Sequence[bytes]]]:
        return iter(self._fields.items())
