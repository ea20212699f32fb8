"""
Graceful shutdown: SIGTERM stops accepting, lets in-flight requests finish
within a grace period, cuts the rest, settles them, then stops the shared
services (ledger, key pools, audit flush) and exits 0.

Structure (see L{build_daemon}): the top L{MultiService} holds a
L{DrainService} first and the listeners after it.  The DrainService is
itself a MultiService whose children are the shared services.  A
MultiService stops its children in reverse order I{concurrently}, so the
listeners stop accepting while the DrainService waits; only after the wait
does the DrainService stop its own children, so the ledger is still open
when the last in-flight request settles.

Exit code: the reactor's own SIGTERM handler records the signal
(C{reactor._exitSignal}, Twisted >= 18) and twistd re-raises it once the
reactor stopped, so the process ends I{by} SIGTERM.  A clean drain is not a
crash: the DrainService replaces the SIGTERM handler (once the reactor has
installed its own, in startService) with one that calls C{reactor.stop()}
without recording a signal, so twistd returns normally and the process
exits 0.  SIGINT keeps Twisted's behaviour.
"""

from __future__ import annotations

import signal

from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger

log = Logger()

DEFAULT_GRACE = 8.0  # below Docker's default stop timeout (10 s)
SETTLE_DELAY = 0.5  # after cutting: time for aborted requests to settle


class InFlight:
    """The requests being served right now."""

    def __init__(self) -> None:
        self._requests: set = set()
        self._waiters: list[defer.Deferred] = []

    @property
    def count(self) -> int:
        return len(self._requests)

    def track(self, request) -> None:
        """Count C{request} until it finishes or its connection is lost."""
        self._requests.add(request)
        request.notifyFinish().addBoth(self._finished, request)

    def _finished(self, _result, request) -> None:
        self._requests.discard(request)
        if not self._requests:
            waiters, self._waiters = self._waiters, []
            for d in waiters:
                d.callback(None)
        return None  # a lost connection is not an error here

    def _idle(self) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        if not self._requests:
            d.callback(None)
        else:
            self._waiters.append(d)
        return d

    def wait(self, timeout: float, clock, settle_delay: float = SETTLE_DELAY) -> defer.Deferred:
        """
        Fire with the number of requests cut (0 when all finished in time):
        once every tracked request finished, or C{timeout} seconds elapsed,
        in which case the rest are aborted, which makes them settle as
        client-closed (499) with their ledger row, and C{settle_delay}
        seconds are left for that settlement.
        """
        done: defer.Deferred = defer.Deferred()
        idle = self._idle()

        def finished(_):
            if timer.active():
                timer.cancel()
            if not done.called:
                done.callback(0)

        def expired():
            if done.called:
                return
            if not idle.called:
                idle.cancel()  # fired below instead, once the cut requests settled
            remaining = list(self._requests)
            for request in remaining:
                _abort(request)
            log.warn("grace of {grace}s over: cut {n} in-flight request(s)", grace=timeout, n=len(remaining))
            after = self._idle()
            # Connection loss is noticed on the next reactor turn; settlement
            # (the upstream abort, the audit line, the ledger row) follows.
            after.addCallback(lambda _: task.deferLater(clock, settle_delay, lambda: None))
            after.addBoth(lambda _: done.callback(len(remaining)))

        timer = clock.callLater(timeout, expired)
        idle.addCallbacks(finished, lambda f: f.trap(defer.CancelledError) and None)
        return done


def _abort(request) -> None:
    transport = getattr(request, "transport", None)
    if transport is None:
        return
    if hasattr(transport, "abortConnection"):
        transport.abortConnection()
    else:
        transport.loseConnection()


class DrainService(service.MultiService):
    """
    Parent of the shared services; stops them only after the in-flight
    requests finished or were cut after C{grace} seconds.  Owns SIGTERM.
    """

    def __init__(self, reactor, inflight: InFlight, grace: float = DEFAULT_GRACE) -> None:
        super().__init__()
        self.reactor = reactor
        self.inflight = inflight
        self.grace = grace
        self._installed = False
        self._stopping = False

    def startService(self):
        super().startService()
        # twistd calls startService before reactor.run(); the reactor
        # installs its own handlers during start-up, so ours goes after.
        self.reactor.callWhenRunning(self._install)

    def _install(self) -> None:
        if not self.running or self._installed:
            return
        try:
            signal.signal(signal.SIGTERM, self._terminate)
            self._installed = True
        except ValueError:  # not the main thread (tests in-process)
            pass

    def _terminate(self, signum, frame) -> None:
        # Like the reactor's sigTerm, but without recording an exit signal:
        # a drained shutdown exits 0.
        self.reactor.callFromThread(log.info, "Received SIGTERM, draining (grace {grace}s).", grace=self.grace)
        self.reactor.callFromThread(self._stop_reactor)

    def _stop_reactor(self) -> None:
        # A second SIGTERM during the drain changes nothing (SIGKILL does).
        if not self._stopping and self.reactor.running:
            self._stopping = True
            self.reactor.stop()

    @defer.inlineCallbacks
    def stopService(self):
        # Our SIGTERM handler stays until the reactor stops, which then puts
        # back the handlers that preceded its own.
        self._stopping = True
        # The listeners (stopped concurrently with us) stop accepting now;
        # one reactor turn lets their sockets close before anything else.
        yield task.deferLater(self.reactor, 0, lambda: None)
        if self.inflight.count:
            log.info("waiting for {n} in-flight request(s), at most {grace}s", n=self.inflight.count, grace=self.grace)
        cut = yield self.inflight.wait(self.grace, self.reactor)
        if cut:
            log.info("cut {n} request(s) at the end of the grace period", n=cut)
        yield super().stopService()
