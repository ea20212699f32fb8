"""
OpenRouter's published prices, refreshed by the operator.

OpenRouter lists every model it serves with its price at C{GET
<base>/models} (no key needed): C{{"data": [{"id", "pricing": {"prompt",
"completion", "input_cache_read", "input_cache_write", ...}, "top_provider":
{"max_completion_tokens"}}]}}, prices in US dollars per token, as strings.
C{cllama-tx openrouter-prices} fetches that list and writes it as a price
table of ours (C{openrouter} only, USD per million tokens) to
C{CLLAMA_OPENROUTER_PRICES_FILE} (default
C{<state dir>/openrouter-prices.json}); the daemon lays that file over the
packaged prices and under the operator's override file
(L{cllama_tx.accounting.pricing.Pricing.set_published}), and notices a new
one within L{RECHECK_INTERVAL} seconds, without a restart.

Not carried: per-request, per-image and web-search fees (not tokens), and
models whose price is not a fixed number (C{openrouter/auto} says C{-1}).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any

from twisted.application import service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from cllama_tx.accounting.pricing import PricingError, Table, parse_table
from cllama_tx.store.jsonfile import Signature, UnreadableFile, file_signature, read_json_file

PROVIDER = "openrouter"
DEFAULT_BASE_URL = "https://openrouter.ai/api/v1"
FILE_NAME = "openrouter-prices.json"
PRICES_FILE_ENV = "CLLAMA_OPENROUTER_PRICES_FILE"
#: Seconds between two looks at the file's signature.
RECHECK_INTERVAL = 30.0
MAX_FILE_BYTES = 16 * 1024 * 1024
FETCH_TIMEOUT = 30.0
MAX_MODELS_BYTES = 64 * 1024 * 1024

_log = Logger()

# OpenRouter's price fields (USD per token) -> ours (USD per million tokens).
_FIELDS = (("prompt", "input"), ("completion", "output"), ("input_cache_read", "cache_read"),
           ("input_cache_write", "cache_write"))


class RefreshError(Exception):
    """The price list could not be fetched, read or written; the message says why."""


def _per_million(value: Any) -> float | None:
    """A per-token price (a string or a number) in USD per million tokens; None when not a fixed price."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(number) or number < 0:
        return None
    return round(number * 1_000_000, 6)


def prices_from_models(doc: Any) -> dict[str, dict]:
    """
    C{{model id: our price entry}} of OpenRouter's C{/models} answer; models
    without a fixed prompt and completion price are left out.
    """
    data = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(data, list):
        raise RefreshError("the answer has no 'data' list of models")
    prices: dict[str, dict] = {}
    for model in data:
        if not isinstance(model, dict):
            continue
        model_id = model.get("id")
        pricing = model.get("pricing")
        if not isinstance(model_id, str) or not model_id or model_id != model_id.strip() or not isinstance(pricing, dict):
            continue
        entry: dict[str, Any] = {}
        for theirs, ours in _FIELDS:
            rate = _per_million(pricing.get(theirs))
            if rate is not None:
                entry[ours] = rate
        if "input" not in entry or "output" not in entry:
            continue
        top = model.get("top_provider")
        limit = top.get("max_completion_tokens") if isinstance(top, dict) else None
        if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
            entry["max_output_tokens"] = limit
        prices[model_id] = entry
    if not prices:
        raise RefreshError("the answer lists no model with a price")
    return prices


def price_document(prices: Mapping[str, dict], source: str, now: float) -> dict:
    """The file written: a price table of ours, with where and when it came from."""
    return {
        "_comment": "OpenRouter's published prices, written by `cllama-tx openrouter-prices`; USD per million "
                    "tokens. Laid over the packaged table, under CLLAMA_PRICING_FILE.",
        "updated": time.strftime("%Y-%m-%d", time.gmtime(now)),
        "sources": {PROVIDER: source},
        PROVIDER: dict(sorted(prices.items())),
    }


def models_url(env: Mapping[str, str]) -> str:
    """OpenRouter's model list: C{OPENROUTER_BASE_URL} (else its public API) + C{/models}."""
    base = (env.get("OPENROUTER_BASE_URL") or DEFAULT_BASE_URL).strip().rstrip("/")
    return base + "/models"


def default_path(env: Mapping[str, str], state_dir: str) -> str:
    """C{CLLAMA_OPENROUTER_PRICES_FILE}, else C{<state dir>/openrouter-prices.json}."""
    return (env.get(PRICES_FILE_ENV) or "").strip() or os.path.join(state_dir, FILE_NAME)


def fetch(url: str, timeout: float = FETCH_TIMEOUT) -> Any:
    """OpenRouter's C{/models} answer, parsed (blocking: a command, never the daemon)."""
    if not url.startswith(("https://", "http://")):
        raise RefreshError(f"{url!r} is not an http(s) URL")
    request = urllib.request.Request(url, headers={"Accept": "application/json", "User-Agent": "cllama_tx"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read(MAX_MODELS_BYTES + 1)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise RefreshError(f"could not fetch {url}: {e}") from None
    if len(raw) > MAX_MODELS_BYTES:
        raise RefreshError(f"{url} answered more than {MAX_MODELS_BYTES} bytes")
    try:
        return json.loads(raw)
    except ValueError:
        raise RefreshError(f"{url} did not answer JSON") from None


def write_atomically(path: str, doc: dict) -> None:
    """Write C{doc} to C{path} whole or not at all (a temporary file, then a rename)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=".openrouter-prices.", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise


def refresh(url: str, path: str, now: float | None = None) -> int:
    """Fetch OpenRouter's prices from C{url} and write them to C{path}; the number of models priced."""
    prices = prices_from_models(fetch(url))
    document = price_document(prices, url, time.time() if now is None else now)
    parse_table(document, path)  # what the daemon will read must be valid
    try:
        write_atomically(path, document)
    except OSError as e:
        raise RefreshError(f"could not write {path}: {e}") from None
    return len(prices)


def read_published(path: str) -> tuple[Signature, Table]:
    """The published table in C{path} (empty when the file does not exist)."""
    try:
        signature, doc = read_json_file(path, MAX_FILE_BYTES)
    except UnreadableFile as e:
        raise PricingError(f"{path}: {e}") from None
    if signature is None:
        return None, {}
    table = parse_table(doc, path)
    return signature, {PROVIDER: table.get(PROVIDER, {})}


class PublishedPrices(service.Service):
    """
    Keeps the published prices file laid into the price table: read at
    start, then again whenever its signature changes (looked at every
    L{RECHECK_INTERVAL} seconds).  A broken file is logged once and the
    prices in force stay.
    """

    def __init__(self, pricing: Any, path: str, clock: Any, interval: float = RECHECK_INTERVAL) -> None:
        self._pricing = pricing
        self.path = path
        self._clock = clock
        self._interval = interval
        self._signature: Signature = None
        self._loop: LoopingCall | None = None
        self.models = 0
        self.check()

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self.check)
        self._loop.clock = self._clock
        self._loop.start(self._interval, now=False)

    def stopService(self):
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        return super().stopService()

    def check(self) -> None:
        """Install the file's prices if it changed since the last look."""
        signature = file_signature(self.path)
        if signature == self._signature:
            return
        self._signature = signature
        try:
            _, table = read_published(self.path)
        except PricingError as e:
            _log.error("OpenRouter prices ignored, the previous ones stay in force: {problem}", problem=str(e))
            return
        self.models = len(table.get(PROVIDER, {}))
        self._pricing.set_published(table if self.models else {})
        if self.models:
            _log.info("OpenRouter prices {path} loaded: {models} models", path=self.path, models=self.models)
