"""
Standing in for the Execwall OR gate: its policy file's OpenRouter
settings, and the opt-ins of a loopback-only deployment like the gate's.

  - C{cost_routing.openrouter.base_url} and C{api_key} of the gate's
    C{policy.yaml} configure the C{openrouter} provider when the
    environment does not (C{OPENROUTER_BASE_URL}, C{OPENROUTER_API_KEY} win);
  - C{CLLAMA_TRUST_X_AGENT_ID}: the API port identifies a caller by its
    C{X-Agent-ID} header, as the gate does (L{cllama_tx.identity.agent_header});
  - C{CLLAMA_CONSOLE_ON_API_PORT}: the gate's console API is also answered
    on the API port, without the operator token
    (L{cllama_tx.sites.gate_console_api});

both opt-ins only with an API listener bound to loopback (or a UNIX
socket): the daemon refuses to start otherwise, and says in its log what
they give away.  C{CLLAMA_OPENROUTER_CEILING} and
C{CLLAMA_OPENROUTER_PRICES_FILE} set how OpenRouter models are priced
(L{cllama_tx.governance.ceiling}, L{cllama_tx.accounting.openrouter_prices}).
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from typing import Any

import attrs
from twisted.logger import Logger

from cllama_tx.accounting.pricing import Price
from cllama_tx.governance.ceiling import AUTO, CeilingError, parse_ceiling
from cllama_tx.runtime.errors import ConfigError

log = Logger()

TRUST_ENV = "CLLAMA_TRUST_X_AGENT_ID"
CONSOLE_ENV = "CLLAMA_CONSOLE_ON_API_PORT"
CEILING_ENV = "CLLAMA_OPENROUTER_CEILING"
PRICES_FILE_ENV = "CLLAMA_OPENROUTER_PRICES_FILE"

_ON = ("1", "true", "yes", "on")
_OFF = ("0", "false", "no", "off")


@attrs.frozen
class GateSettings:
    """The OR gate's opt-ins and how OpenRouter models are priced."""

    trust_agent_header: bool = False
    console_on_api_port: bool = False
    openrouter_ceiling: Price | str = AUTO
    # None: <state dir>/openrouter-prices.json
    openrouter_prices_file: str | None = None


def _switch(env: Mapping[str, str], name: str) -> bool:
    value = (env.get(name) or "").strip().lower()
    if value in _ON:
        return True
    if value in _OFF or not value:
        return False
    raise ConfigError(f"{name} must be 1 or 0 (on or off), not {value[:20]!r}")


def _unescape(text: str) -> str:
    return text.replace("\\:", ":")


def loopback_only(endpoint: str) -> bool:
    """
    Whether a listener's endpoint string accepts connections from this host
    only: a TCP (or TLS) endpoint whose C{interface} is a loopback address,
    or a UNIX socket.  Anything else (every interface, a public address,
    an inherited systemd socket whose address is not known here) is not.
    """
    kind, _, rest = endpoint.partition(":")
    if kind == "unix":
        return True
    if kind not in ("tcp", "tcp6", "ssl"):
        return False
    interface = None
    # Split on ':' that is not escaped (IPv6 interfaces are written 'interface=\:\:1').
    parts, current, escaped = [], "", False
    for char in rest:
        if escaped:
            current += "\\" + char
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":":
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    for part in parts:
        if part.startswith("interface="):
            interface = _unescape(part[len("interface="):])
    if not interface:
        return False
    try:
        return ipaddress.ip_address(interface.strip("[]")).is_loopback
    except ValueError:
        return interface == "localhost"


