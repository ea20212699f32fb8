"""twistd plugin: `twistd -n cllama`.  Lazy: nothing of cllama_tx is imported here."""

from twisted.application.service import ServiceMaker

cllama = ServiceMaker(
    "cllama_tx",
    "cllama_tx.runtime.tap",
    "cllama_tx governance proxy for AI agents (API and operator UI)",
    "cllama",
)
