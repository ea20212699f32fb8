"""
One frozen configuration, built from the environment and the command line.

The command line wins over the environment: L{tap.Options} turns each option
into the environment variable it stands for and overlays it on a copy of
C{os.environ}, so there is exactly one path from names to values (here).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import attrs

from cllama_tx.governance.budget_audit import parse_fail_mode
from cllama_tx.governance.output_limit import DEFAULT_MIN_OUTPUT_TOKENS
from cllama_tx.runtime.errors import ConfigError
from cllama_tx.runtime.worker_env import WorkerEnvError, WorkerRole, parse_count, parse_role
from cllama_tx.sites.guard import (
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_KEEPALIVE_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_UI_MAX_CONNECTIONS,
    LISTEN_BACKLOG,
)

DEFAULT_API_ADDR = ":8080"
DEFAULT_UI_ADDR = ":8081"
DEFAULT_CONTEXT_ROOT = "/claw/context"
DEFAULT_AUTH_DIR = "/claw/auth"
DEFAULT_MAX_BODY = 32 * 1024 * 1024
# Large prompts can take minutes before the first token; streams can then run
# for many minutes, so the idle timer (reset on every chunk) is what bounds a
# dead upstream.
DEFAULT_FIRST_BYTE_TIMEOUT = 300.0
DEFAULT_IDLE_TIMEOUT = 120.0
# An agent that leaves its stream unread this long (the upstream paused by its
# backpressure all the while) is cut, and billed for what was relayed.
DEFAULT_AGENT_STALL_TIMEOUT = 120.0
DEFAULT_CONNECT_TIMEOUT = 10.0
# Below Docker's default stop timeout (10 s): in-flight requests get this long on SIGTERM.
DEFAULT_DRAIN_GRACE = 8.0
# Audit lines kept for a stdout reader that is behind, besides the pipe's own
# 64 KiB: at about 300 bytes a line, some 14,000 lines (a few thousand
# requests), enough to ride out a log shipper's restart.
DEFAULT_AUDIT_BUFFER = 4 * 1024 * 1024

_ENDPOINT_PREFIXES = ("tcp:", "tcp6:", "ssl:", "unix:", "systemd:", "le:", "lets:")
_GO_ADDR = re.compile(r"^(?:\[(?P<v6>[^\]]*)\]|(?P<host>[^:\[\]]*))?:(?P<port>\d{1,5})$")


def listen_endpoint(addr: str) -> str:
    """
    Turn a listen address into a Twisted server endpoint string.

    Go style (C{:8080}, C{127.0.0.1:8080}, C{[::1]:8080}, C{localhost:8080})
    and a bare port become C{tcp:}/C{tcp6:} endpoints; Twisted endpoint
    strings (C{tcp:}, C{ssl:}, C{unix:}, C{systemd:}, ...) pass unchanged.
    """
    addr = addr.strip()
    if addr.startswith(_ENDPOINT_PREFIXES):
        return addr
    if addr.isdigit():
        return f"tcp:{_port(addr, addr)}"
    match = _GO_ADDR.match(addr)
    if not match:
        raise ConfigError(f"cannot understand listen address {addr!r}")
    port = _port(match.group("port"), addr)
    if match.group("v6") is not None:
        host = match.group("v6") or "::"
        return f"tcp6:{port}:interface=" + host.replace(":", "\\:")
    host = match.group("host") or ""
    if host == "localhost":
        host = "127.0.0.1"
    if not host:
        return f"tcp:{port}"
    return f"tcp:{port}:interface={host}"


def with_backlog(endpoint: str, backlog: int = LISTEN_BACKLOG) -> str:
    """C{endpoint} with a C{backlog=} for listening kinds that take one, unless it has one."""
    kind = endpoint.partition(":")[0]
    if kind not in ("tcp", "tcp6", "ssl", "unix") or re.search(r"(^|:)backlog=", endpoint):
        return endpoint
    return f"{endpoint}:backlog={backlog}"


def _port(text: str, addr: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise ConfigError(f"port out of range in listen address {addr!r}")
    return port


def endpoint_port(endpoint: str) -> int | None:
    """The TCP port of a C{tcp:}/C{tcp6:}/C{ssl:} endpoint string, else None."""
    kind, _, rest = endpoint.partition(":")
    if kind not in ("tcp", "tcp6", "ssl"):
        return None
    first = rest.split(":", 1)[0]
    if first.startswith("port="):
        first = first[5:]
    return int(first) if first.isdigit() else None


def _seconds(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw in (None, ""):
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number of seconds, not {raw!r}") from None
    if value <= 0:
        raise ConfigError(f"{name} must be positive")
    return value


def _seconds_or_ms(env: Mapping[str, str], name: str, reference_ms: str, default: float) -> float:
    """
    C{name} in seconds; when it is not set, the reference proxy's
    C{reference_ms} (milliseconds), so a pod configured for it keeps its timeouts.
    """
    if env.get(name) not in (None, "") or env.get(reference_ms) in (None, ""):
        return _seconds(env, name, default)
    return _seconds(env, reference_ms, default * 1000.0) / 1000.0


_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]i?b?|b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def parse_size(text: str) -> int:
    """C{"32MiB"}, C{"512k"}, C{"1048576"} -> bytes."""
    match = _SIZE.match(text)
    if not match:
        raise ConfigError(f"cannot understand size {text!r}")
    unit = (match.group(2) or "").lower()[:1]
    return int(match.group(1)) * _SIZE_UNITS[unit]


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """C{"90d"}, C{"12h"}, C{"30m"}, C{"45"} (seconds) -> seconds."""
    match = _DURATION.match(text)
    if not match or float(match.group(1)) <= 0:
        raise ConfigError(f"cannot understand duration {text!r} (use e.g. 90d, 12h, 30m)")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def _choice(env: Mapping[str, str], name: str, allowed: tuple, default: str) -> str:
    value = (env.get(name) or default).lower()
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(allowed)}, not {value!r}")
    return value


def _switch(env: Mapping[str, str], name: str, default: bool) -> bool:
    """An on/off setting: 1/true/yes/on or 0/false/no/off; empty means C{default}."""
    value = (env.get(name) or "").strip().lower()
    if not value:
        return default
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be 1 or 0 (on or off), not {value!r}")


MIN_MASTER_KEY_LENGTH = 16


def _master_key(env: Mapping[str, str]) -> str | None:
    """CLLAMA_MASTER_KEY, else LITELLM_MASTER_KEY; None turns key administration off."""
    for name in ("CLLAMA_MASTER_KEY", "LITELLM_MASTER_KEY"):
        value = (env.get(name) or "").strip()
        if value:
            if len(value) < MIN_MASTER_KEY_LENGTH:
                raise ConfigError(f"{name} is shorter than {MIN_MASTER_KEY_LENGTH} characters: use a long random value")
            return value
    return None


def _count(env: Mapping[str, str], name: str) -> int | None:
    raw = env.get(name)
    if not raw:
        return None
    if not raw.isdigit():
        raise ConfigError(f"{name} must be a whole number, not {raw!r}")
    return int(raw)


def _budget_fail_mode(env: Mapping[str, str]) -> str:
    """CLLAMA_BUDGET_FAIL_MODE: open or closed (the default); a typo stops the start."""
    try:
        return parse_fail_mode(env.get("CLLAMA_BUDGET_FAIL_MODE"))
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _passthrough(env: Mapping[str, str]):
    """
    The passthrough's settings (C{/_proxy/<provider>/<path>}, docs/CONFIGURATION.md),
    or None when C{CLLAMA_PASSTHROUGH} turns it off; a malformed setting stops the start.
    """
    if not _switch(env, "CLLAMA_PASSTHROUGH", True):
        return None
    from cllama_tx.pipeline.passthrough import parse_settings
    from cllama_tx.providers.passthrough_rules import AllowListError

    raw_max = env.get("CLLAMA_PASSTHROUGH_MAX_BODY_SIZE")
    max_body = parse_size(raw_max) if raw_max else None
    try:
        return parse_settings(env.get("CLLAMA_PASSTHROUGH_PATHS"), max_body, env.get("CLLAMA_PASSTHROUGH_RESERVE_USD"))
    except AllowListError as e:
        raise ConfigError(f"CLLAMA_PASSTHROUGH_PATHS: {e}") from None
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _gate_settings(env: Mapping[str, str], api_endpoint: str):
    """The OR gate's opt-ins and OpenRouter pricing (cllama_tx.runtime.gate)."""
    from cllama_tx.runtime.gate import gate_settings

    return gate_settings(env, api_endpoint)


