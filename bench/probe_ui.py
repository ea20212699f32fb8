#!/usr/bin/env python3
"""
Probe: what writing the operator UI's pages costs the reactor (issue 14,
item 3: the UI on twisted.web.template).

The UI shares its reactor with the proxy: while a page is written, agents
wait.  On the browser tests' fleet (tests/sites/ui/fleet.py: five agents, a
month of history, a dead key, virtual keys), in-process over loopback, this
prints for each page:

  - cpu_ms: CPU time to write the page from its view (best of 5 x 10);
  - page_ms: the median time to answer a signed-in GET (3 x 8 GETs);
  - gap_ms: the longest the reactor stayed away meanwhile (a 1 ms timer
    that re-arms itself measures it; the median of the 3 rounds' longest),
    with Python's garbage collector on, and off (gap_nogc_ms: the page
    alone, without the full collections its allocations bring on).

    .venv/bin/python bench/probe_ui.py
    .venv/bin/python bench/probe_ui.py --repo /tmp/before   # another tree (e.g. git archive of an older commit)

The measurement runs under trial (the test harness builds the UI) in a
subprocess with the tree's directory first on the path.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

WORKER = r'''
import gc, json, statistics, time
from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase
from tests.sites.ui.support import UiHarness
from tests.sites.ui.fleet import kill_a_key, make_virtual_keys, seed_fleet
from cllama_tx.sites.ui import pages, views

HTML = {"Accept": "text/html"}
TICK = 0.001  # the timer re-arms every millisecond (the reactor may sleep: its threads need turns too)
PATHS = ("/", "/agents", "/costs?period=30d", "/requests", "/providers", "/budgets", "/keys")


class Probe(TestCase):
    timeout = 600

    @defer.inlineCallbacks
    def test_probe(self):
        harness = yield UiHarness(self).start()
        yield seed_fleet(harness)
        kill_a_key(harness)
        yield make_virtual_keys(harness)
        yield harness.h.committed()
        ui = harness.ui
        s = ui.services
        result = {path: {} for path in PATHS}
        # CPU to write each page from its view.
        cases = {
            "/": (views.overview(s), pages.overview_page),
            "/agents": ((yield views.agents(s)), pages.agents_page),
            "/costs?period=30d": (views.costs(s, "30d", None, None), pages.costs_page),
            "/requests": ((yield views.requests(s, None, False, 100)), pages.requests_page),
            "/providers": (views.providers(s), pages.providers_page),
            "/budgets": (views.budgets(s), pages.budgets_page),
            "/keys": ((yield views.virtual_keys(s)), pages.keys_page),
        }
        def context():
            return pages.PageContext(templates=ui.templates, static=ui.static, csrf="x" * 32,
                                     now=reactor.seconds(), pod="pod", version="probe")
        for path, (view, render) in cases.items():
            best = []
            for _ in range(5):
                start = time.process_time()
                for _ in range(10):
                    render(context(), view)  # no clock: written at once, so all of it counts
                best.append((time.process_time() - start) / 10 * 1000)
            result[path]["cpu_ms"] = round(min(best), 2)
        # Answering GETs, and how long the reactor stayed away meanwhile.
        client = harness.client
        yield client.sign_in()
        gaps, state = [], {"on": False, "last": 0.0}

        def beat():
            now = time.perf_counter()
            gaps.append(now - state["last"])
            state["last"] = now
            if state["on"]:
                reactor.callLater(TICK, beat)

        for collector in ("gap_ms", "gap_nogc_ms"):
            if collector == "gap_nogc_ms":
                gc.collect()
                gc.disable()
            try:
                for path in PATHS:
                    times, worst = [], []
                    for _ in range(3):
                        del gaps[:]
                        state["on"], state["last"] = True, time.perf_counter()
                        reactor.callLater(TICK, beat)
                        for _ in range(8):
                            start = time.perf_counter()
                            response = yield client.get(path, headers=HTML)
                            yield response.content()
                            times.append((time.perf_counter() - start) * 1000)
                        state["on"] = False
                        worst.append(max(gaps) * 1000)
                    result[path][collector] = round(statistics.median(worst), 1)
                    if collector == "gap_ms":
                        result[path]["page_ms"] = round(statistics.median(times), 1)
            finally:
                gc.enable()
        print("PROBE " + json.dumps(result))
'''


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    args = parser.parse_args()
    repo = os.path.abspath(args.repo)
    with tempfile.TemporaryDirectory(prefix="probe_ui-") as work:
        with open(os.path.join(work, "probe_ui_worker.py"), "w", encoding="utf-8") as f:
            f.write(WORKER)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([work, repo]))
        done = subprocess.run(
            [sys.executable, "-m", "twisted.trial", "--temp-directory", os.path.join(work, "trial"), "probe_ui_worker"],
            cwd=repo, env=env, capture_output=True, text=True, timeout=900,
        )
        lines = [line for line in done.stdout.splitlines() if "PROBE " in line]
        if done.returncode or not lines:
            sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
            return 1
    result = json.loads(lines[-1].split("PROBE ", 1)[1])
    print(f"tree: {repo}")
    print(f"{'page':<20}{'cpu_ms':>9}{'page_ms':>9}{'gap_ms':>9}{'gap_nogc_ms':>13}")
    for path, row in result.items():
        print(f"{path:<20}{row['cpu_ms']:>9}{row['page_ms']:>9}{row['gap_ms']:>9}{row['gap_nogc_ms']:>13}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
