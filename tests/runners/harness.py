"""
One runner's tool-calling loop through the real daemon: a scripted provider
on loopback, C{twistd -n cllama} in front of it (configured only through
its environment, as an operator would), the runner installed from its
registry and run non-interactively with nothing but its documented base-URL
and key settings, then the daemon stopped so that its ledger is complete.

Nothing here imports the daemon's modules: the daemon is a process, its
audit stream is its stdout and its ledger a SQLite file.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass

from twisted.internet import defer, error, protocol, reactor
from twisted.internet.threads import deferToThread
from twisted.logger import Logger

from tests.runners import install
from tests.runners.provider import ScriptedProvider
from tests.secret_scan import SCANNER

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
LISTENING = re.compile(r"(API|UI) listening on 127\.0\.0\.1:(\d+)")

AGENT = "runner-agent"
SECRET = "5e7a" * 12  # 48 lowercase hex characters, as Clawdapus makes them
PROVIDER_KEY = "sk-runner-upstream-key-7788"
UI_TOKEN = "runner-ui-token-6060"
CREDENTIALS = f"{AGENT}:{SECRET}"
SCANNER.register(SECRET, PROVIDER_KEY, UI_TOKEN)

# A runner that has not finished its loop by then is killed (with its
# children) and the test fails with its output.
RUN_TIMEOUT = 240.0
# Install on first use, then the run: the trial timeout covers both.
TEST_TIMEOUT = install.INSTALL_TIMEOUT + RUN_TIMEOUT + 60

log = Logger()


class Daemon(protocol.ProcessProtocol):
    """C{twistd -n cllama} as a child: its audit (stdout), its log (stderr)."""

    def __init__(self) -> None:
        self.stdout = b""
        self.stderr = b""
        self.ports: dict[str, int] = {}
        self.ready = defer.Deferred()
        self.ended = defer.Deferred()
        self.transport = None

    def outReceived(self, data: bytes) -> None:
        self.stdout += data

    def errReceived(self, data: bytes) -> None:
        self.stderr += data
        for kind, port in LISTENING.findall(self.stderr.decode(errors="replace")):
            self.ports[kind] = int(port)
        if len(self.ports) == 2 and not self.ready.called:
            self.ready.callback(self.ports)

    def processEnded(self, reason) -> None:
        for line in (self.stdout + self.stderr).decode(errors="replace").splitlines():
            SCANNER.scan("daemon", line)
        if not self.ready.called:
            self.ready.errback(RuntimeError("the daemon exited before listening:\n" + self.stderr.decode(errors="replace")))
        self.ended.callback(reason.value.exitCode)

    def audit_lines(self) -> list[dict]:
        complete = self.stdout[: self.stdout.rfind(b"\n") + 1]
        return [json.loads(line) for line in complete.decode().splitlines() if line.strip()]

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.ports['API']}"

    def stop(self):
        if self.ended.called:
            return defer.succeed(None)
        try:
            self.transport.signalProcess("TERM")
        except error.ProcessExitedAlready:
            pass
        return self.ended


@dataclass
class RunResult:
    argv: list[str]
    code: int | None
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool

    def describe(self) -> str:
        status = f"killed after {self.seconds:.0f} s" if self.timed_out else f"exit {self.code} after {self.seconds:.1f} s"
        return (
            f"{' '.join(self.argv)}: {status}\n--- stdout ---\n{self.stdout[-6000:]}\n"
            f"--- stderr ---\n{self.stderr[-6000:]}"
        )


def run_blocking(argv: list[str], env: dict[str, str], cwd: str, timeout: float = RUN_TIMEOUT) -> RunResult:
    """
    Run a runner to its end in a session of its own, stdin closed; past
    C{timeout} its whole process group is killed.  Blocking: use a thread.
    """
    started = time.monotonic()
    child = subprocess.Popen(
        argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        start_new_session=True,
    )
    timed_out = False
    try:
        out, err = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(child.pid, signal.SIGKILL)
        out, err = child.communicate()
    finally:
        # A runner's leftover children (language servers, shells) go with it.
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    result = RunResult(
        argv, None if timed_out else child.returncode, out.decode("utf-8", "replace"),
        err.decode("utf-8", "replace"), time.monotonic() - started, timed_out,
    )
    for line in (result.stdout + result.stderr).splitlines():
        SCANNER.scan("runner", line)
    return result


class Loop:
    """
    One test's world: the directories, the scripted provider, the daemon.
    C{providers} names the daemon's provider variables (e.g. C{ANTHROPIC})
    pointed at the scripted provider; C{metadata} adds to the agent's
    C{metadata.json} (a C{model_policy}, a C{budget}).
    """

    def __init__(
        self, testcase, provider: ScriptedProvider, providers: tuple[str, ...], extra_env=None, metadata=None
    ) -> None:
        self.case = testcase
        self.provider = provider
        self.providers = providers
        self.extra_env = extra_env or {}
        base = os.path.abspath(testcase.mktemp())
        self.base = base
        self.home = os.path.join(base, "home")
        self.work = os.path.join(base, "work")
        self.state = os.path.join(base, "state")
        self.context_root = os.path.join(base, "context")
        for directory in (self.home, self.work, os.path.join(base, "auth"), os.path.join(self.context_root, AGENT)):
            os.makedirs(directory)
        with open(os.path.join(self.context_root, AGENT, "metadata.json"), "w") as f:
            json.dump({"token": CREDENTIALS, "pod": "runners", "service": AGENT, **(metadata or {})}, f)
        self.daemon = Daemon()

    @defer.inlineCallbacks
    def start(self):
        self.provider.start(reactor)
        self.case.addCleanup(self.provider.stop)
        env = {
            "PATH": os.environ.get("PATH", ""),
            "PYTHONPATH": REPO,
            "PYTHONUNBUFFERED": "1",
            "LISTEN_ADDR": "tcp:0:interface=127.0.0.1",
            "UI_ADDR": "127.0.0.1:0",
            "CLAW_CONTEXT_ROOT": self.context_root,
            "CLAW_AUTH_DIR": os.path.join(self.base, "auth"),
            "CLLAMA_STATE_DIR": self.state,
            "CLLAMA_UI_TOKEN": UI_TOKEN,
        }
        for name in self.providers:
            env[f"{name}_API_KEY"] = PROVIDER_KEY
            env[f"{name}_BASE_URL"] = self.provider.base_url
        env.update(self.extra_env)
        argv = [TWISTD, "--pidfile=", "-n", "cllama"]
        self.daemon.transport = reactor.spawnProcess(self.daemon, argv[0], argv, env=env, path=self.base)
        self.case.addCleanup(self.daemon.stop)
        yield self.daemon.ready
        return self

    @defer.inlineCallbacks
    def install(self, runner):
        """Install C{runner} unless its cache holds it; a failure fails the test."""
        try:
            seconds = yield deferToThread(install.ensure, runner)
        except install.InstallError as e:
            self.case.fail(str(e))
        if seconds:
            log.info("installed {name} {version} in {seconds:.1f} s", name=runner.name, version=runner.version, seconds=seconds)

    @defer.inlineCallbacks
    def run(self, runner, argv: list[str], env: dict[str, str], timeout: float = RUN_TIMEOUT):
        """Install C{runner} if needed, then run C{argv} in the work directory."""
        yield self.install(runner)
        path = [runner.node_bin_dir] if runner.node_bin_dir else []
        path += [os.path.dirname(runner.executable), "/usr/local/bin", "/usr/bin", "/bin"]
        full_env = {"PATH": os.pathsep.join(path), "HOME": self.home, "LANG": "C.UTF-8", "TERM": "dumb"}
        full_env.update(env)
        result = yield deferToThread(run_blocking, [runner.executable, *argv], full_env, self.work, timeout)
        return result

    @defer.inlineCallbacks
    def finish(self):
        """Stop the daemon (a drained stop flushes the ledger); return the ledger's rows."""
        code = yield self.daemon.stop()
        self.case.assertEqual(code, 0, self.daemon.stderr.decode(errors="replace")[-4000:])
        return ledger_rows(self.state)


