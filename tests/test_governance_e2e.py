"""
Governance end to end over loopback: model policy and its interventions,
failover, budgets (429 body, Retry-After, tiers, soft alerts), rate limits,
the operator policy file.
"""

import json
import os

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from cllama_tx.testing import Reply, openai_completion, openai_error
from tests.support import AGENT, SECRET, ProxyHarness, chat_body, write_agent

PRICES = {
    "openai": {
        "gpt-test": {"input": 2.0, "output": 8.0},
        "gpt-cheap": {"input": 0.1, "output": 0.4},
    },
    "anthropic": {"claude-test": {"input": 3.0, "output": 15.0}},
}


def price_file(testcase):
    path = os.path.abspath(testcase.mktemp())
    with open(path, "w") as f:
        json.dump(PRICES, f)
    return path


class GovernedCase(TestCase):
    harness_options: dict = {}

    @defer.inlineCallbacks
    def setUp(self):
        self.h = yield ProxyHarness(
            self, pricing_file=price_file(self), fake_providers=("openai", "anthropic"), **self.harness_options
        ).start()

    def agent(self, name, **metadata):
        write_agent(self.h.context_root, name, SECRET, **metadata)
        return f"{name}:{SECRET}"

    def lines(self, kind):
        return [line for line in self.h.audit_lines() if line["type"] == kind]


POLICY = {
    "mode": "clamp",
    "allowed": [
        {"slot": "primary", "ref": "openai/gpt-test"},
        {"slot": "fallback", "ref": "anthropic/claude-test"},
    ],
}


class PolicyTests(GovernedCase):
    @defer.inlineCallbacks
    def assertChosen(self, token, requested, expected_model, intervention):
        self.h.fake.enqueue(Reply(json=openai_completion("ok", expected_model, 1, 1)))
        doc = chat_body()
        if requested is None:
            del doc["model"]
        else:
            doc["model"] = requested
        response = yield self.h.chat(doc, token=token)
        self.assertEqual(response.code, 200, (yield response.text()))
        self.assertEqual(self.h.fake.received[-1].json["model"], expected_model)
        interventions = [line for line in self.lines("intervention") if line["request_id"] == response.headers.getRawHeaders("x-cllama-request-id")[0]]
        self.assertEqual([line["intervention"] for line in interventions], [intervention] if intervention else [])

    @defer.inlineCallbacks
    def test_clamp_table(self):
        token = self.agent("pol", model_policy=POLICY)
        yield self.assertChosen(token, "openai/gpt-test", "gpt-test", None)
        yield self.assertChosen(token, None, "gpt-test", "missing")
        yield self.assertChosen(token, "gpt-test", "gpt-test", "bare_model_normalized")
        yield self.assertChosen(token, "OpenAI/gpt-test", "gpt-test", "provider_normalized")
        yield self.assertChosen(token, "openai/gpt-5-expensive", "gpt-test", "disallowed_clamped")

    @defer.inlineCallbacks
    def test_reject_mode(self):
        token = self.agent("strict", model_policy=dict(POLICY, mode="reject"))
        response = yield self.h.chat(chat_body(model="openai/gpt-5-expensive"), token=token)
        self.assertEqual(response.code, 403)
        body = yield response.json()
        self.assertEqual(body["error"]["code"], "model_not_allowed")
        self.assertIn("openai/gpt-test", body["error"]["message"])
        self.assertEqual(self.h.fake.received, [])


