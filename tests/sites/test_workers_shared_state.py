"""
Virtual keys and operator sessions across the workers of one host: the real
`twistd -n cllama --workers 2`, its two worker processes sharing the state
file and the listening sockets.  A key minted through one worker works on
both from its first request; a browser signed in on one worker is signed in
on both (its form token too), and signed out of both.  Connections are held
open a few at a time until both workers have served some (the kernel hands
each connection to one of them), as the workers' own tests do.
"""

from __future__ import annotations

import os
import re
from http.cookiejar import CookieJar, DefaultCookiePolicy
from http.cookies import SimpleCookie

import treq
from twisted.internet import defer, reactor, task
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from cllama_tx.sites.ui.auth import RECHECK_INTERVAL
from cllama_tx.testing import FakeProvider, Reply, openai_completion
from tests.runtime.test_workers import spawn_host
from tests.secret_scan import SCANNER
from tests.support import AGENT, PROVIDER_KEY, SECRET, chat_body, write_agent

UI_TOKEN = "workers-shared-ui-token-1618033988"
MASTER_KEY = "sk-workers-master-key-2718281828459"
SCANNER.register(UI_TOKEN, MASTER_KEY)


def set_cookies(response) -> dict[str, str]:
    jar: SimpleCookie = SimpleCookie()
    for raw in response.headers.getRawHeaders("set-cookie", []):
        jar.load(raw)
    return {name: morsel.value for name, morsel in jar.items()}


