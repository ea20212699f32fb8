"""
The key probe: one cheap authenticated GET (the provider's model list, or
OpenRouter's key endpoint) sent with the key alone and the operator's
provider headers, through the daemon's own upstream client.

Only a 401 proves a key invalid.  A 403 is not proof (a restricted key may
lack the permission to list models and still chat), nor a 404 (no such
endpoint on this provider), a 429, a 5xx or a broken connection: those are
inconclusive.  Details name the path and the status, never the key.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.web.http_headers import Headers

from cllama_tx.providers.bodies import read_small
from cllama_tx.providers.catalog import ProviderSpec, auth_headers, upstream_url
from cllama_tx.providers.forwarding import policy_for
from cllama_tx.providers.health import INCONCLUSIVE, INVALID, VALID, ProbeResult
from cllama_tx.providers.store import KeyRecord

PROBE_TIMEOUT = 10.0
"""Seconds a probe may take, answer and body included."""

_PROBE_BODY_LIMIT = 256 * 1024


class UpstreamProber:
    """Probes keys through C{upstream} (a L{cllama_tx.runtime.upstream.UpstreamClient})."""

    def __init__(self, upstream, clock, timeout: float = PROBE_TIMEOUT) -> None:
        self._upstream = upstream
        self._clock = clock
        self._timeout = timeout

    def probe(self, spec: ProviderSpec, key: KeyRecord) -> defer.Deferred:
        """A Deferred firing with a L{ProbeResult}; it never fails."""
        return defer.ensureDeferred(self._probe(spec, key))

    def headers(self, spec: ProviderSpec, key: KeyRecord) -> Headers:
        """The probe's headers: the key, the operator's provider headers, Accept."""
        headers = Headers()
        for name, value in auth_headers(spec.auth, key.secret):
            headers.setRawHeaders(name, [value])
        policy = policy_for(spec)
        for name, value in policy.defaults + policy.fixed:
            headers.setRawHeaders(name, [value])
        headers.setRawHeaders(b"accept", [b"application/json"])
        return headers

    async def _probe(self, spec: ProviderSpec, key: KeyRecord) -> ProbeResult:
        path = spec.probe_path
        if not path or not spec.base_url:
            return ProbeResult(INCONCLUSIVE, "the provider has no probe endpoint")
        try:
            headers = self.headers(spec, key)
        except ValueError:
            return ProbeResult(INCONCLUSIVE, "the key cannot be sent")
        url = upstream_url(spec.base_url, path).encode("utf-8")
        d = self._upstream.request(b"GET", url, headers, None)
        timed_out = []

        def expire() -> None:
            timed_out.append(True)
            d.cancel()

        timer = self._clock.callLater(self._timeout, expire)
        try:
            response = await d
        except Exception as e:
            if timed_out:
                return ProbeResult(INCONCLUSIVE, f"GET {path}: no answer within {self._timeout:g} s")
            return ProbeResult(INCONCLUSIVE, f"GET {path}: {type(e).__name__}")
        finally:
            if timer.active():
                timer.cancel()
        # Read (and drop) the body so that the connection can be reused.
        await read_small(response, self._clock, self._timeout, _PROBE_BODY_LIMIT)
        code = response.code
        detail = f"GET {path} answered {code}"
        if 200 <= code < 300:
            return ProbeResult(VALID, detail)
        if code == 401:
            return ProbeResult(INVALID, detail)
        return ProbeResult(INCONCLUSIVE, detail)