def gate_settings(env: Mapping[str, str], api_endpoint: str) -> GateSettings:
    """
    The settings from the environment.

    @raise ConfigError: a value is wrong, or an opt-in is asked for on an
        API listener that is not loopback-only.
    """
    trust = _switch(env, TRUST_ENV)
    console = _switch(env, CONSOLE_ENV)
    for asked, name in ((trust, TRUST_ENV), (console, CONSOLE_ENV)):
        if asked and not loopback_only(api_endpoint):
            raise ConfigError(
                f"{name} needs the API to listen on loopback only (LISTEN_ADDR=127.0.0.1:8080, [::1]:8080 or a "
                f"unix: socket), not {api_endpoint!r}: it trusts whoever can connect"
            )
    try:
        ceiling = parse_ceiling(env.get(CEILING_ENV))
    except CeilingError as e:
        raise ConfigError(str(e)) from None
    return GateSettings(
        trust_agent_header=trust,
        console_on_api_port=console,
        openrouter_ceiling=ceiling,
        openrouter_prices_file=(env.get(PRICES_FILE_ENV) or "").strip() or None,
    )


def prices_path(settings: GateSettings, state_dir: str) -> str:
    from cllama_tx.accounting.openrouter_prices import FILE_NAME

    return settings.openrouter_prices_file or os.path.join(state_dir, FILE_NAME)


def provider_env(env: Mapping[str, str], policy_file: str | None) -> Mapping[str, str]:
    """
    The environment the providers are built from: C{env}, with the gate's
    C{cost_routing.openrouter} base URL and key where C{env} has none.  A
    file that cannot be read changes nothing here (the budgets' loading
    says what is wrong with it).
    """
    if not policy_file:
        return env
    from cllama_tx.governance.gate_policy import read_policy
    from cllama_tx.governance.policy_file import PolicyFileError

    try:
        gate = read_policy(policy_file, env).gate
    except PolicyFileError:
        return env
    if gate is None:
        return env
    found = dict(env)
    upstream = gate.upstream
    if upstream.base_url and not (env.get("OPENROUTER_BASE_URL") or "").strip():
        found["OPENROUTER_BASE_URL"] = upstream.base_url
    if upstream.api_key and not (env.get("OPENROUTER_API_KEY") or "").strip():
        found["OPENROUTER_API_KEY"] = upstream.api_key
    return found


def wire(settings: GateSettings, *, governance: Any, contexts: Any, operations: Any, ledger: Any, providers: Any,
         proxy: Any, api_site: Any, clock: Any) -> None:
    """
    The gate's console fields on the operator API, and the opt-ins (each
    said in the log with what it gives away).

    @raise ConfigError: an opt-in without a policy file that names agents.
    """
    from cllama_tx.identity.agent_header import AgentHeaderIdentity, PolicyAgents
    from cllama_tx.sites.gate_console import GateConsole

    agents = PolicyAgents(contexts, governance)
    console = GateConsole(governance=governance, agents=agents, operations=operations, ledger=ledger,
                          providers=providers)
    operations.gate_console = console
    if settings.trust_agent_header:
        if not agents.names():
            raise ConfigError(f"{TRUST_ENV} needs CLLAMA_POLICY_FILE naming the agents X-Agent-ID may name")
        proxy.agent_header = AgentHeaderIdentity(agents)
        log.warn(
            "{name} is on: on the loopback API port, any local process is served as the agent its X-Agent-ID "
            "names (or as 'default') among the policy file's agents {agents}, without credentials",
            name=TRUST_ENV, agents=", ".join(agents.names()),
        )
    if settings.console_on_api_port:
        # Its routes are a Klein app (and the UI's spend periods): imported only when asked for.
        from cllama_tx.sites.gate_console_api import GateConsoleApi, claims, posts

        if not console.active:
            raise ConfigError(f"{CONSOLE_ENV} needs CLLAMA_POLICY_FILE to be the Execwall OR gate's policy.yaml")
        api = GateConsoleApi(console=console, operations=operations, ledger=ledger, clock=clock)
        api_site.serve_console(claims, api.resource(), posts)
        log.warn(
            "{name} is on: any local process may read spend and change or reset budgets through /api/* on the "
            "loopback API port, without the operator token",
            name=CONSOLE_ENV,
        )
