"""
Tests for L{cllama_tx.identity.contexts}: agent contexts on disk, loaded
ahead of use and kept in line with the disk by a watcher.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import time
from collections.abc import Callable
from typing import Any

from twisted.internet.task import Clock
from twisted.logger import Logger, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from cllama_tx.identity import contexts
from cllama_tx.identity.contexts import AgentContext, ContextRegistry, ContextWatcher
from cllama_tx.interfaces import IContextRegistry

SECRET = "0123456789abcdef0123456789abcdef0123456789abcdef"
OTHER_SECRET = "fedcba9876543210fedcba9876543210fedcba9876543210"
# Distinctive, so a leak into a log or repr is easy to spot.
LEAKY_SECRET = "TOPSECRETVALUE"


def write_json(path: str, value: Any) -> None:
    with open(path, "w") as f:
        json.dump(value, f)


def bump_mtime(path: str, seconds: int = 10) -> None:
    """
    Move the file's mtime forward, so a change is seen even when the rewrite
    happened within the file system's timestamp granularity.
    """
    st = os.stat(path)
    new = st.st_mtime_ns + seconds * 1_000_000_000
    os.utime(path, ns=(new, new))


class RegistryTestsMixin:
    """
    Helpers: a temporary context root, a clock, a collecting logger, and a
    registry whose watcher runs on that clock.
    """

    def setUp(self) -> None:
        self.root = self.mktemp()  # type: ignore[attr-defined]
        os.makedirs(self.root)
        self.clock = Clock()
        self.events: list[dict] = []
        self.registry = ContextRegistry(
            self.root,
            self.clock,
            recheck_interval=1.0,
            log=Logger(observer=self.events.append),
        )
        self.watcher = self.registry.watcher()
        self.watcher.startService()
        self.addCleanup(self.watcher.stopService)  # type: ignore[attr-defined]

    def tick(self) -> None:
        """One recheck interval: the watcher scans the root."""
        self.clock.advance(1.0)

    def make_agent(
        self,
        agent_id: str,
        token: Any = None,
        root: str | None = None,
        tick: bool = True,
        **fields: Any,
    ) -> str:
        """
        Write C{<root>/<agent_id>/metadata.json} and return the directory;
        with C{tick}, let the watcher see it.
        """
        directory = os.path.join(root or self.root, agent_id)
        os.makedirs(directory, exist_ok=True)
        metadata = {"token": f"{agent_id}:{SECRET}" if token is None else token}
        metadata.update(fields)
        write_json(os.path.join(directory, "metadata.json"), metadata)
        if tick:
            self.tick()
        return directory

    def warnings(self) -> list[dict]:
        return [e for e in self.events if e["log_level"].name == "warn"]

    def assertNoSecretLogged(self, *secrets: str) -> None:
        for event in self.events:
            text = formatEvent(event) + repr(event)
            for secret in secrets:
                self.assertNotIn(secret, text)  # type: ignore[attr-defined]

    def count_calls(self, name: str) -> list[tuple]:
        """
        Wrap the module-level function C{name} of L{contexts} and return the
        list its calls are recorded in.
        """
        calls: list[tuple] = []
        original: Callable = getattr(contexts, name)

        def wrapper(*args: Any) -> Any:
            calls.append(args)
            return original(*args)

        self.patch(contexts, name, wrapper)  # type: ignore[attr-defined]
        return calls

    def forbid_disk(self) -> None:
        """
        Make every file system access of the registry fail the test.
        """

        def boom(*args: Any) -> Any:
            raise AssertionError(f"touched the disk: {args!r}")

        for name in ["file_signature", "_read_json"]:
            self.patch(contexts, name, boom)  # type: ignore[attr-defined]
        for name in ["stat", "open", "listdir", "scandir", "lstat", "fstat", "read"]:
            self.patch(contexts.os, name, boom)  # type: ignore[attr-defined]
        for name in ["isdir", "exists", "isfile"]:
            self.patch(contexts.os.path, name, boom)  # type: ignore[attr-defined]


class AgentContextTests(SynchronousTestCase):
    """
    L{AgentContext} never shows its secret.
    """

    def test_repr_hides_secret(self) -> None:
        context = AgentContext(
            agent_id="alice",
            path="/claw/context/alice",
            metadata={"token": "alice:" + LEAKY_SECRET, "pod": "p"},
            secret=LEAKY_SECRET,
            pod="p",
        )
        self.assertEqual(context.secret, LEAKY_SECRET)
        self.assertNotIn("TOPSECRET", repr(context))
        self.assertNotIn("TOPSECRET", str(context))
        self.assertNotIn("TOPSECRET", f"{context!r} {context}")
        self.assertIn("alice", repr(context))

    def test_defaults(self) -> None:
        context = AgentContext(agent_id="a", path="/x/a", metadata={}, secret="s")
        for name in [
            "pod",
            "service",
            "type",
            "ordinal",
            "timezone",
            "model_policy",
            "budget",
        ]:
            self.assertIsNone(getattr(context, name))

    def test_frozen(self) -> None:
        context = AgentContext(agent_id="a", path="/x/a", metadata={}, secret="s")
        self.assertRaises(AttributeError, setattr, context, "secret", "t")


class AuthenticateTests(RegistryTestsMixin, SynchronousTestCase):
    """
    L{ContextRegistry.authenticate} and L{ContextRegistry.get}.
    """

    def test_provides_interface(self) -> None:
        self.assertTrue(verifyObject(IContextRegistry, self.registry))

    def test_authenticate(self) -> None:
        directory = self.make_agent(
            "alice",
            pod="pod-1",
            service="svc",
            type="openclaw",
            ordinal=2,
            timezone="Europe/Paris",
            model_policy={"mode": "clamp", "allowed": []},
            budget={"limit_usd": 5, "window": "24h", "behavior": "hard_stop"},
        )
        context = self.registry.authenticate("alice", SECRET)
        self.assertIsInstance(context, AgentContext)
        assert context is not None
        self.assertEqual(context.agent_id, "alice")
        self.assertEqual(context.path, directory)
        self.assertEqual(context.secret, SECRET)
        self.assertEqual(context.pod, "pod-1")
        self.assertEqual(context.service, "svc")
        self.assertEqual(context.type, "openclaw")
        self.assertEqual(context.ordinal, 2)
        self.assertEqual(context.timezone, "Europe/Paris")
        self.assertEqual(context.model_policy, {"mode": "clamp", "allowed": []})
        self.assertEqual(
            context.budget, {"limit_usd": 5, "window": "24h", "behavior": "hard_stop"}
        )
        self.assertEqual(context.metadata["pod"], "pod-1")
        self.assertIs(self.registry.get("alice"), context)
        self.assertNoSecretLogged(SECRET)

    def test_optional_fields_absent(self) -> None:
        self.make_agent("alice")
        context = self.registry.get("alice")
        assert context is not None
        for name in [
            "pod",
            "service",
            "type",
            "ordinal",
            "timezone",
            "model_policy",
            "budget",
        ]:
            self.assertIsNone(getattr(context, name), name)

    def test_token_forms(self) -> None:
        """
        C{agent:secret}, C{Bearer agent:secret} and a bare secret all work.
        """
        self.make_agent("a1", token="a1:" + SECRET)
        self.make_agent("a2", token="bearer a2:" + SECRET)
        self.make_agent("a3", token=SECRET)
        self.make_agent("a4", token="a4:x:y")
        for agent_id in ["a1", "a2", "a3"]:
            self.assertIsNotNone(self.registry.authenticate(agent_id, SECRET), agent_id)
        self.assertIsNotNone(self.registry.authenticate("a4", "x:y"))

    def test_token_names_other_agent(self) -> None:
        """
        A context whose token names another agent does not authenticate,
        under either name, and says so in the log (without the secret).
        """
        self.make_agent("alice", token="bob:" + LEAKY_SECRET)
        self.assertIsNone(self.registry.authenticate("alice", LEAKY_SECRET))
        self.assertIsNone(self.registry.authenticate("bob", LEAKY_SECRET))
        self.assertEqual(len(self.warnings()), 1)
        self.assertIn("token", formatEvent(self.warnings()[0]))
        self.assertNoSecretLogged(LEAKY_SECRET)

    def test_wrong_secret(self) -> None:
        self.make_agent("alice")
        self.assertIsNone(self.registry.authenticate("alice", OTHER_SECRET))
        self.assertIsNone(self.registry.authenticate("alice", SECRET[:-1]))
        self.assertIsNone(self.registry.authenticate("alice", ""))
        self.assertIsNotNone(self.registry.authenticate("alice", SECRET))

    def test_unknown_agent(self) -> None:
        self.make_agent("alice")
        self.assertIsNone(self.registry.authenticate("bob", SECRET))
        self.assertIsNone(self.registry.get("bob"))
        # An unknown id is not worth a warning: anyone can send one.
        self.assertEqual(self.warnings(), [])

    def test_same_comparison_for_unknown_and_wrong(self) -> None:
        """
        Unknown agents, invalid ids and wrong secrets all go through one
        digest of the presented secret and one constant-time comparison of
        two digests of the same length, the first two against the dummy.
        """
        self.make_agent("alice")
        digests = self.count_calls("_digest")
        compared: list[tuple[bytes, bytes]] = []
        real_compare = contexts.hmac.compare_digest

        class CountingHmac:
            @staticmethod
            def compare_digest(a: bytes, b: bytes) -> bool:
                compared.append((a, b))
                return real_compare(a, b)

        self.patch(contexts, "hmac", CountingHmac)
        self.assertIsNone(self.registry.authenticate("bob", OTHER_SECRET))
        self.assertIsNone(self.registry.authenticate("../etc", OTHER_SECRET))
        self.assertIsNone(self.registry.authenticate("alice", OTHER_SECRET))
        self.assertIsNotNone(self.registry.authenticate("alice", SECRET))
        self.assertEqual(digests, [(OTHER_SECRET,), (OTHER_SECRET,), (OTHER_SECRET,), (SECRET,)])
        dummy = contexts._DUMMY_DIGEST
        alice = contexts._digest(SECRET)
        other = contexts._digest(OTHER_SECRET)
        self.assertEqual(compared, [(other, dummy), (other, dummy), (other, alice), (alice, alice)])
        self.assertEqual(len(dummy), len(alice))

    def test_dummy_digest_is_no_secret(self) -> None:
        """The dummy is random: not the digest of an empty or zero secret."""
        for guess in ["", "0" * 48, "dummy"]:
            self.assertNotEqual(contexts._DUMMY_DIGEST, contexts._digest(guess))
            self.assertIsNone(self.registry.authenticate("bob", guess))

    def test_secret_of_any_length(self) -> None:
        """Operators' secrets need not be 48 characters."""
        self.make_agent("short", token="s")
        self.make_agent("long", token="x" * 500)
        self.assertIsNotNone(self.registry.authenticate("short", "s"))
        self.assertIsNotNone(self.registry.authenticate("long", "x" * 500))
        self.assertIsNone(self.registry.authenticate("long", "x" * 499))
        self.assertIsNone(self.registry.authenticate("short", None))  # type: ignore[arg-type]

    def test_root_missing(self) -> None:
        registry = ContextRegistry(
            os.path.join(self.root, "nope"),
            self.clock,
            log=Logger(observer=lambda e: None),
        )
        self.assertIsNone(registry.authenticate("alice", SECRET))
        self.assertIsNone(registry.get("alice"))
        self.assertEqual(registry.agent_ids(), [])

    def test_default_logger(self) -> None:
        """
        Without a logger the registry makes its own.
        """
        self.make_agent("alice")
        registry = ContextRegistry(self.root, self.clock)
        self.assertIsNotNone(registry.authenticate("alice", SECRET))


