"""
How many connections the process's descriptors can hold, and the soft
limit raised to hold the configured caps.

A connection is a descriptor; an API connection being served holds a
second one, to its provider.  Besides those the daemon keeps a few of its
own (the listeners, the reactor, SQLite's database, journal and shared
memory files on three connections, the history files, idle upstream
connections in the pool, a reserve for the burst of one accept loop),
budgeted as L{RESERVE}.  When the caps do not fit under the limit, the
daemon runs out of descriptors before the caps protect it; so the soft
limit is raised as far as the hard limit allows, and if that is not
enough the caps are lowered to fit, and the log says so.
"""

from __future__ import annotations

import resource

import attrs
from twisted.logger import Logger

log = Logger()

RESERVE = 128
# Caps are never lowered below these (a limit so low is a broken host anyway).
MIN_API = 16
MIN_UI = 8


def descriptors_needed(api_cap: int, ui_cap: int) -> int:
    """Descriptors the caps may use at worst: two per API connection, one per UI connection."""
    return 2 * api_cap + ui_cap + RESERVE


@attrs.frozen
class Fit:
    """The caps to run with, and the soft limit to set."""

    api_cap: int
    ui_cap: int
    soft_limit: int
    needed: int  # what the configured caps need

    def lowered(self, api_cap: int, ui_cap: int) -> bool:
        return (self.api_cap, self.ui_cap) != (api_cap, ui_cap)


def fit_caps(api_cap: int, ui_cap: int, soft: int, hard: int) -> Fit:
    """
    Pure: the soft limit to ask for (at most C{hard}) and the caps that fit
    under it.  C{resource.RLIM_INFINITY} counts as unlimited.
    """
    needed = descriptors_needed(api_cap, ui_cap)
    unlimited = resource.RLIM_INFINITY
    if soft == unlimited or soft >= needed:
        return Fit(api_cap, ui_cap, soft, needed)
    if hard == unlimited or hard >= needed:
        return Fit(api_cap, ui_cap, needed, needed)
    room = max(hard - RESERVE, 0)
    ui = max(MIN_UI, min(ui_cap, room // 8))
    api = max(MIN_API, min(api_cap, (room - ui) // 2))
    return Fit(api, ui, hard, needed)


def fit_descriptors(api_cap: int, ui_cap: int) -> Fit:
    """
    Raise the soft C{RLIMIT_NOFILE} as far as the caps need (and the hard
    limit allows); lower the caps when even that is too little.  Logs what
    it changed.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fit = fit_caps(api_cap, ui_cap, soft, hard)
    if fit.soft_limit != soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (fit.soft_limit, hard))
        except (ValueError, OSError) as e:
            log.warn("could not raise the descriptor limit from {soft} to {want}: {error}",
                     soft=soft, want=fit.soft_limit, error=e)
            fit = fit_caps(api_cap, ui_cap, soft, soft)
        else:
            log.info("descriptor limit raised from {soft} to {limit} for the connection caps",
                     soft=soft, limit=fit.soft_limit)
    if fit.lowered(api_cap, ui_cap):
        log.warn(
            "the descriptor limit ({limit}) is too low for the connection caps (API {api}, UI {ui}: "
            "{needed} descriptors at worst): running with API {new_api} and UI {new_ui}; "
            "raise LimitNOFILE= (systemd) or ulimit -n",
            limit=fit.soft_limit, api=api_cap, ui=ui_cap, needed=fit.needed,
            new_api=fit.api_cap, new_ui=fit.ui_cap,
        )
    return fit