class FailoverTests(GovernedCase):
    @defer.inlineCallbacks
    def test_upstream_5xx_fails_over_to_the_fallback(self):
        token = self.agent("fo", model_policy=POLICY)
        from cllama_tx.testing import anthropic_message

        self.h.fake.enqueue(
            Reply(status=503, json=openai_error("overloaded", "server_error", None)),
            Reply(json=anthropic_message("from claude", "claude-test", 5, 2)),
        )
        response = yield self.h.chat(chat_body(model="openai/gpt-test"), token=token)
        self.assertEqual(response.code, 200)
        body = yield response.json()
        self.assertEqual(body["choices"][0]["message"]["content"], "from claude")
        self.assertEqual([r.path for r in self.h.fake.received], ["/v1/chat/completions", "/v1/messages"])
        [hop] = self.lines("failover")
        self.assertEqual(
            (hop["from_provider"], hop["from_model"], hop["to_provider"], hop["to_model"]),
            ("openai", "gpt-test", "anthropic", "claude-test"),
        )
        self.assertIn("503", hop["reason"])
        yield self.h.committed()
        [row] = yield self.h.ledger_rows()
        self.assertEqual((row["provider"], row["effective_model"]), ("anthropic", "claude-test"))

    @defer.inlineCallbacks
    def test_transport_error_fails_over(self):
        token = self.agent("fo2", model_policy=POLICY)
        from cllama_tx.testing import anthropic_message

        self.h.fake.enqueue(Reply(abort_before_headers=True), Reply(json=anthropic_message("ok", "claude-test", 1, 1)))
        response = yield self.h.chat(chat_body(model="openai/gpt-test"), token=token)
        self.assertEqual(response.code, 200)
        self.assertEqual(len(self.lines("failover")), 1)

    @defer.inlineCallbacks
    def test_last_candidate_error_reaches_the_agent(self):
        token = self.agent("fo3", model_policy=POLICY)
        self.h.fake.enqueue(
            Reply(status=500, json=openai_error("boom", "server_error", None)),
            Reply(status=500, json={"type": "error", "error": {"type": "api_error", "message": "down too"}}),
        )
        response = yield self.h.chat(chat_body(model="openai/gpt-test"), token=token)
        self.assertEqual(response.code, 500)
        body = yield response.json()
        self.assertIn("down too", body["error"]["message"])

    @defer.inlineCallbacks
    def test_no_policy_no_failover(self):
        self.h.fake.enqueue(Reply(status=503, json=openai_error("overloaded", "server_error", None)))
        response = yield self.h.chat(chat_body(model="openai/gpt-test"))
        self.assertEqual(response.code, 503)
        self.assertEqual(self.lines("failover"), [])


