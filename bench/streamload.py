"""
Concurrent-stream client for the bench (asyncio protocols, in the bench
process on the load core).  C{run(...)} opens C{n} keep-alive connections
(in batches, so the listener's backlog never overflows), each sending
C{"stream": true} requests back to back until C{hold} seconds have passed,
and times every stream: time to the first SSE event, gaps between events,
whether it ended (C{data: [DONE]} and the chunked terminator).  C{sample} is
called once, mid-hold, with every connection's stream open (RSS sampling).
"""

import asyncio
import time


def pct(xs, q):
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


class Client(asyncio.Protocol):
    def __init__(self, st, request, until):
        self.st, self.request, self.until = st, request, until
        self.transport = None
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport):
        self.transport = transport
        self.send()

    def send(self):
        self.t0 = time.monotonic()
        self.first = None
        self.last = None
        self.tail = b""
        self.end = b""
        self.events = 0
        self.headers_done = False
        self.buf = b""
        self.st["active"] += 1
        self.transport.write(self.request)

    def data_received(self, data):
        now = time.monotonic()
        if not self.headers_done:
            self.buf += data
            i = self.buf.find(b"\r\n\r\n")
            if i < 0:
                return
            head, data = self.buf[:i], self.buf[i + 4:]
            self.buf = b""
            self.headers_done = True
            if not head.startswith(b"HTTP/1.1 200"):
                self.st["bad_status"] += 1
        scan = self.tail + data
        k = scan.count(b"\n\n")  # the 1-byte tail holds no complete "\n\n"
        if k:
            if self.first is None:
                self.first = now
                self.st["ttfb"].append(now - self.t0)
            elif self.last is not None:
                self.st["gaps"].append(now - self.last)
            self.st["gaps"].extend([0.0] * (k - 1))
            self.last = now
            self.events += k
        self.tail = scan[-1:]
        self.end = (self.end + data)[-64:]
        if self.end.endswith(b"0\r\n\r\n") and (b"[DONE]" in self.end or self.events >= self.st["expect"]):
            self.st["active"] -= 1
            self.st["completed"] += 1
            self.st["events"] += self.events
            if time.monotonic() < self.st["until"]:
                self.send()
            else:
                self.transport.close()

    def connection_lost(self, exc):
        if self.st["active"] and self.first is not None or not self.closed.done():
            pass
        if not self.closed.done():
            self.closed.set_result(None)


async def _run(port, request, n, hold, expect, sample, batch, batch_gap, deadline_extra):
    loop = asyncio.get_running_loop()
    st = {"ttfb": [], "gaps": [], "completed": 0, "active": 0, "bad_status": 0, "events": 0,
          "connect_errors": 0, "expect": expect, "until": float("inf")}
    t_start = time.monotonic()
    clients = []

    async def one():
        try:
            _, c = await loop.create_connection(lambda: Client(st, request, None), "127.0.0.1", port)
            clients.append(c)
        except OSError:
            st["connect_errors"] += 1

    for i in range(0, n, batch):
        await asyncio.gather(*(one() for _ in range(min(batch, n - i))))
        await asyncio.sleep(batch_gap)
    st["opened"] = len(clients)
    st["ramp_s"] = time.monotonic() - t_start
    until = st["until"] = time.monotonic() + hold
    # Mid-hold: every connection should have a stream open.
    await asyncio.sleep(hold / 2)
    st["active_at_sample"] = st["active"]
    st["sample"] = sample() if sample else None
    # Let the last streams finish.
    hard = until + deadline_extra
    while time.monotonic() < hard and not all(c.closed.done() for c in clients):
        await asyncio.sleep(0.05)
    st["unfinished"] = sum(1 for c in clients if not c.closed.done())
    for c in clients:
        if c.transport is not None and not c.closed.done():
            c.transport.abort()
    await asyncio.sleep(0.1)
    st["wall_s"] = time.monotonic() - t_start
    return st


def run(port, path, body, token, n, hold, expect=64, sample=None, batch=50, batch_gap=0.02,
        deadline_extra=15.0):
    b = body.encode()
    request = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\n"
               "Content-Type: application/json\r\nAccept: text/event-stream\r\n"
               f"Content-Length: {len(b)}\r\n\r\n").encode() + b
    st = asyncio.run(_run(port, request, n, hold, expect, sample, batch, batch_gap, deadline_extra))
    ttfb, gaps = st.pop("ttfb"), st.pop("gaps")
    st.pop("expect")
    st.update({
        "n": n, "streams": len(ttfb),
        "ttfb_p50_ms": (pct(ttfb, 0.5) or 0) * 1e3 if ttfb else None,
        "ttfb_p99_ms": (pct(ttfb, 0.99) or 0) * 1e3 if ttfb else None,
        "gap_p50_ms": (pct(gaps, 0.5) or 0) * 1e3 if gaps else None,
        "gap_p99_ms": (pct(gaps, 0.99) or 0) * 1e3 if gaps else None,
    })
    st["requests"] = st["completed"]
    st["events_per_stream"] = st["events"] / st["completed"] if st["completed"] else 0
    st["ok"] = (st["connect_errors"] == 0 and st["bad_status"] == 0 and st["unfinished"] == 0
                and st["completed"] > 0 and st["opened"] == n)
    # "held": every connection had its stream open mid-hold, and every stream ended.
    st["held"] = st["ok"] and st["active_at_sample"] >= n
    if not st["ok"]:
        st["error"] = (f"opened {st['opened']}/{n}, connect errors {st['connect_errors']}, "
                       f"non-200 {st['bad_status']}, unfinished {st['unfinished']}")
    return st
