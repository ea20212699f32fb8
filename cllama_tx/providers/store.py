"""
Reading and writing C{CLAW_AUTH_DIR/providers.json} (CONTRACT 3.3).

Both formats are read: v1 (C{{"providers": {name: {base_url, api_key, auth,
api_format}}}}) and v2 (per-provider key pools).  Only v2 is written.

Timestamps (C{cooldown_until}, C{last_error_at}, C{added_at}) are held in
memory as float epoch seconds and written as RFC 3339 UTC strings with
milliseconds (C{2026-11-22T11:08:45.123Z}), or C{null} when unset.  The
reader is lenient: it also accepts numbers (epoch seconds), RFC 3339 with any
offset or precision, and the empty string or C{0} that the reference proxy
writes for "unset".

Keys whose id starts with C{seed:} come from the environment: L{save} never
writes them, nor their secrets.  Error messages name the file and the field
but never echo the file's contents, which contain secrets.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

import attrs

from cllama_tx.providers.catalog import API_FORMATS, AUTH_MODES

PROVIDERS_FILE = "providers.json"
FILE_VERSION = 2
FILE_MODE = 0o600

SEED_PREFIX = "seed:"
SOURCES = frozenset({"seed", "runtime"})
READY = "ready"
COOLDOWN = "cooldown"
DEAD = "dead"
DISABLED = "disabled"
# A 401 made the key suspect: it waits for a re-check before anything
# decides its fate.  Held in memory only; the file says "ready" (the
# contract's states), so a restart simply re-checks on the next 401.
SUSPECT = "suspect"
FILE_STATES = frozenset({READY, COOLDOWN, DEAD, DISABLED})
STATES = FILE_STATES | {SUSPECT}
RATE_LIMIT_SCOPES = frozenset({"model", "key"})


class ProvidersFileError(Exception):
    """
    C{providers.json} cannot be read or written.  The message names the
    path and what is wrong, never the file's contents.
    """

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


@attrs.define
class KeyRecord:
    """
    One provider API key and its pool state.  C{secret} is left out of
    C{repr} so that logging a record never leaks it.
    """

    id: str
    label: str | None
    secret: str = attrs.field(repr=False)
    source: str = attrs.field(default="runtime", validator=attrs.validators.in_(SOURCES))
    state: str = attrs.field(default=READY, validator=attrs.validators.in_(STATES))
    cooldown_until: float | None = None
    last_error_code: int | None = None
    last_error_reason: str | None = None
    last_error_at: float | None = None
    added_at: float | None = None
    # Health bookkeeping, in memory only (never written to the file).
    # When a dead key is re-probed next (None: not scheduled).
    next_probe_at: float | None = None
    # Deaths and failed re-probes since the key last served a request: the
    # exponent of the re-probe backoff.
    backoff_level: int = 0
    # 401s whose re-check could not tell, since the key last served a request.
    strikes: int = 0
    # When a re-check last found the key valid.
    checked_at: float | None = None
    # model -> end of its cooldown, for providers that limit per model.
    model_cooldowns: dict[str, float] = attrs.Factory(dict)

    @property
    def from_environment(self) -> bool:
        """True for keys seeded from environment variables (never saved)."""
        return self.id.startswith(SEED_PREFIX)


@attrs.define
class ProviderEntry:
    """
    One provider as the file describes it.  L{None} fields mean "not set in
    the file": the catalog (and the environment) decide.
    """

    name: str
    base_url: str | None = None
    auth: str | None = None
    api_format: str | None = None
    active_key_id: str | None = None
    source: str = "seed"
    keys: list[KeyRecord] = attrs.Factory(list)
    # Operator settings beyond the contract's fields: written only when set,
    # so a file that does not use them stays exactly as the contract has it.
    # Organization and project are sent as the provider's OpenAI-Organization
    # and OpenAI-Project headers (never the agent's); not secrets, but kept
    # out of logs and reprs anyway.
    organization: str | None = attrs.field(default=None, repr=False)
    project: str | None = attrs.field(default=None, repr=False)
    rate_limit_scope: str | None = None


def providers_path(auth_dir: str) -> str:
    return os.path.join(auth_dir, PROVIDERS_FILE)


# --- timestamps -----------------------------------------------------------


def format_timestamp(epoch: float | None) -> str | None:
    """C{epoch} as RFC 3339 UTC with milliseconds, or L{None}."""
    if epoch is None:
        return None
    millis = int(round(epoch * 1000))
    whole, ms = divmod(millis, 1000)
    stamp = datetime.fromtimestamp(whole, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{stamp}.{ms:03d}Z"


def parse_timestamp(value: Any) -> float | None:
    """
    An epoch from a number, an RFC 3339 string, or L{None}/C{""}/C{0}
    (unset).

    @raise ValueError: anything else.
    """
    if value is None or value == "" or value == 0:
        return None
    if isinstance(value, bool):
        raise ValueError("not a timestamp")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        if text[-1:] in ("Z", "z"):
            text = text[:-1] + "+00:00"
        parsed = datetime.fromisoformat(text)
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=timezone.utc)
        if parsed.year <= 1:
            # Go's zero time: unset.
            return None
        return parsed.timestamp()
    raise ValueError("not a timestamp")


# --- loading --------------------------------------------------------------


def load(path: str) -> dict[str, ProviderEntry]:
    """
    Read C{path}.  A missing file is an empty configuration.

    Provider names are stripped and lower-cased.  A v1 C{api_key} becomes a
    key with id C{file:<name>} (source C{seed}), kept when the file is next
    written as v2.

    @raise ProvidersFileError: unreadable, not JSON, or not the expected
        shape.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise ProvidersFileError(path, f"cannot read: {e.strerror}") from None
    return parse(path, data)


