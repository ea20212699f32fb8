"""
Tests for L{cllama_tx.providers.store}.
"""

from __future__ import annotations

import json
import os
import stat

from twisted.trial.unittest import SynchronousTestCase

from cllama_tx.providers import store
from cllama_tx.providers.store import (
    KeyRecord,
    ProviderEntry,
    ProvidersFileError,
    format_timestamp,
    load,
    parse_timestamp,
    save,
)

SECRET = "sk-file-0123456789abcdefghij"
ENV_SECRET = "sk-env-ZYXWVUTSRQPONMLKJIHG"

# 2026-01-02T03:04:05.250Z
T0 = 1767323045.25


class Dir:
    """A fresh directory for one test, with its providers.json path."""

    def __init__(self, test: SynchronousTestCase) -> None:
        self.dir = test.mktemp()
        os.makedirs(self.dir)
        self.path = os.path.join(self.dir, "providers.json")

    def write(self, document) -> None:
        with open(self.path, "w") as f:
            if isinstance(document, str):
                f.write(document)
            else:
                json.dump(document, f)

    def read_bytes(self) -> bytes:
        with open(self.path, "rb") as f:
            return f.read()


class TimestampTests(SynchronousTestCase):
    def test_format(self):
        self.assertEqual(format_timestamp(T0), "2026-01-02T03:04:05.250Z")
        self.assertIsNone(format_timestamp(None))

    def test_parse_strings(self):
        self.assertEqual(parse_timestamp("2026-01-02T03:04:05.250Z"), T0)
        self.assertEqual(parse_timestamp("2026-01-02T03:04:05Z"), T0 - 0.25)
        self.assertEqual(parse_timestamp("2026-01-02T04:04:05.25+01:00"), T0)

    def test_parse_numbers(self):
        self.assertEqual(parse_timestamp(T0), T0)
        self.assertEqual(parse_timestamp(1767323045), 1767323045.0)

    def test_parse_unset(self):
        """None, the reference's "" and 0, and Go's zero time mean unset."""
        for value in (None, "", 0, "0001-01-01T00:00:00Z"):
            self.assertIsNone(parse_timestamp(value), value)

    def test_parse_garbage(self):
        for value in ("yesterday", True, [1]):
            with self.assertRaises(ValueError):
                parse_timestamp(value)

    def test_round_trip(self):
        self.assertEqual(parse_timestamp(format_timestamp(T0)), T0)


