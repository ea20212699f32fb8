"""
Tests for L{cllama_tx.accounting.history}: pure helpers without a reactor,
the store against real temporary directories and the real reactor's thread
hand-offs (every test awaits the Deferreds; nothing sleeps).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import stat

from twisted.internet import defer, reactor
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from cllama_tx.accounting.history import (
    DEFAULT_LIMIT,
    MAX_LIMIT,
    HistoryEntry,
    HistoryStopped,
    SessionHistory,
    bounded_response_json,
    clamp_limit,
    history_usage,
    json_response,
    parse_after,
    parse_rfc3339,
    sse_response,
)
from cllama_tx.store.records import Usage

CONTRACT_KEYS = [
    "version", "id", "ts", "claw_id", "path", "requested_model",
    "effective_provider", "effective_model", "status_code", "stream",
    "request_original", "request_effective", "response", "usage",
]

BASE = dt.datetime(2026, 3, 31, 12, 0, 0, tzinfo=dt.timezone.utc)


def ts_at(seconds: float) -> str:
    """RFC 3339 UTC with milliseconds, C{seconds} after L{BASE}."""
    moment = BASE + dt.timedelta(seconds=seconds)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def make_entry(agent="tiverton", n=0, response=None, **overrides) -> HistoryEntry:
    fields = dict(
        id=f"req-{n}",
        ts=ts_at(n),
        claw_id=agent,
        path="/v1/chat/completions",
        requested_model="openai/gpt-4o",
        effective_provider="openai",
        effective_model="gpt-4o",
        status_code=200,
        stream=False,
        request_original={"model": "openai/gpt-4o", "messages": [{"role": "user", "content": f"hi {n}"}]},
        request_effective={"model": "gpt-4o", "messages": [{"role": "user", "content": f"hi {n}"}]},
        response=response if response is not None else json_response({"id": f"chatcmpl-{n}", "choices": []}),
        usage={"prompt_tokens": 3, "completion_tokens": 5, "reported_cost_usd": None},
    )
    fields.update(overrides)
    return HistoryEntry(**fields)


def lines_of(path: str) -> list[dict]:
    with open(path, "rb") as f:
        data = f.read()
    assert data.endswith(b"\n") or not data
    return [json.loads(line) for line in data.splitlines()]


class EntryTests(SynchronousTestCase):
    def test_exact_contract_keys(self):
        line = make_entry().to_json_line()
        self.assertTrue(line.endswith(b"\n"))
        self.assertEqual(line.count(b"\n"), 1)
        doc = json.loads(line)
        self.assertEqual(list(doc), CONTRACT_KEYS)
        self.assertEqual(doc["version"], 1)
        self.assertEqual(doc["id"], "req-0")
        self.assertEqual(doc["response"], {"format": "json", "json": {"id": "chatcmpl-0", "choices": []}})
        self.assertEqual(set(doc["usage"]), {"prompt_tokens", "completion_tokens", "reported_cost_usd"})

    def test_same_bytes_as_one_dumps(self):
        """Field-by-field assembly equals serialising the whole dict once."""
        entry = make_entry(request_original={"text": "caf\u00e9 \u2028 \"q\"\n"})
        expected = json.dumps(
            {name: getattr(entry, name) for name in CONTRACT_KEYS},
            ensure_ascii=True, separators=(",", ":"),
        ).encode() + b"\n"
        self.assertEqual(entry.to_json_line(), expected)

    def test_line_is_ascii(self):
        line = make_entry(request_original={"text": "\u65e5\u672c \U0001F600"}).to_json_line()
        line.decode("ascii")
        self.assertEqual(json.loads(line)["request_original"]["text"], "\u65e5\u672c \U0001F600")

    def test_nan_is_written_as_null(self):
        """
        A provider's answer with NaN or Infinity keeps its turn: those
        numbers become null, and the line stays strict JSON.
        """
        entry = make_entry(
            request_original={"x": float("nan"), "ok": 1.5},
            response=json_response({"scores": [float("inf"), -float("inf"), 2.0], "n": {"v": float("nan")}}),
        )
        line = entry.to_json_line()
        self.assertNotIn(b"NaN", line)
        self.assertNotIn(b"Infinity", line)
        doc = json.loads(line, parse_constant=lambda name: self.fail(f"{name} written"))
        self.assertEqual(doc["request_original"], {"x": None, "ok": 1.5})
        self.assertEqual(doc["response"]["json"], {"scores": [None, None, 2.0], "n": {"v": None}})

    def test_helpers(self):
        self.assertEqual(sse_response("data: x\n\n"), {"format": "sse", "text": "data: x\n\n"})
        usage = Usage(input_tokens=10, cache_read_tokens=4, output_tokens=7, reported_cost_usd=0.25)
        self.assertEqual(
            history_usage(usage),
            {"prompt_tokens": 14, "completion_tokens": 7, "reported_cost_usd": 0.25},
        )

    def test_frozen(self):
        entry = make_entry()
        with self.assertRaises(AttributeError):
            entry.ts = "x"


class BoundTests(SynchronousTestCase):
    def test_json_within_bound_kept(self):
        body = {"a": "x" * 10}
        raw = json.dumps(body, separators=(",", ":")).encode()
        out = json.loads(bounded_response_json(json_response(body), len(raw)))
        self.assertEqual(out, {"format": "json", "json": body})

    def test_json_over_bound_truncated(self):
        body = {"a": "x" * 1000}
        raw = json.dumps(body, separators=(",", ":")).encode()
        out = json.loads(bounded_response_json(json_response(body), 100))
        self.assertEqual(
            out, {"format": "json", "truncated": True, "bytes": len(raw), "text": raw[:100].decode()}
        )

    def test_sse_over_bound_truncated_with_replacement(self):
        text = "data: " + "\u00e9" * 100  # two bytes each: a cut lands mid-character
        raw = text.encode("utf-8")
        out = json.loads(bounded_response_json(sse_response(text), 7))
        self.assertEqual(out["format"], "sse")
        self.assertIs(out["truncated"], True)
        self.assertEqual(out["bytes"], len(raw))
        self.assertEqual(out["text"], "data: \ufffd")

    def test_sse_bytes_accepted(self):
        out = json.loads(bounded_response_json(sse_response(b"data: {}\n\n"), 100))
        self.assertEqual(out, {"format": "sse", "text": "data: {}\n\n"})

    def test_sse_total_bytes_from_a_capped_relay(self):
        """The relay kept only the start: the record says so, with the real size."""
        out = json.loads(bounded_response_json(sse_response("data: 1\n\n", total_bytes=5000), 100))
        self.assertEqual(
            out, {"format": "sse", "truncated": True, "bytes": 5000, "text": "data: 1\n\n"}
        )
        out = json.loads(bounded_response_json(sse_response("data: 1\n\n", total_bytes=9), 100))
        self.assertEqual(out, {"format": "sse", "text": "data: 1\n\n"})

    def test_unknown_format(self):
        self.assertRaises(ValueError, bounded_response_json, {"format": "xml"}, 10)


class ParsingTests(SynchronousTestCase):
    def test_rfc3339_forms(self):
        utc = dt.datetime(2026, 3, 31, 12, 0, tzinfo=dt.timezone.utc)
        for text in [
            "2026-03-31T12:00:00Z",
            "2026-03-31t12:00:00z",
            "2026-03-31T12:00:00.000Z",
            "2026-03-31T14:00:00+02:00",
            "2026-03-31T14:00:00 02:00",  # '+' decoded as a space from a query string
            "2026-03-31T09:30:00-02:30",
            "2026-03-31 12:00:00Z",
            "  2026-03-31T12:00:00Z ",
        ]:
            self.assertEqual(parse_rfc3339(text), utc, text)
        self.assertEqual(
            parse_rfc3339("2026-03-31T12:00:00.123456789Z"),
            utc.replace(microsecond=123456),
        )
        self.assertEqual(
            parse_rfc3339("2026-12-31T23:59:60Z"),
            dt.datetime(2026, 12, 31, 23, 59, 59, 999999, tzinfo=dt.timezone.utc),
        )

    def test_rfc3339_rejects(self):
        for text in [
            "yesterday", "2026-03-31", "2026-03-31T12:00:00", "2026-13-01T00:00:00Z",
            "2026-02-30T00:00:00Z", "2026-03-31T12:00Z", "2026-03-31T12:00:00+2:00",
            "2026-03-31T12:00:00+24:00", "1711886400", "2026-03-31T12:00:00.Z",
        ]:
            with self.assertRaises(ValueError) as caught:
                parse_rfc3339(text)
            self.assertIn("RFC 3339", str(caught.exception))

    def test_parse_after_blank(self):
        self.assertIsNone(parse_after(None))
        self.assertIsNone(parse_after(""))
        self.assertIsNone(parse_after("  "))

    def test_clamp_limit(self):
        self.assertEqual(clamp_limit(None), DEFAULT_LIMIT)
        self.assertEqual(clamp_limit(""), 100)
        self.assertEqual(clamp_limit("1"), 1)
        self.assertEqual(clamp_limit(" 250 "), 250)
        self.assertEqual(clamp_limit("1000"), 1000)
        self.assertEqual(clamp_limit("1001"), MAX_LIMIT)
        self.assertEqual(clamp_limit("9" * 5000), 1000)
        self.assertEqual(clamp_limit("007"), 7)
        for bad in ["0", "-1", "-0", "abc", "1.5", "1e3", "0x10", "\u0665", "1_000", "10 0"]:
            with self.assertRaises(ValueError, msg=bad):
                clamp_limit(bad)


class _LogWatcher:
    def __init__(self, case):
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        case.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def formats(self):
        return [e.get("log_format", "") for e in self.events]


class SessionHistoryTests(TestCase):
    def make(self, **kwargs) -> SessionHistory:
        self.root = os.path.join(self.mktemp(), "history")  # does not exist yet
        history = SessionHistory(self.root, reactor, **kwargs)
        history.startService()
        self.addCleanup(lambda: history.stopService() if history.running else None)
        return history

    def path(self, agent="tiverton", suffix=""):
        return os.path.join(self.root, agent, "history.jsonl" + suffix)

    @defer.inlineCallbacks
    def test_appends_in_order(self):
        history = self.make()
        results = yield defer.gatherResults([history.append(make_entry(n=n)) for n in range(200)])
        self.assertEqual(results, [True] * 200)
        self.assertEqual([d["id"] for d in lines_of(self.path())], [f"req-{n}" for n in range(200)])
        for doc in lines_of(self.path()):
            self.assertEqual(list(doc), CONTRACT_KEYS)

    @defer.inlineCallbacks
    def test_modes(self):
        history = self.make()
        yield history.append(make_entry())
        self.assertEqual(stat.S_IMODE(os.stat(self.root).st_mode), 0o700)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(self.root, "tiverton")).st_mode), 0o700)
        self.assertEqual(stat.S_IMODE(os.stat(self.path()).st_mode), 0o600)

    @defer.inlineCallbacks
    def test_tightens_existing_modes(self):
        history = self.make()
        os.makedirs(os.path.join(self.root, "tiverton"))
        os.chmod(os.path.join(self.root, "tiverton"), 0o755)
        with open(self.path(), "wb"):
            pass
        os.chmod(self.path(), 0o644)
        yield history.append(make_entry())
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(self.root, "tiverton")).st_mode), 0o700)
        self.assertEqual(stat.S_IMODE(os.stat(self.path()).st_mode), 0o600)

    @defer.inlineCallbacks
    def test_invalid_agent_ids_refused(self):
        history = self.make()
        watcher = _LogWatcher(self)
        bad = ["", ".", "..", "../escape", "a/b", ".hidden", "-x", "x" * 129, None, "a\x00b"]
        results = yield defer.gatherResults([history.append(make_entry(agent=a)) for a in bad])
        self.assertEqual(results, [False] * len(bad))
        self.assertFalse(os.path.exists(self.root))
        self.assertEqual(
            sum("invalid agent id" in f for f in watcher.formats()), len(bad)
        )
        for agent in bad:
            self.assertRaises(ValueError, history.read, agent, None, 10)

    @defer.inlineCallbacks
    def test_bad_ts_refused(self):
        history = self.make()
        ok = yield history.append(make_entry(ts="not a time"))
        self.assertIs(ok, False)
        self.assertFalse(os.path.exists(self.path()))

    @defer.inlineCallbacks
    def test_big_json_response_truncated(self):
        history = self.make(max_response_bytes=64)
        body = {"choices": [{"message": {"content": "y" * 500}}]}
        raw = json.dumps(body, separators=(",", ":")).encode()
        yield history.append(make_entry(n=0, response=json_response(body)))
        yield history.append(make_entry(n=1, response=json_response({"small": 1})))
        big, small = lines_of(self.path())
        self.assertEqual(
            big["response"],
            {"format": "json", "truncated": True, "bytes": len(raw), "text": raw[:64].decode()},
        )
        self.assertEqual(small["response"], {"format": "json", "json": {"small": 1}})

    @defer.inlineCallbacks
    def test_big_sse_response_truncated(self):
        history = self.make(max_response_bytes=32)
        text = "".join(f"data: {{\"n\":{i}}}\n\n" for i in range(100))
        yield history.append(make_entry(stream=True, response=sse_response(text)))
        yield history.append(make_entry(n=1, stream=True, response=sse_response("data: [DONE]\n\n")))
        big, small = lines_of(self.path())
        self.assertEqual(
            big["response"],
            {"format": "sse", "truncated": True, "bytes": len(text.encode()), "text": text[:32]},
        )
        self.assertEqual(small["response"], {"format": "sse", "text": "data: [DONE]\n\n"})

    @defer.inlineCallbacks
    def test_rotation(self):
        line_size = len(make_entry(n=19).to_json_line())  # the longest of the lines
        history = self.make(max_file_bytes=line_size * 3 + 10, keep_rotated=2)
        for n in range(20):  # awaited one by one, so every ts has its turn
            yield history.append(make_entry(n=n))
        names = sorted(os.listdir(os.path.join(self.root, "tiverton")))
        self.assertEqual(names, ["history.jsonl", "history.jsonl.1", "history.jsonl.2"])
        for suffix in ["", ".1", ".2"]:
            self.assertLessEqual(os.path.getsize(self.path(suffix=suffix)), line_size * 3 + 10)
            self.assertEqual(stat.S_IMODE(os.stat(self.path(suffix=suffix)).st_mode), 0o600)
        ids = [d["id"] for s in [".2", ".1", ""] for d in lines_of(self.path(suffix=s))]
        # The newest entries survive, oldest first, none lost in between.
        self.assertEqual(ids, [f"req-{n}" for n in range(20 - len(ids), 20)])
        self.assertEqual(len(lines_of(self.path(suffix=".2"))), 3)

    @defer.inlineCallbacks
    def test_rotation_drops_beyond_keep(self):
        history = self.make(max_file_bytes=1, keep_rotated=1)
        os.makedirs(os.path.join(self.root, "tiverton"))
        with open(self.path(suffix=".7"), "wb") as f:
            f.write(make_entry(n=99).to_json_line())
        for n in range(3):
            yield history.append(make_entry(n=n))
        self.assertEqual(
            sorted(os.listdir(os.path.join(self.root, "tiverton"))),
            ["history.jsonl", "history.jsonl.1"],
        )
        self.assertEqual([d["id"] for d in lines_of(self.path(suffix=".1"))], ["req-1"])
        self.assertEqual([d["id"] for d in lines_of(self.path())], ["req-2"])

    @defer.inlineCallbacks
    def test_rotation_keep_zero(self):
        history = self.make(max_file_bytes=1, keep_rotated=0)
        for n in range(3):
            yield history.append(make_entry(n=n))
        self.assertEqual(os.listdir(os.path.join(self.root, "tiverton")), ["history.jsonl"])
        self.assertEqual([d["id"] for d in lines_of(self.path())], ["req-2"])

    @defer.inlineCallbacks
    def test_oversized_line_still_written(self):
        history = self.make(max_file_bytes=50)
        ok = yield history.append(make_entry())
        self.assertIs(ok, True)
        self.assertEqual(len(lines_of(self.path())), 1)

    @defer.inlineCallbacks
    def test_read_after_and_limit_across_rotated_files(self):
        line_size = len(make_entry(n=0).to_json_line())
        history = self.make(max_file_bytes=line_size * 4, keep_rotated=5)
        for n in range(15):
            yield history.append(make_entry(n=n))
        self.assertTrue(os.path.exists(self.path(suffix=".3")))

        def ids(lines):
            for line in lines:
                self.assertTrue(line.endswith(b"\n"))
            return [json.loads(line)["id"] for line in lines]

        everything = yield history.read("tiverton", None, 100)
        self.assertEqual(ids(everything), [f"req-{n}" for n in range(15)])
        first = yield history.read("tiverton", None, 5)
        self.assertEqual(ids(first), [f"req-{n}" for n in range(5)])
        # Strictly after: the entry at exactly `after` is excluded.
        page = yield history.read("tiverton", ts_at(4), 6)
        self.assertEqual(ids(page), [f"req-{n}" for n in range(5, 11)])
        # The same instant with an offset, and with more precision.
        page = yield history.read("tiverton", "2026-03-31T14:00:04+02:00", 2)
        self.assertEqual(ids(page), ["req-5", "req-6"])
        page = yield history.read("tiverton", "2026-03-31T12:00:03.999999Z", 1)
        self.assertEqual(ids(page), ["req-4"])
        page = yield history.read("tiverton", ts_at(14), 10)
        self.assertEqual(page, [])
        page = yield history.read("tiverton", "2020-01-01T00:00:00Z", 1000)
        self.assertEqual(len(page), 15)
        page = yield history.read("tiverton", None, 0)
        self.assertEqual(page, [])

    @defer.inlineCallbacks
    def test_read_missing_agent(self):
        history = self.make()
        lines = yield history.read("nobody", None, 100)
        self.assertEqual(lines, [])
        lines = yield history.read("nobody", "2026-03-31T12:00:00Z", 100)
        self.assertEqual(lines, [])

    def test_bad_after(self):
        history = self.make()
        with self.assertRaises(ValueError) as caught:
            history.read("tiverton", "last tuesday", 10)
        self.assertIn("RFC 3339", str(caught.exception))
        self.assertRaises(ValueError, history.read, "tiverton", None, -1)

    @defer.inlineCallbacks
    def test_read_stops_at_max_read_bytes(self):
        history = self.make(max_read_bytes=1)
        for n in range(3):
            yield history.append(make_entry(n=n))
        lines = yield history.read("tiverton", None, 100)
        self.assertEqual([json.loads(x)["id"] for x in lines], ["req-0"])

    @defer.inlineCallbacks
    def test_half_line_from_a_crash(self):
        """A crash's half line is skipped and does not spoil the next line."""
        history = self.make()
        yield history.append(make_entry(n=0))
        with open(self.path(), "ab") as f:
            f.write(make_entry(n=1).to_json_line()[:40])
        lines = yield history.read("tiverton", None, 100)
        self.assertEqual(len(lines), 1)
        yield history.append(make_entry(n=2))
        lines = yield history.read("tiverton", None, 100)
        self.assertEqual([json.loads(x)["id"] for x in lines], ["req-0", "req-2"])
        lines = yield history.read("tiverton", ts_at(0), 100)
        self.assertEqual([json.loads(x)["id"] for x in lines], ["req-2"])

    @defer.inlineCallbacks
    def test_concurrent_agents(self):
        line_size = len(make_entry(n=0).to_json_line())
        history = self.make(max_file_bytes=line_size * 7, keep_rotated=100)
        agents = [f"agent-{i}" for i in range(5)]
        pending, snapshots = [], []
        for n in range(40):
            for agent in agents:
                pending.append(history.append(make_entry(agent=agent, n=n)))
                if n % 7 == 0:
                    pending.append(history.read(agent, None, 1000).addCallback(snapshots.append))
        yield defer.gatherResults(pending)
        # A read racing writes and rotations sees a prefix: no gap, no repeat.
        for lines in snapshots:
            ids = [json.loads(x)["id"] for x in lines]
            self.assertEqual(ids, [f"req-{n}" for n in range(len(ids))])
        for agent in agents:
            directory = os.path.join(self.root, agent)
            ordered = sorted(
                os.listdir(directory),
                key=lambda name: -int(name.rsplit(".", 1)[1]) if name[-1].isdigit() else 0,
            )
            docs = [d for name in ordered for d in lines_of(os.path.join(directory, name))]
            self.assertEqual([d["id"] for d in docs], [f"req-{n}" for n in range(40)])
            self.assertEqual({d["claw_id"] for d in docs}, {agent})
            lines = yield history.read(agent, None, 1000)
            self.assertEqual([json.loads(x)["id"] for x in lines], [f"req-{n}" for n in range(40)])

    @defer.inlineCallbacks
    def test_stop_drains_pending_writes(self):
        history = self.make()
        pending = [history.append(make_entry(n=n)) for n in range(50)]
        yield history.stopService()
        self.assertTrue(all(d.called for d in pending))
        self.assertEqual(len(lines_of(self.path())), 50)
        watcher = _LogWatcher(self)
        late = yield history.append(make_entry(n=51))
        self.assertIs(late, False)
        self.assertTrue(any("stopped" in f for f in watcher.formats()))
        yield self.assertFailure(history.read("tiverton", None, 10), HistoryStopped)

    @defer.inlineCallbacks
    def test_write_failure_logged_not_raised(self):
        history = self.make()
        os.makedirs(self.root)
        with open(os.path.join(self.root, "tiverton"), "w"):
            pass  # a file where the agent's directory belongs
        ok = yield history.append(make_entry())
        self.assertIs(ok, False)
        self.assertEqual(len(self.flushLoggedErrors(NotADirectoryError)), 1)

    def test_limits_validated(self):
        self.assertRaises(ValueError, SessionHistory, "x", reactor, max_file_bytes=0)
        self.assertRaises(ValueError, SessionHistory, "x", reactor, keep_rotated=-1)

    @defer.inlineCallbacks
    def test_restart_after_stop(self):
        history = self.make()
        yield history.append(make_entry(n=0))
        yield history.stopService()
        history.startService()
        ok = yield history.append(make_entry(n=1))
        self.assertIs(ok, True)
        lines = yield history.read("tiverton", None, 10)
        self.assertEqual(len(lines), 2)

    @defer.inlineCallbacks
    def test_appends_before_start_wait_for_it(self):
        root = self.mktemp()
        history = SessionHistory(root, reactor)
        d = history.append(make_entry())
        self.assertFalse(d.called)
        history.startService()
        self.addCleanup(history.stopService)
        ok = yield d
        self.assertIs(ok, True)
