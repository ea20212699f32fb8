"""
The policy plane's settings, from the environment: the reference's
C{CLLAMA_POLICY_URL}, C{CLLAMA_POLICY_TOKEN}, C{CLLAMA_POLICY_TIMEOUT_MS}
and C{CLLAMA_POLICY_FAIL_MODE}, and our C{CLLAMA_POLICY_PLUGIN} for a
policy written in Python and run in process.  Neither set: no policy, and
the request path pays nothing for it.
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import urlsplit

import attrs

URL = "CLLAMA_POLICY_URL"
TOKEN = "CLLAMA_POLICY_TOKEN"
TIMEOUT_MS = "CLLAMA_POLICY_TIMEOUT_MS"
FAIL_MODE = "CLLAMA_POLICY_FAIL_MODE"
PLUGIN = "CLLAMA_POLICY_PLUGIN"

DEFAULT_TIMEOUT_MS = 1000  # the reference's
FAIL_CLOSED = "closed"
FAIL_OPEN = "open"


class PolicySettingsError(ValueError):
    """Settings the daemon cannot start with; the message never quotes a token."""


@attrs.frozen
class PolicySettings:
    url: str | None = None
    token: str | None = attrs.field(default=None, repr=False)
    timeout_ms: int = DEFAULT_TIMEOUT_MS
    fail_open: bool = False
    plugin: str | None = None
    # Values that were not understood and fell back to the default, for the log.
    problems: tuple[str, ...] = ()

    @property
    def enabled(self) -> bool:
        return self.url is not None or self.plugin is not None

    @property
    def timeout(self) -> float:
        return self.timeout_ms / 1000.0

    @property
    def fail_mode(self) -> str:
        return FAIL_OPEN if self.fail_open else FAIL_CLOSED

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> PolicySettings:
        """
        Read the settings.  A timeout that is not a positive whole number of
        milliseconds falls back to 1000, and a fail mode other than C{open}
        is C{closed}, as in the reference (both named in C{problems}).

        @raise PolicySettingsError: a URL without scheme and host (the
            reference would refuse every gated request instead) or with
            credentials in it, or both a URL and a plugin.
        """
        url = (env.get(URL) or "").strip() or None
        plugin = (env.get(PLUGIN) or "").strip() or None
        problems: list[str] = []
        if url is not None:
            url = url.rstrip("/")
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise PolicySettingsError(f"{URL} must be an http:// or https:// URL with a host")
            if parts.username is not None or parts.password is not None:
                raise PolicySettingsError(f"{URL} must not carry credentials: set {TOKEN} (sent as a bearer token)")
        if url is not None and plugin is not None:
            raise PolicySettingsError(f"set {URL} or {PLUGIN}, not both")
        timeout_ms = DEFAULT_TIMEOUT_MS
        raw = (env.get(TIMEOUT_MS) or "").strip()
        if raw:
            try:
                timeout_ms = int(raw)
            except ValueError:
                timeout_ms = 0
            if timeout_ms <= 0:
                problems.append(f"{TIMEOUT_MS}={raw[:20]!r} is not a positive number of milliseconds: using 1000")
                timeout_ms = DEFAULT_TIMEOUT_MS
        mode = (env.get(FAIL_MODE) or "").strip().lower()
        if mode not in ("", FAIL_OPEN, FAIL_CLOSED):
            problems.append(f"{FAIL_MODE}={mode[:20]!r} is neither 'open' nor 'closed': failing closed")
        return cls(
            url=url,
            token=(env.get(TOKEN) or "").strip() or None,
            timeout_ms=timeout_ms,
            fail_open=mode == FAIL_OPEN,
            plugin=plugin,
            problems=tuple(problems),
        )


def redacted_url(url: str) -> str:
    """C{scheme://host[:port]}: what the log says of the sidecar (a URL may carry credentials)."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    return f"{parts.scheme}://{host}" + (f":{port}" if port else "")