class InvalidAgentIdTests(RegistryTestsMixin, SynchronousTestCase):
    """
    Invalid agent ids are refused before any path is built from them.
    """

    INVALID = ["../etc", "a/b", ".hidden", "", "..", "-x", "A" * 129, "a\x00b"]

    def test_no_disk_access(self) -> None:
        self.forbid_disk()
        for agent_id in self.INVALID:
            self.assertIsNone(self.registry.authenticate(agent_id, SECRET), agent_id)
            self.assertIsNone(self.registry.get(agent_id), agent_id)

    def test_never_authenticate_even_when_the_path_holds_a_context(self) -> None:
        """
        Each invalid id would reach a usable context if it were joined to the
        root; it still does not authenticate.
        """
        outside = os.path.dirname(os.path.abspath(self.root))
        self.make_agent("etc", token=SECRET, root=outside)
        self.make_agent(os.path.join("a", "b"), token=SECRET)
        self.make_agent(".hidden", token=SECRET)
        self.make_agent("A" * 129, token=SECRET)
        for agent_id in ["../etc", "a/b", ".hidden", "A" * 129]:
            self.assertIsNone(self.registry.authenticate(agent_id, SECRET), agent_id)

    def test_longest_valid_id(self) -> None:
        """
        128 characters is still an id.
        """
        self.make_agent("A" * 128, token=SECRET)
        self.assertIsNotNone(self.registry.authenticate("A" * 128, SECRET))

    def test_not_a_string(self) -> None:
        self.make_agent("alice")
        self.forbid_disk()
        not_a_string: Any = None
        self.assertIsNone(self.registry.authenticate(not_a_string, SECRET))
        self.assertIsNone(self.registry.get(b"alice"))  # type: ignore[arg-type]
        self.assertIsNone(self.registry.get(["alice"]))  # type: ignore[arg-type]