class LoadTests(SynchronousTestCase):
    def setUp(self):
        self.d = Dir(self)

    def test_missing_file(self):
        self.assertEqual(load(self.d.path), {})

    def test_v1(self):
        self.d.write(
            {
                "providers": {
                    "OpenAI": {
                        "base_url": "https://proxy.example/v1",
                        "api_key": SECRET,
                        "auth": "bearer",
                        "api_format": "openai",
                    },
                    "ollama": {"base_url": "http://gpu:11434/v1", "api_key": "", "auth": "none"},
                }
            }
        )
        entries = load(self.d.path)
        self.assertEqual(sorted(entries), ["ollama", "openai"])
        openai = entries["openai"]
        self.assertEqual(openai.base_url, "https://proxy.example/v1")
        self.assertEqual(openai.auth, "bearer")
        self.assertEqual(openai.api_format, "openai")
        self.assertEqual(len(openai.keys), 1)
        key = openai.keys[0]
        self.assertEqual((key.id, key.secret, key.source, key.state), ("file:openai", SECRET, "seed", "ready"))
        self.assertEqual(openai.active_key_id, "file:openai")
        self.assertEqual(entries["ollama"].keys, [])
        self.assertEqual(entries["ollama"].auth, "none")
        self.assertIsNone(entries["ollama"].api_format)

    def test_v2(self):
        self.d.write(
            {
                "version": 2,
                "providers": {
                    "openrouter": {
                        "base_url": "https://openrouter.ai/api/v1",
                        "auth": "bearer",
                        "api_format": "openai",
                        "active_key_id": "runtime:b",
                        "source": "runtime",
                        "keys": [
                            {
                                "id": "runtime:a",
                                "label": "main",
                                "secret": SECRET,
                                "source": "runtime",
                                "state": "cooldown",
                                "cooldown_until": "2026-01-02T03:04:05.250Z",
                                "last_error_code": 429,
                                "last_error_reason": "rate limited",
                                "last_error_at": T0 - 10,
                                "added_at": "2026-01-02T03:04:05Z",
                            },
                            {
                                # As the reference writes "unset".
                                "id": "runtime:b",
                                "label": "",
                                "secret": "sk-two",
                                "source": "runtime",
                                "state": "dead",
                                "cooldown_until": "",
                                "last_error_code": 0,
                                "last_error_reason": "",
                                "last_error_at": "",
                                "added_at": "",
                            },
                        ],
                    }
                },
            }
        )
        entry = load(self.d.path)["openrouter"]
        self.assertEqual(entry.active_key_id, "runtime:b")
        self.assertEqual(entry.source, "runtime")
        a, b = entry.keys
        self.assertEqual(
            a,
            KeyRecord(
                id="runtime:a",
                label="main",
                secret=SECRET,
                source="runtime",
                state="cooldown",
                cooldown_until=T0,
                last_error_code=429,
                last_error_reason="rate limited",
                last_error_at=T0 - 10,
                added_at=T0 - 0.25,
            ),
        )
        self.assertEqual(
            b,
            KeyRecord(id="runtime:b", label=None, secret="sk-two", source="runtime", state="dead"),
        )

    def test_corrupt_json(self):
        """The error names the path but never echoes the contents."""
        self.d.write('{"providers": {"openai": {"api_key": "' + SECRET + '",,}}}')
        with self.assertRaises(ProvidersFileError) as caught:
            load(self.d.path)
        message = str(caught.exception)
        self.assertIn(self.d.path, message)
        self.assertIn("not valid JSON", message)
        self.assertNotIn(SECRET, message)
        self.assertNotIn("api_key", message)
        self.assertNotIn(SECRET, repr(caught.exception.args))

    def test_not_utf8(self):
        with open(self.d.path, "wb") as f:
            f.write(b'{"providers": "\xff\xfe"}')
        with self.assertRaises(ProvidersFileError) as caught:
            load(self.d.path)
        self.assertIn(self.d.path, str(caught.exception))

    def test_bad_shapes(self):
        cases = [
            [],
            {"version": 3, "providers": {}},
            {"providers": []},
            {"providers": {"openai": "x"}},
            {"providers": {"openai": {"auth": SECRET}}},
            {"providers": {"openai": {"api_format": SECRET}}},
            {"providers": {"openai": {"keys": {}}}},
            {"providers": {"openai": {"keys": [{"id": "a", "secret": SECRET, "state": "zombie"}]}}},
            {"providers": {"openai": {"keys": [{"secret": SECRET}]}}},
            {
                "providers": {
                    "openai": {
                        "keys": [
                            {"id": "a", "secret": SECRET},
                            {"id": "a", "secret": "sk-other"},
                        ]
                    }
                }
            },
            {"providers": {"openai": {"keys": [{"id": "a", "secret": SECRET, "added_at": "soon"}]}}},
            {"providers": {"openai": {}, "OPENAI": {}}},
        ]
        for document in cases:
            self.d.write(document)
            with self.assertRaises(ProvidersFileError, msg=repr(document)) as caught:
                load(self.d.path)
            self.assertNotIn(SECRET, str(caught.exception))
            self.assertIn(self.d.path, str(caught.exception))

    def test_keys_without_secret_dropped(self):
        self.d.write({"version": 2, "providers": {"xai": {"keys": [{"id": "a", "secret": ""}]}}})
        self.assertEqual(load(self.d.path)["xai"].keys, [])

    def test_unreadable(self):
        os.mkdir(self.d.path)  # a directory cannot be read as a file
        with self.assertRaises(ProvidersFileError):
            load(self.d.path)


def _entries() -> dict[str, ProviderEntry]:
    return {
        "openai": ProviderEntry(
            name="openai",
            base_url=None,
            auth=None,
            api_format=None,
            active_key_id="seed:OPENAI_API_KEY",
            source="seed",
            keys=[
                KeyRecord(
                    id="seed:OPENAI_API_KEY",
                    label="OPENAI_API_KEY",
                    secret=ENV_SECRET,
                    source="seed",
                    state="dead",
                    last_error_code=401,
                ),
                KeyRecord(
                    id="runtime:1",
                    label="ops",
                    secret=SECRET,
                    source="runtime",
                    state="cooldown",
                    cooldown_until=T0,
                    last_error_code=429,
                    last_error_reason="rate limited",
                    last_error_at=T0 - 5,
                    added_at=T0 - 100,
                ),
            ],
        ),
        "custom": ProviderEntry(
            name="custom",
            base_url="https://llm.example/v1",
            auth="x-api-key",
            api_format="anthropic",
            source="runtime",
        ),
    }


