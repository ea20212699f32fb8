"""
An agent's compiled rules (C{<context>/rules.json}, ADR-025): the policy
sidecar is told where they are and their SHA-256, and reads them itself.

Looked at only when a policy is configured, and at most once a second per
agent (one C{stat}); the file is read and hashed only when it changed.
"""

from __future__ import annotations

import hashlib
import os

from cllama_tx.store.jsonfile import Signature, file_signature

RULES_FILE = "rules.json"
RECHECK_INTERVAL = 1.0
MAX_RULES_BYTES = 4 * 1024 * 1024


class RulesRefs:
    """Path and digest of each agent's C{rules.json}, kept fresh."""

    def __init__(self, clock, interval: float = RECHECK_INTERVAL) -> None:
        self._clock = clock
        self._interval = interval
        # agent directory -> (checked at, signature, path, digest)
        self._known: dict[str, tuple[float, Signature, str, str]] = {}

    def get(self, directory: str) -> tuple[str, str]:
        """C{(path, digest)} of the rules in C{directory}; empty strings when it has none."""
        now = self._clock.seconds()
        known = self._known.get(directory)
        if known is not None and now - known[0] < self._interval:
            return known[2], known[3]
        path = os.path.join(directory, RULES_FILE)
        signature = file_signature(path)
        if known is not None and signature == known[1]:
            self._known[directory] = (now, signature, known[2], known[3])
            return known[2], known[3]
        found = ("", "")
        if signature is not None:
            digest = _digest(path)
            if digest is not None:
                found = (path, digest)
        if len(self._known) > 100_000:
            self._known.clear()
        self._known[directory] = (now, signature, *found)
        return found


def _digest(path: str) -> str | None:
    """The file's SHA-256 (hex), or None when it cannot be read or is too large."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_RULES_BYTES + 1)
    except OSError:
        return None
    if len(data) > MAX_RULES_BYTES:
        return None
    return hashlib.sha256(data).hexdigest()
