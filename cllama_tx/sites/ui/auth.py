"""
Who may use the operator UI, and how a browser proves it.

 - B{Scripts and dashboards} send C{Authorization: Bearer <token>} on every
   request.  Nothing is stored; no CSRF token is needed (a browser never
   attaches that header to a cross-site request by itself).
 - B{Browsers} sign in once with the token at C{/signin} and get a session
   cookie (C{HttpOnly}, C{SameSite=Strict}, C{Secure} under TLS, expiring).
   A single process keeps sessions in memory: a restart signs everybody
   out.  Several instances (workers behind one socket, hosts on one
   database) keep them in the shared store too (L{SessionStore} with
   C{rows}): memory is a cache, a session this instance has not seen is
   read from the store before the request is served, and a sign-out ends
   it everywhere.  Every state-changing request made with the cookie
   carries the session's CSRF token (a hidden form field, or the
   C{X-CSRF-Token} header), derived from the session id so that every
   instance knows it and none stores it.
 - B{Wrong tokens} (sign-in forms and bearer headers) are slowed per client
   address by the daemon's one L{cllama_tx.identity.operator.OperatorGuard}:
   an address that keeps guessing waits (429, C{Retry-After}) before its
   next token is compared; nobody else's failures ever lock the operator out.
 - B{Without authentication}, the UI answers only to the host names it
   knows (L{host_allowed}): a DNS-rebinding page cannot drive it.
 - B{The token} comes from C{CLLAMA_UI_TOKEN}, or L{ensure_ui_token} makes one
   at start in a 0600 file of the state directory.  Running without
   authentication needs an explicit option and is logged loudly.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import ipaddress
import os
import re
import secrets
import stat
from typing import Any

import attrs
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from cllama_tx.identity.lookups import MissLookups
from cllama_tx.identity.operator_sessions import (
    SessionRows,
    csrf_token,
    looks_like_session_id,
    session_hash,
)

log = Logger(namespace="cllama_tx.sites.ui")

TOKEN_FILE = "ui-token"
"""The generated operator token's file name in the state directory."""

MIN_TOKEN_LENGTH = 16

SESSION_COOKIE = "cllama_session"
SECURE_SESSION_COOKIE = "__Host-cllama_session"
SIGNIN_COOKIE = "cllama_signin"
CSRF_FIELD = "csrf"
CSRF_HEADER = b"x-csrf-token"

DEFAULT_SESSION_LIFETIME = 12 * 3600.0
DEFAULT_SESSION_IDLE = 2 * 3600.0
MAX_SESSIONS = 1000
#: How often a session's use is written to the shared store: its idle time
#: on another instance counts from there (to within this many seconds).
TOUCH_INTERVAL = 60.0
#: A cached session confirmed by the shared store longer ago than this is read
#: again before it is trusted: a sign-out on another instance ends it here within
#: this many seconds even before the change feed says so.
RECHECK_INTERVAL = 5.0


# --- the token file ------------------------------------------------------------


class TokenFileError(Exception):
    """The token file exists but cannot be used; the message says why (never its content)."""


def ensure_ui_token(state_dir: str) -> tuple[str, str]:
    """
    The operator token kept in C{<state_dir>/ui-token}: read it when it is
    there, else generate one (256 random bits) and write it with mode 0600
    (atomically: a temporary file, fsync, rename).  Returns C{(token, path)};
    log the path, never the token.  A file readable by others is made 0600
    (and that is logged).

    @raise TokenFileError: the path is not a regular file, or holds no usable
        token (shorter than 16 characters, or with spaces or control characters).
    """
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    path = os.path.join(state_dir, TOKEN_FILE)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        fd = None
    except OSError as e:
        raise TokenFileError(f"{path}: cannot be opened ({e.strerror})") from None
    if fd is not None:
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise TokenFileError(f"{path}: is not a regular file")
            if info.st_mode & 0o077:
                os.fchmod(fd, 0o600)
                log.warn("{path} was readable by other users; it is now mode 0600", path=path)
            data = os.read(fd, 4096)
        finally:
            os.close(fd)
        token = data.decode("utf-8", "replace").strip()
        if len(token) < MIN_TOKEN_LENGTH or not all(0x21 <= ord(c) <= 0x7E for c in token):
            raise TokenFileError(
                f"{path}: does not hold a usable token (at least {MIN_TOKEN_LENGTH} printable "
                "characters, no spaces); delete it to have a new one generated"
            )
        return token, path
    token = secrets.token_urlsafe(32)
    temporary = f"{path}.{secrets.token_hex(4)}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        os.write(fd, (token + "\n").encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.rename(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
    return token, path


