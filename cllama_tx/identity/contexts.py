"""
Agent contexts under C{CLAW_CONTEXT_ROOT}, loaded ahead of use.

Every context is read when the registry is built, and a watcher re-scans the
root in the background (two C{stat} calls per agent, files read only when
their (mtime, size, inode) signature changed), so a context added, changed
or removed while running takes effect within C{recheck_interval} without a
restart.  A request never touches the file system: it costs a dictionary
lookup and one hash of the presented secret, the same for a known agent, an
unknown one and a wrong secret, so neither the answer nor its timing tells
which agents exist.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterator
from typing import Any

import attrs
from twisted.application import service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from cllama_tx.identity.tokens import expected_secret, valid_agent_id
from cllama_tx.interfaces import IContextRegistry
from cllama_tx.store.jsonfile import Signature, UnreadableFile, file_signature, read_json_file

METADATA_FILE = "metadata.json"
BUDGET_OVERRIDE_FILE = "budget-override.json"

# A context file larger than this is refused rather than read: it is
# read on the reactor thread.
MAX_CONTEXT_FILE_BYTES = 1024 * 1024

_log = Logger()

#: Agents a background scan checks per reactor turn (two stat calls each,
#: about 10 us), so that a large root never holds the reactor for long.
SCAN_SLICE = 100


def _digest(secret: str) -> bytes:
    """
    What a secret is compared by: a fixed-length digest, so that the
    comparison takes the same time whatever the lengths of the presented
    and the expected secrets.
    """
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()


# Compared against when there is no context, so that an unknown agent costs
# the same as a wrong secret.  Random: no secret can match it.
_DUMMY_DIGEST = hashlib.sha256(os.urandom(32)).digest()


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
    A load of an existing C{metadata.json}: a context, or L{None} for the
    problem that prevents one, and the signature of the files it came from.
    """

    context: AgentContext | None
    signature: tuple[Signature, Signature]


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

    Building the registry loads every context; L{scan} (run by the
    L{ContextWatcher} of L{watcher} every C{recheck_interval} seconds of
    C{clock}) follows additions, changes and removals.  The lookups
    (L{authenticate}, L{get}, L{agent_ids}) only read memory.  Directory
    names are checked with L{valid_agent_id} before they become paths.
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
        # Every agent directory with a metadata.json, usable or not.
        self._loaded: dict[str, _Loaded] = {}
        # What requests see: the usable contexts and their secrets' digests.
        self._usable: dict[str, tuple[AgentContext, bytes]] = {}
        # Directories without metadata.json, warned about once.
        self._bare: set[str] = set()
        self._root_problem: str | None = None
        self.scan()

    def watcher(self) -> ContextWatcher:
        """The service that keeps this registry in line with the disk."""
        return ContextWatcher(self, self._clock, self._recheck_interval)

    # -- the request path: memory only

    def authenticate(self, agent_id: str, secret: str) -> AgentContext | None:
        """
        The agent's context when C{secret} is its secret, else L{None}.

        The same work for every answer: one lookup, one digest of the
        presented secret, one constant-time comparison (against a random
        digest when there is no such agent).
        """
        entry = self._usable.get(agent_id) if isinstance(agent_id, str) else None
        expected = _DUMMY_DIGEST if entry is None else entry[1]
        presented = _digest(secret if isinstance(secret, str) else "")
        if hmac.compare_digest(presented, expected) and entry is not None:
            return entry[0]
        return None

    def get(self, agent_id: str) -> AgentContext | None:
        """
        The current context of C{agent_id}, or L{None} when it has none that
        can be used.
        """
        entry = self._usable.get(agent_id) if isinstance(agent_id, str) else None
        return None if entry is None else entry[0]

    def agent_ids(self) -> list[str]:
        """The sorted ids of the agents with a usable context."""
        return sorted(self._usable)

    # -- loading: at start, then from the watcher

    def reload(self) -> None:
        """Read every context again, changed or not (operator reload)."""
        self.scan(force=True)

    def scan(self, force: bool = False) -> None:
        """
        Bring the registry in line with the root: load new and changed
        contexts (every context with C{force}), drop removed ones.  When the
        root cannot be listed (other than not existing), the contexts
        already loaded stay.
        """
        for _ in self.scan_slices(force):
            pass

    def scan_slices(self, force: bool = False, size: int | None = None) -> Iterator[None]:
        """
        L{scan}, pausing (yielding) after every C{size} agents (default
        L{SCAN_SLICE}), for a caller that spreads it over reactor turns.
        """
        size = size or SCAN_SLICE
        names = self._list_root()
        if names is None:
            return
        for done, agent_id in enumerate(names):
            if done and done % size == 0:
                yield None
            self._refresh(agent_id, force)
        for agent_id in [a for a in self._loaded if a not in names]:
            self._drop(agent_id, "its directory is gone")
        self._bare &= names

    def _list_root(self) -> set[str] | None:
        """The valid ids that name a directory under the root."""
        names: set[str] = set()
        try:
            with os.scandir(self._root) as entries:
                for entry in entries:
                    if valid_agent_id(entry.name) and _is_directory(entry):
                        names.add(entry.name)
        except (FileNotFoundError, NotADirectoryError):
            self._root_trouble("does not exist")
            return names
        except OSError as e:
            self._root_trouble(f"cannot be listed ({e.strerror or e.__class__.__name__})")
            return None
        if self._root_problem is not None:
            self._log.info("Context root {root} is readable again", root=self._root)
            self._root_problem = None
        return names

    def _root_trouble(self, problem: str) -> None:
        if problem != self._root_problem:
            self._log.warn("Context root {root} {problem}", root=self._root, problem=problem)
            self._root_problem = problem

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

    def _refresh(self, agent_id: str, force: bool) -> None:
        """
        Stat the agent's files and load them if their signature changed.
        """
        directory, metadata_path, override_path = self._paths(agent_id)
        metadata_signature = file_signature(metadata_path)
        if metadata_signature is None:
            self._drop(agent_id, f"its {METADATA_FILE} is gone")
            if agent_id not in self._bare:
                self._bare.add(agent_id)
                self._log.warn(
                    "Agent {agent_id} cannot authenticate: {file} is missing",
                    agent_id=agent_id,
                    file=METADATA_FILE,
                )
            return
        self._bare.discard(agent_id)
        signature = (metadata_signature, file_signature(override_path))
        loaded = self._loaded.get(agent_id)
        if not force and loaded is not None and loaded.signature == signature:
            return
        reloaded = self._load(agent_id, directory, metadata_path, override_path)
        if reloaded is None:
            # Vanished between the stat and the open: the next scan sees it.
            self._drop(agent_id, f"its {METADATA_FILE} is gone")
            return
        self._loaded[agent_id] = reloaded
        context = reloaded.context
        if context is None:
            self._usable.pop(agent_id, None)
        else:
            self._usable[agent_id] = (context, _digest(context.secret))

    def _drop(self, agent_id: str, reason: str) -> None:
        """Forget C{agent_id}'s context, if it had one."""
        loaded = self._loaded.pop(agent_id, None)
        self._usable.pop(agent_id, None)
        if loaded is not None:
            self._log.info("Agent context {agent_id} removed: {reason}", agent_id=agent_id, reason=reason)

    def _load(
        self,
        agent_id: str,
        directory: str,
        metadata_path: str,
        override_path: str,
    ) -> _Loaded | None:
        """
        Read the agent's files into a fresh entry; L{None} when
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
            return _Loaded(None, signature)

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
        return _Loaded(context, (metadata_signature, override_signature))

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


def _is_directory(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


class ContextWatcher(service.Service):
    """
    Re-scans a L{ContextRegistry}'s root every C{interval} seconds, off the
    request path, so that a context added while running is loaded before
    its agent's first request and not by it.  A scan runs in slices of
    L{SCAN_SLICE} agents, one per reactor turn; the next starts
    C{interval} seconds after one ends.
    """

    def __init__(self, registry: ContextRegistry, clock: IReactorTime, interval: float) -> None:
        self._registry = registry
        self._clock = clock
        self._interval = interval
        self._loop: LoopingCall | None = None
        self._next_slice: IDelayedCall | None = None

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self._scan)
        self._loop.clock = self._clock
        self._loop.start(self._interval, now=True)

    def stopService(self):
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._next_slice is not None and self._next_slice.active():
            self._next_slice.cancel()
        self._next_slice = None
        return super().stopService()

    def _scan(self) -> Deferred:
        """One scan, slice by slice; fires when it is over."""
        done: Deferred = Deferred()
        slices: Iterator[None] | None = None

        def step() -> None:
            nonlocal slices
            self._next_slice = None
            try:
                if slices is None:
                    slices = self._registry.scan_slices()
                next(slices)
            except StopIteration:
                done.callback(None)
                return
            except Exception:
                # A failing scan must not stop the loop: the next may succeed.
                _log.failure("Scanning the agent contexts failed")
                done.callback(None)
                return
            self._next_slice = self._clock.callLater(0, step)

        step()
        return done
