"""
Agent contexts under C{CLAW_CONTEXT_ROOT}, cached and reloaded on change.

The reference proxy re-reads about ten files per request.  Here a request for
a known agent costs a dictionary lookup; at most once per C{recheck_interval}
it costs two C{stat} calls, and files are only read again when their
(mtime, size, inode) signature changed.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any

import attrs

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from cllama_tx.identity.tokens import expected_secret, secrets_equal, valid_agent_id
from cllama_tx.jsonfile import Signature, UnreadableFile, file_signature, read_json_file
from cllama_tx.interfaces import IContextRegistry

METADATA_FILE = "metadata.json"
BUDGET_OVERRIDE_FILE = "budget-override.json"

# A context file larger than this is refused rather than read: it is
# read on the reactor thread.
MAX_CONTEXT_FILE_BYTES = 1024 * 1024

# Unknown ids are remembered for recheck_interval, but only this many, so a
# flood of made-up ids cannot grow memory without bound.
MAX_REMEMBERED_MISSES = 4096

# Compared against when there is no context, so that an unknown agent costs
# the same as a wrong secret.  Same length as a Clawdapus secret.
_DUMMY_SECRET = "0" * 48

# (st_mtime_ns, st_size, st_ino); None when the file does not exist.


class _Unusable(Exception):
    """
    A context file exists but cannot be used.  The message names the
    problem, never the content.
    """


@attrs.frozen
class AgentContext:
    """
    One agent's identity and governance settings, as loaded from its context
    directory.  Immutable, so a request keeps a consistent view while the
    registry swaps in a reloaded one.
    """

    agent_id: str
    path: str
    # The raw metadata holds the token: kept out of repr like the secret.
    metadata: dict = attrs.field(repr=False)
    secret: str = attrs.field(repr=False)
    pod: Any = None
    service: Any = None
    type: Any = None
    ordinal: Any = None
    timezone: Any = None
    model_policy: dict | None = None
    budget: dict | None = None


@attrs.define
class _Loaded:
    """
    A cached load of an existing C{metadata.json}: a context, or the problem
    that prevents one.
    """

    context: AgentContext | None
    signature: tuple[Signature, Signature]
    checked_at: float


@attrs.define
class _Missing:
    """
    A remembered miss: no C{metadata.json}.  C{directory_exists} is kept so
    that a directory without metadata is warned about once, not per request.
    """

    directory_exists: bool
    checked_at: float


def _read_json(path: str) -> tuple[Signature, Any]:
    """A context file's signature and value; _Unusable when it cannot be used."""
    try:
        return read_json_file(path, MAX_CONTEXT_FILE_BYTES)
    except UnreadableFile as e:
        raise _Unusable(str(e)) from None


def _optional_object(metadata: dict, key: str) -> dict | None:
    """
    A governance setting that must be an object when present.  A wrong type
    makes the whole context unusable (fail closed) instead of silently
    lifting the policy or budget.
    """
    value = metadata.get(key)
    if value is None or isinstance(value, dict):
        return value
    raise _Unusable(f"has a '{key}' that is not an object")