# --- comparing tokens ------------------------------------------------------------


def token_matches(presented: bytes | str | None, token: bytes | None) -> bool:
    if not token or presented is None:
        return False
    if isinstance(presented, str):
        presented = presented.encode("utf-8", "replace")
    return hmac.compare_digest(presented.strip(), token)


def bearer_of(authorization: bytes | None) -> bytes | None:
    """The credential of C{Authorization: Bearer <x>}, else None."""
    if not authorization:
        return None
    scheme, _, presented = authorization.partition(b" ")
    if scheme.lower() != b"bearer":
        return None
    return presented.strip()


# --- sessions ---------------------------------------------------------------------

_NAME = re.compile(r"[^A-Za-z0-9._@ +-]")


def clean_name(raw: str | None) -> str | None:
    """An operator's name for the audit: 1-64 plain characters, or None."""
    if not raw:
        return None
    name = _NAME.sub("", raw).strip()[:64]
    return name or None


@attrs.define
class Session:
    id: str = attrs.field(repr=False)
    csrf: str = attrs.field(repr=False)
    created: float
    last_seen: float
    name: str | None = None
    flash: list = attrs.Factory(list)
    # last_seen as the shared store has it.
    stored_seen: float = 0.0
    # When the shared store last confirmed the session.
    checked_at: float = 0.0

    @property
    def handle(self) -> str:
        """A stable, non-secret name for this session (for the audit)."""
        return "s-" + hashlib.sha256(self.id.encode()).hexdigest()[:8]


