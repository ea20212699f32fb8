"""
Virtual keys: the pure helpers without a reactor, and the store on real
SQLite files in temporary directories, with the real reactor for the writer
thread's hand-offs (Deferreds awaited, never sleeps) and an injected Clock
for expiry and pruning.
"""

from __future__ import annotations

import calendar
import hashlib
import json
import os
import sqlite3
import stat

from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from cllama_tx.identity import key_rows
from cllama_tx.identity.virtual_keys import (
    DEFAULT_EXPIRED_RETENTION,
    PRUNE_INTERVAL,
    DuplicateKey,
    InvalidField,
    KeyNotFound,
    StoreClosed,
    VirtualKey,
    VirtualKeyStore,
    generate_key,
    hash_key,
    iso_time,
    looks_like_virtual_key,
    parse_duration,
    token_hash_of,
    validate_key_fields,
)
from cllama_tx.store.database import DatabaseUnavailable
from cllama_tx.store.ledger import SqliteLedger
from tests.secret_scan import SCANNER

NOW = float(calendar.timegm((2026, 11, 17, 12, 0, 0)))
URLSAFE = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def custom_key(tag: str) -> str:
    key = "sk-" + (tag * 40)[:40]
    SCANNER.register(key)
    return key


class KeyShapeTests(SynchronousTestCase):
    def test_generated_keys(self):
        keys = {generate_key() for _ in range(200)}
        self.assertEqual(len(keys), 200)
        for key in keys:
            self.assertTrue(key.startswith("sk-"))
            self.assertEqual(len(key), 3 + 43)  # token_urlsafe(32): 256 bits
            self.assertLessEqual(set(key[3:]), URLSAFE)
            self.assertTrue(looks_like_virtual_key(key))

    def test_hash_is_hex_sha256(self):
        self.assertEqual(hash_key("sk-abc"), hashlib.sha256(b"sk-abc").hexdigest())

    def test_looks_like_a_virtual_key(self):
        self.assertTrue(looks_like_virtual_key("sk-" + "a" * 32))
        self.assertTrue(looks_like_virtual_key("sk-" + "A_-9" * 64))
        for token in [
            "tiverton:" + "9f1c" * 12,  # an agent's credentials
            "sk-" + "a" * 31,  # too short
            "sk-" + "a" * 257,  # too long
            "sk-" + "a" * 31 + ":",
            "sk-" + "a" * 31 + "=",
            "sk-" + "a" * 20 + " " + "a" * 20,
            "Bearer sk-" + "a" * 40,
            "SK-" + "a" * 40,
            "",
            None,
            b"sk-" + b"a" * 40,
        ]:
            self.assertFalse(looks_like_virtual_key(token), token)

    def test_token_hash_of(self):
        key = "sk-" + "k" * 40
        self.assertEqual(token_hash_of(key), hash_key(key))
        self.assertEqual(token_hash_of("sk-short"), hash_key("sk-short"))  # LiteLLM's own keys are shorter
        digest = hash_key(key)
        self.assertEqual(token_hash_of(digest), digest)
        self.assertIsNone(token_hash_of(digest.upper()))
        self.assertIsNone(token_hash_of(digest[:-1]))
        self.assertIsNone(token_hash_of("my-alias"))
        self.assertIsNone(token_hash_of(42))

    def test_iso_time(self):
        self.assertEqual(iso_time(NOW), "2026-11-17T12:00:00+00:00")
        self.assertEqual(iso_time(NOW + 0.5), "2026-11-17T12:00:00.500000+00:00")
        self.assertIsNone(iso_time(None))