class BudgetTests(GovernedCase):
    @defer.inlineCallbacks
    def test_hard_stop_429_body_and_retry_after(self):
        token = self.agent("capped", budget={"limit_usd": 0.0001, "period": "daily", "behavior": "hard_stop"})
        response = yield self.h.chat(chat_body(model="openai/gpt-test", max_tokens=1000), token=token)
        self.assertEqual(response.code, 429)
        body = yield response.json()
        self.assertEqual(body["error"], {"message": body["error"]["message"], "type": "budget_exceeded", "code": "budget_exceeded"})
        self.assertEqual(
            set(body["budget"]),
            {"behavior", "window", "requests", "reported_cost_usd", "unknown_cost_requests", "limit_usd",
             "remaining_usd", "input_cost_usd", "min_request_cost_usd"},
        )
        self.assertEqual((body["budget"]["behavior"], body["budget"]["window"]), ("hard_stop", "daily"))
        self.assertEqual(body["budget"]["remaining_usd"], 0.0001)
        self.assertTrue(body["error"]["message"].startswith("budget exceeded: $0.0001 left, this request's input alone costs about $0.0"))
        retry = response.headers.getRawHeaders("retry-after")
        self.assertIsNone(retry)  # its worst case alone exceeds the limit: it can never fit
        self.assertEqual(self.h.fake.received, [])

    @defer.inlineCallbacks
    def test_spend_then_refusal_with_honest_retry_after(self):
        token = self.agent("rolling", budget={"limit_usd": 0.01, "window": "1h", "behavior": "rate_limit"})
        self.h.fake.enqueue(Reply(json=openai_completion("ok", "gpt-test", 10, 1000)))
        first = yield self.h.chat(chat_body(model="openai/gpt-test", max_tokens=1000), token=token)
        self.assertEqual(first.code, 200)
        yield first.content()
        second = yield self.h.chat(chat_body(model="openai/gpt-test", max_tokens=1000), token=token)
        self.assertEqual(second.code, 429)
        body = yield second.json()
        self.assertEqual(body["error"]["code"], "rate_limited")
        retry = int(second.headers.getRawHeaders("retry-after")[0])
        self.assertTrue(3500 <= retry <= 3600, retry)  # when the first spend leaves the hour
        self.assertEqual(body["budget"]["requests"], 1)

    @defer.inlineCallbacks
    def test_soft_alert_never_refuses(self):
        token = self.agent("soft", budget={"limit_usd": 0.000001, "window": "1h", "behavior": "soft_alert"})
        for _ in range(2):
            self.h.fake.enqueue(Reply(json=openai_completion("ok", "gpt-test", 10, 10)))
            response = yield self.h.chat(chat_body(model="openai/gpt-test", max_tokens=10), token=token)
            self.assertEqual(response.code, 200)
            yield response.content()
        self.assertIn("budget_alert", [line["intervention"] for line in self.lines("intervention")])

    @defer.inlineCallbacks
    def test_tier_downgrade(self):
        token = self.agent(
            "tiered",
            budget={
                "limit_usd": 0.02,
                "window": "24h",
                "tiers": [
                    {"threshold": 0.5, "models": ["openai/gpt-test"]},
                    {"threshold": 0.0, "models": ["openai/gpt-cheap"]},
                ],
            },
        )
        # 0.012 of 0.02 spent: less than half remains, the cheap tier applies.
        self.h.fake.enqueue(
            Reply(json=openai_completion("big", "gpt-test", 2000, 1000)),
            Reply(json=openai_completion("small", "gpt-cheap", 10, 10)),
        )
        first = yield self.h.chat(chat_body(model="openai/gpt-test", max_tokens=1000), token=token)
        self.assertEqual(first.code, 200)
        yield first.content()
        second = yield self.h.chat(chat_body(model="openai/gpt-test", max_tokens=100), token=token)
        self.assertEqual(second.code, 200, (yield second.text()))
        self.assertEqual(self.h.fake.received[-1].json["model"], "gpt-cheap")
        [line] = [entry for entry in self.lines("intervention") if entry["intervention"] == "budget_tier_downgrade"]
        self.assertEqual((line["from_model"], line["to_model"]), ("openai/gpt-test", "openai/gpt-cheap"))

    @defer.inlineCallbacks
    def test_governance_dir_overrides_metadata(self):
        gov = os.path.abspath(self.mktemp())
        yield self.h.ledger.stopService()
        self.h = yield ProxyHarness(self, pricing_file=price_file(self), governance_dir=gov).start()
        token = self.agent("gov", budget={"limit_usd": 100, "window": "1h"})
        os.makedirs(os.path.join(gov, "gov"))
        with open(os.path.join(gov, "gov", "budget.json"), "w") as f:
            json.dump({"limit_usd": 0.0000001}, f)
        response = yield self.h.chat(chat_body(model="openai/gpt-test", max_tokens=10), token=token)
        self.assertEqual(response.code, 429)


class ConcurrencyProofTests(GovernedCase):
    @defer.inlineCallbacks
    def test_200_concurrent_requests_against_a_budget_that_fits_10(self):
        max_tokens = 1000
        body = chat_body(model="openai/gpt-test", max_tokens=max_tokens)
        body_size = len(json.dumps(body).encode())
        worst = (body_size * 2.0 + max_tokens * 8.0) / 1e6
        limit = worst * 10.5
        token = self.agent("proof", budget={"limit_usd": limit, "window": "1h", "behavior": "hard_stop"})
        gate = defer.Deferred()
        for _ in range(200):
            self.h.fake.enqueue(Reply(json=openai_completion("ok", "gpt-test", 30, 900), hold_until=gate))
        refusals = [0]

        def count_refusals(line):
            if line["type"] == "error" and line["status_code"] == 429:
                refusals[0] += 1
            return refusals[0] == 190

        all_refused = self.h.wait_for_audit(count_refusals)
        responses = [self.h.chat(body, token=token) for _ in range(200)]
        # Every refusal is answered while the admitted requests are held.
        yield all_refused
        yield self.h.fake.wait_for_request(10)
        self.assertEqual(len(self.h.fake.received), 10)
        gate.callback(None)
        all_responses = yield defer.gatherResults(responses)
        codes = sorted(r.code for r in all_responses)
        self.assertEqual(codes.count(200), 10)
        self.assertEqual(codes.count(429), 190)
        for r in all_responses:
            yield r.content()
        yield self.h.committed()
        rows = yield self.h.ledger_rows()
        spend = sum(r["cost_usd"] for r in rows)
        self.assertLessEqual(spend, limit)
        self.assertEqual(len([r for r in rows if r["status"] == 200]), 10)


