"""
The systemd units in systemd/: checked by `systemd-analyze verify`, and socket
activation proved for real with `systemd-socket-activate`, which passes
listening sockets to the daemon exactly as systemd does (LISTEN_FDS,
LISTEN_PID, LISTEN_FDNAMES).

Both tools come from Debian's `systemd` package; the tests skip, saying so,
where it is not installed.
"""

import json
import os
import re
import shutil
import socket
import sys

import treq
from twisted.internet import defer, reactor, utils
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from cllama_tx.runtime.descriptors import descriptors_needed, fit_caps
from cllama_tx.sites.guard import DEFAULT_MAX_CONNECTIONS, DEFAULT_UI_MAX_CONNECTIONS
from tests.runtime.test_daemon import REPO, spawn_daemon
from tests.support import AGENT, PROVIDER_KEY, SECRET, write_agent

UNITS_DIR = os.path.join(REPO, "systemd")
UNITS = ("cllama-tx-api.socket", "cllama-tx-ui.socket", "cllama-tx.service")
INSTALLED_BINARY = "/usr/local/bin/cllama-tx"


def _tool(name):
    path = shutil.which(name)
    if path is None:
        raise SkipTest(f"{name} is not installed (Debian: apt-get install systemd)")
    return path


def _exec_start(path):
    """The service's ExecStart= arguments (one line, no continuations)."""
    with open(path) as f:
        for line in f:
            if line.startswith("ExecStart="):
                return line[len("ExecStart=") :].split()
    raise AssertionError(f"no ExecStart= in {path}")