class DurationTests(SynchronousTestCase):
    def test_units(self):
        for text, seconds in [
            ("30s", 30),
            ("15m", 900),
            ("24h", 86400),
            ("7d", 604800),
            ("2w", 1209600),
            (" 1h ", 3600),
            ("1mo", 30 * 86400),  # without a date: 30 days, for validation only
        ]:
            self.assertEqual(parse_duration(text), float(seconds), text)

    def test_calendar_months(self):
        # From 2026-11-17: one month is 30 days, two months reach 2027-01-17.
        self.assertEqual(parse_duration("1mo", NOW), 30 * 86400.0)
        self.assertEqual(parse_duration("2mo", NOW), 61 * 86400.0)
        # From 2026-01-31: February has no 31st, so the 28th.
        jan31 = float(calendar.timegm((2026, 1, 31, 12, 0, 0)))
        self.assertEqual(iso_time(jan31), "2026-01-31T12:00:00+00:00")
        self.assertEqual(parse_duration("1mo", jan31), 28 * 86400.0)
        self.assertEqual(parse_duration("12mo", jan31), 365 * 86400.0)

    def test_refused(self):
        for text in ["", "10", "5x", "-1s", "0s", "0mo", "1.5h", "30M", "1h30m", "1y", "h", "1 h", 5, None, "1201mo", "36601d"]:
            with self.assertRaises(ValueError, msg=repr(text)):
                parse_duration(text)
        self.assertEqual(parse_duration("36600d"), 36600 * 86400.0)  # 100 years of 366 days


class VirtualKeyTests(SynchronousTestCase):
    def test_expiry_to_the_second(self):
        vk = VirtualKey(token_hash="h", key_name="sk-...abcd", expires=NOW + 30)
        self.assertFalse(vk.expired(NOW + 29.999))
        self.assertTrue(vk.expired(NOW + 30))
        self.assertTrue(vk.expired(NOW + 31))
        self.assertFalse(VirtualKey(token_hash="h", key_name="n").expired(1e12))
        self.assertFalse(vk.usable(NOW + 30))
        self.assertFalse(attrs_evolve(vk, blocked=True).usable(NOW))

    def test_to_info_has_litellm_fields_and_never_the_key(self):
        key = generate_key()
        SCANNER.register(key)
        vk = VirtualKey(
            token_hash=hash_key(key),
            key_name="sk-..." + key[-4:],
            key_alias="session-42",
            team_id="org-7",
            user_id="session-42",
            models=("openai/gpt-4o",),
            max_budget=2.5,
            budget_duration="1d",
            rpm_limit=60,
            tpm_limit=10000,
            metadata={"sandbox": "sb-1"},
            created_at=NOW,
            updated_at=NOW,
            expires=NOW + 3600,
        )
        info = vk.to_info()
        self.assertNotIn(key, json.dumps(info))
        self.assertNotIn("key", info)
        self.assertEqual(info["token"], hash_key(key))
        self.assertEqual(info["expires"], "2026-11-17T13:00:00+00:00")
        self.assertEqual(info["created_at"], "2026-11-17T12:00:00+00:00")
        self.assertEqual(info["models"], ["openai/gpt-4o"])
        for name in [
            "key_name", "key_alias", "team_id", "user_id", "models", "max_budget", "budget_duration",
            "rpm_limit", "tpm_limit", "metadata", "expires", "blocked", "max_parallel_requests",
            "aliases", "config", "permissions",
        ]:
            self.assertIn(name, info)
        # A copy: changing it does not change the key.
        info["metadata"]["sandbox"] = "other"
        self.assertEqual(vk.metadata, {"sandbox": "sb-1"})

    def test_claw_id(self):
        self.assertEqual(VirtualKey("h", "sk-...abcd", user_id="u", key_alias="a").claw_id, "u")
        self.assertEqual(VirtualKey("h", "sk-...abcd", key_alias="a").claw_id, "a")
        self.assertEqual(VirtualKey("h", "sk-...abcd").claw_id, "sk-...abcd")

    def test_allows_model(self):
        self.assertTrue(VirtualKey("h", "n").allows_model("anything/at-all"))
        vk = VirtualKey("h", "n", models=("openai/gpt-4o", "anthropic/*"))
        self.assertTrue(vk.allows_model("openai/gpt-4o"))
        self.assertFalse(vk.allows_model("openai/gpt-4o-mini"))
        self.assertTrue(vk.allows_model("anthropic/claude-sonnet-4"))
        self.assertFalse(vk.allows_model("anthropicx/claude"))
        self.assertTrue(VirtualKey("h", "n", models=("*",)).allows_model("xai/grok"))


