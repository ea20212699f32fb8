"""
`twistd cllama`: command-line options and the service tree.

makeService builds every object once and hands each what it needs; there are
no globals.  Shared services start first and the two listeners last, so on
shutdown the listeners close first and the shared services after them.
"""

from __future__ import annotations

import os
import sys

from twisted.application import service
from twisted.python import usage

from cllama_tx.runtime.config import Config
from cllama_tx.runtime.errors import ConfigError

# option name -> the environment variable it overrides
_ENV_OPTIONS = [
    ("listen", None, "LISTEN_ADDR", "API listen address (Go style ':8080' or a Twisted endpoint string) [env LISTEN_ADDR, default :8080]"),
    ("ui-listen", None, "UI_ADDR", "operator UI listen address, same forms [env UI_ADDR, default :8081]"),
    ("context-root", None, "CLAW_CONTEXT_ROOT", "agent contexts directory [env CLAW_CONTEXT_ROOT, default /claw/context]"),
    ("auth-dir", None, "CLAW_AUTH_DIR", "directory of providers.json [env CLAW_AUTH_DIR, default /claw/auth]"),
    ("pod", None, "CLAW_POD", "pod name shown in the UI [env CLAW_POD]"),
    ("ui-allowed-hosts", None, "CLLAMA_UI_ALLOWED_HOSTS", "with --ui-no-auth: comma-separated host names the UI answers to besides localhost and IP addresses (.example.com for a domain) [env CLLAMA_UI_ALLOWED_HOSTS]"),
    ("ui-token", None, "CLLAMA_UI_TOKEN", "operator token; prefer the environment, the command line is visible to other users [env CLLAMA_UI_TOKEN]"),
    ("session-history-dir", None, "CLAW_SESSION_HISTORY_DIR", "per-agent session history directory [env CLAW_SESSION_HISTORY_DIR]"),
    ("governance-dir", None, "CLAW_GOVERNANCE_DIR", "per-agent budget overrides directory [env CLAW_GOVERNANCE_DIR]"),
    ("max-body-size", None, "CLLAMA_MAX_BODY_SIZE", "largest accepted request body, e.g. 32MiB [env CLLAMA_MAX_BODY_SIZE]"),
    ("first-byte-timeout", None, "CLLAMA_FIRST_BYTE_TIMEOUT", "seconds to wait for an upstream's first byte [env CLLAMA_FIRST_BYTE_TIMEOUT, default 300]"),
    ("idle-timeout", None, "CLLAMA_IDLE_TIMEOUT", "seconds an upstream stream may stay silent [env CLLAMA_IDLE_TIMEOUT, default 120]"),
    ("agent-stall-timeout", None, "CLLAMA_AGENT_STALL_TIMEOUT", "seconds an agent may leave a stream unread before it is cut (408 agent_stalled, billed) [env CLLAMA_AGENT_STALL_TIMEOUT, default 120]"),
    ("connect-timeout", None, "CLLAMA_CONNECT_TIMEOUT", "seconds to connect to an upstream [env CLLAMA_CONNECT_TIMEOUT, default 10]"),
    ("state-dir", None, "CLLAMA_STATE_DIR", "directory of the ledger database [env CLLAMA_STATE_DIR, default $STATE_DIRECTORY or ~/.local/state/cllama_tx]"),
    ("pricing-file", None, "CLLAMA_PRICING_FILE", "operator price table merged over the packaged one [env CLLAMA_PRICING_FILE]"),
    ("ledger-sync", None, "CLLAMA_LEDGER_SYNC", "normal (survives a crash) or full (also power loss) [env CLLAMA_LEDGER_SYNC, default normal]"),
    ("ledger-retention", None, "CLLAMA_LEDGER_RETENTION", "fold ledger rows older than this into daily rollups, e.g. 90d [env CLLAMA_LEDGER_RETENTION]"),
    ("ledger-backlog", None, "CLLAMA_LEDGER_BACKLOG", "ledger rows held in memory at most while the disk refuses them; then metered requests get 503 [env CLLAMA_LEDGER_BACKLOG, default 10000]"),
    ("ledger-spill-dir", None, "CLLAMA_LEDGER_SPILL_DIR", "where ledger rows still unwritten at shutdown are saved, best on another disk than the state directory [env CLLAMA_LEDGER_SPILL_DIR, default <tmp>/cllama_tx-ledger-spill-<uid>]"),
    ("model-table", None, "CLLAMA_MODEL_TABLE", "operator model table: public model names -> provider/model, LiteLLM's model_list YAML accepted as it is [env CLLAMA_MODEL_TABLE]"),
    ("policy-file", None, "CLLAMA_POLICY_FILE", "operator budget policy file (YAML or JSON, cost_routing.agents.<id>) [env CLLAMA_POLICY_FILE]"),
    ("trust-x-agent-id", None, "CLLAMA_TRUST_X_AGENT_ID", "1: on a loopback-only API listener, a request is the policy file's agent its X-Agent-ID header names (else 'default'), without credentials, as the Execwall OR gate does [env CLLAMA_TRUST_X_AGENT_ID, default 0]"),
    ("console-on-api-port", None, "CLLAMA_CONSOLE_ON_API_PORT", "1: also answer the OR gate's console API (/api/spend, /api/budget, /api/reset, /api/health, /api/reload) on a loopback-only API listener, without the operator token [env CLLAMA_CONSOLE_ON_API_PORT, default 0]"),
    ("openrouter-ceiling", None, "CLLAMA_OPENROUTER_CEILING", "price held for an OpenRouter model the table does not price: auto (the dearest OpenRouter rates known), off (refused), or <input>/<output> USD per million tokens [env CLLAMA_OPENROUTER_CEILING, default auto]"),
    ("openrouter-prices-file", None, "CLLAMA_OPENROUTER_PRICES_FILE", "OpenRouter's published prices as `cllama-tx openrouter-prices` writes them [env CLLAMA_OPENROUTER_PRICES_FILE, default <state dir>/openrouter-prices.json]"),
    ("unpriced-budget", None, "CLLAMA_UNPRICED_BUDGET", "refuse or allow requests for unpriced models under a dollar budget [env CLLAMA_UNPRICED_BUDGET, default refuse]"),
    ("default-rpm", None, "CLLAMA_DEFAULT_RPM", "requests per minute per agent unless its metadata sets rate_limits.rpm [env CLLAMA_DEFAULT_RPM]"),
    ("default-tpm", None, "CLLAMA_DEFAULT_TPM", "tokens per minute per agent unless its metadata sets rate_limits.tpm [env CLLAMA_DEFAULT_TPM]"),
    ("budget-fail-mode", None, "CLLAMA_BUDGET_FAIL_MODE", "closed: a request whose budget cannot be evaluated gets 503; open: it goes on, audited as budget_check_unavailable [env CLLAMA_BUDGET_FAIL_MODE, default closed]"),
    ("budget-min-output-tokens", None, "CLLAMA_BUDGET_MIN_OUTPUT_TOKENS", "the shortest answer a dollar budget lowers max_tokens to instead of refusing; 0 never lowers [env CLLAMA_BUDGET_MIN_OUTPUT_TOKENS, default 256]"),
    ("master-key", None, "CLLAMA_MASTER_KEY", "master key of the virtual key API (LITELLM_MASTER_KEY also read); prefer the environment [env CLLAMA_MASTER_KEY]"),
    ("alert-webhooks", None, "CLLAMA_ALERT_WEBHOOKS", "comma-separated webhook URLs (json:, slack:, discord: prefixes) for budget alerts [env CLLAMA_ALERT_WEBHOOKS]"),
    ("upstream-ca-file", None, "CLLAMA_UPSTREAM_CA_FILE", "PEM bundle of extra CAs trusted for HTTPS to providers, besides the platform store [env CLLAMA_UPSTREAM_CA_FILE]"),
    ("write-through", None, "CLLAMA_WRITE_THROUGH", "1 (default): the inference paths' writes leave with the socket's send() as they are made; 0: through Twisted's buffer, sent on the next turn [env CLLAMA_WRITE_THROUGH]"),
    ("lean-http", None, "CLLAMA_LEAN_HTTP", "1 (default): the inference paths are served by the lean HTTP/1.1 channel and sent upstream by the lean client; 0: by twisted.web's channel and Agent [env CLLAMA_LEAN_HTTP]"),
    ("max-connections", None, "CLLAMA_MAX_CONNECTIONS", "connections the API listener holds at once; past it the oldest not yet sending a request is evicted [env CLLAMA_MAX_CONNECTIONS, default 4096]"),
    ("ui-max-connections", None, "CLLAMA_UI_MAX_CONNECTIONS", "connections the UI listener holds at once [env CLLAMA_UI_MAX_CONNECTIONS, default 256]"),
    ("header-timeout", None, "CLLAMA_HEADER_TIMEOUT", "seconds a client has to send a request's headers [env CLLAMA_HEADER_TIMEOUT, default 10]"),
    ("body-timeout", None, "CLLAMA_BODY_TIMEOUT", "seconds a client has to send a request's body once its headers are in [env CLLAMA_BODY_TIMEOUT, default 60]"),
    ("keepalive-timeout", None, "CLLAMA_KEEPALIVE_TIMEOUT", "seconds an idle keep-alive connection is kept [env CLLAMA_KEEPALIVE_TIMEOUT, default 120]"),
    ("no-stream-options", None, "CLLAMA_NO_STREAM_OPTIONS", "comma-separated providers that reject stream_options (their stream usage is estimated) [env CLLAMA_NO_STREAM_OPTIONS]"),
    ("openai-organization", None, "OPENAI_ORG_ID", "the operator's OpenAI organization, sent as OpenAI-Organization (an agent's is never forwarded) [env OPENAI_ORG_ID]"),
    ("openai-project", None, "OPENAI_PROJECT_ID", "the operator's OpenAI project, sent as OpenAI-Project (an agent's is never forwarded) [env OPENAI_PROJECT_ID]"),
    ("workers", None, "CLLAMA_WORKERS", "worker processes on this host, sharing the listening sockets; above 1 this process supervises them and serves nothing itself [env CLLAMA_WORKERS, default 1]"),
    ("audit-buffer", None, "CLLAMA_AUDIT_BUFFER", "audit lines held for a stdout reader that is behind, e.g. 4MiB; beyond it lines are dropped and counted [env CLLAMA_AUDIT_BUFFER, default 4MiB]"),
]