class SaveTests(SynchronousTestCase):
    def setUp(self):
        self.d = Dir(self)

    def test_v2_document(self):
        save(self.d.path, _entries())
        document = json.loads(self.d.read_bytes())
        self.assertEqual(document["version"], 2)
        self.assertEqual(
            document["providers"]["custom"],
            {
                "base_url": "https://llm.example/v1",
                "auth": "x-api-key",
                "api_format": "anthropic",
                "active_key_id": None,
                "source": "runtime",
                "keys": [],
            },
        )
        self.assertEqual(
            document["providers"]["openai"]["keys"],
            [
                {
                    "id": "runtime:1",
                    "label": "ops",
                    "secret": SECRET,
                    "source": "runtime",
                    "state": "cooldown",
                    "cooldown_until": "2026-01-02T03:04:05.250Z",
                    "last_error_code": 429,
                    "last_error_reason": "rate limited",
                    "last_error_at": "2026-01-02T03:04:00.250Z",
                    "added_at": "2026-01-02T03:02:25.250Z",
                }
            ],
        )

    def test_environment_keys_never_written(self):
        save(self.d.path, _entries())
        data = self.d.read_bytes()
        self.assertNotIn(ENV_SECRET.encode(), data)
        # Not even the id of the key: it is the environment's, not the file's.
        self.assertNotIn(b'"id": "seed:OPENAI_API_KEY"', data)

    def test_round_trip(self):
        entries = _entries()
        save(self.d.path, entries)
        loaded = load(self.d.path)
        self.assertEqual(loaded["custom"], entries["custom"])
        self.assertEqual(loaded["openai"].keys, entries["openai"].keys[1:])
        self.assertEqual(loaded["openai"].active_key_id, "seed:OPENAI_API_KEY")

    def test_mode_0600_regardless_of_umask(self):
        """
        The file is created 0600; with a permissive umask a file created
        the ordinary way would be world-readable.
        """
        old = os.umask(0)
        try:
            save(self.d.path, _entries())
        finally:
            os.umask(old)
        self.assertEqual(stat.S_IMODE(os.stat(self.d.path).st_mode), 0o600)

    def test_mode_0600_replacing_a_readable_file(self):
        self.d.write({"providers": {}})
        os.chmod(self.d.path, 0o644)
        save(self.d.path, _entries())
        self.assertEqual(stat.S_IMODE(os.stat(self.d.path).st_mode), 0o600)

    def test_atomic_temp_fsync_replace(self):
        """
        The content goes to a 0600 temporary file in the same directory,
        is fsynced, and is renamed over the target in one step.
        """
        self.d.write({"providers": {"old": {}}})
        events = []
        real_replace, real_fsync = os.replace, os.fsync

        def fsync(fd):
            events.append(("fsync", fd))
            return real_fsync(fd)

        def replace(src, dst):
            # At this moment the target still has the old content...
            self.assertEqual(json.loads(self.d.read_bytes()), {"providers": {"old": {}}})
            # ...and the temporary file has all the new content, safely.
            self.assertEqual(os.path.dirname(src), os.path.dirname(os.path.abspath(dst)))
            self.assertEqual(stat.S_IMODE(os.stat(src).st_mode), 0o600)
            with open(src, "rb") as f:
                self.assertEqual(json.loads(f.read())["version"], 2)
            events.append(("replace", src, dst))
            return real_replace(src, dst)

        self.patch(os, "fsync", fsync)
        self.patch(os, "replace", replace)
        save(self.d.path, _entries())
        kinds = [e[0] for e in events]
        self.assertIn("replace", kinds)
        self.assertEqual(kinds[0], "fsync")
        self.assertLess(kinds.index("fsync"), kinds.index("replace"))
        self.assertEqual(events[kinds.index("replace")][2], self.d.path)
        self.assertEqual(json.loads(self.d.read_bytes())["version"], 2)
        self.assertEqual(os.listdir(self.d.dir), ["providers.json"])

    def test_failed_write_leaves_file_and_no_temp(self):
        self.d.write({"providers": {"old": {}}})
        before = self.d.read_bytes()

        def replace(src, dst):
            raise OSError(28, "No space left on device")

        self.patch(os, "replace", replace)
        with self.assertRaises(ProvidersFileError) as caught:
            save(self.d.path, _entries())
        self.assertIn(self.d.path, str(caught.exception))
        self.assertNotIn(SECRET, str(caught.exception))
        self.assertEqual(self.d.read_bytes(), before)
        self.assertEqual(os.listdir(self.d.dir), ["providers.json"])

    def test_creates_directory(self):
        path = os.path.join(self.d.dir, "sub", "providers.json")
        save(path, {})
        self.assertEqual(load(path), {})

    def test_fingerprint(self):
        self.assertIsNone(store.fingerprint(self.d.path))
        save(self.d.path, {})
        first = store.fingerprint(self.d.path)
        self.assertIsNotNone(first)
        save(self.d.path, _entries())
        self.assertNotEqual(store.fingerprint(self.d.path), first)