@implementer(IContextRegistry)
class ContextRegistry:
    """
    The agents whose contexts live under one root directory.

    Every agent id is checked with L{valid_agent_id} before it is joined to
    a path.  Known agents are served from memory; files are re-checked by
    C{stat} at most once per C{recheck_interval} seconds of C{clock} and
    re-read only when they changed.  A miss triggers a load attempt, so an
    agent added while running is found without a restart; misses are
    remembered for C{recheck_interval} too, so unknown ids do not hit the disk
    on every request.
    """

    def __init__(
        self,
        root: str,
        clock: IReactorTime,
        recheck_interval: float = 1.0,
        log: Logger | None = None,
    ) -> None:
        self._root = root
        self._clock = clock
        self._recheck_interval = recheck_interval
        self._log = log if log is not None else Logger()
        self._loaded: dict[str, _Loaded] = {}
        self._missing: OrderedDict[str, _Missing] = OrderedDict()

    def reload(self) -> None:
        """Forget every cached context: each is read again on its next use."""
        self._loaded.clear()
        self._missing.clear()

    def authenticate(self, agent_id: str, secret: str) -> AgentContext | None:
        """
        The agent's context when C{secret} is its secret, else L{None}.

        Unknown or invalid ids are compared against a dummy secret, so the
        answer and its timing do not tell which agents exist.
        """
        context = self.get(agent_id)
        expected = context.secret if context is not None else _DUMMY_SECRET
        presented = secret if isinstance(secret, str) else ""
        matches = secrets_equal(presented, expected)
        if context is None or not matches:
            return None
        return context

    def get(self, agent_id: str) -> AgentContext | None:
        """
        The current context of C{agent_id}, or L{None} when it has none that
        can be used.
        """
        if not valid_agent_id(agent_id):
            return None
        now = self._clock.seconds()
        loaded = self._loaded.get(agent_id)
        if loaded is not None:
            if now - loaded.checked_at < self._recheck_interval:
                return loaded.context
            return self._recheck(agent_id, loaded, now)
        missing = self._missing.get(agent_id)
        if missing is not None and now - missing.checked_at < self._recheck_interval:
            return None
        return self._recheck(agent_id, None, now)

    def agent_ids(self) -> list[str]:
        """
        The sorted ids of the agents with a usable context.  Lists the root,
        so it is for the UI, not for the request path.
        """
        try:
            names = os.listdir(self._root)
        except OSError:
            return []
        return sorted(
            name
            for name in names
            if valid_agent_id(name) and self.get(name) is not None
        )

    def _paths(self, agent_id: str) -> tuple[str, str, str]:
        """
        The agent's directory, metadata and budget override paths.  Only
        called with valid ids.
        """
        directory = os.path.join(self._root, agent_id)
        return (
            directory,
            os.path.join(directory, METADATA_FILE),
            os.path.join(directory, BUDGET_OVERRIDE_FILE),
        )

    def _recheck(
        self, agent_id: str, loaded: _Loaded | None, now: float
    ) -> AgentContext | None:
        """
        Stat the agent's files and reload them if their signature changed.
        """
        directory, metadata_path, override_path = self._paths(agent_id)
        metadata_signature = file_signature(metadata_path)
        if metadata_signature is None:
            self._forget(agent_id, directory, now)
            return None
        signature = (metadata_signature, file_signature(override_path))
        if loaded is not None and loaded.signature == signature:
            loaded.checked_at = now
            return loaded.context
        self._missing.pop(agent_id, None)
        reloaded = self._load(agent_id, directory, metadata_path, override_path, now)
        if reloaded is None:
            # Vanished between the stat and the open.
            self._forget(agent_id, directory, now)
            return None
        self._loaded[agent_id] = reloaded
        return reloaded.context

    def _forget(self, agent_id: str, directory: str, now: float) -> None:
        """
        Record that C{agent_id} has no metadata: drop its context, remember
        the miss, and warn once when its directory exists without metadata.
        """
        if self._loaded.pop(agent_id, None) is not None:
            self._log.info(
                "Agent context {agent_id} removed: its {file} is gone",
                agent_id=agent_id,
                file=METADATA_FILE,
            )
        directory_exists = os.path.isdir(directory)
        previous = self._missing.pop(agent_id, None)
        if directory_exists and (previous is None or not previous.directory_exists):
            self._log.warn(
                "Agent {agent_id} cannot authenticate: {file} is missing",
                agent_id=agent_id,
                file=METADATA_FILE,
            )
        self._missing[agent_id] = _Missing(directory_exists, now)
        while len(self._missing) > MAX_REMEMBERED_MISSES:
            self._missing.popitem(last=False)

    def _load(
        self,
        agent_id: str,
        directory: str,
        metadata_path: str,
        override_path: str,
        now: float,
    ) -> _Loaded | None:
        """
        Read the agent's files into a fresh cache entry; L{None} when
        C{metadata.json} does not exist.  Problems are logged here, which
        only runs when a file changed, so each problem is logged once.
        """
        metadata_signature: Signature = None
        try:
            metadata_signature, metadata = _read_json(metadata_path)
            if metadata_signature is None:
                return None
            if not isinstance(metadata, dict):
                raise _Unusable("is not a JSON object")
            secret = expected_secret(metadata.get("token"), agent_id)
            if secret is None:
                raise _Unusable(
                    "has no usable 'token' (missing, empty, not a string,"
                    " or naming another agent)"
                )
            model_policy = _optional_object(metadata, "model_policy")
            budget = _optional_object(metadata, "budget")
        except _Unusable as e:
            self._log.warn(
                "Agent {agent_id} cannot authenticate: {file} {problem}",
                agent_id=agent_id,
                file=METADATA_FILE,
                problem=str(e),
            )
            if metadata_signature is None:
                metadata_signature = file_signature(metadata_path)
            signature = (metadata_signature, file_signature(override_path))
            return _Loaded(None, signature, now)

        override_signature, budget = self._load_budget_override(
            agent_id, override_path, budget
        )
        context = AgentContext(
            agent_id=agent_id,
            path=directory,
            metadata=metadata,
            secret=secret,
            pod=metadata.get("pod"),
            service=metadata.get("service"),
            type=metadata.get("type"),
            ordinal=metadata.get("ordinal"),
            timezone=metadata.get("timezone"),
            model_policy=model_policy,
            budget=budget,
        )
        self._log.info("Agent context {agent_id} loaded", agent_id=agent_id)
        return _Loaded(context, (metadata_signature, override_signature), now)

    def _load_budget_override(
        self, agent_id: str, override_path: str, budget: dict | None
    ) -> tuple[Signature, dict | None]:
        """
        The budget after C{budget-override.json}, which replaces the
        metadata's budget as a whole.  A broken override is ignored (with a
        warning) rather than disabling the agent: the metadata's budget still
        applies.
        """
        try:
            signature, override = _read_json(override_path)
        except _Unusable as e:
            self._log.warn(
                "Agent {agent_id}: {file} ignored, it {problem}",
                agent_id=agent_id,
                file=BUDGET_OVERRIDE_FILE,
                problem=str(e),
            )
            return file_signature(override_path), budget
        if signature is None:
            return None, budget
        if not isinstance(override, dict):
            self._log.warn(
                "Agent {agent_id}: {file} ignored, it is not a JSON object",
                agent_id=agent_id,
                file=BUDGET_OVERRIDE_FILE,
            )
            return signature, budget
        return signature, override