def _policy_settings(env: Mapping[str, str]):
    """
    The policy plane's settings (docs/POLICY.md): CLLAMA_POLICY_URL or
    CLLAMA_POLICY_PLUGIN and their companions; a setting the daemon cannot
    use, or a plugin that cannot be found, stops the start.
    """
    from cllama_tx.governance.policy_plugin import PluginError, find_factory
    from cllama_tx.governance.policy_settings import PolicySettings, PolicySettingsError

    try:
        settings = PolicySettings.from_env(env)
        if settings.plugin is not None:
            find_factory(settings.plugin)
    except PolicySettingsError as e:
        raise ConfigError(str(e)) from None
    except PluginError as e:
        raise ConfigError(f"CLLAMA_POLICY_PLUGIN: {e}") from None
    return settings


def _budget_min_output_tokens(env: Mapping[str, str]) -> int:
    """CLLAMA_BUDGET_MIN_OUTPUT_TOKENS: a whole number, 0 turns lowering off."""
    value = _count(env, "CLLAMA_BUDGET_MIN_OUTPUT_TOKENS")
    return DEFAULT_MIN_OUTPUT_TOKENS if value is None else value


DEFAULT_LEDGER_BACKLOG = 10000


def _ledger_backlog(env: Mapping[str, str]) -> int:
    """CLLAMA_LEDGER_BACKLOG: rows held while the disk refuses them (at least 1)."""
    value = _count(env, "CLLAMA_LEDGER_BACKLOG")
    if value is None:
        return DEFAULT_LEDGER_BACKLOG
    if value < 1:
        raise ConfigError("CLLAMA_LEDGER_BACKLOG must be at least 1")
    return value


