#!/usr/bin/env python3
"""
A slow upstream mock for the bench (asyncio, one process; C{bench/bench.py}
runs it on the load core).  nginx cannot delay an answer, so this one does:

  - C{POST .../chat/completions} (no C{"stream": true} in the body): a fixed
    OpenAI C{chat.completion} JSON answer, sent C{--delay-ms} (20) after the
    request arrived;
  - C{"stream": true} in the body: a C{text/event-stream} of C{--chunks} (64)
    SSE events, C{--gap-ms} (20) apart (the first at once), then C{data: [DONE]},
    chunked transfer encoding.  Each stream keeps the phase it started with,
    as real providers' streams do: a 1 ms ticker serves the streams of one
    millisecond slot of the gap at a time, so a thousand streams are spread
    over the gap instead of all sending in the same instant, and the
    mock's own cost stays small.

HTTP/1.1 keep-alive, no limits; just enough HTTP for wrk, the proxy and the
bench's stream client.  Usage: C{slowmock.py PORT [--delay-ms 20] [--chunks 64]
[--gap-ms 20]}.
"""

import argparse
import asyncio
import json

MOCK_ID = "chatcmpl-benchmock"


def chat_body() -> bytes:
    return json.dumps({
        "id": MOCK_ID, "object": "chat.completion", "created": 1700000000, "model": "slow-mock",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello from the slow mock."},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 7, "total_tokens": 16},
    }, separators=(",", ":")).encode()


def sse_event(i: int) -> bytes:
    doc = {"id": MOCK_ID, "object": "chat.completion.chunk", "created": 1700000000, "model": "slow-mock",
           "choices": [{"index": 0, "delta": {"content": f" w{i}"}, "finish_reason": None}]}
    return b"data: " + json.dumps(doc, separators=(",", ":")).encode() + b"\n\n"


def chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class Mock(asyncio.Protocol):
    def __init__(self, srv):
        self.srv = srv
        self.buf = b""
        self.transport = None
        self.streaming = False

    def connection_made(self, transport):
        self.transport = transport

    def connection_lost(self, exc):
        self.transport = None  # its slot drops it at its next turn

    def data_received(self, data):
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].decode("latin-1")
            length = 0
            for line in head.split("\r\n")[1:]:
                k, _, v = line.partition(":")
                if k.strip().lower() == "content-length":
                    length = int(v.strip())
            if len(self.buf) < end + 4 + length:
                return
            body = self.buf[end + 4:end + 4 + length]
            self.buf = self.buf[end + 4 + length:]
            self.handle(body)

    def handle(self, body: bytes):
        if b'"stream":true' in body.replace(b" ", b""):
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n" + chunked(self.srv.events[0]))
            self.srv.add_stream(self)
        else:
            asyncio.get_running_loop().call_later(self.srv.delay, self.answer)

    def answer(self):
        if self.transport is not None:
            self.transport.write(self.srv.json_answer)


class Server:
    def __init__(self, delay_ms, chunks, gap_ms):
        self.delay = delay_ms / 1000.0
        self.gap = gap_ms / 1000.0
        self.events = [chunked(sse_event(i)) for i in range(chunks)]
        self.done = chunked(b"data: [DONE]\n\n") + b"0\r\n\r\n"
        body = chat_body()
        self.json_answer = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                            b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        self.slot_count = max(1, round(self.gap * 1000))  # 1 ms slots per gap
        self.slots: list[dict] = [{} for _ in range(self.slot_count)]
        self.slot = 0

    def add_stream(self, proto) -> None:
        """Its next event one gap from now: the slot just served."""
        self.slots[(self.slot - 1) % self.slot_count][proto] = 1

    def tick(self):
        loop = asyncio.get_running_loop()
        self.next_tick += self.gap / self.slot_count
        loop.call_at(max(self.next_tick, loop.time()), self.tick)
        slot = self.slots[self.slot]
        self.slot = (self.slot + 1) % self.slot_count
        n = len(self.events)
        for proto, i in list(slot.items()):
            t = proto.transport
            if t is None:
                del slot[proto]
            elif i < n:
                t.write(self.events[i])
                slot[proto] = i + 1
            else:
                t.write(self.done)
                del slot[proto]


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("port", type=int)
    ap.add_argument("--delay-ms", type=float, default=20.0)
    ap.add_argument("--chunks", type=int, default=64)
    ap.add_argument("--gap-ms", type=float, default=20.0)
    a = ap.parse_args()
    srv = Server(a.delay_ms, a.chunks, a.gap_ms)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Mock(srv), "127.0.0.1", a.port, backlog=4096)
    srv.next_tick = loop.time()
    loop.call_soon(srv.tick)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
