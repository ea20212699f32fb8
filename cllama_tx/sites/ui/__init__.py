"""
The operator UI site (default :8081), one module per job:

  - L{app}: the Klein app (routes, negotiation, forms) and its Site;
  - L{auth}: the operator token, sessions, CSRF, the Host check (guesses are
    slowed by L{cllama_tx.identity.operator.OperatorGuard});
  - L{views}: what each page shows, as JSON-able dicts (the pages' JSON twins);
  - L{pages}: those dicts as HTML: one C{twisted.web.template} element per
    page, filling an XML template of C{web/templates};
  - L{markup}: the template element base and the few tags built in code
    (escaping is the flattener's, never ours);
  - L{web}: the template and static files of C{web/}, loaded once;
  - L{charts}: the SVG charts, as tags;
  - L{render}: number and time formats;
  - L{live}: live updates over Server-Sent Events.
"""

from typing import TYPE_CHECKING, Any

from cllama_tx.sites.ui.auth import TOKEN_FILE, TokenFileError, ensure_ui_token

if TYPE_CHECKING:
    from cllama_tx.sites.ui.app import (
        UiApp,
        UiSite,
        actor_of,
        build_ui_site,
        negotiate,
        spend_periods,
    )

# The app's names are imported when first asked for: the daemon reads the
# token file and the routing API at start, and builds the UI (Klein,
# werkzeug, every page) only on its first connection (sites/lazy.py).
_FROM_APP = frozenset({"UiApp", "UiSite", "actor_of", "build_ui_site", "negotiate", "spend_periods"})


def __getattr__(name: str) -> Any:
    if name in _FROM_APP:
        from cllama_tx.sites.ui import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "TOKEN_FILE",
    "TokenFileError",
    "UiApp",
    "UiSite",
    "actor_of",
    "build_ui_site",
    "ensure_ui_token",
    "negotiate",
    "spend_periods",
]