def ledger_rows(state_dir: str) -> list[dict]:
    """Every request row of the daemon's ledger, oldest first."""
    paths = [os.path.join(state_dir, name) for name in os.listdir(state_dir) if name.endswith(".sqlite3")]
    rows = []
    for path in paths:
        db = sqlite3.connect(path)
        db.row_factory = sqlite3.Row
        try:
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if "requests" in tables:
                rows += [dict(r) for r in db.execute("SELECT * FROM requests ORDER BY id")]
        finally:
            db.close()
    return rows


@dataclass
class Expect:
    """
    What one loop must show.  C{sent} is the model name as the runner sends
    it (a string, or a predicate for a runner that picks its own default);
    C{provider} and C{effective} where the proxy must send it (C{effective}
    None: the name as sent); C{rule} the resolution rule the audit names
    (None: an exact ref, no intervention line).
    """

    sent: object
    provider: str
    effective: str | None = None
    rule: str | None = None
    final_text: str = ""
    tool_output: str = "hello"


class LoopAssertions:
    """The checks every runner's loop shares (a mixin for trial test cases)."""

    timeout = TEST_TIMEOUT

    def check_loop(self, loop: Loop, result: RunResult, rows: list[dict], expect: Expect, kinds=("tool_call", "final")):
        provider = loop.provider
        exchanges = "\n".join(
            f"  {e.method} {e.path}{'?' + e.query if e.query else ''} -> {e.kind} model={e.model}" for e in provider.exchanges
        )
        context = f"\n{result.describe()}\n--- the provider received ---\n{exchanges}"
        self.assertFalse(result.timed_out, context)
        self.assertEqual(result.code, 0, context)
        # The loop: the call, its result back, the final answer the runner printed.
        for kind in kinds:
            self.assertEqual(len(provider.of_kind(kind)), 1, f"{kind} turns{context}")
        self.assertEqual(provider.refusals, [], context)
        self.assertEqual(provider.of_kind("other", "runaway", "no_tool", "refused"), [], context)
        if "tool_call" in kinds:
            self.assertEqual(len(provider.tool_results), 1, context)
            self.assertIn(expect.tool_output, provider.tool_results[0], context)
        if expect.final_text:
            self.assertIn(expect.final_text, result.stdout, context)
        # The agent's credentials never reached the provider; its own key did.
        for exchange in provider.exchanges:
            presented = exchange.headers.get("x-api-key") or exchange.headers.get("authorization", "")
            self.assertIn(PROVIDER_KEY, presented, exchange.headers)
            self.assertNotIn(SECRET, json.dumps(exchange.headers))
        # The audit: every inference request answered 200 for this agent, nothing refused.
        audit = loop.daemon.audit_lines()
        errors = [line for line in audit if line["type"] == "error"]
        self.assertEqual(errors, [], context)
        billable = [e for e in provider.exchanges if e.kind not in ("count_tokens", "models")]
        responses = [line for line in audit if line["type"] == "response" and line.get("provider")]
        self.assertEqual(len(responses), len(billable) + len(provider.of_kind("count_tokens")), context)
        for line in responses:
            self.assertEqual((line["claw_id"], line["status_code"]), (AGENT, 200), line)
        # The ledger: one row per upstream call, attributed to the agent, with
        # the model as sent and where it went.
        self.assertEqual(len(rows), len(responses), rows)
        turn_models = [e.model for kind in kinds for e in provider.of_kind(kind)]
        turn_rows = [r for r in rows if r["effective_model"] in turn_models and _sent_matches(expect.sent, r["requested_model"])]
        self.assertGreaterEqual(len(turn_rows), len(kinds), rows)
        for row in rows:
            self.assertEqual((row["agent"], row["status"]), (AGENT, 200), row)
        for row in turn_rows:
            effective = expect.effective or row["requested_model"]
            self.assertEqual((row["provider"], row["effective_model"]), (expect.provider, effective), row)
            self.assertGreater(row["input_tokens"], 0, row)
        self.assertEqual(sorted(r["effective_model"] for r in rows), sorted(e.model for e in billable), rows)
        # The resolution rule, named in the audit for the model as sent.
        sent = turn_rows[0]["requested_model"]
        rules = {line["intervention"] for line in audit if line["type"] == "intervention" and line["model"] == sent}
        self.assertEqual(rules, {expect.rule} if expect.rule else set(), audit)
        return turn_rows


def _sent_matches(expected, requested: str) -> bool:
    return expected(requested) if callable(expected) else requested == expected
