"""
The C{/discovery} page: the local model servers discovery found (their
provider names, kinds, base URLs, how they were found, models, last seen,
up or gone), how discovery is set, how its last round went, and a button
to look again now.  Its JSON twin is L{discovery_view}; the discovery
object is duck-typed (C{snapshot()}, C{status()}), None when discovery is
off.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred

from cllama_tx.sites.ui.markup import Template, h
from cllama_tx.sites.ui.pages import PageContext, badge, csrf_field, layout
from cllama_tx.sites.ui.render import ago, plural

__all__ = ["TEMPLATES", "discovery_page", "discovery_view"]

TEMPLATES = frozenset({"discovery"})
#: Models named on the page per server (the JSON lists them all).
SHOWN_MODELS = 12


def discovery_view(discovery: Any, now: float) -> dict[str, Any]:
    """What the page shows, as its JSON twin."""
    if discovery is None:
        return {"now": now, "enabled": False, "servers": [], "status": None}
    return {"now": now, "enabled": True, "servers": discovery.snapshot(), "status": discovery.status()}


def _models(models: list[str]) -> Any:
    if not models:
        return h("span", {"class": "muted"}, "none listed")
    shown = [h("code", None, m) for m in models[:SHOWN_MODELS]]
    items: list[Any] = []
    for tag in shown:
        if items:
            items.append(", ")
        items.append(tag)
    if len(models) > SHOWN_MODELS:
        items.append(h("span", {"class": "muted"}, f" and {len(models) - SHOWN_MODELS} more"))
    return items


def _facts(status: dict[str, Any], now: float) -> list[dict[str, Any]]:
    scan = status["port_scan"]
    docker = status["docker"]
    last = status["last_round"]
    facts = [
        ("Listed addresses", ", ".join(status["targets"]) or "none (CLLAMA_DISCOVERY_TARGETS)"),
        ("Port scan", f"ports {scan['ports']} of this host, read by {scan['method']}" if scan["on"] else "off"),
        (
            "Docker",
            "off"
            if docker["socket"] is None
            else f"{docker['socket']} ({'mounted' if docker['present'] else 'not mounted'})"
            + (f", compose project {docker['project']}" if docker["project"] else ", every compose project"),
        ),
        ("Schedule", f"every {status['interval_s']:g} s, probes time out after {status['probe_timeout_s']:g} s"),
    ]
    if last is not None:
        problems = "; ".join(f"{k}: {v}" for k, v in sorted(last["problems"].items()))
        facts.append(
            (
                "Last round",
                f"{ago(last['started_at'], now)}, {last['duration_ms']:g} ms, "
                f"{last['probed']} address{'' if last['probed'] == 1 else 'es'} probed, "
                f"{plural(last['found'], 'server')} found" + (f" ({problems})" if problems else ""),
            )
        )
    elif status["running"]:
        facts.append(("Last round", "the first round is running"))
    return [{"label": label, "value": value} for label, value in facts]


class DiscoveryPage(Template):
    template = "discovery"

    def __init__(self, ctx: PageContext, view: dict[str, Any]) -> None:
        now = view["now"]
        servers = view["servers"]
        up = sum(1 for s in servers if s["state"] == "up")
        super().__init__(
            ctx,
            enabled=view["enabled"],
            summary=badge(f"{up} up", "ok") if up else "",
            servers=[
                {
                    "name": s["name"],
                    "container": f"container {s['container']}" if s["container"] else "",
                    "kind": s["kind"],
                    "base_url": s["base_url"],
                    "found_by": s["found_by"].replace("_", " "),
                    "models": _models(s["models"]),
                    "last_seen": ago(s["last_seen"], now),
                    "state": badge("up", "ok") if s["state"] == "up" else badge("gone", "muted", "its provider is disabled"),
                }
                for s in servers
            ],
            facts=_facts(view["status"], now) if view["enabled"] else [],
        )


def _rediscover_form(ctx: PageContext) -> Any:
    return h(
        "form",
        {"method": "post", "action": "/discovery/rediscover", "class": "inline"},
        csrf_field(ctx),
        h("button", {"type": "submit", "class": "btn btn-ghost", "title": "Probe the listed addresses, ports and containers now"},
          "Look again now"),
    )


def discovery_page(ctx: PageContext, view: dict[str, Any]) -> Deferred[bytes]:
    tools = _rediscover_form(ctx) if view["enabled"] else ""
    return layout(ctx, page="discovery", title="Local model servers", subtitle="discovered keyless providers",
                  content=DiscoveryPage(ctx, view), tools=tools)
