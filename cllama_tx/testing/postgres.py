"""
A real PostgreSQL server for the tests: Debian's binaries, a cluster made by
C{initdb} in a temporary directory, run as a non-root user on a private
loopback port, one fresh database per test.

The first test that asks for it starts the cluster; it is stopped when the
test process exits.  C{CLLAMA_TEST_POSTGRES_BIN} names the binaries'
directory when they are not in C{/usr/lib/postgresql/<version>/bin}.
"""

from __future__ import annotations

import atexit
import glob
import itertools
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time

__all__ = ["PostgresCluster", "PostgresNotInstalled", "shared_cluster"]


class PostgresNotInstalled(Exception):
    """No PostgreSQL server binaries on this machine."""


def _binaries() -> str:
    configured = os.environ.get("CLLAMA_TEST_POSTGRES_BIN")
    if configured:
        return configured
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(p.split("/")[4]))
    if not found:
        raise PostgresNotInstalled("no /usr/lib/postgresql/*/bin/postgres (apt-get install postgresql)")
    return os.path.dirname(found[-1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresCluster:
    """One throwaway cluster; L{database} hands out fresh databases."""

    def __init__(self) -> None:
        self.bin = _binaries()
        self.root = tempfile.mkdtemp(prefix="cllama-pg-")
        self.data = os.path.join(self.root, "data")
        self.port = _free_port()
        self._user = None if os.geteuid() != 0 else "postgres"
        self._counter = itertools.count(1)
        self.running = False

    def _as_server_user(self, argv: list[str]) -> list[str]:
        if self._user is None:
            return argv
        return ["runuser", "-u", self._user, "--", *argv]

    def _run(self, argv: list[str]) -> None:
        done = subprocess.run(self._as_server_user(argv), capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed: {done.stdout}{done.stderr}")

    def initdb(self) -> None:
        if self._user is not None:
            entry = pwd.getpwnam(self._user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self._run([os.path.join(self.bin, "initdb"), "-D", self.data, "-A", "trust", "-U", "cllama",
                   "--no-sync", "-E", "UTF8", "--locale=C"])

    def start(self) -> None:
        if not os.path.isdir(self.data):
            self.initdb()
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=300"
        )
        self._run([os.path.join(self.bin, "pg_ctl"), "-D", self.data, "-l", os.path.join(self.root, "log"),
                   "-o", options, "-w", "-t", "60", "start"])
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        if not self.running:
            return
        self._run([os.path.join(self.bin, "pg_ctl"), "-D", self.data, "-m", mode, "-w", "stop"])
        self.running = False

    def kill(self) -> None:
        """The server's postmaster killed outright (SIGKILL), as a crash would."""
        with open(os.path.join(self.data, "postmaster.pid")) as f:
            pid = int(f.readline())
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        self.running = False

    def destroy(self) -> None:
        try:
            self.stop("immediate")
        except Exception:
            pass
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://cllama@127.0.0.1:{self.port}/{database}"

    def database(self) -> str:
        """A new empty database; returns its URL."""
        import psycopg

        name = f"t{os.getpid()}_{next(self._counter)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
        return self.url(name)


_shared: PostgresCluster | None = None


def shared_cluster() -> PostgresCluster:
    """The test process's cluster, started on first use."""
    global _shared
    if _shared is None:
        cluster = PostgresCluster()
        cluster.start()
        atexit.register(cluster.destroy)
        _shared = cluster
    elif not _shared.running:
        _shared.start()
    return _shared
