"""
The environment markers between a supervisor (C{--workers N}) and its
workers, read and written in one place so both sides agree.

A worker is the same daemon started with the supervisor's environment plus:

  - C{CLLAMA_WORKERS=<N>} and C{CLLAMA_WORKER_INDEX=<i>}: how many workers
    share the host and which one this is (the store reads them too, to work
    across processes);
  - C{CLLAMA_WORKER_FDS=api:<fd>,ui:<fd>,lifeline:<fd>,status:<fd>}: the
    inherited descriptors: the two listening sockets it adopts instead of
    binding, the pipe whose end of file means the supervisor is gone, and
    the pipe on which it says it is ready;
  - C{CLLAMA_WORKER_OWN_API=1} when its API socket is its own (one per
    worker on the port, C{cllama_tx.runtime.reuseport}), not shared by
    every worker.

Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs

WORKERS = "CLLAMA_WORKERS"
WORKER_INDEX = "CLLAMA_WORKER_INDEX"
WORKER_FDS = "CLLAMA_WORKER_FDS"
WORKER_OWN_API = "CLLAMA_WORKER_OWN_API"

MAX_WORKERS = 64
"""More processes than this on one host is a mistake, not a setting."""

# The descriptor layout of a worker: fixed, so nothing else can land there.
LIFELINE_FD = 0
AUDIT_FD = 1
STDERR_FD = 2
STATUS_FD = 3
API_FD = 4
UI_FD = 5

_FD_NAMES = ("api", "ui", "lifeline", "status")

READY = b"ready\n"
"""What a worker writes on its status pipe once it serves."""


class WorkerEnvError(ValueError):
    """A marker that cannot be understood; the message says which and why."""


@attrs.frozen
class WorkerRole:
    """This process is worker C{index} of C{count}, with these inherited descriptors."""

    index: int
    count: int
    api_fd: int
    ui_fd: int
    lifeline_fd: int
    status_fd: int
    own_api: bool = False  # the API socket is this worker's alone


def parse_count(raw: str | None) -> int:
    """C{CLLAMA_WORKERS}: 1 (the default) to L{MAX_WORKERS}."""
    if raw is None or not raw.strip():
        return 1
    raw = raw.strip()
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_WORKERS:
        raise WorkerEnvError(f"{WORKERS} must be a whole number from 1 to {MAX_WORKERS}, not {raw!r}")
    return int(raw)


def parse_role(env: Mapping[str, str]) -> WorkerRole | None:
    """The role the supervisor gave this process, or None (not a worker)."""
    raw_index = env.get(WORKER_INDEX)
    raw_fds = env.get(WORKER_FDS)
    if not raw_index and not raw_fds:
        return None
    if not raw_index or not raw_fds:
        raise WorkerEnvError(f"{WORKER_INDEX} and {WORKER_FDS} come together (a worker is started by its supervisor)")
    count = parse_count(env.get(WORKERS))
    if not raw_index.isdigit() or int(raw_index) >= count:
        raise WorkerEnvError(f"{WORKER_INDEX} must be a whole number below {WORKERS} ({count}), not {raw_index!r}")
    fds: dict[str, int] = {}
    for part in raw_fds.split(","):
        name, sep, value = part.strip().partition(":")
        if not sep or name not in _FD_NAMES or not value.isdigit() or name in fds:
            raise WorkerEnvError(f"cannot understand {WORKER_FDS}={raw_fds!r} (want api:N,ui:N,lifeline:N,status:N)")
        fds[name] = int(value)
    missing = [name for name in _FD_NAMES if name not in fds]
    if missing:
        raise WorkerEnvError(f"{WORKER_FDS} lacks {', '.join(missing)}")
    own_api = env.get(WORKER_OWN_API) == "1"
    return WorkerRole(int(raw_index), count, fds["api"], fds["ui"], fds["lifeline"], fds["status"], own_api)


def role_env(index: int, count: int, own_api: bool = False) -> dict[str, str]:
    """The markers the supervisor adds to worker C{index}'s environment."""
    fds = {"api": API_FD, "ui": UI_FD, "lifeline": LIFELINE_FD, "status": STATUS_FD}
    env = {
        WORKERS: str(count),
        WORKER_INDEX: str(index),
        WORKER_FDS: ",".join(f"{name}:{fd}" for name, fd in fds.items()),
    }
    if own_api:
        env[WORKER_OWN_API] = "1"
    return env
