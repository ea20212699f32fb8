"""
Bad input over the real proxy: a 400 in the surface's own shape, audited,
a $0 ledger row, nothing reserved, nothing sent upstream; and the agent's
next good turn is served, billed and kept in its session history.  Then the
real daemon: a bad body does not hurt it, and an agent added while it runs
is served without a restart.
"""

import json
import os

import treq
from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from cllama_tx.surfaces.validate import MAX_DEPTH
from cllama_tx.testing import FakeProvider, Reply, anthropic_message, openai_completion
from tests.runtime.test_daemon import spawn_daemon
from tests.support import AGENT, PROVIDER_KEY, SECRET, ProxyHarness, chat_body, write_agent
from tests.test_governance_e2e import price_file

BUDGETED = "budgeted"
TOKEN = f"{BUDGETED}:{SECRET}"
BUDGET = {"limit_usd": 5, "max_requests": 1, "window": "1h", "behavior": "hard_stop"}
CHAT_PATH = "/v1/chat/completions"
MESSAGES_PATH = "/v1/messages"


def nested(levels: int) -> bytes:
    """A value nested C{levels} arrays deep."""
    return b"[" * levels + b"]" * levels


def body(surface: str, extra: bytes = b"") -> bytes:
    """A request of C{surface} with C{extra} members spliced in as raw JSON."""
    if surface == CHAT_PATH:
        start = b'{"model":"openai/gpt-test","messages":[{"role":"user","content":"hi"}]'
    else:
        start = b'{"model":"anthropic/claude-test","max_tokens":100,"messages":[{"role":"user","content":"hi"}]'
    return start + (b"," + extra if extra else b"") + b"}"


INVALID_JSON = "invalid_json"
INVALID_PARAMETER = "invalid_parameter"
TOO_DEEP = f"the request body is refused: nested deeper than {MAX_DEPTH} levels"
OUT_OF_RANGE = "the request body is refused: a number is out of range (beyond about 1.8e308)"

# (what, raw members, code, message) refused on both surfaces.
BOTH = [
    ("1,000 levels", b'"x":' + nested(1000), INVALID_JSON, TOO_DEEP),
    ("5,000 levels of objects", b'"x":' + b'{"a":' * 5000 + b"1" + b"}" * 5000, INVALID_JSON, TOO_DEEP),
    # The body object is level 1: "x" at MAX_DEPTH levels makes MAX_DEPTH + 1.
    ("one level too deep", b'"x":' + nested(MAX_DEPTH), INVALID_JSON, TOO_DEEP),
    ("NaN", b'"temperature":NaN', INVALID_JSON, "the request body is not valid JSON: NaN is not a JSON number"),
    ("Infinity", b'"temperature":Infinity', INVALID_JSON,
     "the request body is not valid JSON: Infinity is not a JSON number"),
    ("-Infinity", b'"top_p":-Infinity', INVALID_JSON,
     "the request body is not valid JSON: -Infinity is not a JSON number"),
    ("1e400", b'"max_tokens":1e400', INVALID_JSON, OUT_OF_RANGE),
    ("-1e400 anywhere", b'"metadata":{"x":[-1e400]}', INVALID_JSON, OUT_OF_RANGE),
    ("a 5,000-digit integer", b'"max_tokens":1' + b"0" * 5000, INVALID_JSON,
     "the request body is refused: a number has too many digits"),
    ("max_tokens 10**400", b'"max_tokens":1' + b"0" * 400, INVALID_PARAMETER,
     "'max_tokens' must be an integer from 1 to 2147483647"),
    ("max_tokens 2**31", b'"max_tokens":2147483648', INVALID_PARAMETER,
     "'max_tokens' must be an integer from 1 to 2147483647"),
    ("max_tokens 0", b'"max_tokens":0', INVALID_PARAMETER, "'max_tokens' must be an integer from 1 to 2147483647"),
    ("max_tokens -5", b'"max_tokens":-5', INVALID_PARAMETER,
     "'max_tokens' must be an integer from 1 to 2147483647"),
    ("max_tokens 100.0", b'"max_tokens":100.0', INVALID_PARAMETER,
     "'max_tokens' must be an integer, not a decimal number"),
    ("max_tokens \"100\"", b'"max_tokens":"100"', INVALID_PARAMETER, "'max_tokens' must be an integer, not a string"),
    ("max_tokens true", b'"max_tokens":true', INVALID_PARAMETER, "'max_tokens' must be an integer, not a boolean"),
    ("stream \"true\"", b'"stream":"true"', INVALID_PARAMETER,
     "'stream' must be a boolean (true or false), not a string"),
    ("stream 1", b'"stream":1', INVALID_PARAMETER, "'stream' must be a boolean (true or false), not an integer"),
    ("stream {}", b'"stream":{}', INVALID_PARAMETER, "'stream' must be a boolean (true or false), not an object"),
]

