"""Config: listen addresses, sizes, timeouts, and command line over environment."""

from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from cllama_tx.runtime.config import (
    DEFAULT_MAX_BODY,
    Config,
    ConfigError,
    endpoint_port,
    listen_endpoint,
    parse_size,
)
from cllama_tx.runtime.tap import Options


class ListenEndpointTests(SynchronousTestCase):
    def test_go_styles(self):
        self.assertEqual(listen_endpoint(":8080"), "tcp:8080")
        self.assertEqual(listen_endpoint("127.0.0.1:9000"), "tcp:9000:interface=127.0.0.1")
        self.assertEqual(listen_endpoint("0.0.0.0:80"), "tcp:80:interface=0.0.0.0")
        self.assertEqual(listen_endpoint("localhost:8081"), "tcp:8081:interface=127.0.0.1")
        self.assertEqual(listen_endpoint("[::1]:8080"), "tcp6:8080:interface=\\:\\:1")
        self.assertEqual(listen_endpoint("[::]:8080"), "tcp6:8080:interface=\\:\\:")
        self.assertEqual(listen_endpoint("8080"), "tcp:8080")

    def test_endpoint_strings_pass_through(self):
        for text in (
            "tcp:8080:interface=127.0.0.1",
            "ssl:8443:privateKey=k.pem:certKey=c.pem",
            "unix:/run/cllama.sock",
            "systemd:domain=INET:index=0",
        ):
            self.assertEqual(listen_endpoint(text), text)

    def test_garbage_is_refused(self):
        for text in ("nonsense", "host:port", "1.2.3.4:99999", ""):
            self.assertRaises(ConfigError, listen_endpoint, text)

    def test_endpoint_port(self):
        self.assertEqual(endpoint_port("tcp:8080:interface=127.0.0.1"), 8080)
        self.assertEqual(endpoint_port("ssl:port=8443:privateKey=k"), 8443)
        self.assertIsNone(endpoint_port("unix:/tmp/x"))


class SizeTests(SynchronousTestCase):
    def test_units(self):
        self.assertEqual(parse_size("1048576"), 1048576)
        self.assertEqual(parse_size("32MiB"), 32 * 1024 * 1024)
        self.assertEqual(parse_size("512k"), 512 * 1024)
        self.assertEqual(parse_size("1G"), 1024**3)
        self.assertRaises(ConfigError, parse_size, "lots")


class ConfigTests(SynchronousTestCase):
    def test_defaults(self):
        config = Config.from_env({})
        self.assertEqual(config.api_endpoint, "tcp:8080")
        self.assertEqual(config.ui_endpoint, "tcp:8081")
        self.assertEqual(config.context_root, "/claw/context")
        self.assertEqual(config.auth_dir, "/claw/auth")
        self.assertEqual(config.max_body_bytes, DEFAULT_MAX_BODY)
        self.assertFalse(config.demo)

    def test_environment(self):
        config = Config.from_env(
            {
                "LISTEN_ADDR": "127.0.0.1:1234",
                "UI_ADDR": ":1235",
                "CLAW_CONTEXT_ROOT": "/ctx",
                "CLAW_AUTH_DIR": "/auth",
                "CLAW_POD": "pod-a",
                "CLLAMA_UI_TOKEN": "tok-123",
                "CLLAMA_MAX_BODY_SIZE": "1MiB",
                "CLLAMA_IDLE_TIMEOUT": "5",
            }
        )
        self.assertEqual(config.api_endpoint, "tcp:1234:interface=127.0.0.1")
        self.assertEqual(config.ui_endpoint, "tcp:1235")
        self.assertEqual(config.pod, "pod-a")
        self.assertEqual(config.ui_token, "tok-123")
        self.assertEqual(config.max_body_bytes, 1024 * 1024)
        self.assertEqual(config.idle_timeout, 5.0)

    def test_secrets_not_in_repr(self):
        config = Config.from_env({"CLLAMA_UI_TOKEN": "tok-secret-1", "OPENAI_API_KEY": "sk-hidden"})
        self.assertNotIn("tok-secret-1", repr(config))
        self.assertNotIn("sk-hidden", repr(config))

    def test_bad_timeout(self):
        self.assertRaises(ConfigError, Config.from_env, {"CLLAMA_IDLE_TIMEOUT": "soon"})
        self.assertRaises(ConfigError, Config.from_env, {"CLLAMA_IDLE_TIMEOUT": "-1"})

    def test_the_reference_stream_timeouts_in_milliseconds(self):
        """A pod set up for the reference proxy keeps its stream timeouts; ours win when both are set."""
        reference = {"CLLAMA_STREAM_IDLE_TIMEOUT_MS": "1500", "CLLAMA_STREAM_FIRST_BYTE_TIMEOUT_MS": "45000"}
        config = Config.from_env(reference)
        self.assertEqual((config.idle_timeout, config.first_byte_timeout), (1.5, 45.0))
        config = Config.from_env({**reference, "CLLAMA_IDLE_TIMEOUT": "7", "CLLAMA_FIRST_BYTE_TIMEOUT": "9"})
        self.assertEqual((config.idle_timeout, config.first_byte_timeout), (7.0, 9.0))
        self.assertRaises(ConfigError, Config.from_env, {"CLLAMA_STREAM_IDLE_TIMEOUT_MS": "0"})
        self.assertRaises(ConfigError, Config.from_env, {"CLLAMA_STREAM_FIRST_BYTE_TIMEOUT_MS": "soon"})


