"""
Operator UI sessions shared by several instances (workers behind one socket,
hosts on one database), on SQLite and on a real PostgreSQL: a browser
signed in on one instance is signed in on another, signed out of all of
them at once, and only a hash of its session id is ever stored.  The
session store on its own (with a fake clock, for idle and absolute expiry
across instances), then two UIs over loopback HTTP.
"""

from __future__ import annotations

import calendar
import os
import secrets

import treq
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from cllama_tx.identity.lookups import LookupsBusy
from cllama_tx.identity.operator_sessions import SessionRows, csrf_token, session_hash
from cllama_tx.sites.ui.auth import RECHECK_INTERVAL, TOUCH_INTERVAL, SessionStore
from cllama_tx.store.database import DatabaseUnavailable
from tests.identity.backends import PostgresBackend, SqliteBackend
from tests.sites.ui.support import UiClient, UiHarness

NOW = float(calendar.timegm((2026, 11, 17, 12, 0, 0)))
HTML = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}


def rows_of(database):
    return database.run(lambda tx: [tuple(r) for r in tx.execute("SELECT * FROM ui_sessions").fetchall()])


def changes_of(database):
    return database.run(lambda tx: [tuple(r) for r in tx.execute(
        "SELECT instance, kind, subject FROM changes WHERE kind = 'ui_session' ORDER BY id").fetchall()])