# Chat-only fields.
CHAT_ONLY = [
    ("max_completion_tokens 1.5", b'"max_completion_tokens":1.5', INVALID_PARAMETER,
     "'max_completion_tokens' must be an integer, not a decimal number"),
    ("n 0", b'"n":0', INVALID_PARAMETER, "'n' must be an integer from 1 to 128"),
    ("n 129", b'"n":129', INVALID_PARAMETER, "'n' must be an integer from 1 to 128"),
    ("stream_options \"usage\"", b'"stream":true,"stream_options":"usage"', INVALID_PARAMETER,
     "'stream_options' must be an object, not a string"),
    ("include_usage \"yes\"", b'"stream":true,"stream_options":{"include_usage":"yes"}', INVALID_PARAMETER,
     "'stream_options.include_usage' must be a boolean, not a string"),
]


class BadInputTests(TestCase):
    """Each bad body, on each surface, over loopback."""

    @defer.inlineCallbacks
    def setUp(self):
        self.history_dir = os.path.abspath(self.mktemp())
        self.h = yield ProxyHarness(
            self,
            pricing_file=price_file(self),
            fake_providers=("openai", "anthropic"),
            history_dir=self.history_dir,
        ).start()
        write_agent(self.h.context_root, BUDGETED, SECRET, budget=BUDGET)

    def expected_body(self, surface, code, message):
        if surface == MESSAGES_PATH:
            return {"type": "error", "error": {"type": "invalid_request_error", "message": message}}
        return {"error": {"message": message, "type": "invalid_request_error", "code": code}}

    @defer.inlineCallbacks
    def assertRefused(self, surface, what, raw, code, message):
        """One refusal: its body, its audit line, its ledger row."""
        audited = len(self.h.audit_lines())
        response = yield self.h.post(surface, data=raw, token=TOKEN)
        got = yield response.json()
        self.assertEqual((response.code, got), (400, self.expected_body(surface, code, message)), what)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json"], what)
        [request_id] = response.headers.getRawHeaders("x-cllama-request-id")
        self.assertEqual(self.h.fake.received, [], what)
        lines = self.h.audit_lines()[audited:]
        self.assertEqual([line["type"] for line in lines], ["error"], what)
        [line] = lines
        self.assertEqual(
            (line["claw_id"], line["request_id"], line["status_code"], line["error"], line["cost_usd"]),
            (BUDGETED, request_id, 400, message, 0),
            what,
        )
        return request_id

    @defer.inlineCallbacks
    def assertBooksClean(self, refused_ids):
        """$0 rows for every refusal, and nothing counted or held in the budget."""
        yield self.h.committed()
        rows = yield self.h.ledger_rows()
        self.assertEqual([row["request_id"] for row in rows], refused_ids)
        for row in rows:
            self.assertEqual(
                (row["agent"], row["status"], row["cost_usd"], row["input_tokens"], row["output_tokens"]),
                (BUDGETED, 400, 0, 0, 0),
            )
        context = self.h.contexts.get(BUDGETED)
        usage = self.h.governance.book.usage(BUDGETED, self.h.governance.budget(context))
        self.assertEqual(
            (usage.cost_usd, usage.requests, usage.reserved_usd, usage.reserved_requests), (0, 0, 0, 0)
        )

    @defer.inlineCallbacks
    def assertStillServed(self, surface, reply):
        """
        The agent's budget (one request) is untouched: its next good turn is
        served and kept in its session history, the one after is refused.
        """
        self.h.fake.enqueue(reply)
        response = yield self.h.post(surface, data=body(surface), token=TOKEN)
        self.assertEqual(response.code, 200)
        yield response.content()
        self.assertEqual(len(self.h.fake.received), 1)
        yield self.h.history._when_idle()
        with open(os.path.join(self.history_dir, BUDGETED, "history.jsonl"), "rb") as f:
            [line] = f.read().splitlines()
        entry = json.loads(line)
        self.assertEqual((entry["path"], entry["status_code"]), (surface, 200))
        over = yield self.h.post(surface, data=body(surface), token=TOKEN)
        self.assertEqual(over.code, 429)
        yield over.content()

    @defer.inlineCallbacks
    def refuse_all(self, surface, cases):
        refused = []
        for what, extra, code, message in cases:
            refused.append((yield self.assertRefused(surface, what, body(surface, extra), code, message)))
        yield self.assertBooksClean(refused)

    @defer.inlineCallbacks
    def test_chat_surface(self):
        yield self.refuse_all(CHAT_PATH, BOTH + CHAT_ONLY)
        yield self.assertStillServed(CHAT_PATH, Reply(json=openai_completion("ok", "gpt-test", 5, 2)))

    @defer.inlineCallbacks
    def test_messages_surface(self):
        yield self.refuse_all(MESSAGES_PATH, BOTH)
        yield self.assertStillServed(MESSAGES_PATH, Reply(json=anthropic_message("ok", "claude-test", 5, 2)))

    @defer.inlineCallbacks
    def test_across_surfaces(self):
        """A body bound for translation is refused before it is translated."""
        yield self.refuse_all(CHAT_PATH, [
            ("NaN to anthropic", b'"model":"anthropic/claude-test","temperature":NaN', INVALID_JSON,
             "the request body is not valid JSON: NaN is not a JSON number"),
        ])

    @defer.inlineCallbacks
    def test_token_counting_surface(self):
        response = yield self.h.post(
            "/v1/messages/count_tokens", data=body(MESSAGES_PATH, b'"x":' + nested(1000)), token=TOKEN
        )
        self.assertEqual(
            (response.code, (yield response.json())),
            (400, self.expected_body(MESSAGES_PATH, INVALID_JSON, TOO_DEEP)),
        )
        self.assertEqual(self.h.fake.received, [])

    @defer.inlineCallbacks
    def test_what_is_still_accepted(self):
        """
        The limit itself, null for the checked fields (as the providers read
        it: absent), large finite numbers: forwarded as sent.
        """
        self.h.fake.strict = False  # the bodies carry made-up fields: the proxy's judgement is tested here
        accepted = [
            b'"x":' + nested(MAX_DEPTH - 1),
            b'"stream":null,"max_tokens":null,"max_completion_tokens":null,"n":null,"stream_options":null',
            b'"max_tokens":2147483647,"n":1,"temperature":1e308,"top_p":-0.0',
            b'"stream":false,"stream_options":{"include_usage":null}',
        ]
        for extra in accepted:
            self.h.fake.enqueue(Reply(json=openai_completion("ok", "gpt-test", 5, 2)))
            raw = body(CHAT_PATH, extra)
            response = yield self.h.post(CHAT_PATH, data=raw, token=f"{AGENT}:{SECRET}")
            self.assertEqual(response.code, 200, extra[:80])
            yield response.content()
            self.assertEqual(self.h.fake.received[-1].json, dict(json.loads(raw), model="gpt-test"))
        self.assertEqual(len(self.h.fake.received), len(accepted))

    @defer.inlineCallbacks
    def test_provider_answer_nested_past_the_stack(self):
        """
        A provider's JSON answer nested past Python's recursion limit is no
        500: the agent gets it as sent, like any answer that is not JSON.
        """
        deep = b'{"id":"x","object":"chat.completion","choices":[],"x":' + nested(5000) + b"}"
        self.h.fake.enqueue(Reply(raw=deep, headers={"content-type": "application/json"}))
        response = yield self.h.post(CHAT_PATH, data=body(CHAT_PATH), token=f"{AGENT}:{SECRET}")
        self.assertEqual((response.code, (yield response.content())), (200, deep))
        line = yield self.h.wait_for_audit(lambda line: line["type"] in ("response", "error"))
        self.assertEqual((line["type"], line["status_code"]), ("response", 200))

    @defer.inlineCallbacks
    def test_unauthenticated_bad_body_is_a_403(self):
        """Identity comes first: a bad body from a stranger is no 400."""
        response = yield self.h.post(CHAT_PATH, data=body(CHAT_PATH, b'"x":NaN'), token=f"ghost:{SECRET}")
        self.assertEqual(response.code, 403)
        self.assertEqual((yield response.json())["error"]["code"], "invalid_credentials")


