"""
The request body as the proxy reads it: strict JSON, and the few fields that
decide how a request is governed and metered, checked before anything is
reserved or sent.

A body that would make the proxy fail (nested past the recursion limit, a
number too large for a float) or mislead it (C{NaN}, which no provider
parses; C{"stream": "true"}, metered as a JSON answer while the provider
streams) is refused here with a 400 in the surface's shape.  Everything else
in the body is the provider's to judge.  Pure logic, no I/O.
"""

from __future__ import annotations

import json
import math
from typing import Any

from cllama_tx.surfaces.errors import ProxyError

#: How deeply objects and arrays may nest.  Real requests stay far below
#: (a chat turn with a tool schema is about ten levels); Python's own
#: recursion limit, which every JSON encoder on the path depends on, is
#: about a thousand.
MAX_DEPTH = 128

#: The largest token limit accepted (the providers' 32-bit integers).
MAX_TOKEN_LIMIT = 2**31 - 1

#: OpenAI's bound on C{n}, the number of choices.
MAX_CHOICES = 128

# The token limits each wire format knows.
_TOKEN_FIELDS = {
    "openai": ("max_tokens", "max_completion_tokens"),
    "anthropic": ("max_tokens",),
    "responses": ("max_output_tokens",),
}


class _NotJson(ValueError):
    """Raised by the decoder's hooks: a literal that strict JSON has not."""


def _refuse_constant(name: str) -> Any:
    raise _NotJson(f"{name} is not a JSON number")


class _OutOfRange(ValueError):
    """Raised by the decoder's hooks: a number no float can hold."""


def _finite_float(text: str) -> float:
    value = float(text)
    if value == math.inf or value == -math.inf:
        raise _OutOfRange("a number is out of range (beyond about 1.8e308)")
    return value


_DECODER = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite_float)


def _invalid_json(reason: str) -> ProxyError:
    return ProxyError(400, "invalid_json", f"the request body is not valid JSON: {reason}")


def _unusable_json(reason: str) -> ProxyError:
    return ProxyError(400, "invalid_json", f"the request body is refused: {reason}")


def parse_body(raw: bytes) -> dict:
    """
    The request body as a JSON object.  One parse, as C{json.loads} does it,
    then the depth bound: nearly free for a small body with at most
    L{MAX_DEPTH} brackets, a walk over the containers for the others (a
    third of the parse's time for a large conversation).

    @raise ProxyError: 400 C{invalid_json} (not JSON, C{NaN}/C{Infinity},
        a number out of range, nested deeper than L{MAX_DEPTH}) or
        C{invalid_body} (not an object).
    """
    try:
        text = raw.decode(json.detect_encoding(raw), "surrogatepass")
        doc = _DECODER.decode(text)
    except _NotJson as e:
        raise _invalid_json(str(e)) from None
    except _OutOfRange as e:
        raise _unusable_json(str(e)) from None
    except json.JSONDecodeError as e:
        raise _invalid_json(str(e)) from None
    except RecursionError:
        raise _unusable_json(f"nested deeper than {MAX_DEPTH} levels") from None
    except UnicodeDecodeError:
        raise _invalid_json("the text is not UTF-8") from None
    except ValueError:
        # An integer past Python's digit limit: the exception's own words
        # would describe the interpreter.
        raise _unusable_json("a number has too many digits") from None
    if not isinstance(doc, dict):
        raise ProxyError(400, "invalid_body", "the request body must be a JSON object")
    if not _few_brackets(raw) and not within_depth(doc, MAX_DEPTH):
        raise _unusable_json(f"nested deeper than {MAX_DEPTH} levels")
    return doc


#: Up to this size a body's brackets are counted before it is walked.
_COUNT_BELOW = 16 * 1024


def _few_brackets(raw: bytes) -> bool:
    """
    Whether C{raw} has at most L{MAX_DEPTH} brackets, so it cannot nest
    deeper: most bodies are done here, at C speed.  Larger bodies are
    walked without counting: one with few brackets is mostly text, cheap to
    walk, and one with many would be walked anyway.
    """
    return len(raw) <= _COUNT_BELOW and raw.count(b"{") + raw.count(b"[") <= MAX_DEPTH


