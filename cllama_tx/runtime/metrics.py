"""
Prometheus metrics for the proxy, in their own registry (never the
process-global one, so several daemons or test harnesses in one process
never share counters).

Almost everything is filled from the ledger row of each settled exchange:
L{Metrics.observe_settled} is meant to be appended to
C{Metering.on_settled}.  The one thing a row cannot tell is how many streams
are being relayed right now: the proxy calls L{Metrics.stream_started} and
L{Metrics.stream_ended} around each stream relay (or uses
L{Metrics.streaming}).

Label cardinality is bounded: providers and models an agent names are only
labels once the request reached upstream, at most C{max_providers} /
C{max_models} distinct values are kept (later ones become C{"other"}), and
every label value is truncated to C{MAX_LABEL_CHARS}.

With C{--workers N} each worker counts only what it served.  The figures of
the whole host are the sum of every worker's: a worker's own live values
plus the snapshots the others publish (L{Peer}, read by
C{cllama_tx.runtime.worker}); L{merge_families} adds them up here, free of
I/O.  C{cllama_workers} says how many workers a scrape sums.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import attrs
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from cllama_tx.runtime.tally import TallyCounter, TallyHistogram

__all__ = ["Metrics", "CONTENT_TYPE_LATEST", "OTHER", "NONE", "Peer", "merge_families", "history_only"]

OTHER = "other"
NONE = "none"
MAX_LABEL_CHARS = 128

# Seconds.  Inference latencies range from tens of milliseconds (refusals,
# cached answers) to many minutes (long streams).
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
TTFB_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60)

# Status 499: the agent hung up (CLIENT_CLOSED in metering).
_CLIENT_CLOSED = 499

# Proxy error codes that say what went wrong talking to the provider,
# reported as the status label of upstream_errors_total (looked up with a
# request's error code, None when it has none).
_TRANSPORT_LABELS: dict[str | None, str] = {
    "upstream_timeout": "timeout",
    "upstream_unreachable": "transport",
    "upstream_interrupted": "transport",
}
# Proxy-side 5xx that are not the provider's fault.
_NOT_UPSTREAM = frozenset({"internal_error", "budget_unavailable"})


class _Bounded:
    """The first C{limit} distinct values pass; the rest become C{"other"}."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value) -> str:
        if value is None or value == "":
            return NONE
        value = str(value)[:MAX_LABEL_CHARS]
        if value in self._seen:
            return value
        with self._lock:
            if value in self._seen:
                return value
            if len(self._seen) >= self._limit:
                return OTHER
            self._seen.add(value)
            return value


def status_class(status: int) -> str:
    """C{"2xx"} .. C{"5xx"}; 499 (the agent hung up) is its own class."""
    if status == _CLIENT_CLOSED:
        return "client_closed"
    if 100 <= status <= 599:
        return f"{status // 100}xx"
    return "other"


class _LedgerCounters:
    """Counters the ledger keeps itself, read at scrape time."""

    def __init__(self, ledger, namespace: str) -> None:
        self._ledger = ledger
        self._ns = namespace

    def collect(self):
        stats = self._ledger.writer_stats()
        yield CounterMetricFamily(
            f"{self._ns}_ledger_unkept_rows",
            "Rows of refused requests (never sent to a provider) not kept while the ledger backlog was full.",
            value=stats.get("unkept", 0),
        )
        yield CounterMetricFamily(
            f"{self._ns}_ledger_recovered_rows",
            "Ledger rows held while the disk refused them, then written.",
            value=stats.get("recovered", 0),
        )


# --- several workers: families as plain data, summed -------------------------------------

Family = dict[str, Any]
"""
One metric family as plain (JSON) data: C{name}, C{type}, C{help}, C{unit}
and C{samples}, a list of C{[sample name, labels, value]}.
"""

# Families whose values only grow: what a worker counted stays counted after
# it is gone.  A gauge is a present value: it leaves with its worker.
_HISTORY_TYPES = frozenset({"counter", "histogram", "summary"})


@attrs.frozen
class Peer:
    """
    Another process's published figures: C{fresh} when it wrote them lately
    (it is alive), C{worker} unless it is the supervisor (its audit relay).
    """

    families: Sequence[Family]
    fresh: bool
    worker: bool = True


def family_docs(metrics: Iterable[Metric]) -> list[Family]:
    """Collected metric families as plain data (a snapshot to publish)."""
    return [
        {
            "name": m.name,
            "type": m.type,
            "help": m.documentation,
            "unit": m.unit,
            "samples": [[s.name, dict(s.labels), s.value] for s in m.samples],
        }
        for m in metrics
    ]