class PreloadTests(RegistryTestsMixin, SynchronousTestCase):
    """
    Contexts are loaded ahead of use: at construction and by the watcher.
    A request never touches the disk, so a known agent's first request
    costs what an unknown agent's does.
    """

    def test_loaded_at_construction(self) -> None:
        self.make_agent("alice", tick=False)
        self.make_agent("bob", tick=False, token=OTHER_SECRET)
        registry = ContextRegistry(self.root, self.clock, log=Logger(observer=self.events.append))
        self.forbid_disk()
        self.assertEqual(registry.agent_ids(), ["alice", "bob"])
        self.assertIsNotNone(registry.authenticate("alice", SECRET))
        self.assertIsNotNone(registry.authenticate("bob", OTHER_SECRET))
        self.assertIsNone(registry.authenticate("carol", SECRET))

    def test_first_request_does_no_io(self) -> None:
        """
        The first request of an agent, known or not, right or wrong, reads
        no file and stats nothing.
        """
        self.make_agent("alice")
        self.forbid_disk()
        self.assertIsNone(self.registry.authenticate("alice", OTHER_SECRET))
        self.assertIsNone(self.registry.authenticate("ghost", SECRET))
        self.assertIsNotNone(self.registry.authenticate("alice", SECRET))
        self.assertIsNotNone(self.registry.get("alice"))
        self.assertIsNone(self.registry.get("ghost"))
        self.assertEqual(self.registry.agent_ids(), ["alice"])

    def test_unknown_ids_keep_nothing(self) -> None:
        """A flood of made-up ids costs no disk access and no memory."""
        self.make_agent("alice")
        self.forbid_disk()
        for i in range(1000):
            self.assertIsNone(self.registry.authenticate(f"ghost{i}", SECRET))
        self.assertEqual(list(self.registry._loaded), ["alice"])
        self.assertEqual(list(self.registry._usable), ["alice"])

    def test_new_agent_loaded_by_the_watcher(self) -> None:
        """
        A context added while running is loaded by the next scan, not by
        its agent's request.
        """
        self.make_agent("bob", tick=False)
        reads = self.count_calls("_read_json")
        self.assertIsNone(self.registry.authenticate("bob", SECRET))
        self.assertEqual(reads, [])
        self.clock.advance(0.5)
        self.assertIsNone(self.registry.authenticate("bob", SECRET))
        self.clock.advance(0.5)
        self.assertEqual(len(reads), 2)  # metadata.json, budget-override.json
        self.assertIsNotNone(self.registry.authenticate("bob", SECRET))
        self.assertEqual(len(reads), 2)

    def test_scan_stats_but_does_not_read_unchanged(self) -> None:
        directory = self.make_agent("alice")
        stats = self.count_calls("file_signature")
        reads = self.count_calls("_read_json")
        self.tick()
        self.assertEqual(
            sorted(args[0] for args in stats),
            [
                os.path.join(directory, "budget-override.json"),
                os.path.join(directory, "metadata.json"),
            ],
        )
        self.assertEqual(reads, [])
        # Nothing between scans.
        del stats[:]
        self.clock.advance(0.5)
        for _ in range(100):
            self.registry.authenticate("alice", SECRET)
        self.assertEqual(stats, [])

    def test_reload_after_change(self) -> None:
        directory = self.make_agent("alice", pod="one")
        self.assertIsNotNone(self.registry.authenticate("alice", SECRET))
        metadata = os.path.join(directory, "metadata.json")
        write_json(metadata, {"token": "alice:" + OTHER_SECRET, "pod": "two"})
        bump_mtime(metadata)

        # Until the next scan, the loaded context still answers.
        self.clock.advance(0.5)
        self.assertIsNotNone(self.registry.authenticate("alice", SECRET))
        self.assertIsNone(self.registry.authenticate("alice", OTHER_SECRET))

        self.clock.advance(0.5)
        self.assertIsNone(self.registry.authenticate("alice", SECRET))
        context = self.registry.authenticate("alice", OTHER_SECRET)
        assert context is not None
        self.assertEqual(context.pod, "two")

    def test_reload_after_atomic_replace(self) -> None:
        """
        A file replaced by rename with the same size and mtime is still seen
        as changed (by its inode).
        """
        directory = self.make_agent("alice", token="alice:" + SECRET)
        metadata = os.path.join(directory, "metadata.json")
        before = os.stat(metadata)
        temporary = metadata + ".tmp"
        write_json(temporary, {"token": "alice:" + OTHER_SECRET})
        os.utime(temporary, ns=(before.st_atime_ns, before.st_mtime_ns))
        os.replace(temporary, metadata)
        after = os.stat(metadata)
        self.assertEqual(
            (after.st_size, after.st_mtime_ns), (before.st_size, before.st_mtime_ns)
        )

        self.tick()
        self.assertIsNotNone(self.registry.authenticate("alice", OTHER_SECRET))

    def test_operator_reload_rereads_everything(self) -> None:
        self.make_agent("alice")
        self.make_agent("bob")
        reads = self.count_calls("_read_json")
        self.registry.reload()
        self.assertEqual(len(reads), 4)
        self.assertEqual(self.registry.agent_ids(), ["alice", "bob"])

    def test_removed_metadata_drops_agent(self) -> None:
        directory = self.make_agent("alice")
        self.assertIsNotNone(self.registry.authenticate("alice", SECRET))
        os.remove(os.path.join(directory, "metadata.json"))
        self.tick()
        self.assertIsNone(self.registry.authenticate("alice", SECRET))
        self.assertIsNone(self.registry.get("alice"))
        self.assertEqual(self.registry.agent_ids(), [])

    def test_removed_directory_drops_agent(self) -> None:
        directory = self.make_agent("alice")
        self.assertIsNotNone(self.registry.get("alice"))
        shutil.rmtree(directory)
        self.tick()
        self.assertIsNone(self.registry.authenticate("alice", SECRET))
        self.assertEqual(self.registry._loaded, {})
        # It may come back later.
        self.make_agent("alice", token="alice:" + OTHER_SECRET)
        self.assertIsNotNone(self.registry.authenticate("alice", OTHER_SECRET))

    def test_root_appears_later(self) -> None:
        root = os.path.join(self.root, "later")
        registry = ContextRegistry(root, self.clock, log=Logger(observer=self.events.append))
        self.assertEqual(registry.agent_ids(), [])
        self.assertEqual(len(self.warnings()), 1)
        self.assertIn("does not exist", formatEvent(self.warnings()[0]))
        self.make_agent("alice", root=root, tick=False)
        registry.scan()
        self.assertIsNotNone(registry.authenticate("alice", SECRET))
        registry.scan()
        self.assertEqual(len(self.warnings()), 1)

    def test_unlistable_root_keeps_contexts(self) -> None:
        """
        A root that cannot be listed for a while (not one that is gone)
        leaves the loaded contexts in force, with one warning.
        """
        self.make_agent("alice")

        def refuse(path: str) -> Any:
            raise PermissionError(13, "Permission denied", path)

        self.patch(contexts.os, "scandir", refuse)
        for _ in range(3):
            self.tick()
        self.assertIsNotNone(self.registry.authenticate("alice", SECRET))
        self.assertEqual(len(self.warnings()), 1)
        self.assertIn("cannot be listed", formatEvent(self.warnings()[0]))


