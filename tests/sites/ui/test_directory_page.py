"""
The operator UI's C{/teams} page over loopback HTTP: organisations,
teams and their members, users and customers of the key API shown with
their budgets, spend in the period and next reset; added, changed, reset
and deleted from the page's forms (CSRF-checked, audited) with the same
checks and effects as the key API (a budget set on the page refuses the
team's keys at once); names escaped; a JSON twin for scripts.
"""

from __future__ import annotations

import json
import re

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from cllama_tx.testing import Reply, openai_completion
from tests.secret_scan import SCANNER
from tests.sites.ui.support import UiHarness
from tests.support import MASTER_KEY, UI_TOKEN, chat_body

HTML = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
BEARER = {"Authorization": f"Bearer {UI_TOKEN}"}


class DirectoryPageTests(TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def setUp(self):
        self.harness = yield UiHarness(self).start()
        self.h = self.harness.h
        self.client = self.harness.client

    @defer.inlineCallbacks
    def api(self, path, doc):
        response = yield self.h.http.post(self.h.base_url + path, data=json.dumps(doc).encode(),
                                          headers={"Authorization": [f"Bearer {MASTER_KEY}"],
                                                   "Content-Type": ["application/json"]})
        body = yield response.json()
        self.assertEqual(response.code, 200, body)
        return body

    @defer.inlineCallbacks
    def view(self):
        response = yield self.client.get("/teams", headers=BEARER)
        self.assertEqual(response.code, 200)
        return (yield response.json())

    @defer.inlineCallbacks
    def test_records_budgets_and_spend_are_shown(self):
        yield self.api("/organization/new", {"organization_id": "o1", "organization_alias": "Org", "max_budget": 50})
        yield self.api("/team/new", {"team_id": "t1", "team_alias": "<b>Acme</b>", "organization_id": "o1",
                                     "max_budget": 10, "budget_duration": "30d"})
        yield self.api("/team/member_add", {"team_id": "t1", "member": {"role": "admin", "user_id": "u1"},
                                            "max_budget_in_team": 2})
        yield self.api("/customer/new", {"user_id": "c1", "max_budget": 1})
        minted = yield self.api("/key/generate", {"team_id": "t1", "user_id": "u1"})
        SCANNER.register(minted["key"])
        self.h.fake.enqueue(Reply(json=openai_completion("ok", "gpt-4.1-mini", 100, 100)))
        response = yield self.h.chat(chat_body(model="openai/gpt-4.1-mini", user="c1"), token=minted["key"])
        self.assertEqual(response.code, 200)
        yield response.content()
        yield self.h.committed()
        [row] = yield self.h.ledger_rows()
        view = yield self.view()
        [team] = view["team"]
        self.assertEqual((team["id"], team["max_budget"], team["budget_duration"], team["organization_id"]),
                         ("t1", 10.0, "30d", "o1"))
        self.assertAlmostEqual(team["spend"], row["cost_usd"], places=9)
        self.assertTrue(team["budget_reset_at"].endswith("-01T00:00:00+00:00"))
        self.assertEqual([(m["user_id"], m["role"], m["max_budget"]) for m in team["members"]], [("u1", "admin", 2.0)])
        self.assertAlmostEqual(team["members"][0]["spend"], row["cost_usd"], places=9)
        self.assertEqual(team["keys"], 1)
        self.assertAlmostEqual(view["customer"][0]["spend"], row["cost_usd"], places=9)
        self.assertAlmostEqual(view["org"][0]["spend"], row["cost_usd"], places=9)
        self.assertEqual(view["org"][0]["teams"], ["t1"])
        yield self.client.sign_in()
        page = yield (yield self.client.get("/teams", headers=HTML)).text()
        self.assertIn("&lt;b&gt;Acme&lt;/b&gt;", page)
        self.assertNotIn("<b>Acme</b>", page)
        self.assertIn('id="team-t1"', page)
        self.assertIn('id="member-t1-u1"', page)
        self.assertIn("Teams &amp; budgets", page)
        self.assertNotIn(minted["key"], page)

    @defer.inlineCallbacks
    def test_changed_from_the_page(self):
        yield self.client.sign_in()
        csrf = yield self.client.csrf("/teams")
        post = lambda path, **form: self.client.post(path, {"csrf": csrf, **form}, headers=HTML)  # noqa: E731
        response = yield post("/teams", kind="team", id="t1", alias="Acme", max_budget="5", budget_duration="1d",
                              rpm_limit="60", models="openai/* anthropic/claude-x")
        self.assertEqual(response.code, 303)
        team = self.h.directory.team("t1")
        self.assertEqual((team.alias, team.max_budget, team.budget_duration, team.rpm_limit, team.models),
                         ("Acme", 5.0, "1d", 60, ("openai/*", "anthropic/claude-x")))
        minted = yield self.api("/key/generate", {"team_id": "t1"})
        SCANNER.register(minted["key"])
        # A budget of 0 set on the page refuses the team's keys at once.
        response = yield post("/teams/team/t1", alias="Acme", max_budget="0", budget_duration="", rpm_limit="",
                              models="", blocked_shown="1")
        self.assertEqual(response.code, 303)
        team = self.h.directory.team("t1")
        self.assertEqual((team.max_budget, team.budget_duration, team.rpm_limit, team.models), (0.0, None, None, ()))
        refused = yield self.h.chat(chat_body(model="openai/gpt-4.1-mini"), token=minted["key"])
        self.assertEqual(refused.code, 422)
        self.assertIn("Team=t1", (yield refused.json())["error"]["message"])
        yield post("/teams/team/t1", alias="Acme", max_budget="", blocked="on", blocked_shown="1")
        refused = yield self.h.chat(chat_body(model="openai/gpt-4.1-mini"), token=minted["key"])
        self.assertEqual(refused.code, 401)
        yield refused.content()
        # Refusals come back as a message on the page.
        yield post("/teams/team/t1", max_budget="lots")
        page = yield (yield self.client.get("/teams", headers=HTML)).text()
        self.assertIn("max_budget must be a number", page)
        yield post("/teams", kind="customer", alias="no id")
        page = yield (yield self.client.get("/teams", headers=HTML)).text()
        self.assertIn("a customer needs an id", page)
        response = yield post("/teams/team/t1/reset")
        self.assertEqual(response.code, 303)
        response = yield post("/teams/team/t1/delete")
        self.assertEqual(response.code, 303)
        self.assertIsNone(self.h.directory.team("t1"))
        gone = yield self.h.chat(chat_body(model="openai/gpt-4.1-mini"), token=minted["key"])
        self.assertEqual(gone.code, 401)  # the team's keys went with it
        yield gone.content()
        actions = [line["action"] for line in self.harness.operator_lines()]
        self.assertEqual(
            [a for a in actions if a.startswith("directory_")],
            ["directory_create", "directory_update", "directory_update", "directory_reset", "directory_delete"],
        )

    @defer.inlineCallbacks
    def test_forms_need_the_csrf_token(self):
        yield self.client.sign_in()
        response = yield self.client.post("/teams", {"kind": "team", "id": "t9"}, headers=HTML)
        self.assertEqual(response.code, 403)
        self.assertIsNone(self.h.directory.team("t9"))
        response = yield self.client.post("/teams", json_body={"kind": "org", "id": "o9", "max_budget": "3"},
                                          headers=BEARER)
        self.assertEqual(response.code, 200)
        self.assertEqual(self.h.directory.organization("o9").max_budget, 3.0)
        page = yield (yield self.client.get("/teams", headers=HTML)).text()
        self.assertTrue(re.search(r'href="/teams"', page))