class SharedSessionStoreMixin:
    async def setUp(self):
        self.clock = Clock()
        self.clock.advance(NOW)
        self.database = await self.make_database()
        self.a = self.store("host-a:1:aa")
        self.b = self.store("host-b:2:bb")

    def store(self, instance, **kwargs) -> SessionStore:
        return SessionStore(self.clock, lifetime=3600, idle=600, rows=SessionRows(self.database, instance), **kwargs)

    async def test_a_session_made_on_one_instance_is_found_on_another(self):
        session = await self.a.create_saved("ada")
        self.assertTrue(self.b.needs_lookup(session.id))
        self.assertIsNone(self.b.get(session.id))  # not before it is read
        await self.b.load(session.id)
        found = self.b.get(session.id)
        self.assertEqual((found.name, found.created, found.csrf), ("ada", NOW, session.csrf))
        self.assertEqual(found.handle, session.handle)
        self.assertFalse(self.b.needs_lookup(session.id))
        self.assertFalse(self.a.needs_lookup(session.id))

    async def test_only_a_hash_is_stored(self):
        session = await self.a.create_saved("ada")
        [row] = await rows_of(self.database)
        self.assertEqual(row[0], session_hash(session.id))
        stored = repr(row)
        self.assertNotIn(session.id, stored)
        self.assertNotIn(session.csrf, stored)
        self.assertEqual(session.csrf, csrf_token(session.id))
        self.assertNotIn(session.id, session.csrf)
        if self.backend == "sqlite":
            await self.database.close()  # checkpoint: the main file has it all
            directory = os.path.dirname(self.database_path)
            for name in os.listdir(directory):
                with open(os.path.join(directory, name), "rb") as f:
                    blob = f.read()
                self.assertNotIn(session.id.encode(), blob)
                self.assertNotIn(session.csrf.encode(), blob)

    async def test_signing_out_ends_it_everywhere(self):
        session = await self.a.create_saved()
        await self.b.load(session.id)
        await self.b.end(self.b.get(session.id))
        self.assertIsNone(self.b.get(session.id))
        self.assertFalse(self.b.needs_lookup(session.id))  # never read back here
        self.assertEqual(await changes_of(self.database), [("host-b:2:bb", "ui_session", session_hash(session.id))])
        self.assertEqual(await rows_of(self.database), [])
        # A: the change feed names the hash; the cached copy goes, and reading it again finds nothing.
        self.assertIsNotNone(self.a.get(session.id))
        self.a.reload(session_hash(session.id))
        self.assertIsNone(self.a.get(session.id))
        self.assertTrue(self.a.needs_lookup(session.id))
        await self.a.load(session.id)
        self.assertIsNone(self.a.get(session.id))
        # A third instance that never saw it refuses it too.
        c = self.store("host-c:3:cc")
        await c.load(session.id)
        self.assertIsNone(c.get(session.id))

    async def test_a_sign_out_elsewhere_ends_it_here_within_the_recheck(self):
        session = await self.a.create_saved()
        await self.b.load(session.id)
        cached = self.b.get(session.id)
        await self.a.end(session)  # no change feed here: B is not told
        self.assertFalse(self.b.needs_lookup(session.id))  # confirmed a moment ago
        self.assertIs(self.b.get(session.id), cached)
        self.clock.advance(RECHECK_INTERVAL)
        self.assertTrue(self.b.needs_lookup(session.id))  # a request waits for it to be read again
        # A live stream's periodic check reads it again in the background.
        self.assertTrue(self.b.valid(cached))
        await self.b.load(session.id)
        self.assertFalse(self.b.valid(cached))
        self.assertIsNone(self.b.get(session.id))

    async def test_idle_time_counts_on_every_instance(self):
        session = await self.a.create_saved()
        await self.b.load(session.id)
        # The browser keeps using B only; B records its use every minute.
        for _ in range(12):
            self.clock.advance(TOUCH_INTERVAL)
            self.assertIsNotNone(self.b.get(session.id))
        await self.b.rows.database.run(lambda tx: None)  # the last touch is written
        # Idle on A: A reads it again instead of refusing.
        self.assertTrue(self.a.needs_lookup(session.id))
        await self.a.load(session.id)
        self.assertIsNotNone(self.a.get(session.id))
        # Idle everywhere: gone everywhere.
        self.clock.advance(601)
        self.assertTrue(self.a.needs_lookup(session.id))
        await self.a.load(session.id)
        self.assertIsNone(self.a.get(session.id))

    async def test_the_lifetime_counts_from_the_sign_in(self):
        session = await self.a.create_saved()
        for _ in range(6):
            self.clock.advance(540)
            self.assertIsNotNone(self.a.get(session.id))
        self.clock.advance(3600 - 6 * 540)
        self.assertIsNone(self.a.get(session.id))
        await self.b.load(session.id)
        self.assertIsNone(self.b.get(session.id))

    async def test_unknown_cookies_are_read_once_and_bounded(self):
        forged = secrets.token_urlsafe(32)
        await defer.gatherResults([self.b.load(forged) for _ in range(10)])
        self.assertEqual(self.b._lookups.queries, 1)
        self.assertFalse(self.b.needs_lookup(forged))  # remembered for a second
        self.assertFalse(self.b.needs_lookup("not-a-session-id"))  # never asked
        self.clock.advance(1)
        self.assertTrue(self.b.needs_lookup(forged))
        flood = [self.b.load(secrets.token_urlsafe(32)) for _ in range(400)]
        outcomes = await defer.DeferredList(flood, consumeErrors=True)
        refused = [r for ok, r in outcomes if not ok]
        self.assertTrue(refused and all(f.check(LookupsBusy) for f in refused))
        self.assertLess(self.b._lookups.queries, 30)

    async def test_an_unavailable_database(self):
        session = await self.a.create_saved()
        await self.make_unavailable(self.database)
        with self.assertRaises(DatabaseUnavailable):
            await self.a.create_saved()
        self.assertEqual(len(self.a), 1)  # the one that could not be stored is gone
        with self.assertRaises(DatabaseUnavailable):
            await self.b.load(session.id)
        with self.assertRaises(DatabaseUnavailable):
            await self.a.end(session)
        self.assertIs(self.a.get(session.id), session)  # still signed in: sign out again later
        self.flushLoggedErrors()


class SqliteSharedSessionStoreTests(SqliteBackend, SharedSessionStoreMixin, TestCase):
    pass


class PostgresSharedSessionStoreTests(PostgresBackend, SharedSessionStoreMixin, TestCase):
    pass


