"""
What building the operator UI would refuse or shout, done at start.

The daemon builds the UI on its first connection (L{cllama_tx.sites.lazy}),
but a broken installation (a template missing) must still stop it at
start, and running without authentication must still be said loudly in
the start-up log, not when an operator first opens a page.  Nothing here
imports the UI's app (Klein, werkzeug): only the page modules, which name
their templates.
"""

from __future__ import annotations

from twisted.logger import Logger

from cllama_tx.sites.ui import debug_page, directory_page, discovery_page, pages
from cllama_tx.sites.ui.web import Templates

log = Logger(namespace="cllama_tx.sites.ui")

AUTH_OFF = (
    "OPERATOR UI AUTHENTICATION IS OFF: anyone who can reach the UI port can read "
    "spend and manage provider keys and budgets.  Never run like this on a shared network."
)


def required_templates() -> frozenset[str]:
    """Every template a page of the UI fills."""
    return pages.TEMPLATES | directory_page.TEMPLATES | debug_page.TEMPLATES | discovery_page.TEMPLATES


def announce_auth_off() -> None:
    log.critical(AUTH_OFF)


def preflight(web_root: str | None = None, auth_disabled: bool = False) -> None:
    """Refuse to start without the UI's templates; say loudly when its authentication is off."""
    Templates(web_root).require(required_templates())
    if auth_disabled:
        announce_auth_off()
