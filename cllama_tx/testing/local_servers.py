"""
Fake local model servers and a fake Docker Engine API, for discovery's
tests: each answers as the real one does on the paths discovery reads.

 - L{FakeLocalServer} of kind C{ollama}: C{GET /} (C{Ollama is running}),
   C{/api/tags}, C{/api/version}, its OpenAI-compatible C{/v1/models}
   (C{owned_by: library}), Go's plain-text 404 elsewhere;
 - C{vllm}: C{/v1/models} with C{owned_by: vllm}, C{root} and
   C{max_model_len}, FastAPI's C{{"detail": "Not Found"}} elsewhere;
 - C{llamacpp}: C{/v1/models}, C{/models} and C{/api/tags} all answering
   its combined list (C{models} for Ollama clients and C{data} with
   C{owned_by: llamacpp});
 - C{lmstudio}: C{/v1/models} and its own C{/api/v0/models};
 - C{openai}: an OpenAI-compatible server that is none of those;
 - any other kind: a web server that is no model server (404 everywhere).

Every kind answers C{POST /v1/chat/completions} (JSON or SSE) with the
demo model's deterministic text, and refuses a model it does not serve
in its own words (Ollama's 404 C{model "x" not found}, vLLM's
C{NotFoundError}, ...), so a test sees the provider prefix was stripped.

L{FakeDockerApi} listens on a UNIX socket and answers C{GET /_ping} and
C{GET /containers/json} (its C{filters} parameter's C{label} and
C{status} honoured) with the given containers, in the Engine API's field
names (L{container}).
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qs

from twisted.internet import defer
from twisted.web.resource import Resource
from twisted.web.server import Site

from cllama_tx.demo.model import DemoModel
from cllama_tx.demo.server import ReceivedRequest, Reply
from cllama_tx.demo.wire import openai_error
from cllama_tx.discovery.docker import NUMBER_LABEL, PROJECT_LABEL, SERVICE_LABEL
from cllama_tx.testing import FakeProvider

__all__ = ["FakeDockerApi", "FakeLocalServer", "container"]

CREATED = 1718000000
_JSON = b"application/json; charset=utf-8"


class FakeLocalServer(FakeProvider):
    """
    A local model server of C{kind} serving C{models} on a loopback port.
    @ivar probed: the paths of the GETs discovery made, in order.
    """

    def __init__(self, reactor: Any, kind: str, models: list[str], port: int = 0) -> None:
        self.kind = kind
        self.models = list(models)
        self.probed: list[str] = []
        self._demo = DemoModel()
        super().__init__(reactor, self._chat, port, strict=False)

    # --- the model list, in each server's words -------------------------------

    def _openai_list(self, owner: str) -> dict:
        data = []
        for model in self.models:
            item: dict[str, Any] = {"id": model, "object": "model", "created": CREATED, "owned_by": owner}
            if self.kind == "vllm":
                item.update(root=model, parent=None, max_model_len=32768, permission=[])
            if self.kind == "llamacpp":
                item["meta"] = {"vocab_type": 2, "n_vocab": 151936, "n_ctx_train": 32768}
            data.append(item)
        return {"object": "list", "data": data}

    def _tags(self) -> dict:
        return {
            "models": [
                {
                    "name": model,
                    "model": model,
                    "modified_at": "2025-05-01T10:00:00.000000000Z",
                    "size": 2019393189,
                    "digest": "a80c4f17acd55265feec403c7aef86be0c25983ab279d83f3bcd3abbcb5b8b72",
                    "details": {"parent_model": "", "format": "gguf", "family": "llama", "families": ["llama"],
                                "parameter_size": "3.2B", "quantization_level": "Q4_K_M"},
                }
                for model in self.models
            ]
        }

    def _native(self, path: str) -> tuple[int, bytes, bytes] | None:
        """C{(status, body, content type)} for a GET, or None for the chat routes."""
        kind = self.kind
        if kind == "ollama":
            if path == "/":
                return 200, b"Ollama is running", b"text/plain; charset=utf-8"
            if path == "/api/tags":
                return 200, json.dumps(self._tags()).encode(), _JSON
            if path == "/api/version":
                return 200, b'{"version":"0.6.8"}', _JSON
            if path == "/v1/models":
                return 200, json.dumps(self._openai_list("library")).encode(), _JSON
            return 404, b"404 page not found", b"text/plain"
        if kind == "llamacpp":
            if path in ("/v1/models", "/models", "/api/tags"):
                doc = self._openai_list("llamacpp")
                doc = {"models": [{"name": m, "model": m, "type": "model"} for m in self.models], **doc}
                return 200, json.dumps(doc).encode(), _JSON
            if path == "/health":
                return 200, b'{"status":"ok"}', _JSON
            return 404, b'{"error":{"code":404,"message":"File Not Found","type":"not_found_error"}}', _JSON
        if kind == "lmstudio":
            if path == "/v1/models":
                return 200, json.dumps(self._openai_list("organization_owner")).encode(), _JSON
            if path == "/api/v0/models":
                data = [
                    {"id": m, "object": "model", "type": "llm", "publisher": "lmstudio-community", "arch": "llama",
                     "compatibility_type": "gguf", "quantization": "Q4_K_M", "state": "loaded",
                     "max_context_length": 131072}
                    for m in self.models
                ]
                return 200, json.dumps({"object": "list", "data": data}).encode(), _JSON
            return 200, json.dumps({"error": f"Unexpected endpoint or method. (GET {path})"}).encode(), _JSON
        if path == "/v1/models" and kind in ("vllm", "openai"):
            owner = "vllm" if kind == "vllm" else "system"
            return 200, json.dumps(self._openai_list(owner)).encode(), _JSON
        if path == "/health" and kind == "vllm":
            return 200, b"", b"application/json"
        return 404, b'{"detail":"Not Found"}', _JSON

    def _handle(self, request: Any) -> Any:
        if request.method in (b"GET", b"HEAD"):
            path = request.path.decode("latin-1")
            self.probed.append(path)
            status, body, content_type = self._native(path) or (404, b"", b"text/plain")
            request.setResponseCode(status)
            request.setHeader(b"content-type", content_type)
            return body
        return super()._handle(request)

    # --- chat -------------------------------------------------------------------------

    def _chat(self, received: ReceivedRequest) -> Reply:
        doc = received.json if isinstance(received.json, dict) else {}
        model = doc.get("model")
        if model not in self.models:
            if self.kind == "ollama":
                message = f'model "{model}" not found, try pulling it first'
                return Reply(status=404, json={"error": {"message": message, "type": "api_error",
                                                         "param": None, "code": None}})
            if self.kind == "vllm":
                return Reply(status=404, json={"object": "error", "message": f"The model `{model}` does not exist.",
                                               "type": "NotFoundError", "param": None, "code": 404})
            return Reply(status=404, json=openai_error(f"model {model!r} not found", "invalid_request_error"))
        return self._demo.respond(received)


# --- Docker ------------------------------------------------------------------------------


def container(
    name: str,
    *,
    ports: list[tuple[int, int | None]],
    address: str = "127.0.0.1",
    project: str | None = None,
    service: str | None = None,
    number: int = 1,
    state: str = "running",
    network: str = "bridge",
) -> dict:
    """
    One C{/containers/json} entry in the Engine API's field names: C{ports}
    are C{(PrivatePort, PublicPort or None)}; C{address} is its address on
    C{network}.
    """
    labels = {}
    if project is not None:
        labels = {PROJECT_LABEL: project, SERVICE_LABEL: service or name, NUMBER_LABEL: str(number),
                  "com.docker.compose.oneoff": "False"}
    port_entries: list[dict[str, Any]] = []
    for private, public in ports:
        if public is None:
            port_entries.append({"PrivatePort": private, "Type": "tcp"})
        else:
            port_entries.append({"IP": "0.0.0.0", "PrivatePort": private, "PublicPort": public, "Type": "tcp"})
            port_entries.append({"IP": "::", "PrivatePort": private, "PublicPort": public, "Type": "tcp"})
    digest = (name.encode().hex() * 8)[:64]
    return {
        "Id": digest,
        "Names": [f"/{name}"],
        "Image": "ollama/ollama:latest",
        "ImageID": "sha256:" + digest,
        "Command": "/bin/ollama serve",
        "Created": CREATED,
        "Ports": port_entries,
        "Labels": labels,
        "State": state,
        "Status": "Up 2 hours" if state == "running" else "Exited (0) 1 hour ago",
        "HostConfig": {"NetworkMode": network},
        "NetworkSettings": {
            "Networks": {
                network: {
                    "IPAMConfig": None, "Links": None, "Aliases": None, "MacAddress": "02:42:ac:11:00:02",
                    "NetworkID": "7ea29fc1412292a2d7bba362f9253545fecdfa8ce9a6e37dd10ba8bee7129812",
                    "EndpointID": "2cdc4edb1ded3631c81f57966563e5c8525b81121bb3706a9a9a3ae102711f3f",
                    "Gateway": "", "IPAddress": address, "IPPrefixLen": 8, "IPv6Gateway": "",
                    "GlobalIPv6Address": "", "GlobalIPv6PrefixLen": 0, "DriverOpts": None,
                }
            }
        },
        "Mounts": [],
    }


class _QuietSite(Site):
    """No access log lines from a fake."""

    def log(self, request: Any) -> None:
        pass


class _DockerResource(Resource):
    isLeaf = True

    def __init__(self, fake: FakeDockerApi) -> None:
        super().__init__()
        self._fake = fake

    def render(self, request: Any) -> bytes:
        fake = self._fake
        path = request.path.decode("latin-1")
        fake.requests.append(request.uri.decode("latin-1"))
        request.setHeader(b"api-version", b"1.47")
        request.setHeader(b"server", b"Docker/27.3.1 (linux)")
        if request.method not in (b"GET", b"HEAD"):
            request.setResponseCode(405)
            return b'{"message":"method not allowed"}'
        if path == "/_ping":
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"OK"
        if path.rstrip("/") != "/containers/json" and not path.endswith("/containers/json"):
            request.setResponseCode(404)
            request.setHeader(b"content-type", b"application/json")
            return b'{"message":"page not found"}'
        query = parse_qs(request.uri.decode("latin-1").partition("?")[2])
        try:
            filters = json.loads(query["filters"][0]) if "filters" in query else {}
        except ValueError:
            request.setResponseCode(400)
            request.setHeader(b"content-type", b"application/json")
            return b'{"message":"invalid filter"}'
        listed = []
        for entry in fake.containers:
            labels = entry.get("Labels") or {}
            wanted = filters.get("label") or []
            if any(labels.get(w.partition("=")[0]) != w.partition("=")[2] for w in wanted):
                continue
            states = filters.get("status") or ["running"]
            if entry.get("State") not in states:
                continue
            listed.append(entry)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(listed).encode()


class FakeDockerApi:
    """
    The Docker Engine API on a UNIX socket at C{path}, listing C{containers}
    (dicts as L{container} makes them; change the list at will).
    @ivar requests: every request's URI, in order.
    """

    def __init__(self, reactor: Any, path: str, containers: list[dict] | None = None) -> None:
        self._reactor = reactor
        self.path = path
        self.containers: list[dict] = list(containers or [])
        self.requests: list[str] = []
        self._port: Any = None

    def start(self) -> defer.Deferred:
        site = _QuietSite(_DockerResource(self))
        site.noisy = False
        self._port = self._reactor.listenUNIX(self.path, site)
        return defer.succeed(self)

    def stop(self) -> defer.Deferred:
        port, self._port = self._port, None
        if port is None:
            return defer.succeed(None)
        return defer.maybeDeferred(port.stopListening)
