"""
The API site of one instance of a fleet, for virtual keys minted on
another: the header gate waits for the key to be read from the shared store
(reading none of the body meanwhile), then serves it, or refuses it in the
surface's shape: 401 for a key the store does not have, 503
C{store_unavailable} when the store cannot be read.  A real proxy on
loopback in front of a fake provider, on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import json

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from cllama_tx.identity.virtual_keys import VirtualKeyStore
from cllama_tx.testing import Reply, openai_completion
from tests.identity.backends import PostgresBackend, SqliteBackend
from tests.secret_scan import SCANNER
from tests.sites.test_api_request_line import raw
from tests.support import MASTER_KEY, ProxyHarness, chat_body


def gigabyte_request(key: str, path: bytes = b"/v1/chat/completions") -> bytes:
    """A request's headers declaring a gigabyte of body, none of it sent."""
    return (
        b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + key.encode()
        + b"\r\nContent-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n"
    )


class SharedKeysApiMixin:
    async def setUp(self):
        self.database = await self.make_database()
        self.minter = await self.store("host-a:1:aa")  # where the platform mints
        self.server = await self.store("host-b:2:bb")  # where the agent's request lands
        self.h = await ProxyHarness(self, keys=self.server).start()

    async def store(self, instance) -> VirtualKeyStore:
        store = VirtualKeyStore(self.database, reactor, reactor, shared=True, instance=instance)
        store.startService()
        self.addCleanup(store.stopService)
        await store.when_loaded()
        return store

    async def mint(self, **fields):
        key, vk = await self.minter.create(**fields)
        SCANNER.register(key)
        return key, vk

    async def test_the_first_request_on_another_instance_is_served(self):
        key, vk = await self.mint(team_id="org-1", user_id="session-1")
        self.h.fake.enqueue(Reply(json=openai_completion("hi", "gpt-4o-mini", 3, 1)))
        long_prompt = [{"role": "user", "content": "p" * 200_000}]
        response = await self.h.chat(chat_body(messages=long_prompt), token=key)
        self.assertEqual(response.code, 200)
        self.assertEqual((await response.json())["choices"][0]["message"]["content"], "hi")
        self.assertEqual(self.h.fake.received[0].json["messages"], long_prompt)
        await self.h.committed()
        [row] = await self.h.ledger_rows()
        self.assertEqual((row["key_id"], row["team_id"], row["user_id"]), (vk.token_hash, "org-1", "session-1"))
        self.assertEqual(self.server.lookup(key), vk)  # in memory from now on
        # A small body is all in before the key is read: the request waits for it.
        small, _ = await self.mint()
        self.h.fake.enqueue(Reply(json=openai_completion("hi again", "gpt-4o-mini", 3, 1)))
        response = await self.h.chat(chat_body(), token=small)
        self.assertEqual(response.code, 200)
        self.assertEqual((await response.json())["choices"][0]["message"]["content"], "hi again")

    async def test_models_for_a_key_minted_elsewhere(self):
        key, _ = await self.mint(models=["openai/gpt-4o-mini"])
        response = await self.h.http.get(self.h.base_url + "/v1/models", headers={"Authorization": [f"Bearer {key}"]})
        self.assertEqual(response.code, 200)
        self.assertEqual([m["id"] for m in (await response.json())["data"]], ["openai/gpt-4o-mini"])

    async def test_an_unknown_key_is_refused_on_its_headers(self):
        unknown = "sk-" + "n" * 43
        data = await raw(self.h.port.getHost().port, gigabyte_request(unknown))
        head, body = data.split(b"\r\n\r\n", 1)
        self.assertTrue(head.startswith(b"HTTP/1.1 401 "), head)
        self.assertEqual(json.loads(body)["error"]["code"], "invalid_api_key")
        data = await raw(self.h.port.getHost().port, gigabyte_request(unknown, b"/v1/messages"))
        head, body = data.split(b"\r\n\r\n", 1)
        self.assertTrue(head.startswith(b"HTTP/1.1 401 "), head)
        self.assertEqual(json.loads(body)["type"], "error")  # Anthropic's shape
        self.assertEqual(json.loads(body)["error"]["type"], "authentication_error")
        self.assertEqual(self.h.fake.received, [])
        self.assertEqual(self.server.misses.queries, 1)  # the second was remembered

    async def test_a_deleted_key_is_refused_once_reloaded(self):
        key, vk = await self.mint()
        self.h.fake.enqueue(Reply(json=openai_completion("hi", "gpt-4o-mini", 3, 1)))
        self.assertEqual((await self.h.chat(chat_body(), token=key)).code, 200)
        await self.minter.delete([vk.token_hash])
        await self.server.reload_key(vk.token_hash)  # what the change feed does within a second
        response = await self.h.chat(chat_body(), token=key)
        self.assertEqual(response.code, 401)
        self.assertEqual((await response.json())["error"]["message"], "unknown or deleted key")

    async def test_an_unavailable_store_is_a_503_in_the_surface_shape(self):
        key, _ = await self.mint()
        await self.make_unavailable(self.database)
        data = await raw(self.h.port.getHost().port, gigabyte_request(key))
        head, body = data.split(b"\r\n\r\n", 1)
        self.assertTrue(head.startswith(b"HTTP/1.1 503 "), head)
        self.assertIn(b"\r\nRetry-After: 1", head)
        self.assertEqual(json.loads(body)["error"]["code"], "store_unavailable")
        self.assertNotIn(key.encode(), data)
        response = await self.h.post("/v1/messages", {"model": "openai/gpt-4o-mini", "max_tokens": 5,
                                                      "messages": [{"role": "user", "content": "hi"}]}, token=key)
        self.assertEqual(response.code, 503)
        doc = await response.json()
        self.assertEqual((doc["type"], doc["error"]["type"]), ("error", "overloaded_error"))
        self.assertEqual(self.h.fake.received, [])
        lines = [line for line in self.h.audit_lines() if line["type"] == "error"]
        self.assertEqual([line["status_code"] for line in lines], [503, 503])
        # Key administration cannot write either: a 503, and nothing changed.
        response = await self.h.post("/key/generate", {"user_id": "u"}, token=MASTER_KEY)
        self.assertEqual(response.code, 503)
        self.assertEqual((await response.json())["error"]["type"], "service_unavailable")
        self.assertEqual(len(self.server), 0)
        self.flushLoggedErrors()
        await self.make_available(self.database)
        self.h.fake.enqueue(*[Reply(json=openai_completion("hi", "gpt-4o-mini", 3, 1)) for _ in range(10)])
        for _ in range(10):  # each pool connection the outage ended is replaced on its next use
            response = await self.h.chat(chat_body(), token=key)
            if response.code != 503:
                break
            await response.content()
        self.assertEqual(response.code, 200)


class SqliteSharedKeysApiTests(SqliteBackend, SharedKeysApiMixin, TestCase):
    pass


class PostgresSharedKeysApiTests(PostgresBackend, SharedKeysApiMixin, TestCase):
    pass
