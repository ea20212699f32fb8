"""
The per-host directory of metric snapshots that lets any worker answer
C{/metrics} for the whole host (C{--workers N}).

Each worker publishes its process-local figures (connections, in-flight
streams, latency histograms, ...) every second and once more after its
drain, as C{<state>/workers/<index>.json} (mode 0600, written to a
temporary file and renamed, so a reader never sees half a file); the
supervisor publishes its audit relay's as C{supervisor.json}.  A scrape
reads the others' files: L{cllama_tx.runtime.metrics.Metrics.host_families}
adds them up.  A file not rewritten for L{STALE_AFTER} seconds belongs to a
process that is gone.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

from twisted.application import service
from twisted.internet import task
from twisted.logger import Logger

from cllama_tx.runtime.metrics import Family, Peer

log = Logger()

SNAPSHOT_INTERVAL = 1.0
"""Seconds between two snapshots of a process."""

STALE_AFTER = 5.0
"""A snapshot older than this is of a process that stopped publishing (dead)."""

MAX_SNAPSHOT_BYTES = 16 * 1024 * 1024
"""A larger file is not a snapshot of ours; it is skipped, never read whole."""

SUPERVISOR = "supervisor"
_SUFFIX = ".json"


def snapshot_dir(state_dir: str) -> str:
    return os.path.join(state_dir, "workers")


def prepare_dir(directory: str) -> None:
    """
    The supervisor, before it starts workers: the directory exists (0700)
    and holds nothing of an earlier run, whose counters ended with it.
    """
    os.makedirs(directory, mode=0o700, exist_ok=True)
    for name in os.listdir(directory):
        if name.endswith((_SUFFIX, ".tmp")):
            try:
                os.unlink(os.path.join(directory, name))
            except FileNotFoundError:
                pass


def write_snapshot(directory: str, name: str, doc: dict) -> None:
    """C{<directory>/<name>.json}, mode 0600, replaced in one rename."""
    data = json.dumps(doc, separators=(",", ":")).encode()
    final = os.path.join(directory, name + _SUFFIX)
    temporary = os.path.join(directory, f".{name}.{os.getpid()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(temporary, flags, 0o600)
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)
    os.replace(temporary, final)


def read_snapshot(path: str) -> dict | None:
    """A snapshot file's document, or None when it is missing, too large or not one of ours."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SNAPSHOT_BYTES + 1)
    except OSError:
        return None
    if len(data) > MAX_SNAPSHOT_BYTES:
        return None
    try:
        doc = json.loads(data)
    except ValueError:
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("families"), list):
        return None
    if not isinstance(doc.get("written_at"), (int, float)):
        return None
    return doc


def read_peers(directory: str, own: str, now: float) -> list[Peer]:
    """Every other process's last snapshot, fresh or not."""
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    peers = []
    for name in names:
        if not name.endswith(_SUFFIX) or name == own + _SUFFIX or name.startswith("."):
            continue
        doc = read_snapshot(os.path.join(directory, name))
        if doc is None:
            continue
        peers.append(
            Peer(
                families=doc["families"],
                fresh=now - doc["written_at"] <= STALE_AFTER,
                worker=doc.get("role") == "worker",
            )
        )
    return peers


class SnapshotPublisher(service.Service):
    """
    Writes this process's figures every L{SNAPSHOT_INTERVAL} seconds while
    it runs; L{publish} once more after the drain (the caller arranges it),
    so the last requests are counted.
    """

    def __init__(
        self,
        clock,
        directory: str,
        name: str,
        families: Callable[[], list[Family]],
        role: str,
        index: int | None = None,
    ) -> None:
        self._clock = clock
        self.directory = directory
        self.snapshot_name = name  # not Service.name: that names a child in its parent
        self._families = families
        self._role = role
        self._index = index
        self._loop: task.LoopingCall | None = None
        self._failing = False

    def startService(self) -> None:
        super().startService()
        self.publish()
        self._loop = task.LoopingCall(self.publish)
        self._loop.clock = self._clock
        self._loop.start(SNAPSHOT_INTERVAL, now=False)

    def stopService(self):
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self.publish()

    def publish(self) -> None:
        doc = {
            "version": 1,
            "role": self._role,
            "index": self._index,
            "pid": os.getpid(),
            "written_at": self._clock.seconds(),
            "families": self._families(),
        }
        try:
            write_snapshot(self.directory, self.snapshot_name, doc)
        except OSError as e:
            if not self._failing:
                log.warn("cannot write the metrics snapshot in {directory}: {error}", directory=self.directory, error=e)
            self._failing = True
            return
        self._failing = False