def within_depth(doc: Any, limit: int) -> bool:
    """
    Whether C{doc} nests objects and arrays at most C{limit} levels deep.
    Level by level, without recursion, stopping at the first level past
    C{limit}.
    """
    if type(doc) is not dict and type(doc) is not list:
        return True
    level = [doc]
    depth = 1
    while True:
        below: list = []
        keep = below.append
        for container in level:
            for value in container.values() if type(container) is dict else container:
                kind = type(value)
                if kind is dict or kind is list:
                    keep(value)
        if not below:
            return True
        depth += 1
        if depth > limit:
            return False
        level = below


def _bad_parameter(message: str) -> ProxyError:
    return ProxyError(400, "invalid_parameter", message)


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, float):
        return "a decimal number"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return "null"


def _check_integer(doc: dict, name: str, high: int) -> None:
    """C{name}, when present and not null, is an integer from 1 to C{high}."""
    value = doc.get(name)
    if value is None:
        return
    if type(value) is not int:
        raise _bad_parameter(f"'{name}' must be an integer, not {_json_type(value)}")
    if not 1 <= value <= high:
        raise _bad_parameter(f"'{name}' must be an integer from 1 to {high}")


def check_fields(doc: dict, api_format: str, *, counting: bool = False) -> None:
    """
    The fields the proxy governs and meters by have the types the providers
    require: C{stream} a boolean; C{stream_options} an object whose
    C{include_usage} is a boolean (chat); the token limits and C{n} (chat)
    integers in range.  Null counts as absent, as both providers treat it.

    A Messages request (not a token count, C{counting}) needs C{max_tokens},
    whichever provider answers it: the Messages API requires it, so one rule
    holds for every model instead of a 400 from Anthropic and a pass for the
    others.

    @raise ProxyError: 400 C{invalid_parameter} naming the field.
    """
    stream = doc.get("stream")
    if stream is not None and type(stream) is not bool:
        raise _bad_parameter(f"'stream' must be a boolean (true or false), not {_json_type(stream)}")
    for name in _TOKEN_FIELDS.get(api_format, ()):
        _check_integer(doc, name, MAX_TOKEN_LIMIT)
    if api_format == "anthropic" and not counting and doc.get("max_tokens") is None:
        raise ProxyError(
            400, "invalid_parameter",
            "'max_tokens' is required: the Messages API needs it for every model", param="max_tokens",
        )
    if api_format == "responses":
        _check_responses(doc)
        return
    if api_format != "openai":
        return
    _check_integer(doc, "n", MAX_CHOICES)
    options = doc.get("stream_options")
    if options is None:
        return
    if type(options) is not dict:
        raise _bad_parameter(f"'stream_options' must be an object, not {_json_type(options)}")
    include_usage = options.get("include_usage")
    if include_usage is not None and type(include_usage) is not bool:
        raise _bad_parameter(
            f"'stream_options.include_usage' must be a boolean, not {_json_type(include_usage)}"
        )


def _check_responses(doc: dict) -> None:
    """
    The Responses surface's own: C{store} decides whether the proxy keeps
    the answer, C{previous_response_id} which conversation it continues,
    C{input} what is metered and translated.
    """
    store = doc.get("store")
    if store is not None and type(store) is not bool:
        raise _bad_parameter(f"'store' must be a boolean (true or false), not {_json_type(store)}")
    previous = doc.get("previous_response_id")
    if previous is not None and (type(previous) is not str or not previous):
        raise _bad_parameter(f"'previous_response_id' must be a response id string, not {_json_type(previous)}")
    given = doc.get("input")
    if given is not None and type(given) not in (str, list):
        raise _bad_parameter(f"'input' must be a string or an array of items, not {_json_type(given)}")
    options = doc.get("stream_options")
    if options is not None and type(options) is not dict:
        raise _bad_parameter(f"'stream_options' must be an object, not {_json_type(options)}")
