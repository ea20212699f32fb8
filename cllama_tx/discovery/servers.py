"""
What a local model server's answers say: whether it is one, of which
kind, which models it serves, and the provider name it gets.

 - Ollama answers C{GET /api/tags} with C{{"models": [{"name": ...}]}};
 - vLLM, the llama.cpp server, LM Studio and any OpenAI-compatible server
   answer C{GET /v1/models} with C{{"object": "list", "data": [{"id": ...}]}};
   vLLM says C{"owned_by": "vllm"}, llama.cpp C{"owned_by": "llamacpp"}
   (it also answers C{/api/tags}, with both lists in one body), and LM
   Studio is known by its own C{GET /api/v0/models}, whose models carry
   C{publisher} and C{compatibility_type}.

Names (provider names are lower case, at most 64 characters of a-z, 0-9,
C{.}, C{_} and C{-}):

 - a server on this host (a listed loopback address, or the port scan):
   C{local-<kind>-<port>} (C{local-ollama-11434});
 - a listed server on another host: C{local-<kind>-<host>-<port>};
 - a container's server: C{docker-<compose service, else container name>},
   with C{-<n>} for a compose replica other than the first and
   C{-<port>} when the container serves models on more than one port.

Pure functions, no I/O.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

OLLAMA = "ollama"
LMSTUDIO = "lmstudio"
VLLM = "vllm"
LLAMACPP = "llamacpp"
OPENAI_COMPATIBLE = "openai"
KINDS = (OLLAMA, LMSTUDIO, VLLM, LLAMACPP, OPENAI_COMPATIBLE)

TAGS_PATH = "/api/tags"
MODELS_PATH = "/v1/models"
LMSTUDIO_PATH = "/api/v0/models"

#: Models kept per server; a longer list is cut (and said so in the log).
MAX_MODELS = 1000
MAX_MODEL_ID = 256
MAX_NAME = 64

_OWNERS = {"vllm": VLLM, "llamacpp": LLAMACPP}
_UNSAFE = re.compile(r"[^a-z0-9._-]+")


def _model_id(value: Any) -> str | None:
    """A model id fit to list and to route: printable, no spaces, bounded."""
    if not isinstance(value, str) or not 0 < len(value) <= MAX_MODEL_ID:
        return None
    if any(c.isspace() or not c.isprintable() for c in value):
        return None
    return value


def _ids(items: list, key: str) -> list[str]:
    found = []
    for item in items:
        if isinstance(item, dict):
            model = _model_id(item.get(key))
            if model is not None:
                found.append(model)
    return list(dict.fromkeys(found))[:MAX_MODELS]


def ollama_models(doc: Any) -> list[str] | None:
    """
    The models of an Ollama C{/api/tags} answer, or None when C{doc} is
    not one (llama.cpp's twin answer, which also carries C{data}, is not).
    """
    if not isinstance(doc, dict) or "data" in doc or not isinstance(doc.get("models"), list):
        return None
    items = doc["models"]
    if any(not isinstance(item, dict) or not isinstance(item.get("name") or item.get("model"), str) for item in items):
        return None
    return _ids([{"name": item.get("name") or item.get("model")} for item in items], "name")


def openai_models(doc: Any) -> tuple[list[str], str | None] | None:
    """
    C{(models, kind)} of a C{/v1/models} answer (kind from C{owned_by}:
    vLLM, llama.cpp, else None), or None when C{doc} is not a model list.
    """
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        return None
    if doc.get("object") not in (None, "list"):
        return None
    items = doc["data"]
    if any(not isinstance(item, dict) or not isinstance(item.get("id"), str) for item in items):
        return None
    owners = {item.get("owned_by") for item in items}
    kinds = {_OWNERS[o] for o in owners if isinstance(o, str) and o in _OWNERS}
    return _ids(items, "id"), (kinds.pop() if len(kinds) == 1 else None)


def is_lmstudio(doc: Any) -> bool:
    """Whether C{doc} is LM Studio's own C{/api/v0/models} answer."""
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list) or not doc["data"]:
        return False
    return all(
        isinstance(item, dict) and "compatibility_type" in item and "publisher" in item for item in doc["data"]
    )


def sanitize(text: str) -> str:
    """C{text} as part of a provider name: lower case, other characters as C{-}."""
    cleaned = _UNSAFE.sub("-", text.lower()).strip("-._")
    return re.sub(r"-{2,}", "-", cleaned)


def is_loopback(host: str) -> bool:
    """C{localhost} or a loopback address: this host."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _fit(stem: str, suffix: str) -> str:
    """C{stem + suffix} cut to L{MAX_NAME} characters (the stem gives way)."""
    stem = stem[: MAX_NAME - len(suffix)].rstrip("-._")
    return stem + suffix


def host_server_name(kind: str, host: str, port: int) -> str:
    """C{local-<kind>-<port>} on this host, C{local-<kind>-<host>-<port>} elsewhere."""
    if is_loopback(host):
        return f"local-{kind}-{port}"
    return _fit(f"local-{kind}-{sanitize(host) or 'host'}", f"-{port}")


def container_server_name(base: str, port: int, number: str | None = None, several: bool = False) -> str:
    """C{docker-<base>}, C{-<n>} for a compose replica after the first, C{-<port>} when several ports serve."""
    suffix = ""
    if number and number.isdigit() and number != "1":
        suffix += f"-{number}"
    if several:
        suffix += f"-{port}"
    return _fit(f"docker-{sanitize(base) or 'container'}", suffix)


def unique_name(name: str, taken: set[str]) -> str:
    """C{name}, or C{name-2}, C{name-3}, ... when another server of this round has it."""
    if name not in taken:
        return name
    n = 2
    while _fit(name, f"-{n}") in taken:
        n += 1
    return _fit(name, f"-{n}")


def base_url(host: str, port: int) -> str:
    """The server's OpenAI-compatible base (Ollama serves one at C{/v1} too)."""
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/v1"