def _default_spill_dir() -> str:
    from cllama_tx.store.spill import default_spill_dir

    return default_spill_dir()


def _cap(env: Mapping[str, str], name: str, default: int) -> int:
    """A connection cap: a whole number, at least 1."""
    value = _count(env, name)
    if value is None:
        return default
    if value < 1:
        raise ConfigError(f"{name} must be at least 1")
    return value


def _ca_file(env: Mapping[str, str]) -> str | None:
    """CLLAMA_UPSTREAM_CA_FILE, checked now so a bad bundle stops the start."""
    path = (env.get("CLLAMA_UPSTREAM_CA_FILE") or "").strip()
    if not path:
        return None
    from cllama_tx.runtime.tls import load_ca_certificates  # raises UpstreamCAError, a ConfigError

    load_ca_certificates(path)
    return path


# Listeners a worker can adopt from its supervisor: a TCP socket (TLS is
# each worker's own, over it).  A UNIX socket's path would be unlinked by
# the first worker to stop; ACME endpoints bind and renew in one process.
WORKER_ENDPOINT_KINDS = ("tcp", "tcp6", "ssl", "systemd")


def _workers(env: Mapping[str, str], demo: bool, endpoints: tuple[str, str]) -> tuple[int, WorkerRole | None]:
    """C{CLLAMA_WORKERS} and, in a worker, the role its supervisor gave it."""
    try:
        count = parse_count(env.get("CLLAMA_WORKERS"))
        role = parse_role(env)
    except WorkerEnvError as e:
        raise ConfigError(str(e)) from None
    if count > 1:
        if demo:
            raise ConfigError("--demo runs in one process: drop --workers (CLLAMA_WORKERS)")
        for endpoint in endpoints:
            if endpoint.partition(":")[0] not in WORKER_ENDPOINT_KINDS:
                raise ConfigError(
                    f"--workers needs TCP listeners ({', '.join(WORKER_ENDPOINT_KINDS)}), not {endpoint!r}"
                )
    return count, role


def default_state_dir(env: Mapping[str, str]) -> str:
    """
    Where the ledger lives: C{CLLAMA_STATE_DIR}, else systemd's
    C{STATE_DIRECTORY}, else C{$XDG_STATE_HOME/cllama_tx} (C{~/.local/state}).
    """
    if env.get("CLLAMA_STATE_DIR"):
        return env["CLLAMA_STATE_DIR"]
    if env.get("STATE_DIRECTORY"):
        return env["STATE_DIRECTORY"].split(":")[0]
    base = env.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "cllama_tx")


