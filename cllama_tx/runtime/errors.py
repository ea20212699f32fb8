"""The error every configuration check raises; its own module so that the
settings (L{cllama_tx.runtime.config}) and the checks they call (TLS bundles)
both use it without importing each other."""


class ConfigError(ValueError):
    """A configuration value is unusable; the message names it."""