def attrs_evolve(vk, **changes):
    import attrs

    return attrs.evolve(vk, **changes)


class ValidationTests(SynchronousTestCase):
    def refused(self, doc, field, update=False):
        with self.assertRaises(InvalidField) as caught:
            validate_key_fields(doc, update=update)
        self.assertEqual(caught.exception.field, field, doc)
        return str(caught.exception)

    def test_defaults(self):
        self.assertEqual(
            validate_key_fields({}, update=False),
            {
                "key_alias": None, "team_id": None, "user_id": None, "organization_id": None, "models": (),
                "max_budget": None, "budget_duration": None, "soft_budget": None, "rpm_limit": None,
                "tpm_limit": None, "max_parallel_requests": None, "metadata": {}, "tags": (), "duration": None,
                "blocked": False, "aliases": {}, "model_max_budget": {}, "model_rpm_limit": {},
                "model_tpm_limit": {}, "extra": {},
            },
        )

    def test_aliases(self):
        fields = validate_key_fields({"aliases": {"gpt-4": " openai/gpt-4o "}}, update=False)
        self.assertEqual(fields["aliases"], {"gpt-4": "openai/gpt-4o"})
        self.assertEqual(validate_key_fields({"aliases": None}, update=True), {"aliases": {}})
        for bad in ({"a": 1}, ["a"], {"": "x"}, {"a": ""}, {f"n{i}": "m" for i in range(1001)}):
            with self.assertRaises(InvalidField) as caught:
                validate_key_fields({"aliases": bad}, update=False)
            self.assertEqual(caught.exception.field, "aliases")

    def test_normalised(self):
        fields = validate_key_fields(
            {
                "models": ["a", "b", "a"], "max_budget": 3, "rpm_limit": 10.0, "tpm_limit": 0,
                "team_id": "", "duration": " 7d ", "metadata": {"x": [1, 2]}, "key": "ignored",
            },
            update=False,
        )
        self.assertEqual(fields["models"], ("a", "b"))
        self.assertEqual(fields["max_budget"], 3.0)
        self.assertIsInstance(fields["max_budget"], float)
        self.assertEqual((fields["rpm_limit"], fields["tpm_limit"]), (10, 0))
        self.assertIsNone(fields["team_id"])
        self.assertEqual(fields["duration"], "7d")
        self.assertNotIn("key", fields)

    def test_each_field_is_named(self):
        for doc, field in [
            ({"max_budget": -1}, "max_budget"),
            ({"max_budget": "5"}, "max_budget"),
            ({"max_budget": True}, "max_budget"),
            ({"max_budget": float("nan")}, "max_budget"),
            ({"max_budget": float("inf")}, "max_budget"),
            ({"rpm_limit": 1.5}, "rpm_limit"),
            ({"rpm_limit": -1}, "rpm_limit"),
            ({"rpm_limit": "10"}, "rpm_limit"),
            ({"rpm_limit": False}, "rpm_limit"),
            ({"tpm_limit": 2**60}, "tpm_limit"),
            ({"duration": "forever"}, "duration"),
            ({"duration": 30}, "duration"),
            ({"budget_duration": "1y"}, "budget_duration"),
            ({"models": "openai/gpt-4o"}, "models"),
            ({"models": [1]}, "models"),
            ({"models": [""]}, "models"),
            ({"models": ["x"] * 1001}, "models"),
            ({"metadata": []}, "metadata"),
            ({"metadata": {"x": "y" * 20000}}, "metadata"),
            ({"key_alias": 5}, "key_alias"),
            ({"team_id": {}}, "team_id"),
            ({"team_id": ["org"]}, "team_id"),
            ({"user_id": "a\nb"}, "user_id"),
            ({"user_id": "u" * 257}, "user_id"),
            ({"blocked": "yes"}, "blocked"),
        ]:
            self.refused(doc, field)

    def test_every_litellm_field_is_taken(self):
        fields = validate_key_fields(
            {"soft_budget": 10, "organization_id": "org", "max_parallel_requests": 4, "tags": ["a", "b", "a"],
             "model_max_budget": {"gpt-4o": {"budget_limit": "0.5", "time_period": "1d"}, "o3": 2},
             "model_rpm_limit": {"gpt-4o": 2}, "model_tpm_limit": {"gpt-4o": 100},
             "config": {"x": 1}, "guardrails": ["pii"], "key_type": "llm_api", "auto_rotate": True,
             "rotation_interval": "30d", "tpd_limit": 5, "object_permission": {"models": ["a"]}},
            update=False,
        )
        self.assertEqual((fields["soft_budget"], fields["organization_id"], fields["max_parallel_requests"]),
                         (10.0, "org", 4))
        self.assertEqual(fields["tags"], ("a", "b"))
        self.assertEqual(fields["model_max_budget"], {"gpt-4o": {"max_budget": 0.5, "budget_duration": "1d"},
                                                      "o3": {"max_budget": 2.0, "budget_duration": None}})
        self.assertEqual(fields["extra"], {"config": {"x": 1}, "guardrails": ["pii"], "key_type": "llm_api",
                                           "auto_rotate": True, "rotation_interval": "30d", "tpd_limit": 5,
                                           "object_permission": {"models": ["a"]}})

    def test_unknown_fields(self):
        self.assertIn("unknown", self.refused({"max_budgte": 5}, "max_budgte"))
        self.refused({"key_type": "root"}, "key_type")
        self.refused({"config": [1]}, "config")
        self.refused({"model_max_budget": {"gpt-4o": {"budget": 1}}}, "model_max_budget")
        # Empty values of unknown fields are ignored (what SDKs send by default).
        fields = validate_key_fields({"whatever": "", "other": None}, update=False)
        self.assertEqual(set(fields), set(validate_key_fields({}, update=False)))
        # On an update, a null stored field removes it.
        self.assertEqual(validate_key_fields({"config": None}, update=True), {"extra": {"config": None}})

    def test_update_only_what_is_given(self):
        self.assertEqual(validate_key_fields({}, update=True), {})
        self.assertEqual(
            validate_key_fields(
                {"max_budget": None, "models": None, "metadata": None, "key_alias": "",
                 "duration": None, "blocked": None},
                update=True,
            ),
            {"max_budget": None, "models": (), "metadata": {}, "key_alias": None},
        )


