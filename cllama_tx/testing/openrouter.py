"""
A fake OpenRouter for L{cllama_tx.testing.FakeProvider}: answers chat
completions as OpenRouter does and lists its models with their prices.

  - A request with C{models} (and C{route: "fallback"}) is answered by the
    first model of the list that is up (L{OpenRouterModel.down} holds those
    that fail), its C{model} naming the one that answered; without
    C{models}, C{model} answers.  A model it does not list is OpenRouter's
    400; every model down is its 503.
  - C{usage} carries OpenRouter's C{cost} (dollars, the model's price for
    the tokens) besides the OpenAI counts; so does a stream's usage chunk,
    sent when the request asks C{stream_options.include_usage}, after
    OpenRouter's C{: OPENROUTER PROCESSING} comment.
  - C{GET /v1/models} is OpenRouter's model list: per-token prices as
    strings, C{openrouter/auto} priced C{-1}.
  - It checks what OpenRouter checks of the fields it adds: C{models} a list
    of strings, C{route} C{"fallback"}; anything else is its 400.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from cllama_tx.demo.server import ReceivedRequest, Reply
from cllama_tx.demo.wire import SSE_CONTENT_TYPE, dumps

#: USD per million tokens (input, output) and the output limit of the models it serves.
OPENROUTER_MODELS: dict[str, tuple[float, float, int]] = {
    "anthropic/claude-3.5-sonnet": (3.0, 15.0, 8192),
    "openai/gpt-4o": (2.5, 10.0, 16384),
    "anthropic/claude-3-haiku": (0.25, 1.25, 4096),
    "openai/gpt-4o-mini": (0.15, 0.6, 16384),
    "mistralai/mistral-7b-instruct": (0.028, 0.054, 16384),
    # Served, but not in cllama_tx's packaged price table.
    "qwen/qwen-2.5-coder-32b-instruct": (0.07, 0.16, 8192),
}
PROVIDER_NAMES = {"anthropic": "Anthropic", "openai": "OpenAI", "mistralai": "Mistral", "qwen": "DeepInfra"}
COMPLETION_TOKENS = 12
CREATED = 1_740_000_000


def openrouter_error(status: int, message: str) -> dict:
    """OpenRouter's error body."""
    return {"error": {"code": status, "message": message}}


class OpenRouterModel:
    """The responder (see the module docstring); C{down} and C{served} may change between requests."""

    def __init__(self, models: Mapping[str, tuple[float, float, int]] | None = None) -> None:
        self.models = dict(OPENROUTER_MODELS if models is None else models)
        self.down: set[str] = set()
        self.answers = 0
        # False: usage without OpenRouter's cost (as an answer of a provider that reports none).
        self.report_cost = True

    def cost(self, model: str, prompt: int, completion: int) -> float:
        rate_in, rate_out, _ = self.models[model]
        return round((prompt * rate_in + completion * rate_out) / 1_000_000, 12)

    def respond(self, received: ReceivedRequest) -> Reply:
        if received.method == "GET" and received.path.endswith("/models"):
            return Reply(json=self.model_list())
        body = received.json
        if not isinstance(body, dict):
            return Reply(status=400, json=openrouter_error(400, "Invalid JSON body"))
        models = body.get("models")
        route = body.get("route")
        if models is not None and (not isinstance(models, list) or not all(isinstance(m, str) for m in models)):
            return Reply(status=400, json=openrouter_error(400, "'models' must be an array of model ids"))
        if route is not None and route != "fallback":
            return Reply(status=400, json=openrouter_error(400, f"Invalid route {route!r}"))
        wanted = list(models) if models else [body.get("model")]
        for model in wanted:
            if not isinstance(model, str) or model not in self.models:
                return Reply(status=400, json=openrouter_error(400, f"{model} is not a valid model ID"))
        up = [m for m in wanted if isinstance(m, str) and m not in self.down]
        if not up:
            return Reply(status=503, json=openrouter_error(503, "No endpoints available for the requested models"))
        return self._answer(body, up[0])

    def _answer(self, body: dict, model: str) -> Reply:
        self.answers += 1
        prompt = max(1, math.ceil(sum(len(str(m.get("content", ""))) for m in body.get("messages") or []
                                      if isinstance(m, dict)) / 4))
        completion = COMPLETION_TOKENS
        limit = body.get("max_tokens")
        if isinstance(limit, int) and not isinstance(limit, bool) and 0 < limit < completion:
            completion = limit
        usage: dict[str, Any] = {
            "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": 0}, "completion_tokens_details": {"reasoning_tokens": 0},
        }
        if self.report_cost:
            usage["cost"] = self.cost(model, prompt, completion)
            usage["is_byok"] = False
        answer_id = f"gen-{self.answers:06d}"
        provider = PROVIDER_NAMES.get(model.partition("/")[0], "Unknown")
        text = f"Answered by {model}."
        if body.get("stream") is True:
            return self._stream(body, model, answer_id, provider, text, usage)
        return Reply(json={
            "id": answer_id, "provider": provider, "model": model, "object": "chat.completion", "created": CREATED,
            "choices": [{
                "logprobs": None, "finish_reason": "stop", "native_finish_reason": "stop", "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None, "reasoning": None},
            }],
            "usage": usage,
        })

    @staticmethod
    def _stream(body: dict, model: str, answer_id: str, provider: str, text: str, usage: dict) -> Reply:
        def chunk(choices: list, extra: dict | None = None) -> bytes:
            doc = {"id": answer_id, "provider": provider, "model": model, "object": "chat.completion.chunk",
                   "created": CREATED, "choices": choices, **(extra or {})}
            return b"data: " + dumps(doc) + b"\n\n"

        events = [b": OPENROUTER PROCESSING\n\n"]
        events.append(chunk([{"index": 0, "delta": {"role": "assistant", "content": text}, "finish_reason": None}]))
        events.append(chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": "stop"}]))
        options = body.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage") is True:
            events.append(chunk([], {"usage": usage}))
        events.append(b"data: [DONE]\n\n")
        return Reply(headers={"Content-Type": SSE_CONTENT_TYPE}, sse=events)

    def model_list(self) -> dict:
        """OpenRouter's C{GET /models}: prices per token, as strings."""
        data = [{
            "id": "openrouter/auto", "name": "Auto Router", "context_length": 2000000,
            "pricing": {"prompt": "-1", "completion": "-1"},
            "top_provider": {"context_length": None, "max_completion_tokens": None, "is_moderated": False},
        }]
        for model, (rate_in, rate_out, limit) in sorted(self.models.items()):
            data.append({
                "id": model, "name": model, "context_length": 128000,
                "pricing": {"prompt": f"{rate_in / 1e6:.10f}".rstrip("0"), "completion": f"{rate_out / 1e6:.10f}".rstrip("0"),
                            "request": "0", "image": "0"},
                "top_provider": {"context_length": 128000, "max_completion_tokens": limit, "is_moderated": False},
            })
        return {"data": data}
