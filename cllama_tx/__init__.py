"""cllama_tx: a governance proxy for fleets of AI agents, built on Twisted."""

__version__ = "0.1.0"
