"""
The offline demo: a deterministic local "model", its agent context and the
service that serves it as provider C{demo}.

Nothing here talks to a real provider.  The demo agent's credential
(L{DEMO_TOKEN}) is public on purpose: its model policy lets it reach only
L{DEMO_MODEL_REF}, which the daemon routes to the loopback L{DemoService}.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
from collections.abc import Mapping
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed

from cllama_tx.demo.responses_wire import (
    responses_response,
    responses_sse_events,
    responses_stream_events,
)
from cllama_tx.demo.server import FakeProvider, ReceivedRequest, Reply
from cllama_tx.demo.wire import (
    DEFAULT_CREATED,
    anthropic_error,
    anthropic_message,
    anthropic_sse_events,
    anthropic_stream_events,
    openai_completion,
    openai_error,
    openai_sse_events,
    openai_stream_chunks,
)

__all__ = [
    "DEMO_AGENT_ID",
    "DEMO_MODEL",
    "DEMO_MODEL_REF",
    "DEMO_PROVIDER",
    "DEMO_SECRET",
    "DEMO_TOKEN",
    "DemoModel",
    "DemoService",
    "banner",
    "estimate_tokens",
    "write_demo_context",
]

DEMO_AGENT_ID = "demo"
#: A documented, public demo credential: the demo agent can only reach the
#: demo provider (its model policy rejects everything else).
DEMO_SECRET = "cllama-demo"
DEMO_TOKEN = DEMO_AGENT_ID + ":" + DEMO_SECRET
DEMO_PROVIDER = "demo"
DEMO_MODEL = "echo-1"
DEMO_MODEL_REF = DEMO_PROVIDER + "/" + DEMO_MODEL

GREETING = "Hello from the cllama_tx demo model."
MAX_ECHO = 200


def estimate_tokens(text: str) -> int:
    """
    A deterministic token estimate: one token per four UTF-8 bytes, rounded
    up.
    """
    return math.ceil(len(text.encode("utf-8")) / 4)


def _text_of(content: Any) -> str:
    """
    The text inside a message's C{content}: a string, or a list of parts /
    blocks (C{text} parts, and the text inside C{tool_result} blocks).
    """
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, Mapping):
                if isinstance(part.get("text"), str):
                    texts.append(part["text"])
                elif "content" in part:
                    texts.append(_text_of(part["content"]))
        return "\n".join(t for t in texts if t)
    return ""


def _conversation(body: Mapping[str, Any]) -> list:
    """The messages of a chat or Messages body, or the input items of a Responses one."""
    given = body.get("input", body.get("messages"))
    if isinstance(given, str):
        return [{"role": "user", "content": given}]
    return list(given) if isinstance(given, list) else []


def _word_chunks(text: str) -> list[str]:
    """
    Split C{text} into word pieces that keep their trailing whitespace, so
    C{"".join(pieces) == text}.
    """
    return [p for p in re.split(r"(?<=\s)(?=\S)", text) if p]


class DemoModel:
    """
    A deterministic local "model" that answers every wire format (chat,
    Messages, Responses): it greets and echoes the last user text, and
    reports honest usage (see L{estimate_tokens}) so metering can be
    demonstrated.

    The same request body always gives the same answer (ids are derived from
    the body; C{created} comes from C{clock} when one is given, else it is
    fixed).
    """

    def __init__(self, clock: Any = None) -> None:
        self._clock = clock

    # understanding the request

    @staticmethod
    def prompt_text(body: Mapping[str, Any]) -> str:
        """
        All prompt text of an OpenAI chat or Anthropic messages body: the
        Anthropic C{system}, then every message's text, joined by newlines.
        """
        texts = [_text_of(body.get("system")), _text_of(body.get("instructions"))]
        for message in _conversation(body):
            if isinstance(message, Mapping):
                texts.append(_text_of(message.get("content")))
        return "\n".join(t for t in texts if t)

    @staticmethod
    def last_user_text(body: Mapping[str, Any]) -> str:
        for message in reversed(_conversation(body)):
            if isinstance(message, Mapping) and message.get("role") == "user":
                return _text_of(message.get("content"))
        return ""

    def reply_text(self, body: Mapping[str, Any]) -> str:
        said = self.last_user_text(body).strip()
        if not said:
            return GREETING + " You said nothing."
        if len(said) > MAX_ECHO:
            said = said[:MAX_ECHO] + "..."
        return GREETING + " You said: " + said

    def usage(self, body: Mapping[str, Any]) -> tuple[int, int]:
        """
        C{(prompt tokens, completion tokens)}.
        """
        return estimate_tokens(self.prompt_text(body)), estimate_tokens(self.reply_text(body))

    @staticmethod
    def model_name(body: Mapping[str, Any]) -> str:
        model = body.get("model")
        return model if isinstance(model, str) and model else DEMO_MODEL

    def _digest(self, body: Mapping[str, Any]) -> str:
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:24]

    def _created(self) -> int:
        return int(self._clock.seconds()) if self._clock is not None else DEFAULT_CREATED

    # OpenAI Chat Completions

    def openai_response(self, body: Mapping[str, Any]) -> dict:
        prompt, completion = self.usage(body)
        return openai_completion(
            self.reply_text(body),
            self.model_name(body),
            prompt,
            completion,
            id="chatcmpl-demo" + self._digest(body),
            created=self._created(),
        )

    def openai_stream(self, body: Mapping[str, Any], include_usage: bool | None = None) -> list[dict]:
        """
        The chunks of the streamed answer; C{include_usage} defaults to the
        body's C{stream_options.include_usage}.
        """
        if include_usage is None:
            options = body.get("stream_options")
            include_usage = bool(isinstance(options, Mapping) and options.get("include_usage"))
        prompt, completion = self.usage(body)
        return openai_stream_chunks(
            _word_chunks(self.reply_text(body)),
            self.model_name(body),
            prompt,
            completion,
            id="chatcmpl-demo" + self._digest(body),
            include_usage=include_usage,
            created=self._created(),
        )

    # Anthropic Messages

    def anthropic_response(self, body: Mapping[str, Any]) -> dict:
        prompt, completion = self.usage(body)
        return anthropic_message(
            self.reply_text(body),
            self.model_name(body),
            prompt,
            completion,
            id="msg_demo" + self._digest(body),
        )

    def anthropic_stream(self, body: Mapping[str, Any]) -> list[tuple[str, dict]]:
        prompt, completion = self.usage(body)
        return anthropic_stream_events(
            _word_chunks(self.reply_text(body)),
            self.model_name(body),
            prompt,
            completion,
            id="msg_demo" + self._digest(body),
        )

    # OpenAI Responses

    def responses_response(self, body: Mapping[str, Any]) -> dict:
        prompt, completion = self.usage(body)
        return responses_response(
            self.reply_text(body), self.model_name(body), prompt, completion,
            id="resp_demo" + self._digest(body), created_at=self._created(),
        )

    def responses_stream(self, body: Mapping[str, Any]) -> list[tuple[str, dict]]:
        prompt, completion = self.usage(body)
        return responses_stream_events(
            _word_chunks(self.reply_text(body)), self.model_name(body), prompt, completion,
            id="resp_demo" + self._digest(body), created_at=self._created(),
        )

    def count_tokens(self, body: Mapping[str, Any]) -> dict:
        return {"input_tokens": estimate_tokens(self.prompt_text(body))}

    def models(self, anthropic: bool = False) -> dict:
        if anthropic:
            return {
                "data": [
                    {
                        "type": "model",
                        "id": DEMO_MODEL,
                        "display_name": "cllama_tx demo echo model",
                        "created_at": "2023-11-14T22:13:20Z",
                    }
                ],
                "has_more": False,
                "first_id": DEMO_MODEL,
                "last_id": DEMO_MODEL,
            }
        return {
            "object": "list",
            "data": [{"id": DEMO_MODEL, "object": "model", "created": DEFAULT_CREATED, "owned_by": "cllama_tx"}],
        }

    # the FakeProvider responder

    def respond(self, request: ReceivedRequest) -> Reply:
        """
        Answer one request received by a L{FakeProvider}, in its wire format,
        streaming when the body says C{"stream": true}.
        """
        path = request.path
        anthropic = "/messages" in path
        if path.endswith("/models"):
            return Reply(json=self.models(anthropic=request.header("anthropic-version") is not None))
        body = request.json
        if not isinstance(body, dict):
            message = "the request body must be a JSON object"
            if anthropic:
                return Reply(status=400, json=anthropic_error("invalid_request_error", message))
            return Reply(status=400, json=openai_error(message, "invalid_request_error"))
        if path.endswith("/count_tokens"):
            return Reply(json=self.count_tokens(body))
        stream = body.get("stream") is True
        if path.rstrip("/").endswith("/responses"):
            if stream:
                return Reply(sse=responses_sse_events(self.responses_stream(body)))
            return Reply(json=self.responses_response(body))
        if anthropic:
            if stream:
                return Reply(sse=anthropic_sse_events(self.anthropic_stream(body)))
            return Reply(json=self.anthropic_response(body))
        if stream:
            return Reply(sse=openai_sse_events(self.openai_stream(body)))
        return Reply(json=self.openai_response(body))


def _write_atomically(path: str, data: bytes, mode: int = 0o600) -> None:
    directory = os.path.dirname(path)
    fd, temp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(temp, mode)
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise


def write_demo_context(root: str) -> str:
    """
    Create (or refresh) the demo agent's context C{<root>/demo/} with its
    C{metadata.json} and a short C{AGENTS.md}; directories are created with
    mode 0700.  Return the context directory.
    """
    if not os.path.isdir(root):
        os.makedirs(root, mode=0o700, exist_ok=True)
        os.chmod(root, 0o700)
    context = os.path.join(root, DEMO_AGENT_ID)
    os.makedirs(context, mode=0o700, exist_ok=True)
    os.chmod(context, 0o700)
    metadata = {
        "token": DEMO_TOKEN,
        "pod": "demo",
        "service": "demo",
        "model_policy": {
            "mode": "reject",
            "allowed": [{"slot": "primary", "ref": DEMO_MODEL_REF}],
        },
    }
    _write_atomically(
        os.path.join(context, "metadata.json"),
        (json.dumps(metadata, indent=2) + "\n").encode("utf-8"),
    )
    _write_atomically(
        os.path.join(context, "AGENTS.md"),
        b"# demo\n\nThe cllama_tx demo agent. Its credential is public; it can only use "
        + DEMO_MODEL_REF.encode("utf-8")
        + b", a local echo model.\n",
    )
    return context


class DemoService(Service):
    """
    Serves the L{DemoModel} on 127.0.0.1 (an ephemeral port unless told).
    Register it as provider C{demo}: base URL L{base_url}, auth C{none},
    format C{openai} (it answers C{/v1/messages} too).
    """

    name = "cllama-demo-provider"

    def __init__(self, reactor: Any, port: int = 0) -> None:
        self._reactor = reactor
        self._port = port
        self._fake: FakeProvider | None = None

    @property
    def fake(self) -> FakeProvider | None:
        return self._fake

    @property
    def base_url(self) -> str:
        """
        C{http://127.0.0.1:<port>/v1}; known as soon as C{startService}
        returned (listening is synchronous).
        """
        url = self._fake.base_url if self._fake is not None else None
        if url is None:
            raise RuntimeError("the demo provider is not running")
        return url

    def startService(self) -> Deferred:
        Service.startService(self)
        self._fake = FakeProvider(self._reactor, responder=DemoModel(clock=self._reactor).respond, port=self._port)
        return self._fake.start()

    def stopService(self) -> Deferred:
        Service.stopService(self)
        fake, self._fake = self._fake, None
        if fake is None:
            return succeed(None)
        return fake.stop()


def banner(api_base_url: str) -> str:
    """
    What to print when the demo starts: ready-to-paste commands.
    """
    api = api_base_url.rstrip("/")
    if api.endswith("/v1"):
        api = api[: -len("/v1")]
    url = api + "/v1/chat/completions"
    plain = json.dumps({"model": DEMO_MODEL_REF, "messages": [{"role": "user", "content": "Hello!"}]})
    streaming = json.dumps(
        {"model": DEMO_MODEL_REF, "stream": True, "messages": [{"role": "user", "content": "Hello!"}]}
    )
    return "\n".join(
        [
            f"cllama_tx demo mode: provider {DEMO_PROVIDER!r} serves a local echo model"
            " (no real provider is called).",
            f"Demo agent credential (public; it can only reach {DEMO_MODEL_REF}): {DEMO_TOKEN}",
            "",
            "Try it:",
            f"  curl -sS {url} \\",
            f"    -H 'Authorization: Bearer {DEMO_TOKEN}' \\",
            "    -H 'Content-Type: application/json' \\",
            f"    -d '{plain}'",
            "",
            "Streaming:",
            f"  curl -sSN {url} \\",
            f"    -H 'Authorization: Bearer {DEMO_TOKEN}' \\",
            "    -H 'Content-Type: application/json' \\",
            f"    -d '{streaming}'",
            "",
            "OpenAI SDK:",
            f'  client = OpenAI(base_url="{api}/v1", api_key="{DEMO_TOKEN}")',
            f'  client.chat.completions.create(model="{DEMO_MODEL_REF}",'
            ' messages=[{"role": "user", "content": "Hello!"}])',
            "",
        ]
    )