class StoreTestMixin:
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(NOW)
        self.path = os.path.join(os.path.abspath(self.mktemp()), "state", "ledger.sqlite3")

    async def make_store(self, **kwargs) -> VirtualKeyStore:
        store = VirtualKeyStore(self.path, self.clock, reactor, **kwargs)
        store.startService()
        self.addCleanup(store.stopService)
        await store.when_loaded()
        return store

    async def restart(self, store: VirtualKeyStore) -> VirtualKeyStore:
        await store.stopService()
        return await self.make_store()

    async def create(self, store, **fields):
        key, vk = await store.create(**fields)
        SCANNER.register(key)
        return key, vk

    def db_rows(self):
        conn = sqlite3.connect(self.path)
        try:
            conn.row_factory = sqlite3.Row
            return {r["token_hash"]: dict(r) for r in conn.execute("SELECT * FROM virtual_keys")}
        finally:
            conn.close()


class StoreTests(StoreTestMixin, TestCase):
    async def test_create_and_lookup(self):
        store = await self.make_store()
        key, vk = await self.create(
            store, team_id="org-1", user_id="session-9", models=["openai/gpt-4o"],
            max_budget=5, rpm_limit=60, metadata={"sandbox": "sb-9"}, duration="1h",
        )
        self.assertTrue(looks_like_virtual_key(key))
        self.assertEqual(vk.token_hash, hash_key(key))
        self.assertEqual(vk.key_name, "sk-..." + key[-4:])
        self.assertEqual(vk.expires, NOW + 3600)
        self.assertEqual((vk.team_id, vk.user_id, vk.models, vk.max_budget), ("org-1", "session-9", ("openai/gpt-4o",), 5.0))
        self.assertIs(store.lookup(key), vk)
        self.assertIs(store.get(vk.token_hash), vk)
        self.assertEqual(store.status(key), "valid")
        self.assertIsNone(store.lookup("tiverton:" + "9f1c" * 12))
        self.assertIsNone(store.lookup(custom_key("n")))
        self.assertEqual(store.status(custom_key("n")), "unknown")
        self.assertEqual(len(store), 1)
        row = self.db_rows()[vk.token_hash]
        self.assertEqual(row["team_id"], "org-1")
        self.assertEqual(json.loads(row["metadata_json"]), {"sandbox": "sb-9"})
        self.assertIsNone(row["deleted_at"])

    async def test_key_and_team_aliases_survive_a_restart(self):
        store = await self.make_store()
        key, vk = await self.create(store, team_id="org-1", aliases={"gpt-4": "openai/gpt-4o"})
        self.assertEqual(vk.aliases, {"gpt-4": "openai/gpt-4o"})
        self.assertEqual(vk.to_info()["aliases"], {"gpt-4": "openai/gpt-4o"})
        await store.update(vk.token_hash, aliases={"fast": "anthropic/claude-haiku-4-5"})
        self.assertEqual(await store.set_team_aliases("org-1", {"smart": "openai/o3"}), {"smart": "openai/o3"})
        self.assertEqual(store.team_aliases("org-1"), {"smart": "openai/o3"})
        self.assertEqual(store.team_aliases("org-2"), {})
        store = await self.restart(store)
        self.assertEqual(store.lookup(key).aliases, {"fast": "anthropic/claude-haiku-4-5"})
        self.assertEqual(store.team_aliases("org-1"), {"smart": "openai/o3"})
        await store.set_team_aliases("org-1", None)
        store = await self.restart(store)
        self.assertEqual(store.team_aliases("org-1"), {})
        with self.assertRaises(InvalidField):
            store.set_team_aliases("org-1", {"x": 3})

    async def test_only_the_hash_reaches_the_disk(self):
        store = await self.make_store()
        keys = []
        for i in range(5):
            key, _ = await self.create(store, user_id=f"user-{i}", key_alias=f"alias-{i}")
            keys.append(key)
        directory = os.path.dirname(self.path)

        def files_bytes():
            blob = b""
            for name in os.listdir(directory):
                with open(os.path.join(directory, name), "rb") as f:
                    blob += f.read()
            return blob

        for blob in (files_bytes(), None):
            if blob is None:
                await store.stopService()  # checkpoint: the main file now has it all
                blob = files_bytes()
            for key in keys:
                self.assertNotIn(key.encode(), blob)
                self.assertNotIn(key[3:].encode(), blob)
            self.assertIn(hash_key(keys[0]).encode(), blob)

    async def test_expiry_to_the_second(self):
        store = await self.make_store()
        key, vk = await self.create(store, duration="30s")
        self.clock.advance(29.999)
        self.assertIs(store.lookup(key), vk)
        self.clock.advance(0.001)
        self.assertIsNone(store.lookup(key))
        self.assertEqual(store.status(key), "expired")
        self.assertIs(store.get(vk.token_hash), vk)  # /key/info still shows it

    async def test_a_deleted_key_fails_at_once(self):
        store = await self.make_store()
        key, vk = await self.create(store)
        other, _ = await self.create(store)
        d = store.delete([vk.token_hash, vk.token_hash, "f" * 64])
        self.assertFalse(d.called)  # not committed yet ...
        self.assertIsNone(store.lookup(key))  # ... and already refused
        self.assertIsNone(store.get(vk.token_hash))
        self.assertEqual(await d, [vk.token_hash])
        self.assertIsNotNone(self.db_rows()[vk.token_hash]["deleted_at"])
        self.assertEqual(await store.delete([vk.token_hash]), [])
        store = await self.restart(store)
        self.assertIsNone(store.lookup(key))
        self.assertIsNotNone(store.lookup(other))

    async def test_writes_stay_in_order(self):
        store = await self.make_store()
        d_create = store.create(user_id="u")
        # Delete before the create is committed: it must not be overtaken.
        token_hash = next(iter(store._keys))
        d_delete = store.delete([token_hash])
        key, _ = await d_create
        SCANNER.register(key)
        self.assertEqual(await d_delete, [token_hash])
        store = await self.restart(store)
        self.assertIsNone(store.lookup(key))

    async def test_restart_keeps_every_field(self):
        store = await self.make_store()
        key, vk = await self.create(
            store, key_alias="a", team_id="t", user_id="u", models=["m1", "m2"], max_budget=0.5,
            budget_duration="30d", rpm_limit=1, tpm_limit=2, metadata={"n": [1, {"x": None}]},
            duration="7d", blocked=False,
        )
        store = await self.restart(store)
        self.assertEqual(store.get(vk.token_hash), vk)
        self.assertEqual(store.lookup(key), vk)
        self.assertEqual(store.find_alias("a"), vk)
        # The same instance restarts too.
        await store.stopService()
        store.startService()
        await store.when_loaded()
        self.assertEqual(store.lookup(key), vk)

    async def test_update(self):
        store = await self.make_store()
        key, vk = await self.create(store, max_budget=5, models=["a"], duration="1h", key_alias="old")
        self.clock.advance(600)
        d = store.update(vk.token_hash, max_budget=None, models=["b", "c"], duration="2h", key_alias="new", metadata={"v": 2})
        current = store.lookup(key)  # memory changed before the commit
        self.assertEqual(current.models, ("b", "c"))
        self.assertIsNone(current.max_budget)
        self.assertEqual(current.expires, NOW + 600 + 7200)
        self.assertEqual(current.updated_at, NOW + 600)
        self.assertEqual(current.created_at, NOW)
        self.assertIsNone(store.find_alias("old"))
        updated = await d
        self.assertIs(updated, current)
        store = await self.restart(store)
        self.assertEqual(store.get(vk.token_hash), updated)
        self.assertRaises(KeyNotFound, store.update, "0" * 64, max_budget=1)
        self.assertRaises(InvalidField, store.update, vk.token_hash, rpm_limit=-1)

    async def test_aliases_are_unique(self):
        store = await self.make_store()
        _, first = await self.create(store, key_alias="session-1")
        with self.assertRaises(DuplicateKey) as caught:
            store.create(key_alias="session-1")
        self.assertEqual(caught.exception.field, "key_alias")
        _, second = await self.create(store, key_alias="session-2")
        self.assertRaises(DuplicateKey, store.update, second.token_hash, key_alias="session-1")
        await store.update(first.token_hash, key_alias="session-1")  # its own alias: fine
        await store.delete([first.token_hash])
        await store.update(second.token_hash, key_alias="session-1")
        self.assertEqual(store.find_alias("session-1").token_hash, second.token_hash)

    async def test_blocked(self):
        store = await self.make_store()
        key, vk = await self.create(store)
        d = store.update(vk.token_hash, blocked=True)
        self.assertIsNone(store.lookup(key))
        self.assertEqual(store.status(key), "blocked")
        await d
        await store.update(vk.token_hash, blocked=False)
        self.assertIsNotNone(store.lookup(key))

    async def test_list_pages_and_filters(self):
        store = await self.make_store()
        made = []
        for i in range(25):
            _, vk = await self.create(store, team_id=f"team-{i % 2}", user_id=f"user-{i % 5}", key_alias=f"k{i}")
            made.append(vk)
            self.clock.advance(1)
        newest_first = [vk.token_hash for vk in reversed(made)]
        page = store.list(size=10)
        self.assertEqual((page.total_count, page.total_pages, page.current_page), (25, 3, 1))
        self.assertEqual([vk.token_hash for vk in page.keys], newest_first[:10])
        self.assertEqual([vk.token_hash for vk in store.list(page=3, size=10).keys], newest_first[20:])
        self.assertEqual(store.list(page=4, size=10).keys, ())
        team = store.list(team_id="team-1", size=100)
        self.assertEqual(team.total_count, 12)
        self.assertTrue(all(vk.team_id == "team-1" for vk in team.keys))
        both = store.list(team_id="team-0", user_id="user-0", size=100)
        self.assertEqual({vk.key_alias for vk in both.keys}, {"k0", "k10", "k20"})
        self.assertEqual(store.list(key_alias="k7").keys, (made[7],))
        self.assertEqual(store.list(team_id="nobody").total_pages, 0)
        self.assertRaises(ValueError, store.list, page=0)
        self.assertRaises(ValueError, store.list, size=0)

    async def test_caller_chosen_key(self):
        store = await self.make_store()
        key = custom_key("abc")
        returned, vk = await store.create(key=key)
        self.assertEqual(returned, key)
        self.assertIs(store.lookup(key), vk)
        self.assertRaises(DuplicateKey, store.create, key=key)
        with self.assertRaises(InvalidField) as caught:
            store.create(key="sk-short")
        self.assertEqual(caught.exception.field, "key")
        self.assertRaises(InvalidField, store.create, key="tiverton:secret")
        await store.delete([vk.token_hash])
        # A deleted key's hash stays on disk: the key cannot come back.
        with self.assertRaises(DuplicateKey):
            await store.create(key=key)
        self.assertIsNone(store.lookup(key))

    async def test_a_failed_create_is_taken_back(self):
        store = await self.make_store()

        def broken(tx, *args):
            raise sqlite3.OperationalError("disk I/O error")

        self.patch(key_rows, "insert", broken)
        d = store.create(user_id="u", key_alias="a")
        token_hash = next(iter(store._keys))
        with self.assertRaises(DatabaseUnavailable):
            await d
        self.assertIsNone(store.get(token_hash))
        self.assertIsNone(store.find_alias("a"))
        self.assertEqual(self.db_rows(), {})
        self.flushLoggedErrors()

    async def test_a_failed_update_is_rolled_back(self):
        store = await self.make_store()
        key, vk = await self.create(store, max_budget=1, key_alias="a")

        def broken(tx, *args):
            raise sqlite3.OperationalError("database is locked")

        self.patch(key_rows, "update", broken)
        d = store.update(vk.token_hash, max_budget=2, key_alias="b")
        self.assertEqual(store.lookup(key).max_budget, 2.0)
        with self.assertRaises(DatabaseUnavailable):
            await d
        self.assertIs(store.lookup(key), vk)
        self.assertIs(store.find_alias("a"), vk)
        self.assertIsNone(store.find_alias("b"))

    async def test_a_failed_delete_stays_in_effect_and_a_retry_stores_it(self):
        store = await self.make_store()
        key, vk = await self.create(store)
        original = key_rows.delete

        def broken(tx, *args):
            raise sqlite3.OperationalError("database is locked")

        self.patch(key_rows, "delete", broken)
        with self.assertRaises(DatabaseUnavailable):
            await store.delete([vk.token_hash])
        self.assertIsNone(store.lookup(key))  # fail closed
        self.assertIsNone(self.db_rows()[vk.token_hash]["deleted_at"])
        # A read from the database does not bring it back.
        self.assertIsNone(await store.reload_key(vk.token_hash))
        self.assertIsNone(store.lookup(key))
        self.patch(key_rows, "delete", original)
        self.assertEqual(await store.delete([vk.token_hash]), [vk.token_hash])
        store = await self.restart(store)
        self.assertIsNone(store.lookup(key))

    async def test_a_cancelled_caller_does_not_undo_a_create(self):
        store = await self.make_store()
        d = store.create(user_id="u")
        token_hash = next(iter(store._keys))
        d.cancel()
        with self.assertRaises(defer.CancelledError):
            await d
        await store.stopService()  # waits for the queued write
        store = await self.make_store()
        self.assertIsNotNone(store.get(token_hash))

    async def test_long_expired_keys_leave_memory(self):
        store = await self.make_store()
        key, vk = await self.create(store, duration="1h")
        forever, _ = await self.create(store)
        self.clock.advance(3600 + DEFAULT_EXPIRED_RETENTION - PRUNE_INTERVAL)
        self.assertIsNotNone(store.get(vk.token_hash))
        self.clock.advance(PRUNE_INTERVAL)  # the hourly prune runs
        self.assertIsNone(store.get(vk.token_hash))
        self.assertIsNotNone(store.lookup(forever))
        self.assertIn(vk.token_hash, self.db_rows())  # still on disk
        store = await self.restart(store)
        self.assertIsNone(store.get(vk.token_hash))
        self.assertEqual(len(store), 1)

    async def test_loads_once_what_it_waits_for_has_fired(self):
        """The daemon's store waits for the ledger (PostgreSQL's schema is migrated then)."""
        store = VirtualKeyStore(self.path, self.clock, reactor)
        store.startService()
        key, _ = await self.create(store)
        await store.stopService()
        gate = defer.Deferred()
        store = VirtualKeyStore(self.path, self.clock, reactor, after=lambda: gate)
        store.startService()
        self.addCleanup(store.stopService)
        loaded = store.when_loaded()
        await store.database.run(lambda tx: None)  # a load asked for would be done by now
        self.assertFalse(loaded.called)
        self.assertEqual(store.status(key), "unchecked")
        gate.callback(None)
        await loaded
        self.assertIsNotNone(store.lookup(key))

    async def test_writes_need_a_running_store(self):
        store = VirtualKeyStore(self.path, self.clock, reactor)
        self.assertRaises(StoreClosed, store.create)
        store = await self.make_store()
        key, vk = await self.create(store)
        await store.stopService()
        self.assertRaises(StoreClosed, store.create)
        self.assertRaises(StoreClosed, store.update, vk.token_hash, max_budget=1)
        self.assertRaises(StoreClosed, store.delete, [vk.token_hash])
        self.assertIs(store.lookup(key), vk)  # reads still answer until the process ends