class WatcherTests(RegistryTestsMixin, SynchronousTestCase):
    """
    L{ContextWatcher}: scans at start and every interval, survives a
    failing scan, stops with its service.
    """

    def test_scans_at_start_and_every_interval(self) -> None:
        clock = Clock()
        registry = ContextRegistry(self.root, clock, recheck_interval=5.0)
        scans: list[bool] = []

        def scan_slices(force: bool = False) -> Any:
            scans.append(force)
            return iter(())

        self.patch(registry, "scan_slices", scan_slices)
        watcher = registry.watcher()
        self.assertIsInstance(watcher, ContextWatcher)
        watcher.startService()
        self.assertEqual(scans, [False])
        clock.advance(4.9)
        self.assertEqual(len(scans), 1)
        clock.advance(0.1)
        self.assertEqual(len(scans), 2)
        watcher.stopService()
        clock.advance(50)
        self.assertEqual(len(scans), 2)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_failing_scan_is_logged_and_the_loop_goes_on(self) -> None:
        failures: list[dict] = []
        from twisted.logger import globalLogPublisher

        globalLogPublisher.addObserver(failures.append)
        self.addCleanup(globalLogPublisher.removeObserver, failures.append)
        original = self.registry.scan_slices
        calls = []

        def flaky(force: bool = False) -> Any:
            calls.append(force)
            if len(calls) == 1:
                raise OSError("disk on fire")
            return original(force)

        self.patch(self.registry, "scan_slices", flaky)
        self.tick()
        self.make_agent("alice")
        self.assertEqual(len(calls), 2)
        self.assertIsNotNone(self.registry.authenticate("alice", SECRET))
        logged = [e for e in failures if "log_failure" in e]
        self.assertEqual(len(logged), 1)
        self.assertIn("disk on fire", str(logged[0]["log_failure"].value))
        self.flushLoggedErrors(OSError)