def parse(path: str, data: bytes) -> dict[str, ProviderEntry]:
    """
    The entries of a C{providers.json} document given as bytes (read from
    C{path}, or a copy of it from elsewhere: another instance's, kept in the
    shared store).

    @raise ProvidersFileError: not JSON, or not the expected shape.
    """
    try:
        document = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ProvidersFileError(path, "not UTF-8 text") from None
    except json.JSONDecodeError as e:
        # e.msg is a fixed description ("Expecting value"); e.doc would be
        # the whole file, so it is never used.
        raise ProvidersFileError(
            path, f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
        ) from None
    return _parse_document(path, document)


def _parse_document(path: str, document: Any) -> dict[str, ProviderEntry]:
    if not isinstance(document, dict):
        raise ProvidersFileError(path, "the top level must be a JSON object")
    version = document.get("version")
    if version is not None and (isinstance(version, bool) or version not in (1, 2)):
        raise ProvidersFileError(path, "unsupported \"version\" (expected 1 or 2)")
    providers = document.get("providers")
    if providers is None:
        return {}
    if not isinstance(providers, dict):
        raise ProvidersFileError(path, "\"providers\" must be a JSON object")
    entries: dict[str, ProviderEntry] = {}
    for raw_name, raw in providers.items():
        name = raw_name.strip().lower()
        if not name:
            raise ProvidersFileError(path, "a provider has an empty name")
        if name in entries:
            raise ProvidersFileError(path, f"provider {name!r} appears twice")
        if raw is None:
            continue
        entries[name] = _parse_entry(path, name, raw)
    return entries


def _opt_str(path: str, where: str, field: str, raw: dict) -> str | None:
    value = raw.get(field)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ProvidersFileError(path, f"{where}: \"{field}\" must be a string")
    return value.strip() or None


def _parse_entry(path: str, name: str, raw: Any) -> ProviderEntry:
    where = f"provider {name!r}"
    if not isinstance(raw, dict):
        raise ProvidersFileError(path, f"{where} must be a JSON object")
    auth = _opt_str(path, where, "auth", raw)
    if auth is not None:
        auth = auth.lower()
        if auth not in AUTH_MODES:
            raise ProvidersFileError(
                path, f"{where}: \"auth\" must be one of {sorted(AUTH_MODES)}"
            )
    api_format = _opt_str(path, where, "api_format", raw)
    if api_format is not None:
        api_format = api_format.lower()
        if api_format not in API_FORMATS:
            raise ProvidersFileError(
                path, f"{where}: \"api_format\" must be one of {sorted(API_FORMATS)}"
            )
    source = _opt_str(path, where, "source", raw) or "seed"
    if source not in SOURCES:
        raise ProvidersFileError(path, f"{where}: \"source\" must be \"seed\" or \"runtime\"")
    scope = _opt_str(path, where, "rate_limit_scope", raw)
    if scope is not None:
        scope = scope.lower()
        if scope not in RATE_LIMIT_SCOPES:
            raise ProvidersFileError(
                path, f"{where}: \"rate_limit_scope\" must be \"model\" or \"key\""
            )
    entry = ProviderEntry(
        name=name,
        base_url=_opt_str(path, where, "base_url", raw),
        auth=auth,
        api_format=api_format,
        active_key_id=_opt_str(path, where, "active_key_id", raw),
        source=source,
        organization=_opt_str(path, where, "organization", raw),
        project=_opt_str(path, where, "project", raw),
        rate_limit_scope=scope,
    )
    raw_keys = raw.get("keys")
    if raw_keys is not None:
        if not isinstance(raw_keys, list):
            raise ProvidersFileError(path, f"{where}: \"keys\" must be a JSON array")
        for index, raw_key in enumerate(raw_keys):
            key = _parse_key(path, f"{where} key #{index + 1}", raw_key)
            if key is None:
                continue
            if any(k.id == key.id for k in entry.keys):
                raise ProvidersFileError(path, f"{where}: key id {key.id!r} appears twice")
            entry.keys.append(key)
    # v1: a single api_key.
    api_key = raw.get("api_key")
    if api_key is not None and not isinstance(api_key, str):
        raise ProvidersFileError(path, f"{where}: \"api_key\" must be a string")
    if api_key and api_key.strip():
        secret = api_key.strip()
        if not any(k.secret == secret for k in entry.keys):
            key_id = f"file:{name}"
            if any(k.id == key_id for k in entry.keys):
                raise ProvidersFileError(path, f"{where}: key id {key_id!r} appears twice")
            entry.keys.insert(
                0, KeyRecord(id=key_id, label="primary", secret=secret, source="seed")
            )
            if entry.active_key_id is None:
                entry.active_key_id = key_id
    return entry


