"""
An instance among several that share one store (PostgreSQL, or the SQLite
file of several workers on one host): its coordinator (budgets and rate
limits decided across instances) and its change feed, wired to the parts of
the daemon that keep shared state in memory.

The single process on its own SQLite file has no fleet: nothing here runs,
and every hot path is as it was.
"""

from __future__ import annotations

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from cllama_tx.providers import store as provider_files
from cllama_tx.store.changes import ChangeFeed
from cllama_tx.store.conversations import SharedConversations
from cllama_tx.store.coordination import Coordinator
from cllama_tx.store.shared import get_document, new_instance_id, put_document
from cllama_tx.surfaces.responses_state import ConversationStore

__all__ = ["Fleet"]

log = Logger(namespace="cllama_tx.fleet")

PROVIDERS_DOCUMENT = "providers.json"


class Fleet(service.MultiService):
    """The coordinator and the change feed of this instance."""

    def __init__(self, database, reactor, instance: str | None = None) -> None:
        super().__init__()
        self.database = database
        self.reactor = reactor
        self.instance = instance or new_instance_id()
        self.coordinator = Coordinator(database, reactor, self.instance)
        self.coordinator.setServiceParent(self)
        self.changes = ChangeFeed(database, reactor, self.instance)
        self.changes.setServiceParent(self)

    def conversations(self) -> SharedConversations:
        """The Responses surface's kept conversations, in the store (any instance finds a follow-up's)."""
        shared = SharedConversations(self.database, self.reactor, ConversationStore(self.reactor))
        shared.setServiceParent(self)
        return shared

    def register(self) -> defer.Deferred:
        """Announce this instance before its budgets are seeded (see L{Coordinator.register})."""
        return self.coordinator.register()

    # -- wiring

    def follow_overrides(self, ledger, governance) -> None:
        """A budget set or reset on another instance applies here too."""

        def changed(agent):
            if not agent:
                return None
            return ledger.reload_override(agent).addCallback(
                lambda entry: governance.apply_shared_override(agent, entry)
            )

        self.changes.subscribe("budget_override", changed)

    def follow_keys(self, keys) -> None:
        """Virtual keys and team settings changed on another instance are re-read here."""
        self.changes.subscribe("virtual_key", lambda token_hash: token_hash and keys.reload_key(token_hash))
        self.changes.subscribe("team", lambda team_id: team_id and keys.reload_team(team_id))

    def follow_directory(self, directory) -> None:
        """Users, teams, organisations, customers and added models changed on another instance are re-read here."""
        def reread(kind: str):
            return lambda subject: directory.reload(kind, subject)

        for change, kind in (("team", "team"), ("user", "user"), ("organization", "org"), ("customer", "customer"),
                             ("model", "model")):
            self.changes.subscribe(change, reread(kind))

    def follow_reloads(self, operations) -> None:
        """An operator's reload on another instance reloads this one (not announced again)."""
        self.changes.subscribe("reload", lambda _subject: operations.reload("another instance", announce=False))

    def share_providers(self, providers) -> None:
        """
        The operator's provider changes (keys added, disabled, deleted) are
        copied to every instance: the saved C{providers.json} goes into the
        store, and the others write it over their own and reload it.
        """
        path = getattr(providers, "path", None)
        if not path:
            return

        def saved(file_path: str) -> None:
            try:
                with open(file_path, encoding="utf-8") as f:
                    content = f.read()
            except OSError as e:
                log.error("could not share provider changes: {error}", error=str(e))
                return
            now = self.reactor.seconds()
            self.database.run(put_document, self.instance, PROVIDERS_DOCUMENT, content, now, "provider_keys") \
                .addErrback(lambda f: log.error("could not share provider changes: {e}", e=f.getErrorMessage()))

        def changed(_subject):
            d = self.database.run(get_document, PROVIDERS_DOCUMENT)
            return d.addCallback(_replace, path, providers)

        providers.on_operator_change.append(saved)
        self.changes.subscribe("provider_keys", changed)


def _replace(content: str | None, path: str, providers) -> None:
    """
    Write another instance's C{providers.json} over C{path} when it
    differs, and reload.  It is parsed first (a broken copy is refused, the
    file left as it is) and written as the registry writes it: atomically,
    mode 0600 from the start, fsynced.
    """
    if content is None:
        return
    data = content.encode("utf-8")
    try:
        with open(path, "rb") as f:
            if f.read() == data:
                return
    except OSError:
        pass
    try:
        entries = provider_files.parse(path, data)
        provider_files.save(path, entries)
    except provider_files.ProvidersFileError as e:
        log.error("provider changes from another instance not applied: {problem}", problem=str(e))
        return
    providers.reload()
    log.info("provider keys changed on another instance: reloaded")
