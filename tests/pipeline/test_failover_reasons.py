"""
L{cllama_tx.pipeline.failover_reasons}: a failed candidate named with the
reference's codes, for each place an attempt can fail.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from cllama_tx.pipeline import failover_reasons as reasons
from cllama_tx.surfaces.errors import ProxyError

UNREACHABLE = ProxyError(502, "upstream_unreachable", "could not reach provider 'openai': ConnectionRefusedError")
TIMEOUT = ProxyError(504, "upstream_timeout", "provider 'openai' sent no response within 300 s")
INTERRUPTED = ProxyError(502, "upstream_interrupted", "the connection to provider 'openai' broke mid-response")


class ReasonTests(SynchronousTestCase):
    def test_before_the_headers(self) -> None:
        for stream in (False, True):
            self.assertEqual(reasons.reason_for(UNREACHABLE, answered=False, stream=stream, got_bytes=False),
                             "transport_error")
        self.assertEqual(reasons.reason_for(TIMEOUT, answered=False, stream=True, got_bytes=False),
                         "stream_first_byte_timeout")
        # The reference bounds a non-stream attempt with a deadline: a transport error.
        self.assertEqual(reasons.reason_for(TIMEOUT, answered=False, stream=False, got_bytes=False), "transport_error")

    def test_after_the_headers(self) -> None:
        for stream in (False, True):
            self.assertEqual(reasons.reason_for(TIMEOUT, answered=True, stream=stream, got_bytes=False),
                             "stream_first_byte_timeout")
            self.assertEqual(reasons.reason_for(TIMEOUT, answered=True, stream=stream, got_bytes=True),
                             "stream_read_error")
            self.assertEqual(reasons.reason_for(INTERRUPTED, answered=True, stream=stream, got_bytes=False),
                             "stream_read_error")

    def test_the_key_pool(self) -> None:
        cooling = reasons.KeysUnavailable(429, "provider_keys_exhausted", "cooling", retry_after=7,
                                          reason=reasons.pool_reason(True, False))
        self.assertEqual(reasons.reason_for(cooling, answered=False, stream=False, got_bytes=False), "provider_cooldown")
        self.assertEqual(reasons.pool_reason(False, False), "provider_key_unavailable")
        self.assertEqual(reasons.pool_reason(False, True), "provider_keys_exhausted")
        # The agent still sees the pool's own refusal.
        self.assertEqual((cooling.status, cooling.code, cooling.retry_after), (429, "provider_keys_exhausted", 7))
        self.assertIsInstance(cooling, ProxyError)
        self.assertTrue(reasons.POOL_REASONS >= {"provider_cooldown", "provider_key_unavailable",
                                                 "provider_keys_exhausted"})

    def test_names(self) -> None:
        self.assertEqual(reasons.http_status(503), "http_503")
        self.assertEqual(reasons.candidate_fallback("http_500"), "provider_candidate_fallback:http_500")
        self.assertEqual(reasons.candidate_fallback(""), "provider_candidate_fallback:unknown")
        self.assertEqual(reasons.EXHAUSTED_FAILOVER, "provider_exhausted_failover")