class SliceTests(RegistryTestsMixin, SynchronousTestCase):
    """
    The watcher's scan checks L{contexts.SCAN_SLICE} agents per reactor
    turn, so a large root never holds the reactor for a whole scan.
    """

    def test_one_slice_per_turn(self) -> None:
        self.patch(contexts, "SCAN_SLICE", 10)
        for i in range(25):
            self.make_agent(f"agent{i:02d}", tick=False)
        refreshed: list[int] = []
        turns = [0]
        original = self.registry._refresh

        def refresh(agent_id: str, force: bool) -> None:
            refreshed.append(turns[0])
            original(agent_id, force)

        self.patch(self.registry, "_refresh", refresh)
        real_call_later = self.clock.callLater

        def call_later(delay: float, f: Any, *args: Any, **kwargs: Any) -> Any:
            if delay == 0:
                turns[0] += 1
            return real_call_later(delay, f, *args, **kwargs)

        self.patch(self.clock, "callLater", call_later)
        self.tick()
        self.assertEqual([refreshed.count(turn) for turn in range(3)], [10, 10, 5])
        self.assertEqual(len(self.registry.agent_ids()), 25)
        # The next scan starts an interval after this one ended.
        del refreshed[:]
        self.clock.advance(0.99)
        self.assertEqual(refreshed, [])
        self.clock.advance(0.01)
        self.assertEqual(len(refreshed), 25)

    def test_stop_between_slices(self) -> None:
        """A scan cut by the service's stop leaves no call behind."""
        self.patch(contexts, "SCAN_SLICE", 1)
        for i in range(3):
            self.make_agent(f"agent{i}", tick=False)
        clock = Clock()
        watcher = ContextWatcher(self.registry, clock, 1.0)
        watcher.startService()
        self.assertTrue(clock.getDelayedCalls())
        watcher.stopService()
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_synchronous_scan_is_whole(self) -> None:
        self.patch(contexts, "SCAN_SLICE", 2)
        for i in range(5):
            self.make_agent(f"agent{i}", tick=False)
        self.registry.scan()
        self.assertEqual(len(self.registry.agent_ids()), 5)
        self.assertEqual(len(list(self.registry.scan_slices(size=2))), 2)