def history_only(families: Iterable[Family]) -> list[Family]:
    """The counters and histograms of C{families}: what stays true of a process that is gone."""
    return [family for family in families if family.get("type") in _HISTORY_TYPES]


def merge_families(contributions: Iterable[Iterable[Family]]) -> list[Family]:
    """
    The sum of several processes' families: each sample adds up across
    them (a C{_created} time is the earliest instead), in the order first
    seen, so a histogram's series stay together.
    """
    merged: dict[str, Family] = {}
    values: dict[str, dict[tuple, list]] = {}
    for families in contributions:
        for family in families:
            name = family["name"]
            target = merged.get(name)
            if target is None:
                target = merged[name] = {
                    "name": name, "type": family["type"], "help": family["help"],
                    "unit": family.get("unit", ""), "samples": [],
                }
                values[name] = {}
            seen = values[name]
            for sample_name, labels, value in family["samples"]:
                key = (sample_name, tuple(sorted(labels.items())))
                sample = seen.get(key)
                if sample is None:
                    sample = seen[key] = [sample_name, dict(labels), value]
                    target["samples"].append(sample)
                elif sample_name.endswith("_created"):
                    sample[2] = min(sample[2], value)
                else:
                    sample[2] += value
    return list(merged.values())


def as_metric(family: Family) -> Metric:
    metric = Metric(family["name"], family["help"], family["type"], family.get("unit", ""))
    for sample_name, labels, value in family["samples"]:
        metric.add_sample(sample_name, labels, value)
    return metric


class _Families(Collector):
    """What C{generate_latest} reads: a collector of ready families."""

    def __init__(self, metrics: list[Metric]) -> None:
        self._metrics = metrics

    def collect(self) -> list[Metric]:
        return self._metrics