class SessionStore:
    """
    Sessions in memory, bounded, expiring by age and by idleness.

    With C{rows} (instances that share a database) they are also stored
    there, by the hash of their id: L{create_saved} fires once the session
    is stored, L{needs_lookup} and L{load} read a session this instance has
    not seen (or has seen idle) before its request is served, L{end} signs
    out everywhere, and L{reload} (the change feed's C{ui_session}) drops a
    session another instance signed out.  A cached session is confirmed
    again every C{recheck} seconds, so a sign-out elsewhere ends it here
    soon even without the change feed.  Flash messages stay on the
    instance that made them.
    """

    def __init__(
        self,
        clock,
        lifetime: float = DEFAULT_SESSION_LIFETIME,
        idle: float = DEFAULT_SESSION_IDLE,
        maximum: int = MAX_SESSIONS,
        rows: SessionRows | None = None,
        recheck: float = RECHECK_INTERVAL,
    ) -> None:
        self._clock = clock
        self.lifetime = lifetime
        self.idle = idle
        self.maximum = maximum
        self.rows = rows
        self.recheck = recheck
        self._sessions: collections.OrderedDict[str, Session] = collections.OrderedDict()
        self._by_hash: dict[str, str] = {}  # cached sessions' hashes -> ids (shared store only)
        # Signed out here: never read back from the store (hash -> until).
        self._ended: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._lookups = (
            MissLookups(self._fetch, clock, concurrency=2, batch=32, backlog=256, negative_limit=maximum)
            if rows is not None
            else None
        )

    @property
    def shared(self) -> bool:
        """Whether sessions are kept in a store other instances share."""
        return self.rows is not None

    def create(self, name: str | None = None) -> Session:
        """A new session, usable here at once (stored for the others in the background)."""
        session, stored = self._new(name)
        if stored is not None:
            stored.addErrback(self._not_stored)
        return session

    def create_saved(self, name: str | None = None) -> defer.Deferred:
        """
        A new session; fires with it once every instance can find it (at
        once without a shared store), or fails (the database unavailable)
        and the session is gone again.
        """
        session, stored = self._new(name)
        if stored is None:
            return defer.succeed(session)

        def failed(failure: Failure) -> Failure:
            self._uncache(session)
            return failure

        return stored.addCallbacks(lambda _: session, failed)

    def _new(self, name: str | None) -> tuple[Session, defer.Deferred | None]:
        now = self._clock.seconds()
        session_id = secrets.token_urlsafe(32)
        session = Session(
            id=session_id, csrf=csrf_token(session_id), created=now, last_seen=now, name=name, stored_seen=now,
            checked_at=now,
        )
        self._cache(session)
        if self.rows is None:
            return session, None
        stored = self.rows.insert(
            session_hash(session_id), name, now, now - self.lifetime, now - self.idle - TOUCH_INTERVAL
        )
        return session, stored

    def _not_stored(self, failure: Failure) -> None:
        log.error(
            "operator UI: a session could not be stored in the shared database ({error}); "
            "it works on this instance only",
            error=failure.getErrorMessage(),
        )

    def valid(self, session: Session) -> bool:
        now = self._clock.seconds()
        valid = (
            self._sessions.get(session.id) is session
            and now - session.created < self.lifetime
            and now - session.last_seen < self.idle
        )
        if valid and self._lookups is not None and now - session.checked_at >= self.recheck:
            # A long-lived use (a live stream) learns of a sign-out elsewhere too.
            self.load(session.id).addErrback(lambda _: None)
        return valid

    def get(self, session_id: str | None, touch: bool = True) -> Session | None:
        if not session_id:
            return None
        session = self._sessions.get(session_id)
        if session is None:
            return None
        if not self.valid(session):
            self._uncache(session)
            return None
        if touch:
            session.last_seen = self._clock.seconds()
            if self.rows is not None and session.last_seen - session.stored_seen >= TOUCH_INTERVAL:
                session.stored_seen = session.last_seen
                self.rows.touch(session_hash(session.id), session.last_seen).addErrback(
                    lambda f: log.warn("operator UI: could not record a session's use: {error}",
                                       error=f.getErrorMessage())
                )
        return session

    # -- several instances

    def needs_lookup(self, session_id: str | None) -> bool:
        """
        Whether C{session_id} must be read from the shared store before
        L{get} can answer: not cached here (and not known absent), or
        cached but not confirmed for C{recheck} seconds (signed out
        elsewhere, or used elsewhere while idle here).
        """
        if self._lookups is None or not looks_like_session_id(session_id):
            return False
        assert session_id is not None
        session = self._sessions.get(session_id)
        if session is None:
            token = session_hash(session_id)
            return token not in self._ended and not self._lookups.known_absent(token)
        now = self._clock.seconds()
        return now - session.created < self.lifetime and now - session.checked_at >= self.recheck

    def load(self, session_id: str) -> defer.Deferred:
        """
        Read C{session_id} from the shared store into memory (coalesced,
        bounded, an absent id remembered for a second).  Fails with
        L{cllama_tx.store.database.DatabaseUnavailable} or
        L{cllama_tx.identity.lookups.LookupsBusy} when it cannot tell.
        """
        assert self._lookups is not None
        token = session_hash(session_id)

        def found(row: tuple | None) -> None:
            cached = self._sessions.get(session_id)
            if token in self._ended:
                return
            if row is None:
                if cached is not None:
                    self._uncache(cached)
                return
            name, created, last_seen = row
            now = self._clock.seconds()
            if cached is not None:
                cached.last_seen = max(cached.last_seen, last_seen)
                cached.stored_seen = max(cached.stored_seen, last_seen)
                cached.checked_at = now
                return
            self._cache(Session(id=session_id, csrf=csrf_token(session_id), created=created, last_seen=last_seen,
                                name=name, stored_seen=last_seen, checked_at=now))

        return self._lookups.get(token).addCallback(found)

    def _fetch(self, hashes: list[str]) -> defer.Deferred:
        assert self.rows is not None
        now = self._clock.seconds()
        return self.rows.fetch(hashes, now - self.lifetime, now - self.idle - TOUCH_INTERVAL)

    def end(self, session: Session) -> defer.Deferred:
        """
        Sign out: the session is gone here at once and, once the Deferred
        fires, everywhere.  If the shared store cannot be written, it
        fails and the session stays (signing out again is possible).
        """
        self._uncache(session)
        if self.rows is None:
            return defer.succeed(None)
        token = session_hash(session.id)
        self._ended[token] = session.created + self.lifetime
        self._prune_ended()

        def failed(failure: Failure) -> Failure:
            self._ended.pop(token, None)
            if session.id not in self._sessions:
                self._cache(session)
            return failure

        return self.rows.delete(token, self._clock.seconds()).addErrback(failed)

    def destroy(self, session: Session) -> None:
        """L{end}, without waiting (a failure to reach the shared store is logged)."""
        self.end(session).addErrback(
            lambda f: log.error("operator UI: could not end a session in the shared database: {error}",
                                error=f.getErrorMessage())
        )

    def reload(self, token: str | None) -> None:
        """
        The change feed's C{ui_session}: another instance signed the session
        with this hash out (None: any may have changed); the cached copy is
        dropped, and a request that still presents it reads it again.
        """
        if token is None:
            for session in list(self._sessions.values()):
                self._uncache(session)
            return
        session_id = self._by_hash.get(token)
        if session_id is not None:
            self._uncache(self._sessions[session_id])

    def _cache(self, session: Session) -> None:
        self._sessions[session.id] = session
        if self.rows is not None:
            self._by_hash[session_hash(session.id)] = session.id
        while len(self._sessions) > self.maximum:
            self._uncache(next(iter(self._sessions.values())))

    def _uncache(self, session: Session) -> None:
        if self._sessions.get(session.id) is session:
            del self._sessions[session.id]
            if self.rows is not None:
                self._by_hash.pop(session_hash(session.id), None)

    def _prune_ended(self) -> None:
        now = self._clock.seconds()
        while self._ended and (len(self._ended) > 10 * self.maximum or next(iter(self._ended.values())) <= now):
            self._ended.popitem(last=False)

    def __len__(self) -> int:
        return len(self._sessions)