class TimingTests(SynchronousTestCase):
    """
    The first request of an existing agent costs what a missing agent's
    does (issue: 153 us apart before contexts were loaded ahead).
    """

    def test_known_first_request_costs_what_unknown_costs(self) -> None:
        root = self.mktemp()
        os.makedirs(root)
        agents = [f"agent{i:03d}" for i in range(300)]
        for agent_id in agents:
            os.makedirs(os.path.join(root, agent_id))
            write_json(os.path.join(root, agent_id, "metadata.json"), {"token": f"{agent_id}:{SECRET}"})
        registry = ContextRegistry(root, Clock(), log=Logger(observer=lambda e: None))
        known, unknown = [], []
        clock = time.perf_counter_ns
        for i, agent_id in enumerate(agents):
            # Interleaved, each agent's first request, a wrong secret both ways.
            for name, into in ((agent_id, known), (f"ghost{i:03d}", unknown)):
                start = clock()
                registry.authenticate(name, OTHER_SECRET)
                into.append(clock() - start)
        gap_us = (statistics.median(known) - statistics.median(unknown)) / 1000
        # Before: a first request read two files (~150 us); now both are a
        # lookup and a digest (a microsecond or two on a busy machine).
        self.assertLess(abs(gap_us), 5, (statistics.median(known), statistics.median(unknown)))