def _free_port():
    """
    A loopback port free right now.  systemd-socket-activate refuses port 0,
    so a port is picked here and handed to it; another process could take it
    in between, which on a test machine is not worth more machinery.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class UnitFileTests(TestCase):
    timeout = 60

    def _daemon_command(self):
        """What ExecStart= runs in the copies: an executable that exists here."""
        script = os.path.join(os.path.dirname(sys.executable), "cllama-tx")
        if os.access(script, os.X_OK):
            return script  # installed with pip (as .ci/run does)
        return f"{sys.executable} -m cllama_tx.runtime.cli"  # a source checkout on PYTHONPATH

    @defer.inlineCallbacks
    def test_units_verify_cleanly(self):
        """
        C{systemd-analyze verify} finds nothing to say about the three units
        once ExecStart= names an executable that exists on this machine.
        """
        analyze = _tool("systemd-analyze")
        copies = os.path.abspath(self.mktemp())
        os.makedirs(copies)
        for name in UNITS:
            with open(os.path.join(UNITS_DIR, name)) as f:
                text = f.read()
            if name == "cllama-tx.service":
                self.assertIn(f"ExecStart={INSTALLED_BINARY} ", text)
                text = text.replace(f"ExecStart={INSTALLED_BINARY} ", f"ExecStart={self._daemon_command()} ")
            with open(os.path.join(copies, name), "w") as f:
                f.write(text)
        out, err, code = yield utils.getProcessOutputAndValue(
            analyze,
            ["verify", *(os.path.join(copies, name) for name in UNITS)],
            env={"PATH": os.environ.get("PATH", ""), "SYSTEMD_LOG_COLOR": "0"},
            path=copies,
        )
        report = (out + err).decode(errors="replace")
        self.assertEqual((code, report), (0, ""))

    def test_service_adopts_the_sockets_by_name(self):
        """
        The service's listen options name the descriptors the socket units
        give (FileDescriptorName=), so the order of LISTEN_FDS is irrelevant,
        and the socket units bind IPv4 as C{domain=INET} expects.
        """
        argv = _exec_start(os.path.join(UNITS_DIR, "cllama-tx.service"))
        self.assertEqual(argv[0], INSTALLED_BINARY)
        options = dict(zip(argv[1::2], argv[2::2], strict=True))
        self.assertEqual(
            options,
            {
                "--listen": "systemd:domain=INET:name=cllama-api",
                "--ui-listen": "systemd:domain=INET:name=cllama-ui",
            },
        )
        for unit, name, port in (("cllama-tx-api.socket", "cllama-api", 8080), ("cllama-tx-ui.socket", "cllama-ui", 8081)):
            with open(os.path.join(UNITS_DIR, unit)) as f:
                lines = [line.strip() for line in f]
            self.assertIn(f"FileDescriptorName={name}", lines)
            self.assertIn("Service=cllama-tx.service", lines)
            self.assertIn(f"ListenStream=0.0.0.0:{port}", lines)


    def test_descriptor_limit_holds_the_default_connection_caps(self):
        """
        LimitNOFILE= leaves room for the default caps with every API
        connection holding an upstream one too, so the daemon never lowers
        them (nor runs out of descriptors before they protect it).
        """
        with open(os.path.join(UNITS_DIR, "cllama-tx.service")) as f:
            limits = [line.strip().partition("=")[2] for line in f if line.startswith("LimitNOFILE=")]
        self.assertEqual(limits, ["65536"])
        needed = descriptors_needed(DEFAULT_MAX_CONNECTIONS, DEFAULT_UI_MAX_CONNECTIONS)
        self.assertLessEqual(needed, 65536 // 4)
        fit = fit_caps(DEFAULT_MAX_CONNECTIONS, DEFAULT_UI_MAX_CONNECTIONS, 65536, 65536)
        self.assertFalse(fit.lowered(DEFAULT_MAX_CONNECTIONS, DEFAULT_UI_MAX_CONNECTIONS))


class SocketActivationTests(TestCase):
    timeout = 60

    def setUp(self):
        self.activate = _tool("systemd-socket-activate")
        base = os.path.abspath(self.mktemp())
        self.context_root = os.path.join(base, "context")
        self.auth_dir = os.path.join(base, "auth")
        self.state_dir = os.path.join(base, "state")
        os.makedirs(self.auth_dir)
        os.makedirs(self.state_dir, mode=0o700)
        write_agent(self.context_root, AGENT, SECRET)
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        self.http = treq.client.HTTPClient(Agent(reactor, pool=pool))

    @defer.inlineCallbacks
    def test_serves_on_inherited_named_sockets(self):
        """
        Under C{systemd-socket-activate} (two sockets, named as the socket
        units name them) the daemon listens on neither address of its own:
        it adopts both descriptors, answers /health on each, takes its state
        directory from C{STATE_DIRECTORY}, and exits 0 on SIGTERM.
        """
        api_port, ui_port = _free_port(), _free_port()
        # systemd-socket-activate hands the child only TERM, PATH, USER and
        # HOME of its own environment; everything else goes through -E.
        child_env = {
            "PYTHONPATH": REPO,
            "PYTHONUNBUFFERED": "1",
            "CLAW_CONTEXT_ROOT": self.context_root,
            "CLAW_AUTH_DIR": self.auth_dir,
            "STATE_DIRECTORY": self.state_dir,
            "OPENAI_API_KEY": PROVIDER_KEY,
        }
        command = [
            self.activate,
            f"--listen=127.0.0.1:{api_port}",
            f"--listen=127.0.0.1:{ui_port}",
            "--fdname=cllama-api:cllama-ui",
            *(f"--setenv={k}={v}" for k, v in child_env.items()),
            sys.executable,
            "-m",
            "cllama_tx.runtime.cli",
            # The very options of the service's ExecStart=.
            *_exec_start(os.path.join(UNITS_DIR, "cllama-tx.service"))[1:],
        ]
        process, transport = spawn_daemon(self, {}, command=command)
        # systemd-socket-activate says when each socket listens, then waits for
        # the first connection before it execs the daemon (systemd 252 has no
        # --now): the request below is that connection, held in the backlog
        # until the daemon accepts it.
        yield process.wait_for_stderr(f"Listening on 127.0.0.1:{api_port} as ".encode())
        yield process.wait_for_stderr(f"Listening on 127.0.0.1:{ui_port} as ".encode())

        api = yield self.http.get(f"http://127.0.0.1:{api_port}/health", timeout=30)
        self.assertEqual(api.code, 200)
        self.assertEqual(json.loads((yield api.content())), {"ok": True})

        ports = yield process.ready  # "API/UI listening on 127.0.0.1:<port>"
        self.assertEqual(ports, {"API": api_port, "UI": ui_port})
        stderr = process.stderr.decode(errors="replace")
        self.assertIn("Execing", stderr)
        self.assertEqual(len(re.findall(r"Communication attempt", stderr)), 1)

        ui = yield self.http.get(f"http://127.0.0.1:{ui_port}/health", timeout=30)
        self.assertEqual(ui.code, 200)
        self.assertEqual(json.loads((yield ui.content())), {"ok": True})

        # STATE_DIRECTORY (set by StateDirectory=) is the state directory.
        self.assertTrue(os.path.exists(os.path.join(self.state_dir, "ledger.sqlite3")))
        self.assertTrue(os.path.exists(os.path.join(self.state_dir, "ui-token")))

        # KillSignal=SIGTERM: the daemon drains and exits 0, a clean stop.
        transport.signalProcess("TERM")
        code = yield process.ended
        self.assertEqual((code, process.signal), (0, None))