class KeyRecordTests(SynchronousTestCase):
    def test_repr_hides_secret(self):
        key = KeyRecord(id="runtime:1", label="x", secret=SECRET)
        self.assertNotIn(SECRET, repr(key))
        self.assertIn("runtime:1", repr(key))

    def test_from_environment(self):
        self.assertTrue(KeyRecord(id="seed:XAI_API_KEY", label=None, secret="s").from_environment)
        self.assertFalse(KeyRecord(id="file:xai", label=None, secret="s").from_environment)

    def test_states_and_sources_validated(self):
        with self.assertRaises(ValueError):
            KeyRecord(id="k", label=None, secret="s", state="zombie")
        with self.assertRaises(ValueError):
            KeyRecord(id="k", label=None, secret="s", source="env")
        key = KeyRecord(id="k", label=None, secret="s")
        with self.assertRaises(ValueError):
            key.state = "zombie"


class OperatorFieldTests(SynchronousTestCase):
    """Organization, project and rate-limit scope: optional, written only when set."""

    def test_round_trip(self):
        d = Dir(self)
        d.write(
            {
                "version": 2,
                "providers": {
                    "openai": {
                        "organization": " org-operator0001 ",
                        "project": "proj_operator0001",
                        "rate_limit_scope": "KEY",
                        "keys": [{"id": "runtime:a", "secret": SECRET}],
                    }
                },
            }
        )
        entries = load(d.path)
        entry = entries["openai"]
        self.assertEqual(
            (entry.organization, entry.project, entry.rate_limit_scope),
            ("org-operator0001", "proj_operator0001", "key"),
        )
        self.assertNotIn("org-operator0001", repr(entry))
        save(d.path, entries)
        document = json.loads(d.read_bytes())["providers"]["openai"]
        self.assertEqual(document["organization"], "org-operator0001")
        self.assertEqual(document["project"], "proj_operator0001")
        self.assertEqual(document["rate_limit_scope"], "key")

    def test_unset_fields_are_not_written(self):
        d = Dir(self)
        save(d.path, {"xai": ProviderEntry(name="xai", keys=[KeyRecord(id="runtime:a", label=None, secret=SECRET)])})
        document = json.loads(d.read_bytes())["providers"]["xai"]
        self.assertEqual(
            sorted(document), ["active_key_id", "api_format", "auth", "base_url", "keys", "source"]
        )

    def test_bad_scope(self):
        d = Dir(self)
        d.write({"providers": {"openai": {"rate_limit_scope": "per-galaxy"}}})
        with self.assertRaises(ProvidersFileError) as caught:
            load(d.path)
        self.assertIn("rate_limit_scope", str(caught.exception))

    def test_suspect_is_read_and_written_as_ready(self):
        d = Dir(self)
        d.write({"version": 2, "providers": {"xai": {"keys": [{"id": "runtime:a", "secret": SECRET, "state": "suspect"}]}}})
        entries = load(d.path)
        self.assertEqual(entries["xai"].keys[0].state, "ready")
        entries["xai"].keys[0].state = "suspect"
        save(d.path, entries)
        self.assertEqual(json.loads(d.read_bytes())["providers"]["xai"]["keys"][0]["state"], "ready")

    def test_health_bookkeeping_is_not_written(self):
        d = Dir(self)
        key = KeyRecord(id="runtime:a", label=None, secret=SECRET, state="dead")
        key.next_probe_at, key.backoff_level, key.strikes = T0, 3, 1
        key.model_cooldowns["gpt-4o"] = T0
        save(d.path, {"xai": ProviderEntry(name="xai", keys=[key])})
        [written] = json.loads(d.read_bytes())["providers"]["xai"]["keys"]
        self.assertEqual(
            sorted(written),
            ["added_at", "cooldown_until", "id", "label", "last_error_at", "last_error_code",
             "last_error_reason", "secret", "source", "state"],
        )