@attrs.frozen
class Config:
    """Everything the daemon needs to know, resolved once at start-up."""

    api_endpoint: str
    ui_endpoint: str
    context_root: str
    auth_dir: str
    pod: str | None
    ui_token: str | None = attrs.field(repr=False)
    session_history_dir: str | None
    governance_dir: str | None
    max_body_bytes: int
    first_byte_timeout: float
    idle_timeout: float
    agent_stall_timeout: float
    connect_timeout: float
    drain_grace: float
    demo: bool
    state_dir: str
    pricing_file: str | None
    ledger_sync: str
    ledger_retention: float | None
    # Ledger rows held in memory at most while the disk refuses them, and
    # where rows still held at shutdown are saved (docs/LEDGER.md).
    ledger_backlog: int
    ledger_spill_dir: str
    no_stream_options: frozenset
    policy_file: str | None
    # The operator model table (public names, LiteLLM model_list YAML).
    model_table: str | None
    unpriced_budget: str
    default_rpm: int | None
    default_tpm: int | None
    # The shortest answer a budget lowers max_tokens to instead of
    # refusing; 0: never lower (docs/BUDGETS.md).
    budget_min_output_tokens: int
    # What a budget that cannot be evaluated does: closed refuses (503),
    # open lets the request go on (docs/BUDGETS.md).
    budget_fail_mode: str
    alert_webhooks: str | None = attrs.field(repr=False)  # URLs embed tokens
    # The operator UI without authentication: only by explicit choice.
    ui_no_auth: bool
    # Host names the UI answers to when authentication is off, besides
    # localhost and IP literals (against DNS rebinding); see docs/UI.md.
    ui_allowed_hosts: frozenset
    master_key: str | None = attrs.field(repr=False)
    # Operator CA bundle (PEM) trusted for upstream TLS besides the platform store.
    upstream_ca_file: str | None
    # The lean API channel and upstream client send with the socket's send()
    # as each write is made while nothing waits in Twisted's buffer (see
    # cllama_tx.sites.lean_http); off: every write takes Twisted's buffer.
    write_through: bool
    # The inference paths on the lean HTTP/1.1 channel and the lean upstream
    # client (cllama_tx.sites.lean_http, cllama_tx.runtime.lean_client); off:
    # twisted.web's channel and Agent serve them as every other route.
    lean_http: bool
    # Per listener: the connection cap, and the header, body and keep-alive
    # deadlines (see cllama_tx.sites.guard).
    max_connections: int
    ui_max_connections: int
    header_timeout: float
    body_timeout: float
    keepalive_timeout: float
    # Bytes of audit lines held for a stdout reader that is behind; beyond it
    # lines are dropped and counted (cllama_tx.runtime.bounded_output).
    audit_buffer_bytes: int
    # The environment as seen after command-line overrides; provider keys and
    # base URLs are read from it by the provider registry.
    env: Mapping[str, str] = attrs.field(repr=False)
    # Worker processes on this host (--workers, CLLAMA_WORKERS); 1 is one
    # process and no supervisor.  In a worker, the role its supervisor gave it.
    workers: int = 1
    worker: WorkerRole | None = None
    # The policy plane's PolicySettings (cllama_tx.governance.policy_settings).
    policy: object = None
    # Standing in for the Execwall OR gate: its opt-ins and OpenRouter pricing
    # (cllama_tx.runtime.gate.GateSettings).
    gate: Any = None
    # The passthrough (/_proxy/<provider>/<path>): its PassthroughSettings
    # (cllama_tx.pipeline.passthrough), None when it is off.
    passthrough: Any = None
    # The reactor calls a ready socket's handler without Twisted's per-event
    # log context (cllama_tx.runtime.twisted_private.lean_dispatch); off:
    # Twisted's own poll loop.
    lean_dispatch: bool = True

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, demo: bool = False) -> Config:
        env = dict(os.environ if env is None else env)
        max_body = env.get("CLLAMA_MAX_BODY_SIZE")
        demo = demo or env.get("CLLAMA_DEMO", "").lower() in ("1", "true", "yes")
        api_endpoint = listen_endpoint(env.get("LISTEN_ADDR") or DEFAULT_API_ADDR)
        ui_endpoint = listen_endpoint(env.get("UI_ADDR") or DEFAULT_UI_ADDR)
        workers, worker = _workers(env, demo, (api_endpoint, ui_endpoint))
        return cls(
            api_endpoint=api_endpoint,
            ui_endpoint=ui_endpoint,
            context_root=env.get("CLAW_CONTEXT_ROOT") or DEFAULT_CONTEXT_ROOT,
            auth_dir=env.get("CLAW_AUTH_DIR") or DEFAULT_AUTH_DIR,
            pod=env.get("CLAW_POD") or None,
            ui_token=env.get("CLLAMA_UI_TOKEN") or None,
            session_history_dir=env.get("CLAW_SESSION_HISTORY_DIR") or None,
            governance_dir=env.get("CLAW_GOVERNANCE_DIR") or None,
            max_body_bytes=parse_size(max_body) if max_body else DEFAULT_MAX_BODY,
            first_byte_timeout=_seconds_or_ms(
                env, "CLLAMA_FIRST_BYTE_TIMEOUT", "CLLAMA_STREAM_FIRST_BYTE_TIMEOUT_MS", DEFAULT_FIRST_BYTE_TIMEOUT
            ),
            idle_timeout=_seconds_or_ms(
                env, "CLLAMA_IDLE_TIMEOUT", "CLLAMA_STREAM_IDLE_TIMEOUT_MS", DEFAULT_IDLE_TIMEOUT
            ),
            agent_stall_timeout=_seconds(env, "CLLAMA_AGENT_STALL_TIMEOUT", DEFAULT_AGENT_STALL_TIMEOUT),
            connect_timeout=_seconds(
                env, "CLLAMA_CONNECT_TIMEOUT", DEFAULT_CONNECT_TIMEOUT
            ),
            drain_grace=_seconds(env, "CLLAMA_DRAIN_GRACE", DEFAULT_DRAIN_GRACE),
            demo=demo,
            state_dir=default_state_dir(env),
            pricing_file=env.get("CLLAMA_PRICING_FILE") or None,
            ledger_sync=_choice(env, "CLLAMA_LEDGER_SYNC", ("normal", "full"), "normal"),
            ledger_retention=parse_duration(env["CLLAMA_LEDGER_RETENTION"])
            if env.get("CLLAMA_LEDGER_RETENTION")
            else None,
            ledger_backlog=_ledger_backlog(env),
            ledger_spill_dir=env.get("CLLAMA_LEDGER_SPILL_DIR") or _default_spill_dir(),
            no_stream_options=frozenset(
                p.strip().lower() for p in env.get("CLLAMA_NO_STREAM_OPTIONS", "").split(",") if p.strip()
            ),
            policy_file=env.get("CLLAMA_POLICY_FILE") or None,
            model_table=env.get("CLLAMA_MODEL_TABLE") or None,
            unpriced_budget=_choice(env, "CLLAMA_UNPRICED_BUDGET", ("refuse", "allow"), "refuse"),
            default_rpm=_count(env, "CLLAMA_DEFAULT_RPM"),
            default_tpm=_count(env, "CLLAMA_DEFAULT_TPM"),
            budget_min_output_tokens=_budget_min_output_tokens(env),
            budget_fail_mode=_budget_fail_mode(env),
            alert_webhooks=env.get("CLLAMA_ALERT_WEBHOOKS") or None,
            ui_no_auth=env.get("CLLAMA_UI_NO_AUTH", "").lower() in ("1", "true", "yes"),
            ui_allowed_hosts=frozenset(
                h.strip().lower().rstrip(".") for h in env.get("CLLAMA_UI_ALLOWED_HOSTS", "").split(",") if h.strip()
            ),
            master_key=_master_key(env),
            upstream_ca_file=_ca_file(env),
            write_through=_switch(env, "CLLAMA_WRITE_THROUGH", True),
            lean_http=_switch(env, "CLLAMA_LEAN_HTTP", True),
            lean_dispatch=_switch(env, "CLLAMA_LEAN_DISPATCH", True),
            max_connections=_cap(env, "CLLAMA_MAX_CONNECTIONS", DEFAULT_MAX_CONNECTIONS),
            ui_max_connections=_cap(env, "CLLAMA_UI_MAX_CONNECTIONS", DEFAULT_UI_MAX_CONNECTIONS),
            header_timeout=_seconds(env, "CLLAMA_HEADER_TIMEOUT", DEFAULT_HEADER_TIMEOUT),
            body_timeout=_seconds(env, "CLLAMA_BODY_TIMEOUT", DEFAULT_BODY_TIMEOUT),
            keepalive_timeout=_seconds(env, "CLLAMA_KEEPALIVE_TIMEOUT", DEFAULT_KEEPALIVE_TIMEOUT),
            audit_buffer_bytes=parse_size(env["CLLAMA_AUDIT_BUFFER"])
            if env.get("CLLAMA_AUDIT_BUFFER")
            else DEFAULT_AUDIT_BUFFER,
            env=env,
            workers=workers,
            worker=worker,
            policy=_policy_settings(env),
            gate=_gate_settings(env, api_endpoint),
            passthrough=_passthrough(env),
        )