class SharedSessionsUiMixin:
    """Two operator UIs (two instances, each with its own proxy) on one database."""

    timeout = 30

    async def setUp(self):
        self.database = await self.make_database()
        self.one = await self.ui("host-a:1:aa")
        self.two = await self.ui("host-b:2:bb")
        # One browser: the same cookies whichever instance its request reaches.
        self.browser_one = self.one.client
        self.browser_two = UiClient(self.two.client.http, self.two.url)
        self.browser_two.cookies = self.browser_one.cookies

    def fresh_http(self):
        """Another browser: treq keeps cookies in its client, so a client of its own."""
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        return treq.client.HTTPClient(Agent(reactor, pool=pool))

    async def ui(self, instance) -> UiHarness:
        rows = SessionRows(self.database, instance)
        return await UiHarness(self, ui_kwargs={"session_rows": rows}).start()

    async def test_signed_in_on_one_signed_in_on_the_other(self):
        response = await self.browser_one.sign_in(name="ada")
        self.assertEqual(response.code, 303)
        token = session_hash(self.browser_one.cookies["cllama_session"])
        response = await self.browser_two.get("/", headers=HTML)
        self.assertEqual(response.code, 200)
        self.assertIn("ada", await response.text())
        # The form token works on either instance.
        csrf = await self.browser_two.csrf("/providers")
        self.assertEqual(csrf, await self.browser_one.csrf("/providers"))
        response = await self.browser_two.post("/signout", {"csrf": csrf}, headers=HTML)
        self.assertEqual(response.headers.getRawHeaders("location"), ["/signin"])
        self.assertEqual(await changes_of(self.database), [("host-b:2:bb", "ui_session", token)])
        self.assertEqual(await rows_of(self.database), [])

    async def test_signed_out_on_one_signed_out_on_the_other(self):
        await self.browser_one.sign_in()
        session = self.browser_one.cookies["cllama_session"]
        token = session_hash(session)
        self.assertEqual((await self.browser_two.get("/", headers=HTML)).code, 200)  # cached on two now
        csrf = await self.browser_one.csrf()
        response = await self.browser_one.post("/signout", {"csrf": csrf}, headers=HTML)
        self.assertEqual(response.code, 303)
        self.assertNotIn("cllama_session", self.browser_one.cookies)
        self.assertEqual(await changes_of(self.database), [("host-a:1:aa", "ui_session", token)])
        self.two.ui.sessions.reload(token)  # what the change feed does within a second
        self.browser_one.cookies["cllama_session"] = session  # a stolen copy
        for browser in (self.browser_one, self.browser_two):
            response = await browser.get("/", headers=HTML)
            self.assertEqual(response.code, 303)
            self.assertTrue(response.headers.getRawHeaders("location")[0].startswith("/signin"))

    async def test_an_unavailable_database_is_a_503_not_a_sign_out(self):
        await self.browser_one.sign_in()
        await self.make_unavailable(self.database)
        response = await self.browser_two.get("/", headers=HTML)  # never seen on two
        self.assertEqual(response.code, 503)
        self.assertEqual(response.headers.getRawHeaders("retry-after"), ["5"])
        self.assertIn("Sessions unavailable", await response.text())
        response = await self.browser_two.get("/api/status")
        self.assertEqual(response.code, 503)
        self.assertEqual((await response.json())["error"]["code"], "store_unavailable")
        # Signing in cannot work either: no cookie is handed out for a session the others cannot find.
        other = UiClient(self.fresh_http(), self.one.url)
        response = await other.sign_in()
        self.assertEqual(response.code, 503)
        self.assertNotIn("cllama_session", other.cookies)
        # One still serves the session it has, and cannot sign it out yet.
        self.assertEqual((await self.browser_one.get("/", headers=HTML)).code, 200)
        csrf = await self.browser_one.csrf()
        response = await self.browser_one.post("/signout", {"csrf": csrf}, headers=HTML)
        self.assertEqual(response.code, 503)
        self.assertIn("cllama_session", self.browser_one.cookies)
        self.flushLoggedErrors()


class SqliteSharedSessionsUiTests(SqliteBackend, SharedSessionsUiMixin, TestCase):
    pass


class PostgresSharedSessionsUiTests(PostgresBackend, SharedSessionsUiMixin, TestCase):
    pass
