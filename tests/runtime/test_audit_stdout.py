"""
The real daemon (`twistd -n cllama`) with stdout connected to a pipe that
nobody reads, as a stalled log shipper leaves it: it keeps serving, drops
and counts audit lines, writes one gap line when the reader is back, and
still stops promptly on SIGTERM.
"""

import json
import os
import time

import treq
from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from cllama_tx.testing import FakeProvider
from tests.runtime.test_audit_output import PipeReader
from tests.runtime.test_daemon import REPO, TWISTD, DaemonProcess
from tests.secret_scan import SCANNER
from tests.support import AGENT, PROVIDER_KEY, SECRET, chat_body, write_agent

UI_TOKEN = "ui-token-stdout-test-4242"
SCANNER.register(UI_TOKEN)
BUFFER = 64 * 1024
# Each request writes two audit lines (request, response) of some 600 bytes
# together: 700 requests are about three times the pipe's 64 KiB and the
# 64 KiB buffer.  The daemon this fixes froze after about 110.
REQUESTS = 700
PROMPT = 5.0  # seconds: an answer slower than this counts as the freeze


class StalledStdoutTests(TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):
        self.fake = FakeProvider(reactor)
        yield self.fake.start()
        self.addCleanup(self.fake.stop)
        base = os.path.abspath(self.mktemp())
        context_root = os.path.join(base, "context")
        auth_dir = os.path.join(base, "auth")
        os.makedirs(auth_dir)
        write_agent(context_root, AGENT, SECRET)
        self.env = {
            "PATH": os.environ.get("PATH", ""),
            "PYTHONPATH": REPO,
            "LISTEN_ADDR": "tcp:0:interface=127.0.0.1",
            "UI_ADDR": "127.0.0.1:0",
            "CLAW_CONTEXT_ROOT": context_root,
            "CLAW_AUTH_DIR": auth_dir,
            "CLLAMA_STATE_DIR": os.path.join(base, "state"),
            "OPENAI_API_KEY": PROVIDER_KEY,
            "OPENAI_BASE_URL": self.fake.base_url,
            "CLLAMA_UI_TOKEN": UI_TOKEN,
            "CLLAMA_AUDIT_BUFFER": str(BUFFER),
        }
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = 10
        self.addCleanup(pool.closeCachedConnections)
        self.http = treq.client.HTTPClient(Agent(reactor, pool=pool))

    def spawn_with_stalled_stdout(self):
        """The daemon, its stdout a pipe we do not read (yet); stderr read as usual."""
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        process = DaemonProcess()
        transport = reactor.spawnProcess(
            process, TWISTD, [TWISTD, "--pidfile=", "-n", "cllama"],
            env=self.env, path=REPO, childFDs={0: "w", 1: w, 2: "r"},
        )
        os.close(w)

        def stop():
            if not process.ended.called:
                transport.signalProcess("KILL")
                return process.ended

        self.addCleanup(stop)
        return process, transport, r

    @defer.inlineCallbacks
    def chat(self, api):
        response = yield self.http.post(
            api + "/v1/chat/completions", json=chat_body(),
            headers={"Authorization": f"Bearer {AGENT}:{SECRET}"}, timeout=PROMPT,
        )
        body = yield response.json()
        self.assertEqual(response.code, 200, body)
        self.assertEqual(body["object"], "chat.completion")
        self.assertEqual(body["choices"][0]["message"]["role"], "assistant")
        return response.headers.getRawHeaders("x-cllama-request-id")[0]

    @defer.inlineCallbacks
    def health_latency(self, api):
        started = time.monotonic()
        response = yield self.http.get(api + "/health", timeout=PROMPT)
        self.assertEqual((yield response.json()), {"ok": True})
        return time.monotonic() - started

    @defer.inlineCallbacks
    def flood(self, api, count):
        """C{count} chat requests, ten at a time, and a health check every hundred."""
        latencies = []
        for start in range(0, count, 10):
            yield defer.gatherResults([self.chat(api) for _ in range(min(10, count - start))], consumeErrors=True)
            if start % 100 == 0:
                latencies.append((yield self.health_latency(api)))
        return latencies

    @defer.inlineCallbacks
    def metric(self, ui, name):
        response = yield self.http.get(ui + "/metrics", headers={"Authorization": f"Bearer {UI_TOKEN}"}, timeout=PROMPT)
        text = (yield response.text())
        self.assertEqual(response.code, 200, text)
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        self.fail(f"{name} not in /metrics:\n{text}")

    @defer.inlineCallbacks
    def test_a_stdout_nobody_reads_costs_audit_lines_never_service(self):
        process, transport, stdout = self.spawn_with_stalled_stdout()
        ports = yield process.ready
        api, ui = f"http://127.0.0.1:{ports['API']}", f"http://127.0.0.1:{ports['UI']}"
        latencies = yield self.flood(api, REQUESTS)
        self.assertLess(max(latencies), PROMPT)
        self.assertEqual(len(self.fake.received), REQUESTS)
        # While the reader is away, the metric already tells.
        dropped = yield self.metric(ui, "cllama_audit_lines_dropped_total")
        self.assertGreater(dropped, 0)
        self.assertLessEqual((yield self.metric(ui, "cllama_audit_buffer_bytes")), BUFFER)

        # The shipper comes back: one gap line, then the newest lines again.
        reader = PipeReader(stdout).start()
        self.addCleanup(reader.stop)
        yield reader.wait_for(b'"type":"audit_gap"')
        last = yield self.chat(api)
        yield reader.wait_for_line(lambda line: line["type"] == "response" and line.get("request_id") == last)
        lines = [json.loads(text) for text in bytes(reader.data).splitlines()]
        for text in bytes(reader.data).decode().splitlines():
            SCANNER.scan("audit", text)
        gaps = [line for line in lines if line["type"] == "audit_gap"]
        self.assertEqual(len(gaps), 1)
        gap = gaps[0]
        self.assertEqual(
            {k: gap[k] for k in ("claw_id", "model", "intervention")},
            {"claw_id": None, "model": None, "intervention": None},
        )
        self.assertEqual(gap["dropped_lines"], dropped)
        self.assertEqual((yield self.metric(ui, "cllama_audit_lines_dropped_total")), dropped)
        others = [line for line in lines if line["type"] != "audit_gap"]
        self.assertEqual({line["type"] for line in others}, {"request", "response"})
        # Every line is either read or counted in the gap.
        self.assertEqual(len(others) + gap["dropped_lines"], 2 * (REQUESTS + 1))
        # The gap sits where lines are missing: what follows it is newer.
        after = lines[lines.index(gap) + 1:]
        self.assertEqual(after[-1]["request_id"], last)
        self.assertLess(len(after), len(others))

        transport.signalProcess("TERM")
        self.assertEqual((yield process.ended), 0)

    @defer.inlineCallbacks
    def test_sigterm_with_stdout_stalled_stops_in_bounded_time(self):
        process, transport, _stdout = self.spawn_with_stalled_stdout()
        ports = yield process.ready
        api = f"http://127.0.0.1:{ports['API']}"
        yield self.flood(api, 400)
        started = time.monotonic()
        transport.signalProcess("TERM")
        code = yield process.ended
        self.assertEqual(code, 0)
        # The audit flush waits one second for the reader, not forever.
        self.assertLess(time.monotonic() - started, 6.0)
        self.assertRegex(
            process.stderr.decode(), r"\d+ audit lines were not written: stdout was not read before shutdown"
        )
        self.assertIn(b"Server Shut Down", process.stderr)
