"""
Tests for L{cllama_tx.providers.registry}.
"""

from __future__ import annotations

import builtins
import json
import os
import stat

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from cllama_tx.interfaces import IProviderRegistry
from cllama_tx.providers import store
from cllama_tx.providers.catalog import CATALOG
from cllama_tx.providers.keys import KEYLESS, UnknownKey, Verdict
from cllama_tx.providers.registry import (
    ProviderNotConfigured,
    ProviderRegistry,
    ResolvedProvider,
    UnknownProvider,
)
from cllama_tx.providers.store import ProvidersFileError

NOW = 1767323045.0
ENV_SECRET = "sk-env-0000000000000000000000-ENV0"
ENV_SECRET_1 = "sk-env-1111111111111111111111-ENV1"
ENV_SECRET_2 = "sk-env-2222222222222222222222-ENV2"
FILE_SECRET = "sk-file-333333333333333333333-FILE"
UI_SECRET = "sk-ui-4444444444444444444444444-UI4"


class RegistryTestCase(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(NOW)
        self.auth_dir = self.mktemp()
        os.makedirs(self.auth_dir)
        self.path = os.path.join(self.auth_dir, "providers.json")
        self.events = []

    def registry(self, env=None, auth_dir="default"):
        return ProviderRegistry(
            env or {},
            self.auth_dir if auth_dir == "default" else auth_dir,
            self.clock,
            on_pool_event=self.events.append,
        )

    def write(self, document):
        with open(self.path, "w") as f:
            json.dump(document, f)

    def read(self):
        with open(self.path, "rb") as f:
            return f.read()

    def assertNotInFile(self, *secrets):
        data = self.read()
        for secret in secrets:
            self.assertNotIn(secret.encode(), data)

    def key_ids(self, registry, name):
        return [k.id for k in registry.resolve(name).pool.keys]


class ResolveTests(RegistryTestCase):
    def test_interface(self):
        registry = self.registry()
        self.assertTrue(verifyObject(IProviderRegistry, registry))

    def test_catalog_provider_with_env_key(self):
        resolved = self.registry({"OPENAI_API_KEY": ENV_SECRET}).resolve("openai")
        self.assertIsInstance(resolved, ResolvedProvider)
        self.assertEqual(resolved.spec, CATALOG["openai"])
        key = resolved.pool.acquire(set())
        self.assertEqual((key.id, key.secret, key.source), ("seed:OPENAI_API_KEY", ENV_SECRET, "seed"))

    def test_keyless_ollama(self):
        resolved = self.registry().resolve("ollama")
        self.assertEqual(resolved.spec.base_url, "http://ollama:11434/v1")
        self.assertEqual(resolved.spec.auth, "none")
        self.assertIs(resolved.pool.acquire(set()), KEYLESS)

    def test_unknown(self):
        with self.assertRaises(UnknownProvider) as caught:
            self.registry().resolve("opnai")
        self.assertIn("opnai", str(caught.exception))

    def test_no_key(self):
        registry = self.registry()
        with self.assertRaises(ProviderNotConfigured) as caught:
            registry.resolve("openai")
        self.assertEqual(
            str(caught.exception),
            "no API key for provider 'openai': set OPENAI_API_KEY or add a key in the UI",
        )
        self.assertEqual(caught.exception.name, "openai")
        self.assertEqual(caught.exception.message, str(caught.exception))
        with self.assertRaises(ProviderNotConfigured) as caught:
            registry.resolve("google")
        self.assertIn("GEMINI_API_KEY (or GOOGLE_API_KEY)", str(caught.exception))
        with self.assertRaises(ProviderNotConfigured) as caught:
            registry.resolve("zai")
        self.assertIn("add a key in the UI", str(caught.exception))

    def test_no_base_url(self):
        registry = self.registry()
        with self.assertRaises(ProviderNotConfigured) as caught:
            registry.resolve("cloudflare-ai-gateway")
        message = str(caught.exception)
        self.assertIn("provider 'cloudflare-ai-gateway' has no base URL", message)
        self.assertIn(self.path, message)

    def test_all_keys_disabled(self):
        registry = self.registry({"OPENAI_API_KEY": ENV_SECRET})
        registry.disable_key("openai", "seed:OPENAI_API_KEY")
        with self.assertRaises(ProviderNotConfigured) as caught:
            registry.resolve("openai")
        self.assertIn("disabled", str(caught.exception))
        self.assertNotIn(ENV_SECRET, str(caught.exception))

    def test_dead_keys_still_resolve(self):
        """All keys dead is a 429/503 for the caller, not a configuration error."""
        resolved = self.registry({"OPENAI_API_KEY": ENV_SECRET}).resolve("openai")
        resolved.pool.report(resolved.pool.acquire(), Verdict("dead", "unauthorized", None, 401))
        self.assertIsNone(resolved.pool.acquire())
        self.assertIsNone(resolved.pool.retry_after())

    def test_names(self):
        registry = self.registry({"XAI_API_KEY": ENV_SECRET})
        self.assertEqual(registry.names(), ["ollama", "xai"])
        self.assertEqual(registry.known_names(), sorted(CATALOG))

    def test_resolve_does_no_io(self):
        registry = self.registry({"OPENAI_API_KEY": ENV_SECRET})

        def forbidden(*a, **kw):
            raise AssertionError("I/O on the request path")

        self.patch(builtins, "open", forbidden)
        self.patch(os, "stat", forbidden)
        self.patch(store, "load", forbidden)
        self.assertEqual(registry.resolve("openai").spec.name, "openai")
        self.assertEqual(registry.resolve("ollama").spec.name, "ollama")

    def test_no_auth_dir(self):
        registry = self.registry({"OPENAI_API_KEY": ENV_SECRET}, auth_dir=None)
        self.assertEqual(registry.resolve("openai").spec.name, "openai")
        key_id = registry.add_key("anthropic", UI_SECRET)
        self.assertEqual(registry.resolve("anthropic").pool.acquire().id, key_id)
        self.assertFalse(os.path.exists(self.path))


class EnvironmentTests(RegistryTestCase):
    def test_key_order(self):
        registry = self.registry(
            {
                "OPENAI_API_KEY_2": ENV_SECRET_2,
                "OPENAI_API_KEY_1": ENV_SECRET_1,
                "OPENAI_API_KEY": ENV_SECRET,
            }
        )
        self.assertEqual(
            self.key_ids(registry, "openai"),
            ["seed:OPENAI_API_KEY", "seed:OPENAI_API_KEY_1", "seed:OPENAI_API_KEY_2"],
        )
        pool = registry.resolve("openai").pool
        self.assertEqual(pool.active_key_id, "seed:OPENAI_API_KEY")

    def test_backups_without_primary(self):
        registry = self.registry({"OPENAI_API_KEY_2": ENV_SECRET_2, "OPENAI_API_KEY": " "})
        self.assertEqual(self.key_ids(registry, "openai"), ["seed:OPENAI_API_KEY_2"])

    def test_google_alias_lower_priority(self):
        registry = self.registry(
            {"GOOGLE_API_KEY": ENV_SECRET, "GEMINI_API_KEY_1": ENV_SECRET_1}
        )
        self.assertEqual(
            self.key_ids(registry, "google"), ["seed:GEMINI_API_KEY_1", "seed:GOOGLE_API_KEY"]
        )
        self.assertEqual(registry.resolve("google").pool.acquire().secret, ENV_SECRET_1)

    def test_google_alias_alone(self):
        registry = self.registry({"GOOGLE_API_KEY": ENV_SECRET})
        self.assertEqual(registry.resolve("google").pool.acquire().id, "seed:GOOGLE_API_KEY")

    def test_same_secret_twice_is_one_key(self):
        registry = self.registry({"GEMINI_API_KEY": ENV_SECRET, "GOOGLE_API_KEY": ENV_SECRET})
        self.assertEqual(self.key_ids(registry, "google"), ["seed:GEMINI_API_KEY"])

    def test_vercel(self):
        registry = self.registry(
            {"AI_GATEWAY_API_KEY": ENV_SECRET, "AI_GATEWAY_BASE_URL": "https://gw.example/v1"}
        )
        resolved = registry.resolve("vercel")
        self.assertEqual(resolved.spec.base_url, "https://gw.example/v1")
        self.assertEqual(resolved.pool.acquire().id, "seed:AI_GATEWAY_API_KEY")

    def test_base_url_overrides(self):
        env = {
            "OPENAI_BASE_URL": "https://o.example/v1",
            "ANTHROPIC_BASE_URL": "https://a.example/v1",
            "OPENROUTER_BASE_URL": "https://r.example/v1",
            "XAI_BASE_URL": "https://x.example/v1",
            "GOOGLE_BASE_URL": "https://g.example/v1",
            "OLLAMA_BASE_URL": "http://gpu:11434/v1",
            "AI_GATEWAY_BASE_URL": "https://v.example/v1",
        }
        registry = self.registry(env)
        specs = {s["name"]: s["base_url"] for s in registry.snapshot()}
        self.assertEqual(specs["openai"], "https://o.example/v1")
        self.assertEqual(specs["anthropic"], "https://a.example/v1")
        self.assertEqual(specs["openrouter"], "https://r.example/v1")
        self.assertEqual(specs["xai"], "https://x.example/v1")
        self.assertEqual(specs["google"], "https://g.example/v1")
        self.assertEqual(specs["vercel"], "https://v.example/v1")
        self.assertEqual(registry.resolve("ollama").spec.base_url, "http://gpu:11434/v1")

    def test_invalid_base_url(self):
        registry = self.registry({"OLLAMA_BASE_URL": "ftp://user:hunter2@x/"})
        with self.assertRaises(ProviderNotConfigured) as caught:
            registry.resolve("ollama")
        self.assertIn("OLLAMA_BASE_URL", str(caught.exception))
        self.assertNotIn("hunter2", str(caught.exception))
        self.assertNotIn("hunter2", json.dumps(registry.snapshot()))

    def test_unusable_env_key_ignored(self):
        registry = self.registry({"XAI_API_KEY": "sk bad key", "XAI_API_KEY_1": ENV_SECRET_1})
        self.assertEqual(self.key_ids(registry, "xai"), ["seed:XAI_API_KEY_1"])


class FileTests(RegistryTestCase):
    def test_file_adds_provider(self):
        self.write(
            {
                "version": 2,
                "providers": {
                    "MyGateway": {
                        "base_url": "https://llm.example/v1",
                        "auth": "x-api-key",
                        "api_format": "anthropic",
                        "keys": [{"id": "runtime:1", "secret": FILE_SECRET}],
                    }
                },
            }
        )
        resolved = self.registry().resolve("mygateway")
        self.assertEqual(
            (resolved.spec.base_url, resolved.spec.auth, resolved.spec.api_format),
            ("https://llm.example/v1", "x-api-key", "anthropic"),
        )
        self.assertEqual(resolved.pool.acquire().secret, FILE_SECRET)

    def test_new_provider_defaults(self):
        self.write({"providers": {"local": {"base_url": "http://llm:8000/v1", "api_key": FILE_SECRET}}})
        spec = self.registry().resolve("local").spec
        self.assertEqual((spec.auth, spec.api_format), ("bearer", "openai"))

    def test_file_overrides_catalog(self):
        self.write(
            {
                "providers": {
                    "anthropic": {"base_url": "https://corp-proxy.example/v1", "auth": "bearer", "api_key": FILE_SECRET},
                    "cloudflare-ai-gateway": {
                        "base_url": "https://gateway.ai.cloudflare.com/v1/acct/gw/anthropic",
                        "api_key": FILE_SECRET,
                    },
                }
            }
        )
        registry = self.registry()
        spec = registry.resolve("anthropic").spec
        self.assertEqual(
            (spec.base_url, spec.auth, spec.api_format),
            ("https://corp-proxy.example/v1", "bearer", "anthropic"),
        )
        spec = registry.resolve("cloudflare-ai-gateway").spec
        self.assertEqual(spec.auth, "x-api-key")

    def test_env_base_url_overrides_file(self):
        self.write({"providers": {"openai": {"base_url": "https://file.example/v1", "api_key": FILE_SECRET}}})
        registry = self.registry({"OPENAI_BASE_URL": "https://env.example/v1"})
        self.assertEqual(registry.resolve("openai").spec.base_url, "https://env.example/v1")

    def test_aliases_canonicalised(self):
        self.write({"providers": {"z.ai": {"api_key": FILE_SECRET}}})
        registry = self.registry()
        self.assertEqual(registry.resolve("zai").pool.acquire().secret, FILE_SECRET)

    def test_alias_conflict(self):
        self.write({"providers": {"qwen": {}, "qwen-portal": {}}})
        with self.assertRaises(ProvidersFileError):
            self.registry()

    def test_corrupt_file_at_start(self):
        with open(self.path, "w") as f:
            f.write('{"providers": {"openai": {"api_key": "' + FILE_SECRET + '"')
        with self.assertRaises(ProvidersFileError) as caught:
            self.registry()
        self.assertIn(self.path, str(caught.exception))
        self.assertNotIn(FILE_SECRET, str(caught.exception))

    def test_env_keys_override_file(self):
        """
        Environment keys come first and are active, ahead of the file's
        keys, even when the file said another key was active.
        """
        self.write(
            {
                "version": 2,
                "providers": {
                    "openai": {
                        "active_key_id": "runtime:file",
                        "keys": [{"id": "runtime:file", "secret": FILE_SECRET, "source": "runtime"}],
                    }
                },
            }
        )
        registry = self.registry({"OPENAI_API_KEY": ENV_SECRET})
        pool = registry.resolve("openai").pool
        self.assertEqual([k.id for k in pool.keys], ["seed:OPENAI_API_KEY", "runtime:file"])
        self.assertEqual(pool.acquire().secret, ENV_SECRET)
        # The file's key is the fallback.
        self.assertEqual(pool.acquire({"seed:OPENAI_API_KEY"}).secret, FILE_SECRET)

    def test_file_active_env_key_honoured(self):
        self.write({"version": 2, "providers": {"openai": {"active_key_id": "seed:OPENAI_API_KEY_1"}}})
        registry = self.registry({"OPENAI_API_KEY": ENV_SECRET, "OPENAI_API_KEY_1": ENV_SECRET_1})
        self.assertEqual(registry.resolve("openai").pool.acquire().secret, ENV_SECRET_1)

    def test_frozen_env_copy_replaced(self):
        """
        A reference-written file with a frozen copy of an environment key:
        the environment's current value wins and the stale copy is gone
        from the file after the next save.
        """
        stale = "sk-stale-5555555555555555555555-OLD"
        self.write(
            {
                "version": 2,
                "providers": {
                    "openai": {
                        "active_key_id": "seed:OPENAI_API_KEY",
                        "keys": [{"id": "seed:OPENAI_API_KEY", "secret": stale, "source": "seed"}],
                    }
                },
            }
        )
        registry = self.registry({"OPENAI_API_KEY": ENV_SECRET})
        pool = registry.resolve("openai").pool
        self.assertEqual([(k.id, k.secret) for k in pool.keys], [("seed:OPENAI_API_KEY", ENV_SECRET)])
        registry.add_key("openai", UI_SECRET)
        self.assertNotInFile(stale, ENV_SECRET)
        self.assertIn(UI_SECRET.encode(), self.read())

    def test_file_seed_key_without_env_kept(self):
        """
        A seed key in the file whose variable is not set any more (the
        reference writes v1 keys that way) stays usable under a file id,
        and survives a save.
        """
        self.write(
            {
                "version": 2,
                "providers": {
                    "xai": {
                        "active_key_id": "seed:XAI_API_KEY",
                        "keys": [{"id": "seed:XAI_API_KEY", "secret": FILE_SECRET, "source": "seed"}],
                    }
                },
            }
        )
        registry = self.registry()
        pool = registry.resolve("xai").pool
        self.assertEqual(pool.active_key_id, "file:XAI_API_KEY")
        self.assertEqual(pool.acquire().secret, FILE_SECRET)
        registry.flush()
        again = self.registry()
        self.assertEqual(again.resolve("xai").pool.acquire().secret, FILE_SECRET)

    def test_unusable_file_key_disabled_not_lost(self):
        self.write({"version": 2, "providers": {"xai": {"keys": [
            {"id": "runtime:bad", "secret": "sk bad\tkey"},
            {"id": "runtime:good", "secret": FILE_SECRET},
        ]}}})
        registry = self.registry()
        pool = registry.resolve("xai").pool
        self.assertEqual(pool.get("runtime:bad").state, "disabled")
        self.assertEqual(pool.acquire().id, "runtime:good")
        registry.flush()
        self.assertIn(b"runtime:bad", self.read())

    def test_v1_migrates_to_v2(self):
        self.write({"providers": {"openrouter": {"api_key": FILE_SECRET, "auth": "bearer", "api_format": "openai"}}})
        registry = self.registry()
        registry.add_key("openrouter", UI_SECRET, "second")
        document = json.loads(self.read())
        self.assertEqual(document["version"], 2)
        keys = document["providers"]["openrouter"]["keys"]
        self.assertEqual([k["secret"] for k in keys], [FILE_SECRET, UI_SECRET])
        self.assertEqual(keys[0]["id"], "file:openrouter")


class PersistenceTests(RegistryTestCase):
    def test_state_change_saved_after_delay(self):
        self.write(
            {
                "version": 2,
                "providers": {"openai": {"keys": [{"id": "runtime:a", "secret": FILE_SECRET}]}},
            }
        )
        before = self.read()
        registry = self.registry({"OPENAI_API_KEY_1": ENV_SECRET_1})
        pool = registry.resolve("openai").pool
        pool.report(pool.get("runtime:a"), Verdict("dead", "unauthorized", None, 401))
        pool.report(pool.get("seed:OPENAI_API_KEY_1"), Verdict("cooldown", "rate limited", 30, 429))
        self.assertEqual(self.read(), before)
        self.clock.advance(1)
        document = json.loads(self.read())
        (key,) = document["providers"]["openai"]["keys"]
        self.assertEqual((key["id"], key["state"], key["last_error_code"]), ("runtime:a", "dead", 401))
        self.assertEqual(key["last_error_reason"], "unauthorized")
        self.assertEqual(key["last_error_at"], "2026-01-02T03:04:05.000Z")
        self.assertNotInFile(ENV_SECRET_1, "seed:")
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        # And it is read back as it was.
        again = self.registry({"OPENAI_API_KEY_1": ENV_SECRET_1})
        self.assertEqual(again.resolve("openai").pool.get("runtime:a").state, "dead")

    def test_many_changes_one_write(self):
        self.write({"version": 2, "providers": {"openai": {"keys": [
            {"id": "runtime:a", "secret": FILE_SECRET},
            {"id": "runtime:b", "secret": UI_SECRET},
        ]}}})
        registry = self.registry()
        writes = []
        real_save = store.save
        self.patch(store, "save", lambda *a: (writes.append(1), real_save(*a)))
        pool = registry.resolve("openai").pool
        pool.report(pool.get("runtime:a"), Verdict("cooldown", "rate limited", 5, 429))
        pool.report(pool.get("runtime:b"), Verdict("cooldown", "rate limited", 5, 429))
        self.clock.advance(1)
        self.assertEqual(len(writes), 1)

    def test_env_only_changes_not_written(self):
        registry = self.registry({"OPENAI_API_KEY": ENV_SECRET})
        pool = registry.resolve("openai").pool
        pool.report(pool.acquire(), Verdict("dead", "unauthorized", None, 401))
        self.clock.advance(10)
        self.assertFalse(os.path.exists(self.path))

    def test_stop_service_flushes(self):
        self.write({"version": 2, "providers": {"xai": {"keys": [{"id": "runtime:a", "secret": FILE_SECRET}]}}})
        registry = self.registry()
        registry.startService()
        pool = registry.resolve("xai").pool
        pool.report(pool.acquire(), Verdict("dead", "unauthorized", None, 401))
        registry.stopService()
        self.assertEqual(json.loads(self.read())["providers"]["xai"]["keys"][0]["state"], "dead")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_write_failure_logged_and_kept(self):
        self.write({"version": 2, "providers": {"xai": {"keys": [{"id": "runtime:a", "secret": FILE_SECRET}]}}})
        registry = self.registry()
        real_save = store.save
        before = self.read()

        def broken(path, entries):
            raise ProvidersFileError(path, "cannot write: Read-only file system")

        self.patch(store, "save", broken)
        pool = registry.resolve("xai").pool
        pool.report(pool.acquire(), Verdict("dead", "unauthorized", None, 401))
        self.clock.advance(1)  # logged, not raised
        self.assertEqual(self.read(), before)
        # The change is still pending: the next flush writes it.
        self.patch(store, "save", real_save)
        registry.flush()
        self.assertEqual(json.loads(self.read())["providers"]["xai"]["keys"][0]["state"], "dead")


class ManagementTests(RegistryTestCase):
    def test_add_key(self):
        registry = self.registry({"OPENAI_API_KEY": ENV_SECRET})
        key_id = registry.add_key("OpenAI", UI_SECRET, " ops key ")
        self.assertTrue(key_id.startswith("runtime:"))
        pool = registry.resolve("openai").pool
        self.assertEqual([k.id for k in pool.keys], ["seed:OPENAI_API_KEY", key_id])
        # Saved at once, 0600, without the environment's key.
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        self.assertIn(UI_SECRET.encode(), self.read())
        self.assertNotInFile(ENV_SECRET)
        document = json.loads(self.read())
        (key,) = document["providers"]["openai"]["keys"]
        self.assertEqual(
            (key["id"], key["label"], key["source"], key["state"], key["added_at"]),
            (key_id, "ops key", "runtime", "ready", "2026-01-02T03:04:05.000Z"),
        )
        self.assertEqual(self.events[-1]["action"], "added")
        self.assertEqual(self.events[-1]["key_id"], key_id)

    def test_add_key_makes_provider_usable(self):
        registry = self.registry()
        with self.assertRaises(ProviderNotConfigured):
            registry.resolve("anthropic")
        registry.add_key("anthropic", UI_SECRET)
        self.assertEqual(registry.resolve("anthropic").pool.acquire().secret, UI_SECRET)
        again = self.registry()
        self.assertEqual(again.resolve("anthropic").pool.acquire().secret, UI_SECRET)

    def test_add_key_errors(self):
        registry = self.registry()
        with self.assertRaises(UnknownProvider):
            registry.add_key("nope", UI_SECRET)
        with self.assertRaises(ValueError) as caught:
            registry.add_key("openai", "sk with spaces")
        self.assertNotIn("sk with spaces", str(caught.exception))
        with self.assertRaises(ValueError):
            registry.add_key("openai", "")
        with self.assertRaises(ValueError):
            registry.add_key("ollama", UI_SECRET)
        registry.add_key("openai", UI_SECRET)
        with self.assertRaises(ValueError) as caught:
            registry.add_key("openai", UI_SECRET)
        self.assertNotIn(UI_SECRET, str(caught.exception))

    def test_activate_disable_delete_persist(self):
        registry = self.registry()
        first = registry.add_key("xai", FILE_SECRET)
        second = registry.add_key("xai", UI_SECRET)
        registry.activate_key("xai", second)
        self.assertEqual(self.registry().resolve("xai").pool.acquire().id, second)
        registry.disable_key("xai", second)
        again = self.registry()
        self.assertEqual(again.resolve("xai").pool.get(second).state, "disabled")
        self.assertEqual(again.resolve("xai").pool.acquire().id, first)
        registry.delete_key("xai", first)
        again = self.registry()
        (xai,) = [p for p in again.snapshot() if p["name"] == "xai"]
        self.assertEqual([(k["id"], k["state"]) for k in xai["keys"]], [(second, "disabled")])
        self.assertNotIn(FILE_SECRET.encode(), self.read())
        self.assertEqual(
            [e["action"] for e in self.events],
            ["added", "added", "activated", "disabled", "deleted"],
        )

    def test_unknown_key(self):
        registry = self.registry()
        with self.assertRaises(UnknownKey):
            registry.activate_key("openai", "runtime:nope")
        with self.assertRaises(UnknownProvider):
            registry.delete_key("nope", "runtime:nope")

    def test_add_provider(self):
        registry = self.registry()
        name = registry.add_provider("My-LLM", "https://llm.example/v1", None, None)
        self.assertEqual(name, "my-llm")
        registry.add_key("my-llm", UI_SECRET)
        spec = self.registry().resolve("my-llm").spec
        self.assertEqual(
            (spec.base_url, spec.auth, spec.api_format), ("https://llm.example/v1", "bearer", "openai")
        )
        self.assertEqual(json.loads(self.read())["providers"]["my-llm"]["source"], "runtime")

    def test_add_provider_configures_catalog_provider(self):
        registry = self.registry()
        registry.add_key("cloudflare-ai-gateway", UI_SECRET)
        with self.assertRaises(ProviderNotConfigured):
            registry.resolve("cloudflare-ai-gateway")
        registry.add_provider(
            "cloudflare-ai-gateway", "https://gateway.ai.cloudflare.com/v1/a/g/anthropic", None, None
        )
        spec = registry.resolve("cloudflare-ai-gateway").spec
        self.assertEqual(spec.base_url, "https://gateway.ai.cloudflare.com/v1/a/g/anthropic")
        self.assertEqual((spec.auth, spec.api_format), ("x-api-key", "anthropic"))

    def test_add_provider_keyless(self):
        registry = self.registry()
        registry.add_provider("lab", "http://lab:8000/v1", "none", "openai")
        self.assertIs(registry.resolve("lab").pool.acquire(), KEYLESS)

    def test_add_provider_errors(self):
        registry = self.registry()
        for args in [
            ("bad name!", "https://x.example/v1", None, None),
            ("x", "ftp://x.example/v1", None, None),
            ("x", "https://user:pw@x.example/v1", None, None),
            ("x", "https://x.example/v1", "basic", None),
            ("x", "https://x.example/v1", None, "gemini"),
        ]:
            with self.assertRaises(ValueError, msg=repr(args)):
                registry.add_provider(*args)
        self.assertNotIn("x", registry.known_names())

    def test_snapshot(self):
        registry = self.registry({"OPENAI_API_KEY": ENV_SECRET})
        registry.add_key("openai", UI_SECRET, "ops")
        pool = registry.resolve("openai").pool
        pool.report(pool.acquire(), Verdict("cooldown", "rate limited", 5, 429))
        snapshot = registry.snapshot()
        text = json.dumps(snapshot)
        for secret in (ENV_SECRET, UI_SECRET):
            self.assertNotIn(secret, text)
        openai = next(p for p in snapshot if p["name"] == "openai")
        self.assertTrue(openai["configured"])
        self.assertIsNone(openai["problem"])
        self.assertEqual(openai["source"], "file")
        self.assertEqual(openai["retry_after"], 1)
        env_key, ui_key = openai["keys"]
        self.assertEqual(env_key["masked_secret"], "sk-e…ENV0")
        self.assertEqual(env_key["state"], "cooldown")
        self.assertTrue(env_key["from_environment"])
        self.assertEqual(ui_key["masked_secret"], "sk-u…-UI4")
        self.assertFalse(ui_key["from_environment"])
        synthetic = next(p for p in snapshot if p["name"] == "synthetic")
        self.assertFalse(synthetic["configured"])
        self.assertEqual(synthetic["source"], "catalog")
        self.assertEqual([p["name"] for p in snapshot], sorted(p["name"] for p in snapshot))

    def test_events_reach_observer_without_secrets(self):
        registry = self.registry({"OPENAI_API_KEY": ENV_SECRET})
        pool = registry.resolve("openai").pool
        pool.report(pool.acquire(), Verdict("dead", "unauthorized", None, 401))
        self.assertEqual(
            self.events,
            [
                {
                    "provider": "openai",
                    "key_id": "seed:OPENAI_API_KEY",
                    "action": "dead",
                    "reason": "unauthorized",
                    "cooldown_until": None,
                }
            ],
        )
        self.assertNotIn(ENV_SECRET, json.dumps(self.events))

    def test_broken_observer_does_not_break_pool(self):
        registry = self.registry({"OPENAI_API_KEY": ENV_SECRET, "OPENAI_API_KEY_1": ENV_SECRET_1})

        def broken(event):
            raise RuntimeError("observer bug")

        registry.on_pool_event = broken
        pool = registry.resolve("openai").pool
        pool.report(pool.acquire(), Verdict("dead", "unauthorized", None, 401))
        self.assertEqual(pool.acquire().id, "seed:OPENAI_API_KEY_1")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class ReloadTests(RegistryTestCase):
    def test_env_change(self):
        env = {"OPENAI_API_KEY": ENV_SECRET}
        registry = self.registry(env)
        registry.reload({"OPENAI_API_KEY": ENV_SECRET_1, "XAI_API_KEY": ENV_SECRET_2})
        self.assertEqual(registry.resolve("openai").pool.acquire().secret, ENV_SECRET_1)
        self.assertEqual(registry.resolve("xai").pool.acquire().secret, ENV_SECRET_2)
        registry.reload({})
        with self.assertRaises(ProviderNotConfigured):
            registry.resolve("openai")

    def test_file_edited_on_disk(self):
        registry = self.registry()
        self.write(
            {
                "version": 2,
                "providers": {"lab": {"base_url": "http://lab/v1", "keys": [{"id": "k", "secret": FILE_SECRET}]}},
            }
        )
        with self.assertRaises(UnknownProvider):
            registry.resolve("lab")
        registry.reload()
        self.assertEqual(registry.resolve("lab").pool.acquire().secret, FILE_SECRET)
        self.write({"version": 2, "providers": {}})
        registry.reload()
        with self.assertRaises(UnknownProvider):
            registry.resolve("lab")

    def test_pool_object_kept(self):
        """
        A request in flight during a reload reports to the same pool, which
        now holds the reloaded keys.
        """
        registry = self.registry({"OPENAI_API_KEY": ENV_SECRET})
        pool = registry.resolve("openai").pool
        key = pool.acquire()
        registry.reload()
        self.assertIs(registry.resolve("openai").pool, pool)
        pool.report(key, Verdict("dead", "unauthorized", None, 401))
        self.assertEqual(pool.get("seed:OPENAI_API_KEY").state, "dead")

    def test_unchanged_env_key_keeps_state(self):
        registry = self.registry({"OPENAI_API_KEY": ENV_SECRET})
        pool = registry.resolve("openai").pool
        pool.report(pool.acquire(), Verdict("dead", "unauthorized", None, 401))
        registry.reload()
        self.assertEqual(pool.get("seed:OPENAI_API_KEY").state, "dead")
        registry.reload({"OPENAI_API_KEY": ENV_SECRET_1})
        self.assertEqual(pool.get("seed:OPENAI_API_KEY").state, "ready")

    def test_pending_state_saved_before_reload(self):
        self.write({"version": 2, "providers": {"xai": {"keys": [{"id": "runtime:a", "secret": FILE_SECRET}]}}})
        registry = self.registry()
        pool = registry.resolve("xai").pool
        pool.report(pool.acquire(), Verdict("dead", "unauthorized", None, 401))
        registry.reload()  # before the debounced save ran
        self.assertEqual(pool.get("runtime:a").state, "dead")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_file_edit_wins_over_pending_state(self):
        self.write({"version": 2, "providers": {"xai": {"keys": [{"id": "runtime:a", "secret": FILE_SECRET}]}}})
        registry = self.registry()
        pool = registry.resolve("xai").pool
        pool.report(pool.acquire(), Verdict("dead", "unauthorized", None, 401))
        # The operator replaces the key by hand, then sends SIGHUP.
        self.write({"version": 2, "providers": {"xai": {"keys": [{"id": "runtime:b", "secret": UI_SECRET}]}}})
        os.utime(self.path, ns=(1, 1))
        registry.reload()
        self.assertEqual([k.id for k in pool.keys], ["runtime:b"])
        self.clock.advance(10)
        self.assertIn(UI_SECRET.encode(), self.read())

    def test_corrupt_file_keeps_old_state(self):
        registry = self.registry({"OPENAI_API_KEY": ENV_SECRET})
        with open(self.path, "w") as f:
            f.write("{nope")
        with self.assertRaises(ProvidersFileError):
            registry.reload()
        self.assertEqual(registry.resolve("openai").pool.acquire().secret, ENV_SECRET)


ORG = "org-operator0000000000000001"
PROJECT = "proj_operator00000000000001"


class OperatorSettingsTests(RegistryTestCase):
    """Organization, project, rate-limit scope, header policy and scrubbing."""

    def test_organization_from_the_file_is_sent_as_the_providers_header(self):
        self.write({"version": 2, "providers": {"openai": {"organization": ORG, "project": PROJECT}}})
        resolved = self.registry({"OPENAI_API_KEY": ENV_SECRET}).resolve("openai")
        self.assertEqual(
            resolved.headers.fixed,
            ((b"OpenAI-Organization", ORG.encode()), (b"OpenAI-Project", PROJECT.encode())),
        )

    def test_environment_overrides_the_file(self):
        self.write({"version": 2, "providers": {"openai": {"organization": "org-from-file-000"}}})
        registry = self.registry(
            {"OPENAI_API_KEY": ENV_SECRET, "OPENAI_ORG_ID": ORG, "OPENAI_PROJECT_ID": PROJECT}
        )
        spec = registry.resolve("openai").spec
        self.assertEqual((spec.organization, spec.project), (ORG, PROJECT))
        # The file keeps its own value: the environment is never written to it.
        registry.add_key("openai", FILE_SECRET)
        self.assertIn(b"org-from-file-000", self.read())
        self.assertNotIn(ORG.encode(), self.read())

    def test_invalid_organization_makes_the_provider_unusable(self):
        registry = self.registry({"OPENAI_API_KEY": ENV_SECRET, "OPENAI_ORG_ID": "org 1\r\nX-Evil: 1"})
        with self.assertRaises(ProviderNotConfigured) as caught:
            registry.resolve("openai")
        self.assertIn("invalid organization (from OPENAI_ORG_ID)", caught.exception.message)
        self.assertNotIn("X-Evil", caught.exception.message)

    def test_organization_ignored_for_anthropic_format(self):
        self.write({"version": 2, "providers": {"anthropic": {"organization": ORG}}})
        resolved = self.registry({"ANTHROPIC_API_KEY": ENV_SECRET}).resolve("anthropic")
        self.assertIsNone(resolved.spec.organization)
        self.assertEqual(resolved.headers.fixed, ())
        self.assertEqual(resolved.headers.defaults, ((b"anthropic-version", b"2023-06-01"),))

    def test_rate_limit_scope(self):
        self.write(
            {
                "version": 2,
                "providers": {
                    "xai": {"rate_limit_scope": "key"},
                    "lab": {"base_url": "http://lab.example/v1", "keys": [{"id": "runtime:l", "secret": FILE_SECRET}]},
                },
            }
        )
        registry = self.registry({"OPENAI_API_KEY": ENV_SECRET, "XAI_API_KEY": ENV_SECRET_1})
        self.assertTrue(registry.resolve("openai").pool.per_model)
        self.assertFalse(registry.resolve("xai").pool.per_model)  # the file says so
        self.assertFalse(registry.resolve("lab").pool.per_model)  # unknown: the contract's default
        self.assertEqual(registry.resolve("lab").spec.probe_path, "/v1/models")
        snapshot = {p["name"]: p for p in registry.snapshot()}
        self.assertEqual(snapshot["openai"]["rate_limit_scope"], "model")
        self.assertEqual(snapshot["xai"]["rate_limit_scope"], "key")

    def test_scrubber_knows_every_secret(self):
        self.write(
            {
                "version": 2,
                "providers": {
                    "openai": {"organization": ORG, "project": PROJECT},
                    "xai": {"keys": [{"id": "runtime:x", "secret": FILE_SECRET}]},
                },
            }
        )
        registry = self.registry({"OPENAI_API_KEY": ENV_SECRET, "ANTHROPIC_API_KEY": ENV_SECRET_1})
        registry.add_key("xai", UI_SECRET)
        resolved = registry.resolve("openai")
        self.assertIs(resolved.scrubber, registry.scrubber)
        body = " ".join([ENV_SECRET, ENV_SECRET_1, FILE_SECRET, UI_SECRET, ORG, PROJECT]).encode()
        self.assertEqual(registry.scrubber.scrub(body), b" ".join([b"[redacted]"] * 6))
        # A deleted key may still be echoed by an answer in flight.
        [ui_key] = [k.id for k in registry.resolve("xai").pool.keys if k.id.startswith("runtime:") and k.id != "runtime:x"]
        registry.delete_key("xai", ui_key)
        self.assertEqual(registry.scrubber.scrub(UI_SECRET.encode()), b"[redacted]")

    def test_snapshot_masks_organization_and_project(self):
        registry = self.registry({"OPENAI_API_KEY": ENV_SECRET, "OPENAI_ORG_ID": ORG, "OPENAI_PROJECT_ID": PROJECT})
        [openai] = [p for p in registry.snapshot() if p["name"] == "openai"]
        self.assertEqual(openai["organization"], "org-…0001")
        self.assertEqual(openai["project"], "proj…0001")
        self.assertNotIn(ORG, json.dumps(registry.snapshot()))

    def test_org_fields_survive_a_save(self):
        self.write({"version": 2, "providers": {"openai": {"organization": ORG, "rate_limit_scope": "key"}}})
        registry = self.registry()
        registry.add_key("openai", FILE_SECRET)
        document = json.loads(self.read())["providers"]["openai"]
        self.assertEqual((document["organization"], document["rate_limit_scope"]), (ORG, "key"))
        self.assertNotIn("project", document)
