"""The policy plane's settings: the reference's variables and their defaults."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from cllama_tx.governance.policy_settings import PolicySettings, PolicySettingsError, redacted_url


class Settings(SynchronousTestCase):
    def test_nothing_set_is_no_policy(self):
        settings = PolicySettings.from_env({"CLLAMA_POLICY_URL": "  "})
        self.assertFalse(settings.enabled)

    def test_the_references_defaults(self):
        settings = PolicySettings.from_env({"CLLAMA_POLICY_URL": "http://policy:9000/"})
        self.assertEqual(
            (settings.url, settings.token, settings.timeout, settings.fail_mode, settings.problems),
            ("http://policy:9000", None, 1.0, "closed", ()),
        )

    def test_every_setting(self):
        settings = PolicySettings.from_env({
            "CLLAMA_POLICY_URL": "https://policy.internal/v1", "CLLAMA_POLICY_TOKEN": " tok ",
            "CLLAMA_POLICY_TIMEOUT_MS": "250", "CLLAMA_POLICY_FAIL_MODE": "OPEN",
        })
        self.assertEqual((settings.url, settings.token, settings.timeout, settings.fail_open),
                         ("https://policy.internal/v1", "tok", 0.25, True))
        self.assertNotIn("tok", repr(settings))

    def test_values_that_fall_back_as_the_reference_does(self):
        for raw in ("abc", "0", "-5", "1.5"):
            settings = PolicySettings.from_env({"CLLAMA_POLICY_URL": "http://p", "CLLAMA_POLICY_TIMEOUT_MS": raw})
            self.assertEqual(settings.timeout_ms, 1000)
            self.assertEqual(len(settings.problems), 1)
        settings = PolicySettings.from_env({"CLLAMA_POLICY_URL": "http://p", "CLLAMA_POLICY_FAIL_MODE": "sometimes"})
        self.assertEqual((settings.fail_open, len(settings.problems)), (False, 1))

    def test_settings_that_stop_the_start(self):
        for env in (
            {"CLLAMA_POLICY_URL": "policy:9000"},
            {"CLLAMA_POLICY_URL": "ftp://policy"},
            {"CLLAMA_POLICY_URL": "http://"},
            {"CLLAMA_POLICY_URL": "http://user:secret@policy"},
            {"CLLAMA_POLICY_URL": "http://policy", "CLLAMA_POLICY_PLUGIN": "a:b"},
        ):
            with self.assertRaises(PolicySettingsError) as caught:
                PolicySettings.from_env(env)
            self.assertNotIn("secret", str(caught.exception))

    def test_a_plugin(self):
        settings = PolicySettings.from_env({"CLLAMA_POLICY_PLUGIN": "mine.policy:make"})
        self.assertEqual((settings.enabled, settings.url, settings.plugin), (True, None, "mine.policy:make"))

    def test_what_the_log_says_of_a_url(self):
        self.assertEqual(redacted_url("https://policy.internal:8443/tenant/s3cr3t"), "https://policy.internal:8443")
        self.assertEqual(redacted_url("http://[::1]:9000/x"), "http://[::1]:9000")