class WorkersShareKeysAndSessionsTests(TestCase):
    timeout = 90

    async def setUp(self):
        self.fake = FakeProvider(reactor)
        await self.fake.start()
        self.addCleanup(self.fake.stop)
        base = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(base, "auth"))
        write_agent(os.path.join(base, "context"), AGENT, SECRET)
        env = {
            "LISTEN_ADDR": "tcp:0:interface=127.0.0.1",
            "UI_ADDR": "127.0.0.1:0",
            "CLAW_CONTEXT_ROOT": os.path.join(base, "context"),
            "CLAW_AUTH_DIR": os.path.join(base, "auth"),
            "CLLAMA_STATE_DIR": os.path.join(base, "state"),
            "OPENAI_API_KEY": PROVIDER_KEY,
            "OPENAI_BASE_URL": self.fake.base_url,
            "CLLAMA_UI_TOKEN": UI_TOKEN,
            "CLLAMA_MASTER_KEY": MASTER_KEY,
        }
        pool = HTTPConnectionPool(reactor, persistent=False)  # every request its own connection
        self.addCleanup(pool.closeCachedConnections)
        # Cookies sent by hand only: the jar keeps none.
        jar = CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))
        self.http = treq.client.HTTPClient(Agent(reactor, pool=pool), cookiejar=jar)
        self.process, _transport = spawn_host(self, env, ("--workers", "2"))
        ports = await self.process.ready
        await self.process.wait_ready(2)
        self.api = f"http://127.0.0.1:{ports['API']}"
        self.ui = f"http://127.0.0.1:{ports['UI']}"

    def lines(self, kind, **fields):
        return [
            x for x in self.process.audit_lines()
            if x["type"] == kind and all(x.get(k) == v for k, v in fields.items())
        ]

    async def on_both_workers(self, send, seen, batch=6, most=16):
        """
        C{send()} a few at a time, on connections of their own, until
        C{seen()} (the audit lines they wrote) names both workers; every
        answer must be a success.  Returns the answers.  (A batch of 6 needs
        two accepts: a worker takes at most 4 connections per wake-up.)
        """
        answers = []
        for _ in range(most):
            round_ = await defer.gatherResults([send() for _ in range(batch)])
            for response in round_:
                await response.content()
            answers.extend(round_)
            count = len(answers)
            await self.process.wait(lambda n=count: len(seen()) >= n)
            if {x["worker"] for x in seen()} == {0, 1}:
                break
        self.assertEqual({x["worker"] for x in seen()}, {0, 1}, "one worker took every connection")
        return answers

    async def test_a_key_minted_on_one_worker_works_on_both_at_once(self):
        minted = await self.http.post(self.api + "/key/generate", json={"user_id": "session-7"},
                                      headers={"Authorization": f"Bearer {MASTER_KEY}"})
        self.assertEqual(minted.code, 200)
        key = (await minted.json())["key"]
        SCANNER.register(key)
        gate = defer.Deferred()
        answer = openai_completion("hi", "gpt-4o-mini", 5, 1)
        self.fake.enqueue(*[Reply(json=answer, hold_until=gate) for _ in range(40)])
        sent = []
        # Requests held in flight until both workers hold one: neither refuses the new key.
        for _ in range(10):
            sent.extend(
                self.http.post(self.api + "/v1/chat/completions", json=chat_body(),
                               headers={"Authorization": f"Bearer {key}"})
                for _ in range(4)
            )
            count = len(sent)
            await self.process.wait(lambda n=count: len(self.lines("request")) >= n)
            if {x["worker"] for x in self.lines("request")} == {0, 1}:
                break
        gate.callback(None)
        responses = await defer.gatherResults(sent)
        self.assertEqual([r.code for r in responses], [200] * len(responses))
        for r in responses:
            await r.content()
        self.assertEqual({x["worker"] for x in self.lines("request")}, {0, 1})
        self.assertEqual({x["claw_id"] for x in self.lines("request")}, {"session-7"})
        self.assertNotIn(key, self.process.stdout.decode() + self.process.stderr.decode())

    async def test_a_session_works_on_both_workers_and_ends_on_both(self):
        page = await self.http.get(self.ui + "/signin", headers={"Accept": "text/html"})
        nonce = re.search(r'name="csrf" value="([^"]+)"', await page.text()).group(1)
        signin_cookie = set_cookies(page)["cllama_signin"]
        signed_in = await self.http.post(
            self.ui + "/signin", data={"csrf": nonce, "token": UI_TOKEN, "name": "ada", "next": "/"},
            headers={"Accept": "text/html", "Cookie": f"cllama_signin={signin_cookie}"}, allow_redirects=False,
        )
        self.assertEqual(signed_in.code, 303)
        session = set_cookies(signed_in)["cllama_session"]
        cookie = {"Cookie": f"cllama_session={session}"}
        page = await self.http.get(self.ui + "/", headers={"Accept": "text/html", **cookie})
        self.assertEqual(page.code, 200)
        csrf = re.search(r'name="csrf" value="([^"]+)"', await page.text()).group(1)

        # A state change (an audited reload) with the cookie and its form token, on both workers.
        def reload():
            return self.http.post(self.ui + "/api/reload", json={}, headers={"X-CSRF-Token": csrf, **cookie})

        ada = "operator:ada@127.0.0.1"
        answers = await self.on_both_workers(reload, lambda: self.lines("operator", action="reload", actor=ada))
        self.assertEqual({r.code for r in answers}, {200})
        # Each worker also reloads when told of the other's (the change feed, within 0.5 s): said so.
        self.assertLessEqual({x["actor"] for x in self.lines("operator", action="reload")}, {ada, "another instance"})

        signed_out = await self.http.post(self.ui + "/signout", data={"csrf": csrf},
                                          headers={"Accept": "text/html", **cookie}, allow_redirects=False)
        self.assertEqual(signed_out.code, 303)
        # The worker that signed out refuses at once; the other once it confirms the session
        # again (every few seconds; at once once it has read the change feed).
        deadline = reactor.seconds() + RECHECK_INTERVAL + 10
        refused_rounds = 0
        while refused_rounds < 3:
            self.assertLess(reactor.seconds(), deadline, "a worker still accepts the signed-out session")
            round_ = await defer.gatherResults([self.http.get(self.ui + "/api/status", headers=cookie)
                                                for _ in range(8)])
            for response in round_:
                await response.content()
            refused_rounds = refused_rounds + 1 if {r.code for r in round_} == {401} else 0
            await task.deferLater(reactor, 0.25, lambda: None)
