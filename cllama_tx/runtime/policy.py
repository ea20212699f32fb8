"""
The policy plane of one daemon, from its settings: the reference's HTTP
sidecar (C{CLLAMA_POLICY_URL}) or an operator's in-process plugin
(C{CLLAMA_POLICY_PLUGIN}), wrapped in the pipeline's L{PolicyHooks}; or
nothing at all when neither is set.
"""

from __future__ import annotations

from twisted.application import service
from twisted.logger import Logger

from cllama_tx.governance.policy_plane import PolicyPlane
from cllama_tx.governance.policy_plugin import PluginError, PluginHost, load_plugin
from cllama_tx.governance.policy_settings import PolicySettings, PolicySettingsError, redacted_url
from cllama_tx.governance.policy_sidecar import PolicySidecar
from cllama_tx.pipeline.policy_hooks import PolicyHooks
from cllama_tx.runtime.config import Config
from cllama_tx.runtime.errors import ConfigError
from cllama_tx.runtime.tls import upstream_tls_policy

log = Logger()


def build_policy(config: Config, reactor, parent: service.MultiService, *, metering, audit) -> PolicyHooks | None:
    """
    The proxy's policy hooks, or None without a policy.  A sidecar client
    (or a plugin that is a service) becomes a child of C{parent}, stopped
    after the listeners and the drain.

    @raise ConfigError: settings or a plugin the daemon cannot start with.
    """
    settings = config.policy
    if not isinstance(settings, PolicySettings):  # a Config not made by from_env
        try:
            settings = PolicySettings.from_env(config.env)
        except PolicySettingsError as e:
            raise ConfigError(str(e)) from None
    if not settings.enabled:
        return None
    for problem in settings.problems:
        log.warn("Policy: {problem}", problem=problem)
    evaluator: object
    if settings.url is not None:
        sidecar = PolicySidecar(
            reactor,
            settings.url,
            settings.token,
            tls_policy=upstream_tls_policy(config.upstream_ca_file),
            connect_timeout=max(settings.timeout, 0.001),
        )
        sidecar.setServiceParent(parent)
        evaluator = sidecar
        where = f"sidecar at {redacted_url(settings.url)}"
    else:
        assert settings.plugin is not None
        try:
            plugin = load_plugin(settings.plugin, PluginHost(reactor, config.env))
        except PluginError as e:
            raise ConfigError(f"CLLAMA_POLICY_PLUGIN: {e}") from None
        if service.IService.providedBy(plugin.plugin):
            plugin.plugin.setServiceParent(parent)
        evaluator = plugin
        where = f"plugin {settings.plugin}"
    log.info(
        "Policy: {where}, {timeout} ms per hook, failing {mode}",
        where=where, timeout=settings.timeout_ms, mode=settings.fail_mode,
    )
    plane = PolicyPlane(evaluator, settings.timeout, settings.fail_open)
    return PolicyHooks(plane, clock=reactor, metering=metering, audit=audit)