class BudgetOverrideTests(RegistryTestsMixin, SynchronousTestCase):
    """
    C{budget-override.json} replaces the metadata's budget as a whole.
    """

    BUDGET = {"limit_usd": 5, "window": "24h", "behavior": "hard_stop"}

    def budget(self, agent_id: str = "alice") -> dict | None:
        context = self.registry.get(agent_id)
        assert context is not None
        return context.budget

    def test_replaces_whole_budget(self) -> None:
        directory = self.make_agent("alice", budget=self.BUDGET)
        override = os.path.join(directory, "budget-override.json")
        write_json(override, {"max_requests": 10})
        self.tick()
        context = self.registry.get("alice")
        assert context is not None
        self.assertEqual(context.budget, {"max_requests": 10})
        # The metadata itself is left as it was on disk.
        self.assertEqual(context.metadata["budget"], self.BUDGET)

    def test_without_metadata_budget(self) -> None:
        directory = self.make_agent("alice")
        write_json(os.path.join(directory, "budget-override.json"), {"window": "1h"})
        self.tick()
        context = self.registry.get("alice")
        assert context is not None
        self.assertEqual(context.budget, {"window": "1h"})

    def test_override_added_changed_removed(self) -> None:
        directory = self.make_agent("alice", budget=self.BUDGET)
        override = os.path.join(directory, "budget-override.json")
        self.assertEqual(self.budget(), self.BUDGET)

        write_json(override, {"max_requests": 1})
        self.clock.advance(1.0)
        self.assertEqual(self.budget(), {"max_requests": 1})

        write_json(override, {"max_requests": 2})
        bump_mtime(override)
        self.clock.advance(1.0)
        self.assertEqual(self.budget(), {"max_requests": 2})

        os.remove(override)
        self.clock.advance(1.0)
        self.assertEqual(self.budget(), self.BUDGET)

    def test_broken_override_ignored(self) -> None:
        """
        An override that is not a JSON object leaves the metadata's budget in
        force and the agent usable, with one warning per change.
        """
        directory = self.make_agent("alice", budget=self.BUDGET)
        override = os.path.join(directory, "budget-override.json")
        for content in ["[1, 2]", "{not json", '"text"', "\xff"]:
            with open(override, "w", encoding="latin-1") as f:
                f.write(content)
            bump_mtime(override)
            del self.events[:]
            self.clock.advance(1.0)
            context = self.registry.authenticate("alice", SECRET)
            assert context is not None, content
            self.assertEqual(context.budget, self.BUDGET)
            self.assertEqual(len(self.warnings()), 1, content)
            self.assertIn("budget-override.json", formatEvent(self.warnings()[0]))

    def test_budget_not_an_object(self) -> None:
        """
        A metadata budget of the wrong type disables the agent instead of
        silently lifting its budget.
        """
        self.make_agent("alice", budget="5 dollars")
        self.assertIsNone(self.registry.authenticate("alice", SECRET))
        self.assertEqual(len(self.warnings()), 1)
        self.assertIn("budget", formatEvent(self.warnings()[0]))

    def test_model_policy_not_an_object(self) -> None:
        self.make_agent("alice", model_policy=["openai/gpt-4o"])
        self.assertIsNone(self.registry.authenticate("alice", SECRET))
        self.assertEqual(len(self.warnings()), 1)
        self.assertIn("model_policy", formatEvent(self.warnings()[0]))


