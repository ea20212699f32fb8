"""
Reading this host's listening TCP sockets from the OS, off the reactor:
Linux's C{/proc/net/tcp} and C{/proc/net/tcp6} in a thread, macOS's
C{lsof} as a child process (with a deadline).  The parsing is
L{cllama_tx.discovery.netstat}'s.
"""

from __future__ import annotations

import os
import shutil
import sys

from twisted.internet import defer, threads
from twisted.internet.utils import getProcessOutputAndValue

from cllama_tx.discovery.netstat import ListeningSocket, parse_lsof, parse_proc_net_tcp

PROC_FILES = ("/proc/net/tcp", "/proc/net/tcp6")
#: A socket table is a line per socket; a busy host has tens of thousands.
MAX_TABLE_BYTES = 64 * 1024 * 1024
LSOF_TIMEOUT = 10.0
LSOF_ARGS = ("-nP", "-iTCP", "-sTCP:LISTEN", "-F", "ptn")


class ScanUnsupported(Exception):
    """This OS has neither /proc/net/tcp nor lsof: the port scan cannot run."""


def _read_proc(files: tuple[str, ...]) -> list[ListeningSocket]:
    found: list[ListeningSocket] = []
    for path in files:
        try:
            with open(path, encoding="ascii", errors="replace") as f:
                found.extend(parse_proc_net_tcp(f.read(MAX_TABLE_BYTES)))
        except FileNotFoundError:
            continue  # no IPv6 on this host
    return found


def method() -> str | None:
    """How this host's sockets are read: C{proc}, C{lsof}, or None."""
    if os.path.exists(PROC_FILES[0]):
        return "proc"
    if sys.platform == "darwin" and (shutil.which("lsof") or os.path.exists("/usr/sbin/lsof")):
        return "lsof"
    return None


def read_listening(reactor, files: tuple[str, ...] = PROC_FILES) -> defer.Deferred:
    """
    A Deferred firing with this host's listening sockets, or failing with
    L{ScanUnsupported} (or the OS's error).
    """
    how = method() if files == PROC_FILES else "proc"
    if how == "proc":
        return threads.deferToThreadPool(reactor, reactor.getThreadPool(), _read_proc, files)
    if how == "lsof":
        return _run_lsof(reactor)
    return defer.fail(ScanUnsupported("this OS has neither /proc/net/tcp nor lsof"))


def _run_lsof(reactor) -> defer.Deferred:
    executable = shutil.which("lsof") or "/usr/sbin/lsof"
    d = getProcessOutputAndValue(executable, LSOF_ARGS, env={"PATH": "/usr/sbin:/usr/bin:/bin"}, reactor=reactor)
    d.addTimeout(LSOF_TIMEOUT, reactor)
    # lsof exits 1 when nothing listens; its output is what counts.
    return d.addCallback(lambda result: parse_lsof(result[0].decode("utf-8", "replace")))