def _parse_key(path: str, where: str, raw: Any) -> KeyRecord | None:
    if not isinstance(raw, dict):
        raise ProvidersFileError(path, f"{where} must be a JSON object")
    key_id = _opt_str(path, where, "id", raw)
    secret = raw.get("secret")
    if secret is not None and not isinstance(secret, str):
        raise ProvidersFileError(path, f"{where}: \"secret\" must be a string")
    if not secret or not secret.strip():
        # A key without a secret is useless; it is dropped (and so not
        # written back).
        return None
    if key_id is None:
        raise ProvidersFileError(path, f"{where} has no \"id\"")
    where = f"{where} ({key_id!r})"
    source = _opt_str(path, where, "source", raw) or "runtime"
    if source not in SOURCES:
        raise ProvidersFileError(path, f"{where}: \"source\" must be \"seed\" or \"runtime\"")
    state = (_opt_str(path, where, "state", raw) or READY).lower()
    if state == SUSPECT:
        # Not a contract state; a suspect key is re-checked on its next 401.
        state = READY
    if state not in FILE_STATES:
        raise ProvidersFileError(
            path, f"{where}: \"state\" must be one of {sorted(FILE_STATES)}"
        )
    code = raw.get("last_error_code")
    if code in (None, "", 0):
        code = None
    elif isinstance(code, bool) or not isinstance(code, int):
        raise ProvidersFileError(path, f"{where}: \"last_error_code\" must be an integer")
    times = {}
    for field in ("cooldown_until", "last_error_at", "added_at"):
        try:
            times[field] = parse_timestamp(raw.get(field))
        except (ValueError, TypeError, OverflowError):
            raise ProvidersFileError(
                path, f"{where}: \"{field}\" must be an RFC 3339 time, a number or null"
            ) from None
    cooldown_until = times["cooldown_until"] if state == COOLDOWN else None
    return KeyRecord(
        id=key_id,
        label=_opt_str(path, where, "label", raw),
        secret=secret.strip(),
        source=source,
        state=state,
        cooldown_until=cooldown_until,
        last_error_code=code,
        last_error_reason=_opt_str(path, where, "last_error_reason", raw),
        last_error_at=times["last_error_at"],
        added_at=times["added_at"],
    )


# --- saving ---------------------------------------------------------------


def to_document(entries: Mapping[str, ProviderEntry]) -> dict:
    """
    The v2 document for C{entries}, without any environment-seeded key
    (ids starting C{seed:}).
    """
    providers = {}
    for name in sorted(entries):
        entry = entries[name]
        document: dict[str, Any] = {
            "base_url": entry.base_url,
            "auth": entry.auth,
            "api_format": entry.api_format,
            "active_key_id": entry.active_key_id,
            "source": entry.source,
        }
        for field in ("organization", "project", "rate_limit_scope"):
            value = getattr(entry, field)
            if value is not None:
                document[field] = value
        providers[name] = document
        document["keys"] = [
            {
                "id": key.id,
                "label": key.label,
                "secret": key.secret,
                "source": key.source,
                "state": READY if key.state == SUSPECT else key.state,
                "cooldown_until": format_timestamp(
                    key.cooldown_until if key.state == COOLDOWN else None
                ),
                "last_error_code": key.last_error_code,
                "last_error_reason": key.last_error_reason,
                "last_error_at": format_timestamp(key.last_error_at),
                "added_at": format_timestamp(key.added_at),
            }
            for key in entry.keys
            if not key.id.startswith(SEED_PREFIX)
        ]
    return {"version": FILE_VERSION, "providers": providers}


def save(path: str, entries: Mapping[str, ProviderEntry]) -> None:
    """
    Write C{entries} to C{path} as v2, atomically: a temporary file in the
    same directory, created with mode 0600, written, fsynced, then renamed
    over C{path} (and the directory fsynced).  Environment-seeded keys are
    never written.

    @raise ProvidersFileError: the file could not be written; C{path} is
        unchanged.
    """
    data = (json.dumps(to_document(entries), indent=2) + "\n").encode("utf-8")
    directory = os.path.dirname(os.path.abspath(path))
    prefix = "." + os.path.basename(path) + "."
    tmp = None
    try:
        os.makedirs(directory, exist_ok=True)
        # Created with mode 0600 from the start (O_EXCL, a fresh random
        # name), so the secrets are never readable by others, not even for
        # a moment; no chmod afterwards.
        candidate = os.path.join(directory, f"{prefix}{secrets.token_hex(8)}.tmp")
        fd = os.open(
            candidate,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
            FILE_MODE,
        )
        tmp = candidate
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        tmp = None
        _fsync_directory(directory)
    except OSError as e:
        raise ProvidersFileError(path, f"cannot write: {e.strerror or e}") from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def _fsync_directory(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fingerprint(path: str) -> tuple[int, int, int] | None:
    """Identity of the file on disk now (inode, size, mtime), or L{None}."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)