class BrokenMetadataTests(RegistryTestsMixin, SynchronousTestCase):
    """
    An agent with unusable metadata does not authenticate, and that is
    logged once per change, never with the secret.
    """

    def write_metadata(self, agent_id: str, content: str | bytes) -> str:
        directory = os.path.join(self.root, agent_id)
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, "metadata.json")
        with open(path, "wb") as f:
            f.write(content if isinstance(content, bytes) else content.encode())
        return path

    def assertBroken(self, content: str | bytes, secret: str = LEAKY_SECRET) -> None:
        del self.events[:]
        path = self.write_metadata("alice", content)
        bump_mtime(path)
        self.clock.advance(1.0)
        self.assertIsNone(self.registry.authenticate("alice", secret), content)
        self.assertIsNone(self.registry.get("alice"))
        warnings = self.warnings()
        self.assertEqual(len(warnings), 1, (content, self.events))
        self.assertEqual(warnings[0]["agent_id"], "alice")
        self.assertNoSecretLogged(LEAKY_SECRET)

    def test_not_json(self) -> None:
        self.assertBroken('{"token": "alice:' + LEAKY_SECRET + '"')
        self.assertBroken("alice:" + LEAKY_SECRET)

    def test_not_utf8(self) -> None:
        self.assertBroken(b'{"token": "alice:' + LEAKY_SECRET.encode() + b'\xff"}')

    def test_not_an_object(self) -> None:
        self.assertBroken(json.dumps(["alice:" + LEAKY_SECRET]))
        self.assertBroken(json.dumps("alice:" + LEAKY_SECRET))
        self.assertBroken("null")

    def test_no_usable_token(self) -> None:
        self.assertBroken(json.dumps({"pod": "p"}))
        self.assertBroken(json.dumps({"token": ""}), secret="")
        self.assertBroken(json.dumps({"token": None}))
        self.assertBroken(json.dumps({"token": 12345}), secret="12345")
        self.assertBroken(json.dumps({"token": "bob:" + LEAKY_SECRET}))
        self.assertBroken(json.dumps({"token": "alice:"}), secret="")

    def test_metadata_is_a_directory(self) -> None:
        os.makedirs(os.path.join(self.root, "alice", "metadata.json"))
        self.tick()
        self.assertIsNone(self.registry.authenticate("alice", SECRET))
        self.assertEqual(len(self.warnings()), 1)

    def test_metadata_is_a_fifo(self) -> None:
        """
        A FIFO is refused without blocking the reactor on its open or read.
        """
        if not hasattr(os, "mkfifo"):
            raise self.skipTest("no FIFOs here")
        os.makedirs(os.path.join(self.root, "alice"))
        os.mkfifo(os.path.join(self.root, "alice", "metadata.json"))
        self.tick()
        self.assertIsNone(self.registry.authenticate("alice", SECRET))
        self.assertEqual(len(self.warnings()), 1)
        self.assertIn("regular file", formatEvent(self.warnings()[0]))

    def test_too_large(self) -> None:
        self.patch(contexts, "MAX_CONTEXT_FILE_BYTES", 64)
        self.assertBroken(json.dumps({"token": "alice:" + LEAKY_SECRET, "x": "y" * 64}))

    def test_unreadable(self) -> None:
        """
        A metadata file that cannot be opened (say, wrong permissions) is
        reported, without the file system error taking the registry down.
        """
        path = self.write_metadata("alice", json.dumps({"token": "alice:" + SECRET}))
        original_open = os.open

        def refuse(name: str, *args: Any) -> int:
            if name == path:
                raise PermissionError(13, "Permission denied", name)
            return original_open(name, *args)

        self.patch(contexts.os, "open", refuse)
        self.tick()
        self.assertIsNone(self.registry.authenticate("alice", SECRET))
        self.assertEqual(len(self.warnings()), 1)
        self.assertIn("EACCES", formatEvent(self.warnings()[0]))

    def test_missing_metadata_in_existing_directory(self) -> None:
        os.makedirs(os.path.join(self.root, "alice"))
        self.tick()
        self.assertIsNone(self.registry.authenticate("alice", SECRET))
        self.assertEqual(len(self.warnings()), 1)
        self.assertIn("missing", formatEvent(self.warnings()[0]))
        for _ in range(3):
            self.clock.advance(1.0)
            self.assertIsNone(self.registry.authenticate("alice", SECRET))
        self.assertEqual(len(self.warnings()), 1)

    def test_warned_once_per_change(self) -> None:
        path = self.write_metadata("alice", "{broken")
        for _ in range(5):
            self.assertIsNone(self.registry.authenticate("alice", SECRET))
            self.clock.advance(1.0)
        self.assertEqual(len(self.warnings()), 1)

        # Edited but still broken: one more warning.
        with open(path, "w") as f:
            f.write("{still broken")
        bump_mtime(path)
        for _ in range(5):
            self.assertIsNone(self.registry.authenticate("alice", SECRET))
            self.clock.advance(1.0)
        self.assertEqual(len(self.warnings()), 2)

    def test_fixed_metadata_authenticates(self) -> None:
        path = self.write_metadata("alice", "{broken")
        self.assertIsNone(self.registry.authenticate("alice", SECRET))
        write_json(path, {"token": "alice:" + SECRET})
        bump_mtime(path)
        self.clock.advance(1.0)
        self.assertIsNotNone(self.registry.authenticate("alice", SECRET))

    def test_loaded_context_repr_hides_secret(self) -> None:
        self.make_agent("alice", token="alice:" + LEAKY_SECRET)
        context = self.registry.authenticate("alice", LEAKY_SECRET)
        assert context is not None
        self.assertNotIn("TOPSECRET", repr(context))
        self.assertNoSecretLogged(LEAKY_SECRET)
        self.assertTrue(self.events)


class AgentIdsTests(RegistryTestsMixin, SynchronousTestCase):
    """
    L{ContextRegistry.agent_ids} lists the agents with a usable context.
    """

    def test_lists_usable_agents_sorted(self) -> None:
        self.make_agent("carol")
        self.make_agent("alice")
        self.make_agent("bob", token=SECRET)
        self.make_agent("broken", token="")
        self.make_agent(".hidden")
        os.makedirs(os.path.join(self.root, "empty"))
        with open(os.path.join(self.root, "file.json"), "w") as f:
            f.write("{}")
        self.assertEqual(self.registry.agent_ids(), ["alice", "bob", "carol"])

    def test_empty_root(self) -> None:
        self.assertEqual(self.registry.agent_ids(), [])

    def test_follows_changes(self) -> None:
        self.make_agent("alice")
        self.assertEqual(self.registry.agent_ids(), ["alice"])
        self.make_agent("bob")
        self.clock.advance(1.0)
        self.assertEqual(self.registry.agent_ids(), ["alice", "bob"])
        shutil.rmtree(os.path.join(self.root, "alice"))
        self.clock.advance(1.0)
        self.assertEqual(self.registry.agent_ids(), ["bob"])
