"""
A loopback provider for the passthrough's provider-native endpoints
(C{/_proxy/<provider>/<path>}): OpenAI's embeddings, moderations, image
generations, speech and transcriptions, and Gemini's C{generateContent},
in their exact wire formats (pinned against the official SDK's types in
C{tests/test_native_fake.py}).

It checks the key as the real APIs do (OpenAI: C{Authorization: Bearer};
Gemini: C{x-goog-api-key}), records every request's headers, and watches
an upload's body as it arrives, chunk by chunk, so a test can prove the
proxy streams it (L{NativeProvider.wait_for_upload}) without keeping a
large body in memory (past 1 MiB only its size and digest are kept).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from typing import Any

import attr
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred, succeed
from twisted.protocols.policies import WrappingFactory
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

__all__ = [
    "KEPT_BODY",
    "NativeProvider",
    "NativeRequest",
    "embeddings_response",
    "gemini_response",
    "images_response",
    "moderation_response",
    "token_count",
    "transcription_response",
]

#: Bytes of a request body the fake keeps; past that only size and digest.
KEPT_BODY = 1024 * 1024


def token_count(text: str) -> int:
    """The fake's deterministic tokenizer: one token per four bytes, at least one."""
    return max(1, (len(text.encode("utf-8")) + 3) // 4)


def embeddings_response(model: str, inputs: list[str], dimensions: int = 4) -> dict:
    """OpenAI's C{CreateEmbeddingResponse} for C{inputs}."""
    tokens = sum(token_count(text) for text in inputs)
    data = [
        {"object": "embedding", "index": i, "embedding": [round((i + 1) / (d + 2), 6) for d in range(dimensions)]}
        for i in range(len(inputs))
    ]
    return {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def images_response(n: int, created: int = 1_700_000_000) -> dict:
    """OpenAI's C{ImagesResponse} with C{n} images by URL."""
    return {"created": created, "data": [{"url": f"https://images.example/{i}.png", "revised_prompt": "a cat"} for i in range(n)]}


def moderation_response(model: str) -> dict:
    """OpenAI's C{ModerationCreateResponse}: one result, nothing flagged."""
    categories = (
        "harassment", "harassment/threatening", "hate", "hate/threatening", "illicit", "illicit/violent",
        "self-harm", "self-harm/instructions", "self-harm/intent", "sexual", "sexual/minors", "violence",
        "violence/graphic",
    )
    return {
        "id": "modr-fake-1",
        "model": model,
        "results": [{
            "flagged": False,
            "categories": {c: False for c in categories},
            "category_scores": {c: 0.0 for c in categories},
            "category_applied_input_types": {c: ["text"] for c in categories},
        }],
    }


def transcription_response(text: str) -> dict:
    """OpenAI's C{Transcription} (C{whisper-1}: the text only, no usage)."""
    return {"text": text}


def gemini_response(text: str, prompt_tokens: int) -> dict:
    """Gemini's C{GenerateContentResponse} with its C{usageMetadata}."""
    output = token_count(text)
    return {
        "candidates": [{"content": {"role": "model", "parts": [{"text": text}]}, "finishReason": "STOP", "index": 0}],
        "usageMetadata": {"promptTokenCount": prompt_tokens, "candidatesTokenCount": output,
                          "totalTokenCount": prompt_tokens + output},
        "modelVersion": "gemini-2.5-flash",
    }


def _openai_error(message: str, kind: str, code: str | None) -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


@attr.s(auto_attribs=True)
class NativeRequest:
    """
    One request as the fake saw it: method, path, query, headers (lower
    case), the body's size and SHA-256, its first L{KEPT_BODY} bytes, and
    how many chunks it arrived in (and how many had arrived when the first
    L{NativeProvider.wait_for_upload} fired).
    """

    method: str
    path: str
    query: str
    headers: dict[str, list[str]]
    size: int = 0
    sha256: str = ""
    body: bytes = b""
    chunks: int = 0
    done: bool = False

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None

    @property
    def json(self) -> Any:
        try:
            return json.loads(self.body) if self.body else None
        except ValueError:
            return None


class _WatchedRequest(Request):
    """A request whose body is watched as it arrives (not spooled past L{KEPT_BODY})."""

    @property
    def _fake(self) -> NativeProvider:
        channel: Any = self.channel  # Site.buildProtocol sets channel.site
        return channel.site.fake

    def gotLength(self, length):
        super().gotLength(length)
        self._native = self._fake._started(self)
        self._digest = hashlib.sha256()

    def handleContentChunk(self, data):
        native = self._native
        native.size += len(data)
        native.chunks += 1
        self._digest.update(data)
        if len(native.body) < KEPT_BODY:
            native.body += data[: KEPT_BODY - len(native.body)]
        self._fake._progress(native)

    def requestReceived(self, command, path, version):
        self._native.sha256 = self._digest.hexdigest()
        self._native.done = True
        super().requestReceived(command, path, version)


class _Site(Site):
    requestFactory = _WatchedRequest

    def __init__(self, fake: NativeProvider, resource: Resource) -> None:
        super().__init__(resource)
        self.fake = fake
        self.noisy = False

    def log(self, request: Any) -> None:
        pass


class _Resource(Resource):
    isLeaf = True

    def __init__(self, fake: NativeProvider) -> None:
        super().__init__()
        self._fake = fake

    def render(self, request: Any) -> bytes:
        return self._fake._answer(request)


class NativeProvider:
    """
    The fake provider.  C{keys}: the OpenAI keys it accepts; C{google_keys}
    the Gemini keys.  C{responder}, when set, answers instead (takes the
    L{NativeRequest}, returns C{(status, headers, body)}).
    """

    def __init__(self, reactor: Any, keys: Iterable[str], google_keys: Iterable[str] = ()) -> None:
        self._reactor = reactor
        self.keys = set(keys)
        self.google_keys = set(google_keys)
        self.requests: list[NativeRequest] = []
        self.responder: Callable[[NativeRequest], tuple[int, dict, bytes]] | None = None
        self._port: Any = None
        self._factory: WrappingFactory | None = None
        self._upload_waiters: list[tuple[int, Deferred]] = []
        self._request_waiters: list[tuple[int, Deferred]] = []

    @property
    def base_url(self) -> str:
        """C{http://127.0.0.1:<port>/v1} (OpenAI's base URL)."""
        return f"http://127.0.0.1:{self._port.getHost().port}/v1"

    @property
    def google_base_url(self) -> str:
        """Gemini's OpenAI-compatible base URL, as the catalog has it (C{/v1beta/openai})."""
        return f"http://127.0.0.1:{self._port.getHost().port}/v1beta/openai"

    def start(self) -> Deferred:
        self._factory = WrappingFactory(_Site(self, _Resource(self)))
        self._factory.noisy = False
        self._port = self._reactor.listenTCP(0, self._factory, interface="127.0.0.1")
        return succeed(self)

    def stop(self) -> Deferred:
        waits = [maybeDeferred(self._port.stopListening)]
        if self._factory is not None:
            for protocol in list(self._factory.protocols):
                protocol.transport.abortConnection()
        return gatherResults(waits, consumeErrors=True)

    # -- observation

    def wait_for_upload(self, size: int) -> Deferred:
        """Fires with the L{NativeRequest} once a request's body has reached C{size} bytes."""
        for native in self.requests:
            if native.size >= size:
                return succeed(native)
        d: Deferred = Deferred()
        self._upload_waiters.append((size, d))
        return d

    def wait_for_request(self, n: int = 1) -> Deferred:
        """Fires with request number C{n} (1-based) once its body is complete."""
        done = [r for r in self.requests if r.done]
        if len(done) >= n:
            return succeed(done[n - 1])
        d: Deferred = Deferred()
        self._request_waiters.append((n, d))
        return d

    def _started(self, request: Any) -> NativeRequest:
        headers: dict[str, list[str]] = {}
        for name, values in request.requestHeaders.getAllRawHeaders():
            headers.setdefault(name.decode("latin-1").lower(), []).extend(v.decode("latin-1") for v in values)
        # The request line is not parsed until the body is in: read it from the channel.
        channel = request.channel
        method = getattr(channel, "_command", b"").decode("latin-1")
        target = getattr(channel, "_path", b"").decode("latin-1")
        path, _, query = target.partition("?")
        native = NativeRequest(method=method, path=path, query=query, headers=headers)
        self.requests.append(native)
        return native

    def _progress(self, native: NativeRequest) -> None:
        ready = [(n, d) for n, d in self._upload_waiters if native.size >= n]
        self._upload_waiters = [(n, d) for n, d in self._upload_waiters if native.size < n]
        for _, d in ready:
            d.callback(native)

    # -- answers

    def _answer(self, request: Any) -> bytes:
        native: NativeRequest = request._native
        done = [r for r in self.requests if r.done]
        ready = [(n, d) for n, d in self._request_waiters if len(done) >= n]
        self._request_waiters = [(n, d) for n, d in self._request_waiters if len(done) < n]
        for n, d in ready:
            d.callback(done[n - 1])
        if self.responder is not None:
            status, headers, body = self.responder(native)
        else:
            status, headers, body = self._respond(native)
        request.setResponseCode(status)
        for name, value in headers.items():
            request.setHeader(name.encode(), value.encode())
        return body

    def _respond(self, native: NativeRequest) -> tuple[int, dict, bytes]:
        json_type = {"content-type": "application/json"}
        path = native.path
        if path.startswith("/v1beta/models/"):
            if native.header("x-goog-api-key") not in self.google_keys:
                error = {"error": {"code": 400, "message": "API key not valid.", "status": "INVALID_ARGUMENT"}}
                return 400, json_type, json.dumps(error).encode()
            doc = native.json or {}
            text = json.dumps(doc.get("contents", ""))
            return 200, json_type, json.dumps(gemini_response("Hello from Gemini", token_count(text))).encode()
        auth = native.header("authorization") or ""
        if not auth.startswith("Bearer ") or auth[7:] not in self.keys:
            error = _openai_error("Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
            return 401, json_type, json.dumps(error).encode()
        doc = native.json if isinstance(native.json, dict) else {}
        if path == "/v1/embeddings" and native.method == "POST":
            inputs = doc.get("input")
            inputs = [inputs] if isinstance(inputs, str) else [str(i) for i in inputs or []]
            return 200, json_type, json.dumps(embeddings_response(str(doc.get("model")), inputs)).encode()
        if path == "/v1/moderations" and native.method == "POST":
            return 200, json_type, json.dumps(moderation_response("omni-moderation-2024-09-26")).encode()
        if path == "/v1/images/generations" and native.method == "POST":
            n = doc.get("n")
            return 200, json_type, json.dumps(images_response(n if isinstance(n, int) else 1)).encode()
        if path == "/v1/audio/speech" and native.method == "POST":
            audio = b"ID3" + b"\x00\xff" * (8 * len(str(doc.get("input", ""))))
            return 200, {"content-type": "audio/mpeg"}, audio
        if path == "/v1/audio/transcriptions" and native.method == "POST":
            text = f"{native.size} bytes heard"
            return 200, json_type, json.dumps(transcription_response(text)).encode()
        error = _openai_error(f"Invalid URL ({native.method} {path})", "invalid_request_error", None)
        return 404, json_type, json.dumps(error).encode()
