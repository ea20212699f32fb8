"""Operational logging: human-readable lines on stderr, never the audit stream."""

from __future__ import annotations

import sys

from twisted.logger import ILogObserver, textFileLogObserver


def stderr_observer() -> ILogObserver:
    """The default operational log observer under twistd: stderr, not stdout."""
    return textFileLogObserver(sys.stderr)
