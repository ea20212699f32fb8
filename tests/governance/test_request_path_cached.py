"""
Tests for the second round of governance's request-path work (issue 21):
what is computed once or kept answers exactly as what it replaces, and a
change to anything a kept answer read applies to the next request.
"""

from __future__ import annotations

import json
import random

import attrs
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from cllama_tx.accounting.pricing import Price
from cllama_tx.accounting.usage import estimate_prompt_tokens, text_messages_chars
from cllama_tx.governance.alerts import AlertNotifier, Webhook
from cllama_tx.governance.budgets import BudgetBook, Refusal, parse_budget
from cllama_tx.governance.engine import Admission as EngineAdmission
from cllama_tx.governance.engine import Governance
from cllama_tx.governance.mappings import OPERATOR, ModelMapping
from cllama_tx.governance.policy import parse_policy
from cllama_tx.governance.ratelimit import RateLimiter
from cllama_tx.governance.request_cost import read_request, read_request_and_estimate
from cllama_tx.governance.resolution import DEFAULT, Router, TableEntry
from cllama_tx.governance.resolution_trace import ResolutionTrace
from cllama_tx.pipeline import cost_report
from cllama_tx.providers.catalog import auth_headers
from cllama_tx.providers.registry import ProviderRegistry
from cllama_tx.surfaces.errors import ProxyError
from cllama_tx.surfaces.matrix import OPENAI_CHAT, ModelRef

BASE = {
    "model": "openai/gpt-4o-mini",
    "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Say hello."},
    ],
    "temperature": 0,
}

#: Bodies on both sides of the one-walk short cut: text only, output
#: limits, every field the shape reads, media, odd messages.
BODIES = [
    BASE,
    {**BASE, "max_tokens": 100},
    {**BASE, "max_completion_tokens": 7, "max_tokens": 9},
    {**BASE, "max_tokens": "12"},
    {**BASE, "max_tokens": 0},
    {**BASE, "n": 3},
    {**BASE, "tools": [{"type": "function", "function": {"name": "x", "parameters": {"type": "object"}}}],
     "tool_choice": "required"},
    {**BASE, "functions": [{"name": "f"}]},
    {**BASE, "thinking": {"budget_tokens": 99}, "max_tokens": 5},
    {**BASE, "reasoning": {"max_tokens": 40}},
    {**BASE, "generationConfig": {"maxOutputTokens": 50, "candidateCount": 2}},
    {**BASE, "extra_body": {"google": {"thinking_config": {"thinking_budget": 300}}}},
    {**BASE, "prediction": {"content": "abc"}},
    {**BASE, "system": "you are", "mcp_servers": [{}, {}]},
    {**BASE, "system": [{"type": "text", "text": "blocks"}]},
    {**BASE, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:xx"}}]}]},
    {**BASE, "messages": [{"role": "user", "content": [{"type": "text", "text": "a block"}]}]},
    {**BASE, "messages": [{"role": "user", "content": "x", "name": "bob", "weight": 1.5, "flag": True, "x": None}]},
    {**BASE, "messages": [{"role": "user", "content": "x", "audio": {"id": "a"}}]},
    {**BASE, "messages": [{"role": "assistant", "content": None,
                           "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{}"}}]}]},
    {**BASE, "messages": [{"type": "image", "content": "x"}]},
    {**BASE, "messages": [{"type": "redacted_thinking", "data": "zz"}]},
    {**BASE, "messages": ["hi", {"role": "user", "content": "x"}]},
    {**BASE, "messages": [{"role": "tool", "tool_call_id": "call_1", "content": "ünïcode ✓"}]},
    {**BASE, "messages": []},
    {"model": "m", "input": "hi", "instructions": "be brief"},
    {"model": "m", "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "data:x"}]}]},
]