class OptionsTests(SynchronousTestCase):
    def parse(self, argv, env):
        options = Options()
        self.patch(__import__("os"), "environ", env)
        options.parseOptions(argv)
        return options

    def test_command_line_wins(self):
        options = self.parse(
            ["--listen", "127.0.0.1:7000", "--context-root", "/cli", "--pod", "cli-pod"],
            {"LISTEN_ADDR": ":9999", "CLAW_CONTEXT_ROOT": "/env", "CLAW_POD": "env-pod"},
        )
        self.assertEqual(options.config.api_endpoint, "tcp:7000:interface=127.0.0.1")
        self.assertEqual(options.config.context_root, "/cli")
        self.assertEqual(options.config.pod, "cli-pod")

    def test_every_contract_variable_has_an_option(self):
        env_vars = {
            "LISTEN_ADDR": "--listen",
            "UI_ADDR": "--ui-listen",
            "CLAW_CONTEXT_ROOT": "--context-root",
            "CLAW_AUTH_DIR": "--auth-dir",
            "CLAW_POD": "--pod",
            "CLLAMA_UI_TOKEN": "--ui-token",
            "CLAW_SESSION_HISTORY_DIR": "--session-history-dir",
            "CLAW_GOVERNANCE_DIR": "--governance-dir",
        }
        for var, flag in env_vars.items():
            options = self.parse([flag, "127.0.0.1:1" if "ADDR" in var else "/x"], {})
            self.assertEqual(
                options.environment({})[var], "127.0.0.1:1" if "ADDR" in var else "/x", var
            )

    def test_provider_keys_and_urls(self):
        options = self.parse(
            [
                "--provider-key", "openai=sk-one",
                "--provider-key", "openai=sk-two",
                "--provider-key", "google=g-key",
                "--provider-base-url", "ollama=http://gpu:11434/v1",
            ],
            {"OPENAI_API_KEY": "sk-env"},
        )
        env = options.environment({"OPENAI_API_KEY": "sk-env"})
        self.assertEqual(env["OPENAI_API_KEY"], "sk-one")
        self.assertEqual(env["OPENAI_API_KEY_1"], "sk-two")
        self.assertEqual(env["GEMINI_API_KEY"], "g-key")
        self.assertEqual(env["OLLAMA_BASE_URL"], "http://gpu:11434/v1")

    def test_bad_values_are_usage_errors(self):
        self.assertRaises(usage.UsageError, self.parse, ["--listen", "nowhere"], {})
        self.assertRaises(usage.UsageError, self.parse, ["--provider-key", "nope"], {})
        self.assertRaises(usage.UsageError, self.parse, ["--provider-key", "madeup=k"], {})

    def test_demo_flag(self):
        self.assertTrue(self.parse(["--demo"], {}).config.demo)
        self.assertFalse(self.parse([], {}).config.demo)

    def test_budget_min_output_tokens(self):
        """The floor a budget lowers max_tokens to: 256, the environment, the command line; 0 turns it off."""
        self.assertEqual(self.parse([], {}).config.budget_min_output_tokens, 256)
        self.assertEqual(self.parse([], {"CLLAMA_BUDGET_MIN_OUTPUT_TOKENS": "1024"}).config.budget_min_output_tokens, 1024)
        options = self.parse(["--budget-min-output-tokens", "0"], {"CLLAMA_BUDGET_MIN_OUTPUT_TOKENS": "1024"})
        self.assertEqual(options.config.budget_min_output_tokens, 0)
        self.assertRaises(usage.UsageError, self.parse, ["--budget-min-output-tokens", "-5"], {})
        self.assertRaises(ConfigError, Config.from_env, {"CLLAMA_BUDGET_MIN_OUTPUT_TOKENS": "many"})


class HealthUrlTests(SynchronousTestCase):
    def test_plain_and_tls(self):
        from cllama_tx.runtime.cli import health_url

        self.assertEqual(health_url({"LISTEN_ADDR": "127.0.0.1:9000"}), "http://127.0.0.1:9000/health")
        self.assertEqual(
            health_url({"LISTEN_ADDR": "ssl:8443:privateKey=k.pem:certKey=c.pem"}), "https://127.0.0.1:8443/health"
        )
        self.assertEqual(health_url({}), "http://127.0.0.1:8080/health")


class BacklogTests(SynchronousTestCase):
    def test_listening_kinds_get_a_deep_backlog(self) -> None:
        from cllama_tx.runtime.config import LISTEN_BACKLOG, with_backlog

        self.assertEqual(LISTEN_BACKLOG, 1024)
        self.assertEqual(with_backlog("tcp:8080"), "tcp:8080:backlog=1024")
        self.assertEqual(with_backlog("tcp6:8080:interface=\\:\\:1"), "tcp6:8080:interface=\\:\\:1:backlog=1024")
        self.assertEqual(
            with_backlog("ssl:8443:privateKey=k.pem:certKey=c.pem"),
            "ssl:8443:privateKey=k.pem:certKey=c.pem:backlog=1024",
        )
        self.assertEqual(with_backlog("unix:/run/cllama.sock"), "unix:/run/cllama.sock:backlog=1024")
        # The operator's own choice stays; systemd sockets have theirs in the unit.
        self.assertEqual(with_backlog("tcp:8080:backlog=64"), "tcp:8080:backlog=64")
        self.assertEqual(with_backlog("systemd:domain=INET:index=0"), "systemd:domain=INET:index=0")

    def test_the_endpoint_listens_with_it(self) -> None:
        from twisted.internet import endpoints, reactor

        from cllama_tx.runtime.config import with_backlog

        endpoint = endpoints.serverFromString(reactor, with_backlog("tcp:0:interface=127.0.0.1"))
        self.assertEqual(endpoint._backlog, 1024)
