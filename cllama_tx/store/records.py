"""
The values metering passes between its rooms: token usage as a provider
reported it, the ledger row of one client request, and how records spell a
moment (RFC 3339 UTC with milliseconds: audit lines, history entries).
"""

from __future__ import annotations

import time

import attrs

_last_second: tuple[int, str] = (-(2**62), "")


def rfc3339_ms(epoch: float) -> str:
    """
    C{epoch} as RFC 3339 UTC with milliseconds: C{2026-11-22T11:08:45.123Z}.
    The formatted second is kept (one entry, replaced whole, so threads may
    share it): the lines of a request fall in the same second, and
    C{strftime} of C{gmtime} is most of the cost.
    """
    global _last_second
    whole = int(epoch)
    millis = int((epoch - whole) * 1000)
    second, prefix = _last_second
    if whole != second:
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
        _last_second = (whole, prefix)
    return f"{prefix}.{millis:03d}Z"


@attrs.define
class Usage:
    """
    Tokens of one response, normalised across wire formats.

    C{input_tokens} are the prompt tokens billed at the plain input rate:
    for OpenAI that is C{prompt_tokens - cached_tokens}; for Anthropic
    C{input_tokens} as reported (it already excludes cache reads and writes).
    C{reasoning_tokens} are part of C{output_tokens}, reported for
    information.  C{reported_cost_usd} is a provider-reported price
    (OpenRouter's C{usage.cost}).  C{seen} is true once any usage arrived.
    """

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    reported_cost_usd: float | None = None
    seen: bool = False

    @property
    def prompt_tokens(self) -> int:
        """Every prompt token, cached or not (OpenAI's C{prompt_tokens})."""
        return self.input_tokens + self.cache_read_tokens + self.cache_write_tokens


@attrs.frozen
class LedgerRow:
    """
    One client request as the ledger keeps it.

    The four token counts are disjoint, like the rates they are billed at
    (L{Usage}): C{input_tokens} is plain input only, without the cache
    reads and writes, so C{prompt_tokens} (their sum) is every prompt token
    and a sum over rows never counts a token twice (C{docs/LEDGER.md}).
    """

    request_id: str
    ts: float  # epoch seconds when the request arrived
    agent: str | None
    provider: str | None
    requested_model: str | None
    effective_model: str | None
    status: int
    stream: bool
    latency_ms: float
    ttfb_ms: float | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    cost_usd: float = 0.0
    priced: bool = False
    estimated: bool = False
    # Virtual keys: who is billed (the key's hash, team, user and
    # organisation, the customer the request named in "user").
    key_id: str | None = None
    team_id: str | None = None
    user_id: str | None = None
    organization_id: str | None = None
    end_user: str | None = None
    # The answer's own id (a chat completion's "id"), as clients know the request.
    response_id: str | None = None
    # A passthrough request (/_proxy/<provider>/<path>): its path and the
    # bytes of its body and its answer; None for the inference surfaces.
    path: str | None = None
    request_bytes: int | None = None
    response_bytes: int | None = None

    @property
    def prompt_tokens(self) -> int:
        """Every prompt token: plain input plus cache reads and writes."""
        return self.input_tokens + self.cache_read_tokens + self.cache_write_tokens