# Provider env prefixes accepted by --provider-key / --provider-base-url.
_KEY_PREFIXES = {
    "openai": "OPENAI",
    "anthropic": "ANTHROPIC",
    "openrouter": "OPENROUTER",
    "xai": "XAI",
    "gemini": "GEMINI",
    "google": "GEMINI",
    "vercel": "AI_GATEWAY",
    "ai_gateway": "AI_GATEWAY",
}
_URL_PREFIXES = {
    "openai": "OPENAI",
    "anthropic": "ANTHROPIC",
    "openrouter": "OPENROUTER",
    "xai": "XAI",
    "google": "GOOGLE",
    "gemini": "GOOGLE",
    "ollama": "OLLAMA",
    "vercel": "AI_GATEWAY",
    "ai_gateway": "AI_GATEWAY",
}


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run the cllama_tx governance proxy: the API site and the operator UI "
        "site in one reactor.  Every option overrides the environment variable "
        "named in its help."
    )
    optFlags = [
        ["demo", None, "serve a built-in offline demo provider and demo agent (no provider keys needed)"],
        ["ui-no-auth", None, "DANGEROUS: serve the operator UI without authentication [env CLLAMA_UI_NO_AUTH=1]"],
    ]
    optParameters = [[name, short, None, help] for name, short, _env, help in _ENV_OPTIONS]

    def __init__(self) -> None:
        super().__init__()
        self["provider-key"] = []
        self["provider-base-url"] = []

    def opt_provider_key(self, value: str) -> None:
        """PROVIDER=KEY, repeatable (1st, 2nd, 3rd key); prefer the environment [env <P>_API_KEY, <P>_API_KEY_1, _2]"""
        name, sep, key = value.partition("=")
        if not sep or not key or name.lower() not in _KEY_PREFIXES:
            raise usage.UsageError(
                "--provider-key wants PROVIDER=KEY with PROVIDER one of "
                + ", ".join(sorted(_KEY_PREFIXES))
            )
        self["provider-key"].append((_KEY_PREFIXES[name.lower()], key))

    def opt_provider_base_url(self, value: str) -> None:
        """PROVIDER=URL, repeatable [env <P>_BASE_URL]"""
        name, sep, url = value.partition("=")
        if not sep or not url or name.lower() not in _URL_PREFIXES:
            raise usage.UsageError(
                "--provider-base-url wants PROVIDER=URL with PROVIDER one of "
                + ", ".join(sorted(_URL_PREFIXES))
            )
        self["provider-base-url"].append((_URL_PREFIXES[name.lower()], url))

    def environment(self, base=None) -> dict[str, str]:
        """The process environment with this command line laid over it."""
        env = dict(os.environ if base is None else base)
        for name, _short, var, _help in _ENV_OPTIONS:
            if self.get(name) is not None:
                env[var] = self[name]
        counts: dict[str, int] = {}
        for prefix, key in self["provider-key"]:
            n = counts.get(prefix, 0)
            counts[prefix] = n + 1
            env[f"{prefix}_API_KEY" if n == 0 else f"{prefix}_API_KEY_{n}"] = key
        for prefix, url in self["provider-base-url"]:
            env[f"{prefix}_BASE_URL"] = url
        if self["ui-no-auth"]:
            env["CLLAMA_UI_NO_AUTH"] = "1"
        return env

    def postOptions(self) -> None:
        try:
            self.config = Config.from_env(self.environment(), demo=bool(self["demo"]))
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        parent = getattr(self, "parent", None)
        # Under twistd with no --logfile/--logger of the operator's choice,
        # operational logs go to stderr: stdout carries the audit stream.
        if parent is not None and not parent.get("logger") and not parent.get("logfile"):
            parent["logger"] = "cllama_tx.runtime.logs.stderr_observer"


def makeService(options: Options, reactor=None, audit_stream=None) -> service.MultiService:
    from twisted.internet import reactor as default_reactor

    from cllama_tx.runtime.daemon import build_daemon

    reactor = reactor or default_reactor
    config = options.config
    stream = audit_stream if audit_stream is not None else sys.stdout
    if config.workers > 1 and config.worker is None:
        from cllama_tx.runtime.workers import build_supervisor, exit_with_status

        supervisor = build_supervisor(config, reactor, stream)
        # Registered before twistd starts its log observer, so it runs after
        # the log's own flush at exit.
        exit_with_status(supervisor)
        return supervisor
    daemon = build_daemon(config, reactor, stream)
    if config.worker is not None:
        from cllama_tx.runtime.worker import attach_worker

        attach_worker(daemon, config, reactor)
    return daemon
