#!/usr/bin/env python3
"""
Probe: what the passthrough (C{/_proxy/<provider>/<path>}, docs/SPEC.md)
adds, and whether an upload streams.

Starts the passthrough's fake provider (C{cllama_tx.testing.native}) and
the real daemon (C{twistd -n cllama}) in front of it, then, side by side in
one run:

  - C{--requests} embeddings calls one after another, straight to the fake
    and through the daemon, alternating: the median and 99th percentile of
    each, and what the daemon adds;
  - an upload of C{--upload} MiB (multipart, chunked), straight and through
    the daemon: the time each took, and how much of the body the provider
    had received when the agent had sent half of it (streamed: about half;
    buffered: nothing), and the daemon's peak resident memory before and
    after the uploads (C{/proc/<pid>/status}, Linux).

    .venv/bin/python bench/probe_passthrough.py --requests 300 --upload 64
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import treq  # noqa: E402
from probe_daemon import Daemon  # noqa: E402
from twisted.internet import defer, task  # noqa: E402
from twisted.web.client import Agent, HTTPConnectionPool  # noqa: E402
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer  # noqa: E402
from zope.interface import implementer  # noqa: E402

from cllama_tx.testing.native import NativeProvider  # noqa: E402

PROVIDER_KEY = "sk-probe-passthrough-0001"
AGENT, SECRET = "probe", "a1" * 24
CHUNK = 64 * 1024


@implementer(IBodyProducer)
class Upload:
    """A chunked body written as fast as the connection takes it; notes what the provider had at the half."""

    length = UNKNOWN_LENGTH

    def __init__(self, reactor, body: bytes, native: NativeProvider) -> None:
        self._reactor = reactor
        self._body = body
        self._native = native
        self._offset = 0
        self._paused = False
        self._done: defer.Deferred | None = None
        self._consumer = None
        self.provider_at_half: int | None = None

    def startProducing(self, consumer):
        self._consumer = consumer
        self._done = defer.Deferred()
        self._reactor.callLater(0, self._write)
        return self._done

    def _write(self) -> None:
        while not self._paused and self._offset < len(self._body):
            if self.provider_at_half is None and self._offset >= len(self._body) // 2:
                self.provider_at_half = sum(r.size for r in self._native.requests if not r.done)
            self._consumer.write(self._body[self._offset:self._offset + CHUNK])
            self._offset += CHUNK
        if self._offset >= len(self._body) and self._done is not None and not self._done.called:
            self._done.callback(None)

    def pauseProducing(self):
        self._paused = True

    def resumeProducing(self):
        self._paused = False
        self._reactor.callLater(0, self._write)

    def stopProducing(self):
        self._paused = True


def peak_rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def quantiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


async def run(reactor, args) -> int:
    base = tempfile.mkdtemp(prefix="cllama-probe-passthrough-")
    context = os.path.join(base, "context", AGENT)
    os.makedirs(context)
    os.makedirs(os.path.join(base, "auth"))
    with open(os.path.join(context, "metadata.json"), "w") as f:
        json.dump({"token": f"{AGENT}:{SECRET}", "pod": "probe", "service": AGENT}, f)
    native = NativeProvider(reactor, keys={PROVIDER_KEY})
    await native.start()
    env = {
        "PATH": os.environ.get("PATH", ""), "PYTHONPATH": REPO, "PYTHONUNBUFFERED": "1",
        "LISTEN_ADDR": "tcp:0:interface=127.0.0.1", "UI_ADDR": "127.0.0.1:0",
        "CLAW_CONTEXT_ROOT": os.path.join(base, "context"), "CLAW_AUTH_DIR": os.path.join(base, "auth"),
        "CLLAMA_STATE_DIR": os.path.join(base, "state"), "CLLAMA_UI_TOKEN": "probe-ui-token-000000",
        "OPENAI_API_KEY": PROVIDER_KEY, "OPENAI_BASE_URL": native.base_url,
        "CLLAMA_PASSTHROUGH_MAX_BODY_SIZE": f"{args.upload + 1}MiB",
    }
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    daemon = Daemon()
    transport = reactor.spawnProcess(daemon, twistd, [twistd, "--pidfile=", "-n", "cllama"], env=env, path=REPO)
    pool = HTTPConnectionPool(reactor, persistent=True)
    http = treq.client.HTTPClient(Agent(reactor, pool=pool))
    try:
        ports = await daemon.ready
        api = f"http://127.0.0.1:{ports['API']}"
        agent = {"Authorization": [f"Bearer {AGENT}:{SECRET}"], "Content-Type": ["application/json"]}
        direct = {"Authorization": [f"Bearer {PROVIDER_KEY}"], "Content-Type": ["application/json"]}
        body = json.dumps({"model": "text-embedding-3-small", "input": ["probe " * 50]}).encode()
        chat = json.dumps({"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "probe"}]}).encode()
        answer = json.dumps({"id": "chatcmpl-probe", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                                          "finish_reason": "stop"}],
                             "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}}).encode()
        native.responder = lambda r: ((200, {"content-type": "application/json"}, answer)
                                      if r.path == "/v1/chat/completions" else native._respond(r))
        times: dict[str, list[float]] = {"direct": [], "passthrough": [], "chat surface": []}
        for i in range(args.requests + 20):  # the first 20 of each warm up
            for label, url, headers, data in (
                ("direct", native.base_url + "/embeddings", direct, body),
                ("passthrough", api + "/_proxy/openai/embeddings", agent, body),
                ("chat surface", api + "/v1/chat/completions", agent, chat),
            ):
                started = time.perf_counter()
                response = await http.post(url, data=data, headers=headers)
                await response.content()
                if response.code != 200:
                    print(f"{label}: {response.code}", file=sys.stderr)
                    return 1
                if i >= 20:
                    times[label].append(time.perf_counter() - started)
        lines = [line for line in daemon.audit() if line["type"] == "response" and line.get("path")]
        if lines:
            lat = statistics.median(line["latency_ms"] for line in lines)
            ttfb = statistics.median(line["ttfb_ms"] for line in lines if line.get("ttfb_ms") is not None)
            print(f"daemon's own view: median latency {lat:.3f} ms, first byte {ttfb:.3f} ms")
        d_med, d_p99 = quantiles(times["direct"])
        p_med, p_p99 = quantiles(times["passthrough"])
        print(f"embeddings, {args.requests} sequential calls each, alternating:")
        print(f"  direct       median {d_med * 1000:.3f} ms  p99 {d_p99 * 1000:.3f} ms")
        print(f"  passthrough  median {p_med * 1000:.3f} ms  p99 {p_p99 * 1000:.3f} ms"
              f"  (adds {(p_med - d_med) * 1000:.3f} ms at the median)")
        c_med, c_p99 = quantiles(times["chat surface"])
        print(f"  chat surface median {c_med * 1000:.3f} ms  p99 {c_p99 * 1000:.3f} ms (the same fake, for comparison)")
        native.responder = None
        boundary = "probe-boundary"
        payload = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\n".encode()
                   + os.urandom(args.upload * 1024 * 1024) + f"\r\n--{boundary}--\r\n".encode())
        multipart = {"Content-Type": [f"multipart/form-data; boundary={boundary}"]}
        rss_before = peak_rss_kib(transport.pid)
        print(f"upload of {args.upload} MiB, chunked:")
        for label, url, headers in (("direct", native.base_url + "/audio/transcriptions",
                                     {**direct, **multipart}),
                                    ("passthrough", api + "/_proxy/openai/audio/transcriptions",
                                     {"Authorization": agent["Authorization"], **multipart})):
            upload = Upload(reactor, payload, native)
            started = time.perf_counter()
            response = await http.post(url, data=upload, headers=headers)
            answer = await response.json()
            seconds = time.perf_counter() - started
            mib = len(payload) / 1024 / 1024
            print(f"  {label:<12} {seconds:.3f} s ({mib / seconds:.0f} MiB/s), status {response.code} {answer}; "
                  f"the provider had {upload.provider_at_half or 0:,} bytes when the agent had sent half")
        rss_after = peak_rss_kib(transport.pid)
        if rss_before is not None and rss_after is not None:
            print(f"daemon peak RSS: {rss_before / 1024:.1f} MiB before the uploads, {rss_after / 1024:.1f} MiB after")
        return 0
    finally:
        if not daemon.ended.called:
            transport.signalProcess("TERM")
            await daemon.ended
        await pool.closeCachedConnections()
        await native.stop()


def main(reactor, argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300, help="embeddings calls of each kind (300)")
    parser.add_argument("--upload", type=int, default=64, help="MiB uploaded each way (64)")
    args = parser.parse_args(argv)
    return defer.ensureDeferred(run(reactor, args)).addCallback(_exit)


def _exit(status: int) -> None:
    if status:
        raise SystemExit(status)


if __name__ == "__main__":
    task.react(main, (sys.argv[1:],))