class DaemonTests(TestCase):
    """The real daemon, as the issue probed it."""

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.fake = FakeProvider(reactor)
        yield self.fake.start()
        self.addCleanup(self.fake.stop)
        base = os.path.abspath(self.mktemp())
        self.context_root = os.path.join(base, "context")
        os.makedirs(os.path.join(base, "auth"))
        write_agent(self.context_root, AGENT, SECRET, budget={"limit_usd": 5, "window": "1h"})
        env = {
            "LISTEN_ADDR": "tcp:0:interface=127.0.0.1",
            "UI_ADDR": "127.0.0.1:0",
            "CLAW_CONTEXT_ROOT": self.context_root,
            "CLAW_AUTH_DIR": os.path.join(base, "auth"),
            "CLLAMA_STATE_DIR": os.path.join(base, "state"),
            "OPENAI_API_KEY": PROVIDER_KEY,
            "OPENAI_BASE_URL": self.fake.base_url,
        }
        self.process, _ = spawn_daemon(self, env)
        ports = yield self.process.ready
        self.api = f"http://127.0.0.1:{ports['API']}"
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        self.http = treq.client.HTTPClient(Agent(reactor, pool=pool))

    def post(self, raw, agent=AGENT):
        return self.http.post(
            self.api + CHAT_PATH,
            data=raw,
            headers={"Authorization": f"Bearer {agent}:{SECRET}", "Content-Type": "application/json"},
        )

    @defer.inlineCallbacks
    def test_bad_bodies_are_400s(self):
        for extra, code in [
            (b'"x":' + nested(1000), INVALID_JSON),
            (b'"max_tokens":1e400', INVALID_JSON),
            (b'"max_tokens":1' + b"0" * 400, INVALID_PARAMETER),
            (b'"temperature":NaN', INVALID_JSON),
            (b'"stream":"true"', INVALID_PARAMETER),
        ]:
            response = yield self.post(body(CHAT_PATH, extra))
            got = yield response.json()
            self.assertEqual((response.code, got["error"]["code"]), (400, code), extra[:40])
        self.assertEqual(self.fake.received, [])
        self.assertNotIn(b"Traceback", self.process.stderr)
        yield self.process.wait_for_audit(lambda lines: len(lines) == 5)
        self.assertEqual({(line["type"], line["status_code"]) for line in self.process.audit_lines()}, {("error", 400)})

    @defer.inlineCallbacks
    def test_agent_added_while_running_is_served(self):
        """
        Loaded by the watcher, ahead of its first request: the log says so
        before the request is sent.
        """
        refused = yield self.post(json.dumps(chat_body()).encode(), agent="newcomer")
        self.assertEqual(refused.code, 403)
        yield refused.content()
        loaded = self.process.wait_for_stderr(b"Agent context newcomer loaded")
        write_agent(self.context_root, "newcomer", SECRET)
        yield loaded
        self.fake.enqueue(Reply(json=openai_completion("hello", "gpt-4o-mini", 3, 1)))
        response = yield self.post(json.dumps(chat_body()).encode(), agent="newcomer")
        self.assertEqual(response.code, 200)
        self.assertEqual((yield response.json())["choices"][0]["message"]["content"], "hello")