class OneWalkTests(SynchronousTestCase):
    """L{read_request_and_estimate} is L{read_request} and L{estimate_prompt_tokens}, whatever the body."""

    def test_same_as_both_walks(self) -> None:
        for doc in BODIES:
            size = len(json.dumps(doc))
            for wire_format in ("openai", "anthropic", "responses"):
                with self.subTest(doc=doc, wire_format=wire_format):
                    self.assertEqual(
                        read_request_and_estimate(doc, size, wire_format),
                        (read_request(doc, size), estimate_prompt_tokens(doc, wire_format)),
                    )

    def test_reference_body(self) -> None:
        """The bench's body: its bytes, no output limit, the text at four characters a token plus framing."""
        size = len(json.dumps(BASE))
        shape, estimate = read_request_and_estimate(BASE, size, "openai")
        self.assertEqual(shape.text_bytes, size)
        self.assertIsNone(shape.max_tokens)
        self.assertEqual((shape.choices, shape.images, shape.tools, shape.opaque_inputs), (1, 0, 0, 0))
        chars = len("You are a helpful assistant.") + len("Say hello.")
        self.assertEqual(estimate, (chars + 3) // 4 + 2 * 4)

    def test_text_messages_chars(self) -> None:
        """Strings count except identifiers and roles; anything nested declines (None)."""
        self.assertEqual(text_messages_chars([{"role": "user", "content": "abc", "name": "de", "id": "zzz"}]), 5)
        self.assertIsNone(text_messages_chars([{"role": "user", "content": [{"type": "text", "text": "a"}]}]))
        self.assertIsNone(text_messages_chars(["text"]))
        self.assertIsNone(text_messages_chars([{"type": "image_url", "content": "x"}]))
        self.assertIsNone(text_messages_chars([{"type": ["odd"], "content": "x"}]))
        self.assertEqual(text_messages_chars([]), 0)

    def test_mcp_servers_do_not_leak(self) -> None:
        """The shared empty media of the short cut is never counted into (MCP servers are per body)."""
        with_mcp = {**BASE, "mcp_servers": [{}, {}, {}]}
        size = len(json.dumps(with_mcp))
        self.assertEqual(read_request_and_estimate(with_mcp, size, "openai")[0].opaque_inputs, 3)
        self.assertEqual(read_request_and_estimate(BASE, size, "openai")[0].opaque_inputs, 0)
        self.assertEqual(read_request_and_estimate(with_mcp, size, "openai")[0].opaque_inputs, 3)


class _Table:
    """The model table file's object: its parsed table in C{current}, replaced whole on reload."""

    def __init__(self, entries: dict) -> None:
        self.current = _Current(entries)


class _Current:
    def __init__(self, entries: dict) -> None:
        self.entries = entries
        self.families = DEFAULT


@attrs.frozen
class _Agent:
    agent_id: str = "tiverton"


class _Ex:
    request_id = "r1"
    resolve_hints = None


class KeptResolutionTests(SynchronousTestCase):
    """
    A resolution kept for an agent's name is the one the order gives now:
    any change to what it read (a key, a reload of providers.json, the
    model table, a stored mapping, the agent's policy) applies to the next
    request.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.registry = ProviderRegistry(
            {"OPENAI_API_KEY": "sk-openai-kept-1", "OPENROUTER_API_KEY": "sk-or-kept-1"}, None, self.clock
        )
        self.addCleanup(self.registry.stop_probes)
        self.router = Router(providers=self.registry, table=_Table({}))

    def resolve(self, requested, policy=None, bare=None, agent=_Agent()):
        return self.router.resolve(agent, requested, policy, bare, _Ex())

    def test_kept_is_reused(self) -> None:
        first = self.resolve("openai/gpt-4o-mini")
        self.assertIs(self.resolve("openai/gpt-4o-mini"), first)
        self.assertEqual((str(first.ref), first.steps), ("openai/gpt-4o-mini", ()))
        # Another name, another surface: their own resolutions.
        self.assertEqual(str(self.resolve("gpt-4o").ref), "openai/gpt-4o")
        self.assertEqual(str(self.resolve("my-model", bare="anthropic").ref), "openrouter/anthropic/my-model")

    def test_a_disabled_key_applies_at_once(self) -> None:
        """The provider loses its only key: the next request goes through OpenRouter, as the order says."""
        self.assertEqual(str(self.resolve("openai/gpt-4o-mini").ref), "openai/gpt-4o-mini")
        self.registry.disable_key("openai", "seed:OPENAI_API_KEY")
        found = self.resolve("openai/gpt-4o-mini")
        self.assertEqual(str(found.ref), "openrouter/openai/gpt-4o-mini")
        self.assertEqual([step.rule for step in found.steps], ["openrouter_fallback"])
        self.registry.activate_key("openai", "seed:OPENAI_API_KEY")
        self.assertEqual(str(self.resolve("openai/gpt-4o-mini").ref), "openai/gpt-4o-mini")

    def test_a_reload_applies_at_once(self) -> None:
        """providers.json and the environment read again without the key: the next request sees it."""
        self.assertEqual(str(self.resolve("gpt-4o").ref), "openai/gpt-4o")
        self.registry.reload({"OPENROUTER_API_KEY": "sk-or-kept-1"})
        self.assertEqual(str(self.resolve("gpt-4o").ref), "openrouter/openai/gpt-4o")
        self.registry.reload({})
        # No key anywhere: the catalog's provider, whose refusal the registry gives when it is sent.
        found = self.resolve("gpt-4o")
        self.assertEqual((str(found.ref), [s.rule for s in found.steps]), ("openai/gpt-4o", ["bare_family"]))

    def test_an_added_key_applies_at_once(self) -> None:
        """xai had no key (OpenRouter carried it); a key added in the UI routes it to xai itself."""
        self.assertEqual(str(self.resolve("grok-4").ref), "openrouter/x-ai/grok-4")
        self.registry.add_key("xai", "xai-kept-secret-1")
        self.assertEqual(str(self.resolve("grok-4").ref), "xai/grok-4")

    def test_a_new_model_table_applies_at_once(self) -> None:
        with self.assertRaises(ProxyError):
            self.resolve("house")
        self.router._table.current = _Current({"house": TableEntry("house", (ModelRef("openai", "gpt-4o"),))})
        found = self.resolve("house")
        self.assertEqual((str(found.ref), [s.rule for s in found.steps]), ("openai/gpt-4o", ["model_table"]))

    def test_a_stored_mapping_applies_at_once(self) -> None:
        """An operator's mapping put after the name was resolved: the next request follows it."""
        store = _Mappings()
        self.router.attach(mappings=store)
        self.assertEqual(str(self.resolve("openai/gpt-4o-mini").ref), "openai/gpt-4o-mini")
        store.set(ModelMapping("openai/gpt-4o-mini", "openai/gpt-4o", OPERATOR, 1.0, 1.0, 1.0, "ops", {}))
        found = self.resolve("openai/gpt-4o-mini")
        self.assertEqual((str(found.ref), [s.rule for s in found.steps]), ("openai/gpt-4o", ["mapping"]))
        store.set(None, "openai/gpt-4o-mini")
        self.assertEqual(str(self.resolve("openai/gpt-4o-mini").ref), "openai/gpt-4o-mini")

    def test_a_store_without_change_signal_is_never_kept(self) -> None:
        store = _Mappings()
        del store.on_change
        self.router.attach(mappings=store)
        first = self.resolve("openai/gpt-4o-mini")
        self.assertIsNot(self.resolve("openai/gpt-4o-mini"), first)
        self.assertEqual(self.resolve("openai/gpt-4o-mini"), first)

    def test_a_reloaded_policy_applies_at_once(self) -> None:
        """A context reloaded with another policy (a new policy object): its own decision."""
        old = parse_policy({"allowed": [{"slot": "primary", "ref": "openai/gpt-4o-mini"}]})
        new = parse_policy({"allowed": [{"slot": "primary", "ref": "openai/gpt-4o"}]})
        self.assertEqual(str(self.resolve("openai/gpt-4o-mini", old).ref), "openai/gpt-4o-mini")
        found = self.resolve("openai/gpt-4o-mini", new)
        self.assertEqual(str(found.ref), "openai/gpt-4o")
        self.assertEqual([s.rule for s in found.steps], ["disallowed_clamped"])
        self.assertEqual(str(self.resolve("openai/gpt-4o-mini", old).ref), "openai/gpt-4o-mini")

    def test_keys_are_never_kept(self) -> None:
        """A virtual key's aliases are read per request (they change with the key): nothing is kept for it."""

        class Key:
            team_id = None
            aliases = {"fast": "openai/gpt-4o-mini"}

        @attrs.frozen
        class KeyPrincipal:
            key: object = Key()
            agent_id: str = "key-1"

        principal = KeyPrincipal()
        self.assertEqual(str(self.resolve("fast", agent=principal).ref), "openai/gpt-4o-mini")
        Key.aliases = {"fast": "openai/gpt-4o"}
        self.assertEqual(str(self.resolve("fast", agent=principal).ref), "openai/gpt-4o")
        self.assertEqual(self.router._kept, {})

    def test_the_trace_records_every_request(self) -> None:
        trace = ResolutionTrace(self.clock, size=10)
        self.router.attach(trace=trace)
        for _ in range(3):
            self.resolve("gpt-4o")
        entries = trace.entries()
        self.assertEqual(len(entries), 3)
        self.assertEqual({(e["decided_by"], e["result"], e["caller"], e["request_id"]) for e in entries},
                         {("bare_family", "openai/gpt-4o", "tiverton", "r1")})

    def test_refusals_are_not_kept(self) -> None:
        for _ in range(2):
            with self.assertRaises(ProxyError):
                self.resolve("junk-model")
        self.assertEqual(self.router._kept, {})


class _Mappings:
    """A mapping store's reads and its change signal (L{cllama_tx.governance.mapping_store.MappingStore})."""

    loaded = True

    def __init__(self) -> None:
        self.current: dict = {}
        self.on_change: list = []

    def set(self, mapping, name=None) -> None:
        name = mapping.name if mapping is not None else name
        if mapping is None:
            self.current.pop(name, None)
        else:
            self.current[name] = mapping
        for observer in self.on_change:
            observer(name)


class RateAdmitTests(SynchronousTestCase):
    """L{RateLimiter.admit} counts and refuses exactly as L{RateLimiter.check}, without its object when admitted."""

    def test_same_as_check(self) -> None:
        clock = Clock()
        clock.advance(1000.25)
        by_check, by_admit = RateLimiter(clock), RateLimiter(clock)
        for step, (rpm, tpm, tokens) in enumerate([(3, 100, 10), (3, 100, 40), (3, 100, 60), (3, 100, 5), (3, None, 1),
                                                   (None, 100, 30), (0, None, 1), (3, 20, 21), (None, None, 7)] * 3):
            verdict = by_check.check("k", rpm, tpm, tokens)
            admitted = by_admit.admit("k", rpm, tpm, tokens)
            if verdict.allowed:
                self.assertEqual(admitted, clock.seconds())
                self.assertEqual(verdict.at, admitted)
            else:
                self.assertEqual(admitted, verdict)
            self.assertEqual(by_check.usage("k"), by_admit.usage("k"))
            if step % 4 == 3:
                by_check.settle("k", tokens, tokens // 2, admitted_at=clock.seconds())
                by_admit.settle("k", tokens, tokens // 2, admitted_at=clock.seconds())
            clock.advance(7.5)

    def test_arguments_are_still_checked(self) -> None:
        limiter = RateLimiter(Clock())
        for rpm, tpm, tokens in ((-1, None, 1), (True, None, 1), (1.5, None, 1), (None, -2, 1), (None, None, -1),
                                 (None, None, True), (None, None, float("inf"))):
            self.assertRaises(ValueError, limiter.admit, "k", rpm, tpm, tokens)
            self.assertRaises(ValueError, limiter.check, "k", rpm, tpm, tokens)
        self.assertRaises(ValueError, limiter.settle, "k", -1, 0)
        self.assertRaises(ValueError, limiter.settle, "k", 0, True)
        self.assertEqual(limiter.check("k", None, None, 2.5).at, 0.0)  # a float estimate is rounded up
        self.assertEqual(limiter.usage("k"), (1, 3))

    def test_expiry_as_without_the_quiet_second(self) -> None:
        """Keys are forgotten exactly when the first key's window is empty, the clock stepping back or not."""
        clock = Clock()
        clock.advance(5_000)
        limiter = RateLimiter(clock)
        rng = random.Random(7)
        for _ in range(2_000):
            key = rng.choice("abcdef")
            action = rng.random()
            if action < 0.6:
                limiter.admit(key, None, None, rng.randrange(50))
            elif action < 0.8:
                limiter.settle(key, 10, rng.randrange(20), admitted_at=clock.seconds() - rng.random() * 5)
            else:
                limiter.absorb(key, clock.seconds() - rng.random() * 90, 3)
            step = rng.choice([0.0, 0.3, 1.0, 7.0, 30.0, 70.0, -2.0])
            clock.advance(step) if step >= 0 else setattr(clock, "rightNow", clock.rightNow + step)
            second = int(clock.seconds() // 1)
            expected = list(limiter._states.items())
            while expected and expected[0][1].last_add + 61 <= second:
                expected.pop(0)
            limiter._expire(second)
            self.assertEqual(list(limiter._states), [k for k, _ in expected])


class _Row:
    """The settled row's fields L{Governance.finish} reads."""

    def __init__(self, cost: float) -> None:
        self.status = 200
        self.prompt_tokens = 10
        self.output_tokens = 20
        self.cost_usd = cost
        self.priced = True


class _FinishEx:
    def __init__(self) -> None:
        self.surface = _Surface()
        self.body_size = 100
        self.request_id = "r1"
        self.admission = None
        self.budget_report = None
        self.resolve_hints = None


@attrs.frozen
class _Surface:
    name: str = OPENAI_CHAT
    api_format: str = "openai"
    billable: bool = True


@attrs.frozen
class _Context:
    agent_id: str
    metadata: dict
    budget: dict | None = None
    model_policy: dict | None = None
    timezone: str | None = None


class _Pricing:
    def price(self, provider, model):
        return Price(input=2.0, output=8.0, max_output_tokens=1000)


class _Client:
    def __init__(self) -> None:
        self.posts: list = []

    def post(self, url, data, headers):
        self.posts.append(json.loads(data))
        return defer.succeed(_Answer())


class _Answer:
    code = 200

    def content(self):
        return defer.succeed(b"")


class SettledBudgetTests(SynchronousTestCase):
    """
    A settled request's remaining-budget header and its alerts read the
    spend once (L{BudgetBook.committed}); alerts still fire at every
    threshold, and a whole usage report is built only near one.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.book = BudgetBook(self.clock, _Pricing())
        self.client = _Client()
        self.alerts = AlertNotifier(self.clock, self.client, [Webhook("https://alerts.example/hook")])
        self.governance = Governance(clock=self.clock, book=self.book, limiter=RateLimiter(self.clock),
                                     alerts=self.alerts)
        self.agent = _Context("spender", {}, budget={"limit_usd": 1, "window": "1h"})
        self.reports = 0
        usage = self.book.usage

        def counted(*args, **kwargs):
            self.reports += 1
            return usage(*args, **kwargs)

        self.book.usage = counted  # type: ignore[method-assign]

    def spend(self, cost: float):
        ex = _FinishEx()
        ex.admission = self.governance.admit(ex, self.agent, BASE)
        self.governance.finish(ex, _Row(cost))
        self.clock.advance(1)
        return ex.budget_report

    def test_committed_is_usage(self) -> None:
        budget = parse_budget({"limit_usd": 1, "window": "1h", "max_requests": 10})
        self.assertEqual(self.book.committed("a", budget), (0.0, 0))
        self.book.settle(self.book.reserve("a", budget, 0.5), 1 / 3)
        self.book.settle(self.book.reserve("a", budget, 0.5), None)
        usage = self.book.usage("a", budget)
        self.assertEqual(self.book.committed("a", budget), (usage.cost_usd, usage.requests))
        self.assertEqual(self.book.committed_usd("a", budget), usage.cost_usd)

    def test_alerts_and_remaining(self) -> None:
        report = self.spend(0.3)
        self.assertEqual(report.remaining_usd, 0.7)
        self.assertEqual((self.reports, self.client.posts), (0, []))  # far from a threshold: no usage report
        report = self.spend(0.3)
        self.assertEqual(report.remaining_usd, 0.4)
        self.clock.advance(0)
        self.assertEqual([post["threshold"] for post in self.client.posts], [0.5])
        self.assertEqual(self.reports, 1)
        report = self.spend(0.1)  # announced in this period already: observed again, nothing new
        self.assertAlmostEqual(report.remaining_usd, 0.3)
        self.clock.advance(0)
        self.assertEqual(len(self.client.posts), 1)
        report = self.spend(0.15)
        self.clock.advance(0)
        self.assertEqual([post["threshold"] for post in self.client.posts], [0.5, 0.8])
        self.assertEqual(report.remaining_usd, round(1 - self.book.committed_usd("spender", self.governance.budget(
            self.agent)), 10))

    def test_quiet(self) -> None:
        self.assertTrue(self.alerts.quiet("new", 0.49))
        self.assertFalse(self.alerts.quiet("new", 0.5))
        self.assertFalse(self.alerts.quiet("new", float("nan")))
        self.alerts.observe("marked", "1h", "k", 0.6)
        self.assertFalse(self.alerts.quiet("marked", 0.1))


class CheckedAuthTests(SynchronousTestCase):
    """A key's credential headers are checked once and then reused; a bad key is refused every time."""

    def test_reused_and_equal(self) -> None:
        secret = "sk-checked-" + "ab" * 10
        first = auth_headers("bearer", secret)
        self.assertEqual(first, [(b"Authorization", b"Bearer " + secret.encode())])
        first.append((b"x-mutated", b"1"))  # a caller's list is its own
        self.assertEqual(auth_headers("bearer", secret), [(b"Authorization", b"Bearer " + secret.encode())])
        self.assertEqual(auth_headers("x-api-key", secret), [(b"x-api-key", secret.encode())])
        self.assertEqual(auth_headers("none", secret), [])
        self.assertEqual(auth_headers("none", None), [])

    def test_bad_keys_are_refused_every_time(self) -> None:
        for _ in range(2):
            self.assertRaises(ValueError, auth_headers, "bearer", "has space")
            self.assertRaises(ValueError, auth_headers, "bearer", "ünïcode-key")
            self.assertRaises(ValueError, auth_headers, "bearer", "")
            self.assertRaises(ValueError, auth_headers, "bearer", None)
            self.assertRaises(ValueError, auth_headers, "digest", "sk-fine-key-123")


class _HeaderRequest:
    def __init__(self) -> None:
        self.headers: dict = {}

    def setHeader(self, name: bytes, value: bytes) -> None:  # noqa: N802 (twisted.web's name)
        self.headers[name] = value


class CandidatesHeaderTests(SynchronousTestCase):
    """The models header is written from a kept candidates tuple once, and always says that tuple's models."""

    def headers(self, candidates, openrouter_models=None, remaining=None):
        ex = _FinishEx()
        ex.claw_id = "tiverton"
        ex.admission = EngineAdmission(agent="tiverton", candidates=candidates,
                                       openrouter_models=openrouter_models, remaining_usd=remaining)
        request = _HeaderRequest()
        cost_report.start_headers(request, ex)
        return request.headers

    def test_headers(self) -> None:
        kept = (ModelRef("openai", "gpt-4o-mini"), ModelRef("openai", "gpt-4o"))
        for _ in range(2):
            self.assertEqual(self.headers(kept, remaining=0.25), {
                cost_report.AGENT_HEADER: b"tiverton",
                cost_report.MODELS_HEADER: b"openai/gpt-4o-mini, openai/gpt-4o",
                cost_report.REMAINING_HEADER: b"0.25",
            })
        for index in range(5):  # new tuples (ids may be reused once one is gone): each its own models
            other = (ModelRef("anthropic", f"claude-{index}"),)
            self.assertEqual(self.headers(other)[cost_report.MODELS_HEADER], f"anthropic/claude-{index}".encode())
        self.assertEqual(self.headers(kept, ["a/x", "b/y"])[cost_report.MODELS_HEADER], b"a/x, b/y")
        self.assertNotIn(cost_report.MODELS_HEADER, self.headers(()))


class BookPassTests(SynchronousTestCase):
    """The book's short cuts agree with the passes they save."""

    def test_surely_fits_never_says_more_than_headroom(self) -> None:
        clock = Clock()
        clock.advance(1_000_000)
        book = BudgetBook(clock, _Pricing())
        rng = random.Random(21)
        budgets = [parse_budget({"limit_usd": 1, "window": "1m"}),
                   parse_budget({"limit_usd": 1, "window": "1h", "spent_offset_usd": 0.2}),
                   parse_budget({"limit_usd": 0.5, "period": "daily"}),
                   parse_budget({"limit_usd": 1, "window": "1h", "max_requests": 5})]
        said = {True: 0, False: 0}
        for _ in range(600):
            budget = rng.choice(budgets)
            agent = rng.choice(["a", "b"])
            worst = rng.choice([0.0, 0.01, 0.1, 0.3, 0.6, 1.2])
            fits = book.surely_fits(agent, budget, worst)
            said[fits] += 1
            if fits:
                room = book.headroom(agent, budget)
                self.assertLessEqual(worst, room.settled + 1e-12, (agent, budget, worst))
            held = book.reserve(agent, budget, worst)
            if not isinstance(held, Refusal):
                book.settle(held, rng.random() * worst)
            clock.advance(rng.choice([0.5, 5, 50, 500]))
        self.assertGreater(said[True], 50)
        self.assertGreater(said[False], 50)
        self.assertFalse(book.surely_fits("a", parse_budget({"max_requests": 3, "window": "1h"}), 0.0))

    def test_settle_counting_is_committed(self) -> None:
        clock = Clock()
        clock.advance(1_000_000)
        book = BudgetBook(clock, _Pricing())
        budget = parse_budget({"limit_usd": 10, "window": "1h", "spent_offset_usd": 0.5})
        for cost in (0.1, None, 1 / 3, 0.0):
            held = book.reserve("a", budget, 1.0)
            counts = book.settle_counting(held, cost)
            self.assertEqual(counts, book.committed("a", budget))
            self.assertFalse(book.settle_counting(held, cost))  # settled once
            clock.advance(600)
        released = book.reserve("a", budget, 1.0)
        book.release(released)
        self.assertFalse(book.settle_counting(released, 0.1))
        # Settled after the agent's budget changed: counted there, and the caller reads again.
        held = book.reserve("a", budget, 1.0)
        book.reserve("a", parse_budget({"limit_usd": 20, "window": "1h"}), 0.1)
        self.assertIs(book.settle_counting(held, 0.2), True)