class Metrics:
    """The proxy's metrics, in one private L{CollectorRegistry}."""

    def __init__(self, *, ledger=None, max_models: int = 200, max_providers: int = 50, namespace: str = "cllama") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._providers = _Bounded(max_providers)
        self._models = _Bounded(max_models)
        r, ns = self.registry, namespace
        # Fed on every settled request: plain numbers, families built at scrape (runtime.tally).
        self.requests = TallyCounter(
            "requests", "Requests settled, by surface, provider and status class.",
            ["surface", "provider", "status_class"], namespace=ns,
        )
        self.latency = TallyHistogram(
            "request_latency_seconds", "From arrival to settlement (the whole answer), by surface.",
            ["surface"], LATENCY_BUCKETS, namespace=ns,
        )
        self.ttfb = TallyHistogram(
            "time_to_first_byte_seconds", "From arrival to the provider's first body byte (streams and JSON).",
            ["surface", "stream"], TTFB_BUCKETS, namespace=ns,
        )
        self.tokens = TallyCounter(
            "tokens", "Tokens metered (reported by the provider, or estimated).",
            ["provider", "model", "kind"], namespace=ns,
        )
        self.cost = TallyCounter(
            "cost_usd", "Cost in US dollars, as recorded in the ledger.", ["provider", "model"], namespace=ns,
        )
        self.upstream_errors = TallyCounter(
            "upstream_errors", "Provider failures that reached the agent: 5xx answers, transport errors, timeouts.",
            ["provider", "status"], namespace=ns,
        )
        self.budget_refusals = TallyCounter(
            "budget_refusals", "Requests refused 429 (or a key's 422) by governance (budgets, rate limits), by error code.",
            ["code"], namespace=ns,
        )
        for tally in (self.requests, self.latency, self.ttfb, self.tokens, self.cost,
                      self.upstream_errors, self.budget_refusals):
            r.register(tally)
        self.inflight_streams = Gauge(
            "inflight_streams", "Streamed answers being relayed right now.", namespace=ns, registry=r,
        )
        if ledger is not None and hasattr(ledger, "writer_stats"):
            queue = Gauge(
                "ledger_writer_queue_depth", "Ledger rows and writes waiting for their commit.",
                namespace=ns, registry=r,
            )
            queue.set_function(lambda: ledger.writer_stats()["queued"])
            pending = Gauge(
                "ledger_pending_rows", "Ledger rows held in memory because the disk refuses them (0 when healthy).",
                namespace=ns, registry=r,
            )
            pending.set_function(lambda: ledger.writer_stats()["held"])
            r.register(_LedgerCounters(ledger, ns))
        self.audit_lines_dropped = Counter(
            "audit_lines_dropped", "Audit lines dropped because stdout was not read fast enough (an audit_gap line marks where).",
            namespace=ns, registry=r,
        )
        self._audit_buffer = Gauge(
            "audit_buffer_bytes", "Bytes of audit lines waiting for the stdout reader.", namespace=ns, registry=r,
        )
        self._namespace = ns
        # With --workers: what this worker's predecessor counted, and the
        # other processes' published figures (see sum_with).
        self._carried: list[Family] = []
        self._peers: Callable[[], Iterable[Peer]] | None = None

    def watch_audit_output(self, output) -> None:
        """Count the drops of the audit's L{BoundedOutput} and show what it holds."""
        output.on_dropped.append(self.audit_lines_dropped.inc)
        self._audit_buffer.set_function(lambda: output.buffered)

    # --- feeding ---------------------------------------------------------------------------

    def observe_settled(self, ex, row) -> None:
        """A C{Metering.on_settled} observer: count one settled exchange."""
        surface = getattr(getattr(ex, "surface", None), "name", None) or NONE
        reached = bool(getattr(ex, "upstream_called", False))
        # Before upstream, a provider name is whatever the agent wrote.
        provider = self._providers(row.provider) if reached else NONE
        status = int(row.status)
        self.requests.inc((surface, provider, status_class(status)))
        self.latency.observe((surface,), max(row.latency_ms, 0.0) / 1000.0)
        if row.ttfb_ms is not None:
            self.ttfb.observe((surface, "true" if row.stream else "false"), max(row.ttfb_ms, 0.0) / 1000.0)
        if reached:
            model = self._models(row.effective_model)
            tokens = self.tokens
            if row.input_tokens:
                tokens.inc((provider, model, "input"), row.input_tokens)
            if row.output_tokens:
                tokens.inc((provider, model, "output"), row.output_tokens)
            if row.cache_read_tokens:
                tokens.inc((provider, model, "cache_read"), row.cache_read_tokens)
            if row.cache_write_tokens:
                tokens.inc((provider, model, "cache_write"), row.cache_write_tokens)
            if row.cost_usd:
                self.cost.inc((provider, model), row.cost_usd)
        code = getattr(ex, "error_code", None)
        if status >= 500 and reached and code not in _NOT_UPSTREAM:
            label = _TRANSPORT_LABELS.get(code, str(status) if status <= 599 else "other")
            self.upstream_errors.inc((provider, label))
        if status in (422, 429) and not reached:
            # Governance refuses before anything is sent; a provider's own
            # 429 (or every key cooling down) has upstream_called set.
            self.budget_refusals.inc((str(code)[:MAX_LABEL_CHARS] if code else "unknown",))

    def stream_started(self) -> None:
        self.inflight_streams.inc()

    def stream_ended(self) -> None:
        self.inflight_streams.dec()

    @contextlib.contextmanager
    def streaming(self):
        """C{with metrics.streaming():} around one stream relay."""
        self.stream_started()
        try:
            yield
        finally:
            self.stream_ended()

    # --- several workers ---------------------------------------------------------------------

    def carry(self, families: Iterable[Family]) -> None:
        """
        Add the counters of this worker's predecessor (its last snapshot) to
        ours: a restarted worker keeps counting where the dead one stopped,
        so the host's sums never go back (Prometheus would read a reset).
        """
        self._carried = history_only(families)

    def sum_with(self, peers: Callable[[], Iterable[Peer]]) -> None:
        """Report the whole host: our figures plus those C{peers()} returns, at each scrape."""
        self._peers = peers

    def local_families(self) -> list[Family]:
        """This process's figures (with what it carries), as plain data to publish."""
        own = family_docs(self.registry.collect())
        return merge_families([own, self._carried]) if self._carried else own

    def host_families(self) -> tuple[list[Family], int]:
        """
        The figures of every worker on the host and how many are alive.  A
        peer that stopped publishing (dead, or gone) keeps its counters,
        until its successor publishes them as its own, and loses its gauges.
        """
        contributions: list[Iterable[Family]] = [self.local_families()]
        workers = 1
        for peer in self._peers() if self._peers is not None else ():
            contributions.append(peer.families if peer.fresh else history_only(peer.families))
            workers += int(peer.fresh and peer.worker)
        return merge_families(contributions), workers

    # --- exposition ------------------------------------------------------------------------

    def render(self, request=None) -> bytes:
        """The exposition text; sets the content type on C{request} if given."""
        if request is not None:
            request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
            request.setHeader(b"cache-control", b"no-store")
        if self._peers is None and not self._carried:
            metrics = list(self.registry.collect())
            workers = 1
        else:
            families, workers = self.host_families()
            metrics = [as_metric(family) for family in families]
        metrics.append(GaugeMetricFamily(
            f"{self._namespace}_workers",
            "Worker processes whose figures this scrape sums (1 without --workers).",
            value=workers,
        ))
        return generate_latest(_Families(metrics))
