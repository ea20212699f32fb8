"""
Lowering max_tokens in the real daemon (`twistd -n cllama`): the
C{--budget-min-output-tokens} option reaches the budget, a request the budget
pays part of is lowered (the provider receives the limit, stdout audits it),
and one whose answer would fall under the floor is refused with what is left.
"""

import json
import os
import sqlite3

import treq
from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from cllama_tx.testing import FakeProvider
from cllama_tx.testing.billing import BillingModel
from tests.runtime.test_daemon import spawn_daemon
from tests.support import AGENT, PROVIDER_KEY, SECRET, write_agent

IN, OUT = 15.0 / 1e6, 75.0 / 1e6
FLOOR = 4096


def dollars(value):
    """As the message writes amounts: two decimals, four under a cent."""
    return f"${value:.4f}" if 0 < value < 0.01 else f"${value:.2f}"


class LoweringDaemonTests(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_lowered_then_refused_under_the_configured_floor(self):
        fake = FakeProvider(reactor, responder=BillingModel().respond)
        yield fake.start()
        self.addCleanup(fake.stop)
        base = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(base, "auth"))
        prices = os.path.join(base, "prices.json")
        with open(prices, "w") as f:
            json.dump({"anthropic": {"claude-opus-4-1": {"input": 15.0, "output": 75.0, "max_output_tokens": 32_000}}}, f)
        body = {
            "model": "claude-opus-4-1-20250805", "max_tokens": 32_000,
            "system": "You are Claude Code. " + "Keep to the conventions. " * 80,
            "messages": [{"role": "user", "content": "Fix the failing test"}],
        }
        data = json.dumps(body).encode()
        size = len(data)
        # The budget pays for the prompt at its bytes and 6,000 tokens of answer.
        limit = size * IN + 6_000 * OUT
        write_agent(os.path.join(base, "context"), AGENT, SECRET,
                    budget={"limit_usd": limit, "window": "1h", "behavior": "hard_stop"})
        env = {
            "LISTEN_ADDR": "tcp:0:interface=127.0.0.1",
            "UI_ADDR": "127.0.0.1:0",
            "CLAW_CONTEXT_ROOT": os.path.join(base, "context"),
            "CLAW_AUTH_DIR": os.path.join(base, "auth"),
            "CLLAMA_STATE_DIR": os.path.join(base, "state"),
            "CLLAMA_PRICING_FILE": prices,
            "ANTHROPIC_API_KEY": PROVIDER_KEY,
            "ANTHROPIC_BASE_URL": fake.base_url,
        }
        process, _ = spawn_daemon(self, env, args=("--budget-min-output-tokens", str(FLOOR)))
        ports = yield process.ready
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        http = treq.client.HTTPClient(Agent(reactor, pool=pool))
        url = f"http://127.0.0.1:{ports['API']}/v1/messages"
        headers = {"x-api-key": f"{AGENT}:{SECRET}", "anthropic-version": "2023-06-01", "content-type": "application/json"}

        first = yield http.post(url, data=data, headers=headers)
        answer = yield first.json()
        self.assertEqual(first.code, 200, answer)
        sent = fake.received[-1].json["max_tokens"]
        self.assertIn(sent, (5_999, 6_000))  # float rounding may cost the last token
        self.assertEqual(first.headers.getRawHeaders("x-cllama-max-tokens-lowered"), [str(sent)])
        self.assertEqual(answer["usage"]["output_tokens"], sent)
        yield process.wait_for_audit(lambda lines: any(line.get("intervention") == "max_tokens_lowered" for line in lines))
        line = [line for line in process.audit_lines() if line.get("intervention") == "max_tokens_lowered"][0]
        self.assertEqual((line["claw_id"], line["from_max_tokens"], line["to_max_tokens"]), (AGENT, 32_000, sent))

        # What is left now pays for fewer than 4,096 tokens of answer (the
        # prompt was billed below its bytes): refused, not cut to nothing.
        second = yield http.post(url, data=data, headers=headers)
        refusal = yield second.json()
        self.assertEqual(second.code, 429, refusal)
        left = refusal["budget"]["remaining_usd"]
        self.assertTrue(0 < left < size * IN + FLOOR * OUT, refusal)
        self.assertEqual(
            refusal["error"],
            {"type": "budget_exceeded", "code": "budget_exceeded",
             "message": f"budget exceeded: {dollars(left)} left, this request's input alone costs about {dollars(size * IN)}"},
        )
        self.assertEqual(len(fake.received), 1)
        yield process.wait_for_audit(lambda lines: any(line["type"] == "error" for line in lines))
        db = sqlite3.connect(os.path.join(base, "state", "ledger.sqlite3"))
        try:
            (spend,) = db.execute("SELECT SUM(cost_usd) FROM requests WHERE status = 200").fetchone()
        finally:
            db.close()
        self.assertLessEqual(spend, limit)
        self.assertAlmostEqual(spend + left, limit, places=9)
