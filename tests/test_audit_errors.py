"""Audit line format and error body shapes."""

import io
import json

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from cllama_tx.interfaces import IAuditLog
from cllama_tx.runtime.audit import AuditLog, rfc3339_ms
from cllama_tx.surfaces.errors import ANTHROPIC, OPENAI, ProxyError, error_body, sse_error_event


class AuditTests(SynchronousTestCase):
    def test_timestamp(self):
        self.assertEqual(rfc3339_ms(0), "1970-01-01T00:00:00.000Z")
        self.assertEqual(rfc3339_ms(1763809725.1239), "2025-11-22T11:08:45.123Z")

    def test_line_has_contract_fields(self):
        stream, clock = io.StringIO(), Clock()
        clock.advance(1.5)
        audit = AuditLog(stream, clock)
        verifyObject(IAuditLog, audit)
        audit.emit("response", "agent-1", "openai/gpt-4o", request_id="abc", status_code=200)
        line = json.loads(stream.getvalue())
        self.assertEqual(
            line,
            {
                "ts": "1970-01-01T00:00:01.500Z",
                "claw_id": "agent-1",
                "type": "response",
                "model": "openai/gpt-4o",
                "intervention": None,
                "request_id": "abc",
                "status_code": 200,
            },
        )
        self.assertTrue(stream.getvalue().endswith("\n"))

    def test_buffered_until_flush(self):
        stream, clock = io.StringIO(), Clock()
        scheduled = []
        audit = AuditLog(stream, clock, schedule=scheduled.append)
        audit.emit("request", "a", "m")
        audit.emit("response", "a", "m")
        self.assertEqual(stream.getvalue(), "")
        self.assertEqual(len(scheduled), 1)
        scheduled[0]()
        self.assertEqual([json.loads(line)["type"] for line in stream.getvalue().splitlines()], ["request", "response"])


class ErrorShapeTests(SynchronousTestCase):
    def test_openai_shape(self):
        body = json.loads(error_body(ProxyError(400, "invalid_json", "bad"), OPENAI))
        self.assertEqual(body, {"error": {"message": "bad", "type": "invalid_request_error", "code": "invalid_json"}})

    def test_anthropic_shape(self):
        body = json.loads(error_body(ProxyError(413, "request_too_large", "big"), ANTHROPIC))
        self.assertEqual(body, {"type": "error", "error": {"type": "request_too_large", "message": "big"}})
        body = json.loads(error_body(ProxyError(502, "x", "y"), ANTHROPIC))
        self.assertEqual(body["error"]["type"], "api_error")

    def test_sse_error_events(self):
        event = sse_error_event(ProxyError(502, "upstream_interrupted", "cut"), ANTHROPIC)
        self.assertTrue(event.startswith(b"event: error\ndata: "))
        self.assertTrue(event.endswith(b"\n\n"))
        # The chat surface as the reference sends it: a named error event.
        event = sse_error_event(ProxyError(504, "upstream_timeout", "upstream stream idle timeout: slow"), OPENAI)
        self.assertTrue(event.startswith(b"event: error\ndata: "))
        self.assertEqual(
            json.loads(event[len(b"event: error\ndata: "):]),
            {"error": {"message": "upstream stream idle timeout: slow", "type": "api_error", "code": "upstream_timeout"}},
        )

    def test_budget_refusals_carry_their_code_in_the_anthropic_shape(self):
        for code in ("budget_exceeded", "rate_limited"):
            body = json.loads(error_body(ProxyError(429, code, "budget exceeded", error_type=code), ANTHROPIC))
            self.assertEqual(body, {"type": "error", "error": {"type": code, "message": "budget exceeded", "code": code}})
        # Other refusals keep Anthropic's shape exactly.
        body = json.loads(error_body(ProxyError(429, "too_many_attempts", "wait"), ANTHROPIC))
        self.assertEqual(body, {"type": "error", "error": {"type": "rate_limit_error", "message": "wait"}})


class InterventionLineTests(SynchronousTestCase):
    def test_intervention_line(self):
        from cllama_tx.pipeline.metering import Exchange, Metering

        stream = io.StringIO()
        audit = AuditLog(stream, Clock())
        metering = Metering(clock=Clock(), pricing=None, ledger=None, audit=audit)
        ex = Exchange("rid-1", 0.0, None, claw_id="a", model="openai/gpt-4o")
        metering.intervention(ex, "surface_translated", from_surface="chat", to_format="anthropic")
        line = json.loads(stream.getvalue())
        self.assertEqual(line["type"], "intervention")
        self.assertEqual(line["intervention"], "surface_translated")
        self.assertEqual(line["request_id"], "rid-1")
        self.assertEqual(line["to_format"], "anthropic")
