"""
Scrubbing configured secrets out of what an upstream sends back.

A provider error body may echo the request's headers, and with them the
operator's key; relayed as it is, the agent would hold the key.  Everything
relayed from a non-2xx answer, and every response header, goes through
L{SecretScrubber} first.  Detection is a plain substring search per secret
(C{bytes.__contains__}, fast on small bodies); the one compiled regex runs
only when something was found.  Pure logic: no I/O, no clock.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from twisted.web.http_headers import Headers

REDACTED = b"[redacted]"

MIN_SECRET_LENGTH = 8
"""Shorter values are not scrubbed: replacing them would mangle ordinary
text, and no provider key is that short."""


class SecretScrubber:
    """
    Replaces every known secret by C{[redacted]}.  Secrets are only ever
    added (a deleted key may still be echoed by an answer in flight); the
    set is the operator's keys and ids, a handful.
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets: tuple[bytes, ...] = ()
        self._pattern: re.Pattern[bytes] | None = None
        self.add(secrets)

    def __repr__(self) -> str:
        return f"<SecretScrubber secrets={len(self._secrets)}>"

    def __len__(self) -> int:
        return len(self._secrets)

    def add(self, secrets: Iterable[str]) -> None:
        """Scrub C{secrets} too (rebuilds the pattern only when they are new)."""
        known = set(self._secrets)
        new = {
            s.encode("utf-8")
            for s in secrets
            if s and len(s) >= MIN_SECRET_LENGTH
        } - known
        if not new:
            return
        # Longest first, so a secret that contains another is replaced whole.
        ordered = sorted(known | new, key=lambda s: (-len(s), s))
        self._secrets = tuple(ordered)
        self._pattern = re.compile(b"|".join(re.escape(s) for s in ordered))

    def found_in(self, data: bytes) -> bool:
        """Whether C{data} contains any secret."""
        for secret in self._secrets:
            if secret in data:
                return True
        return False

    def scrub(self, data: bytes) -> bytes:
        """C{data} with every secret replaced."""
        if self._pattern is None or not self.found_in(data):
            return data
        return self._pattern.sub(REDACTED, data)

    def scrub_headers(self, headers: Headers) -> None:
        """
        Replace secrets in C{headers}' values, in place.  Runs on every
        response: one search over all the values joined, and only a header
        set that holds a secret is rewritten.
        """
        if self._pattern is None:
            return
        items = list(headers.getAllRawHeaders())
        if not self.found_in(b"\n".join([v for _, values in items for v in values])):
            return
        for name, values in items:
            headers.setRawHeaders(name, [self.scrub(v) for v in values])