class SharedDatabaseTests(StoreTestMixin, TestCase):
    async def test_beside_the_ledger(self):
        ledger = SqliteLedger(self.path, reactor)
        ledger.startService()
        self.addCleanup(ledger.stopService)
        store = await self.make_store()
        key, vk = await self.create(store, team_id="org")
        self.assertTrue(await ledger.ready())
        conn = sqlite3.connect(self.path)
        try:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            self.assertEqual(conn.execute("PRAGMA journal_mode").fetchone()[0], "wal")
        finally:
            conn.close()
        self.assertLessEqual({"requests", "meta", "virtual_keys"}, tables)
        await ledger.stopService()
        await store.stopService()
        # Both open again, in the other order.
        store = await self.make_store()
        ledger = SqliteLedger(self.path, reactor)
        ledger.startService()
        self.addCleanup(ledger.stopService)
        self.assertTrue(await ledger.ready())
        self.assertEqual(store.lookup(key), vk)

    async def test_creates_a_private_file(self):
        store = await self.make_store()
        await self.create(store)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.dirname(self.path)).st_mode), 0o700)

    async def test_completes_an_older_table(self):
        os.makedirs(os.path.dirname(self.path))
        conn = sqlite3.connect(self.path)
        conn.execute("CREATE TABLE virtual_keys (token_hash TEXT PRIMARY KEY, key_name TEXT NOT NULL)")
        conn.execute("INSERT INTO virtual_keys VALUES (?, ?)", ("a" * 64, "sk-...aaaa"))
        conn.commit()
        conn.close()
        store = await self.make_store()
        vk = store.get("a" * 64)
        self.assertEqual((vk.models, vk.metadata, vk.blocked, vk.expires), ((), {}, False, None))