def csrf_matches(session: Session, presented: Any) -> bool:
    if not presented:
        return False
    if isinstance(presented, bytes):
        presented = presented.decode("utf-8", "replace")
    return hmac.compare_digest(str(presented).encode(), session.csrf.encode())


# --- request helpers ------------------------------------------------------------------


def is_secure(request) -> bool:
    """TLS here, or at a reverse proxy that says so."""
    if request.isSecure():
        return True
    forwarded = request.getHeader(b"x-forwarded-proto")
    return bool(forwarded) and forwarded.split(b",")[0].strip().lower() == b"https"


def client_address(request) -> str:
    address = request.getClientAddress()
    return str(getattr(address, "host", None) or "unknown")


def cookie_header(
    name: str, value: str, *, secure: bool, max_age: int | None, path: str = "/"
) -> bytes:
    parts = [f"{name}={value}", f"Path={path}", "HttpOnly", "SameSite=Strict"]
    if max_age is not None:
        parts.append(f"Max-Age={max(0, int(max_age))}")
    if secure:
        parts.append("Secure")
    return "; ".join(parts).encode("ascii")


def session_cookie_name(secure: bool) -> str:
    return SECURE_SESSION_COOKIE if secure else SESSION_COOKIE


def read_session_cookie(request) -> str | None:
    for name in (SECURE_SESSION_COOKIE, SESSION_COOKIE):
        value = request.getCookie(name.encode("ascii"))
        if value:
            return value.decode("ascii", "replace")
    return None


def same_origin(request) -> bool:
    """
    False when the request says it comes from another site: an C{Origin}
    (or, without one, a C{Referer}) whose host is not our C{Host}.  Absent
    or C{null} origins are left to the CSRF token.
    """
    host = (request.getHeader(b"host") or b"").lower()
    source = request.getHeader(b"origin")
    if source is None or source == b"null":
        source = request.getHeader(b"referer")
    if not source or source == b"null" or not host:
        return True
    match = re.match(rb"^[a-z][a-z0-9+.-]*://([^/?#]+)", source.lower())
    return match is not None and match.group(1) == host


# --- the Host check (authentication off) ----------------------------------------------


def host_name(host: bytes | str) -> str:
    """The name of a C{Host} header: lower case, without port or brackets or final dot."""
    if isinstance(host, bytes):
        host = host.decode("latin-1")
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host[1:]
    if host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


def host_allowed(host: bytes | str | None, allowed: frozenset[str] = frozenset()) -> bool:
    """
    Whether a request naming C{host} may be served when authentication is
    off.  A DNS-rebinding page reaches the UI under the attacker's own host
    name, so only names that cannot be rebound pass: IP literals,
    C{localhost} and C{*.localhost}, and the operator's C{allowed} names
    (C{name}, C{.domain} for it and its subdomains, C{*} for any).  A
    request without C{Host} (HTTP/1.0: never a browser) passes.
    """
    if host is None or not host.strip():
        return True
    name = host_name(host)
    if not name:
        return False
    try:
        ipaddress.ip_address(name.split("%", 1)[0])
        return True
    except ValueError:
        pass
    if name == "localhost" or name.endswith(".localhost"):
        return True
    if "*" in allowed or name in allowed:
        return True
    return any(entry.startswith(".") and (name.endswith(entry) or name == entry[1:]) for entry in allowed)