class RateLimitTests(GovernedCase):
    @defer.inlineCallbacks
    def test_requests_per_minute(self):
        token = self.agent("rpm", rate_limits={"rpm": 2})
        for _ in range(2):
            self.h.fake.enqueue(Reply(json=openai_completion("ok", "gpt-test", 1, 1)))
            response = yield self.h.chat(chat_body(model="openai/gpt-test"), token=token)
            self.assertEqual(response.code, 200)
            yield response.content()
        refused = yield self.h.chat(chat_body(model="openai/gpt-test"), token=token)
        self.assertEqual(refused.code, 429)
        body = yield refused.json()
        self.assertEqual(body["error"]["code"], "rate_limited")
        retry = int(refused.headers.getRawHeaders("retry-after")[0])
        self.assertTrue(1 <= retry <= 61, retry)
        self.assertEqual(len(self.h.fake.received), 2)

    @defer.inlineCallbacks
    def test_tokens_per_minute(self):
        token = self.agent("tpm", rate_limits={"tpm": 50})
        response = yield self.h.chat(chat_body(model="openai/gpt-test", max_tokens=1000), token=token)
        self.assertEqual(response.code, 429)
        self.assertIn("too large", (yield response.json())["error"]["message"])


class PolicyFileTests(TestCase):
    @defer.inlineCallbacks
    def test_yaml_policy_file_with_env_interpolation(self):
        path = os.path.abspath(self.mktemp())
        os.environ["CLLAMA_TEST_BUDGET"] = "0.0000001"
        self.addCleanup(os.environ.pop, "CLLAMA_TEST_BUDGET", None)
        with open(path, "w") as f:
            f.write(
                "cost_routing:\n"
                "  agents:\n"
                f"    {AGENT}:\n"
                "      budget_total: ${CLLAMA_TEST_BUDGET}\n"
                "      budget_spent: 0\n"
                "      period: daily\n"
                "      hard_cap: true\n"
            )
        h = yield ProxyHarness(self, pricing_file=price_file(self), policy_file=path).start()
        response = yield h.chat(chat_body(model="openai/gpt-test", max_tokens=10))
        self.assertEqual(response.code, 429)
        body = yield response.json()
        self.assertEqual(body["budget"]["limit_usd"], 0.0000001)
        self.assertEqual(body["budget"]["window"], "daily")


class SpendAdministrationTests(GovernedCase):
    def admin(self, method, path, doc=None, token=None):
        from tests.support import UI_TOKEN

        headers = {"Authorization": f"Bearer {token or UI_TOKEN}"}
        kwargs = {"headers": headers}
        if doc is not None:
            kwargs["data"] = json.dumps(doc).encode()
        return getattr(self.h.ui_client, method)(f"http://ui{path}", **kwargs)

    @defer.inlineCallbacks
    def test_health(self):
        response = yield self.admin("get", "/api/health")
        doc = yield response.json()
        self.assertEqual((response.code, doc["ok"], doc["ledger"]), (200, True, "ready"))
        refused = yield self.admin("get", "/api/health", token="wrong")
        self.assertEqual(refused.code, 401)

    @defer.inlineCallbacks
    def test_set_budget_then_reset(self):
        token = self.agent("admin1", budget={"limit_usd": 100, "window": "1h"})
        response = yield self.admin("post", "/api/budget/admin1", {"limit_usd": 0.0000001})
        self.assertEqual(response.code, 200, (yield response.text()))
        refused = yield self.h.chat(chat_body(model="openai/gpt-test", max_tokens=10), token=token)
        self.assertEqual(refused.code, 429)
        [line] = self.lines("operator")
        self.assertEqual((line["action"], line["claw_id"], line["changes"]), ("budget_set", "admin1", ["limit_usd"]))
        self.assertTrue(line["actor"].startswith("operator-token@"))
        # The runtime change is persisted in the ledger.
        self.assertEqual(self.h.ledger.budget_override("admin1")["budget"], {"limit_usd": 0.0000001})
        response = yield self.admin("post", "/api/reset/admin1")
        self.assertEqual(response.code, 200)
        self.h.fake.enqueue(Reply(json=openai_completion("ok", "gpt-test", 1, 1)))
        allowed = yield self.h.chat(chat_body(model="openai/gpt-test", max_tokens=10), token=token)
        self.assertEqual(allowed.code, 200)
        self.assertEqual([line["action"] for line in self.lines("operator")], ["budget_set", "budget_reset"])

    @defer.inlineCallbacks
    def test_spent_counts_against_the_budget(self):
        token = self.agent("admin2", budget={"limit_usd": 1.0, "window": "1h"})
        yield self.admin("post", "/api/budget/admin2", {"spent": 0.99999})
        refused = yield self.h.chat(chat_body(model="openai/gpt-test", max_tokens=100), token=token)
        self.assertEqual(refused.code, 429)

    @defer.inlineCallbacks
    def test_bad_budget_is_refused(self):
        response = yield self.admin("post", "/api/budget/admin3", {"behavior": "explode", "limit_usd": 1})
        self.assertEqual(response.code, 400)
        self.assertEqual((yield response.json())["error"]["code"], "invalid_budget")
        response = yield self.admin("post", "/api/budget/admin3", {"colour": "red"})
        self.assertEqual(response.code, 400)

    @defer.inlineCallbacks
    def test_reload_picks_up_a_new_price(self):
        with open(self.h.pricing_file, "w") as f:
            json.dump({"openai": {"gpt-test": {"input": 1000.0, "output": 1000.0}}}, f)
        response = yield self.admin("post", "/api/reload")
        doc = yield response.json()
        self.assertEqual(sorted(doc["reloaded"]), ["contexts", "policy", "pricing", "providers"])
        self.assertEqual(self.h.pricing.price("openai", "gpt-test").input, 1000.0)
        self.assertEqual(self.lines("operator")[-1]["action"], "reload")


class AlertTests(TestCase):
    @defer.inlineCallbacks
    def test_threshold_alert_reaches_a_local_webhook(self):
        from twisted.internet import reactor
        from twisted.web.resource import Resource
        from twisted.web.server import Site

        received = defer.Deferred()

        class Receiver(Resource):
            isLeaf = True

            def render_POST(self, request):
                if not received.called:
                    received.callback((request.path, json.loads(request.content.read())))
                return b"ok"

        site = Site(Receiver())
        site.log = lambda request: None
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        hook = f"http://127.0.0.1:{port.getHost().port}/hooks/alert-token-8080"
        from tests.secret_scan import SCANNER

        SCANNER.register("alert-token-8080")
        h = yield ProxyHarness(self, pricing_file=price_file(self), alert_webhooks=f"json:{hook}").start()
        write_agent(h.context_root, "spender", SECRET, budget={"limit_usd": 0.01, "period": "daily", "behavior": "soft_alert"})
        # 350 output tokens at $8/M = $0.0028 + input: 28 %; the second makes 56 %, past 50 %.
        h.fake.enqueue(
            Reply(json=openai_completion("a", "gpt-test", 10, 350)),
            Reply(json=openai_completion("b", "gpt-test", 10, 350)),
        )
        for _ in range(2):
            response = yield h.chat(chat_body(model="openai/gpt-test", max_tokens=700), token=f"spender:{SECRET}")
            self.assertEqual(response.code, 200)
            yield response.content()
        path, body = yield received
        self.assertEqual(path, b"/hooks/alert-token-8080")
        self.assertEqual((body["event"], body["agent"], body["threshold"]), ("budget_threshold", "spender", 0.5))
        self.assertEqual(body["limit_usd"], 0.01)
        self.assertEqual(body["pod"], "test-pod")
        yield h.alerts.when_quiet()
        self.assertEqual(h.alerts.sent, 1)
