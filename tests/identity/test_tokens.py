"""
Tests for L{cllama_tx.identity.tokens}: CONTRACT section 2's credential rules.
"""

from __future__ import annotations

import hmac

from twisted.trial.unittest import SynchronousTestCase

from cllama_tx.identity import tokens
from cllama_tx.identity.tokens import (
    AGENT_ID_PATTERN,
    MalformedCredentials,
    expected_secret,
    parse_credentials,
    secrets_equal,
    valid_agent_id,
)

SECRET = "0123456789abcdef0123456789abcdef0123456789abcdef"


class ValidAgentIdTests(SynchronousTestCase):
    """
    L{valid_agent_id} accepts exactly C{[A-Za-z0-9][A-Za-z0-9._-]{0,127}}.
    """

    def test_valid(self) -> None:
        for agent_id in ["a", "Z", "7", "agent-1", "a.b_c-d", "A" * 128, "a..b"]:
            self.assertTrue(valid_agent_id(agent_id), agent_id)

    def test_invalid(self) -> None:
        for agent_id in [
            "",
            ".",
            "..",
            "../etc",
            "a/b",
            "/abs",
            "a\\b",
            ".hidden",
            "-dash",
            "_under",
            "a b",
            "a\n",
            "a\x00",
            "agént",
            "a:b",
            "A" * 129,
        ]:
            self.assertFalse(valid_agent_id(agent_id), repr(agent_id))

    def test_not_a_string(self) -> None:
        """
        Bytes and other objects are never valid ids.
        """
        for agent_id in [None, b"abc", 1, ["a"]]:
            self.assertFalse(valid_agent_id(agent_id), repr(agent_id))

    def test_pattern_is_full_match(self) -> None:
        """
        The pattern is meant for C{fullmatch}: a prefix match is not enough.
        """
        self.assertIsNotNone(AGENT_ID_PATTERN.match("a/b"))
        self.assertIsNone(AGENT_ID_PATTERN.fullmatch("a/b"))


class ParseCredentialsTests(SynchronousTestCase):
    """
    L{parse_credentials} reads C{Authorization: Bearer} or, when that is
    absent, C{x-api-key}.
    """

    def assertMalformed(
        self, authorization: bytes | None, x_api_key: bytes | None = None
    ) -> MalformedCredentials:
        return self.assertRaises(
            MalformedCredentials, parse_credentials, authorization, x_api_key
        )

    def test_bearer(self) -> None:
        self.assertEqual(
            parse_credentials(b"Bearer alice:" + SECRET.encode(), None),
            ("alice", SECRET),
        )

    def test_scheme_case_insensitive(self) -> None:
        for scheme in [b"bearer", b"BEARER", b"bEaReR"]:
            self.assertEqual(
                parse_credentials(scheme + b" alice:s3cret", None), ("alice", "s3cret")
            )

    def test_whitespace(self) -> None:
        """
        Any run of whitespace after the scheme, and whitespace around the
        value, is accepted.
        """
        for value in [
            b"Bearer    alice:s3cret",
            b"Bearer\talice:s3cret",
            b"  Bearer alice:s3cret  ",
            b"Bearer \t alice:s3cret\t",
        ]:
            self.assertEqual(parse_credentials(value, None), ("alice", "s3cret"), value)

    def test_first_colon(self) -> None:
        """
        The token is split on the first colon: secrets may contain colons.
        """
        self.assertEqual(
            parse_credentials(b"Bearer alice:a:b::c", None), ("alice", "a:b::c")
        )
        self.assertEqual(parse_credentials(None, b"alice:a:b"), ("alice", "a:b"))

    def test_empty_parts(self) -> None:
        for token in [b":s3cret", b"alice:", b":", b"alice", b"::"]:
            self.assertMalformed(b"Bearer " + token)
            self.assertMalformed(None, token)

    def test_not_bearer(self) -> None:
        for value in [
            b"Basic alice:s3cret",
            b"Beareralice:s3cret",
            b"Bearer",
            b"Bearer   ",
            b"alice:s3cret",
            b"",
            b"   ",
        ]:
            self.assertMalformed(value)

    def test_x_api_key(self) -> None:
        """
        C{x-api-key} carries the same C{agent:secret} token, without a scheme,
        when there is no C{Authorization}.
        """
        self.assertEqual(
            parse_credentials(None, b"  alice:" + SECRET.encode() + b" "),
            ("alice", SECRET),
        )

    def test_x_api_key_only_when_authorization_absent(self) -> None:
        """
        A present C{Authorization} wins, and a malformed one is not rescued by
        a good C{x-api-key}.
        """
        self.assertEqual(
            parse_credentials(b"Bearer alice:one", b"bob:two"), ("alice", "one")
        )
        self.assertMalformed(b"Basic alice:one", b"bob:two")
        self.assertMalformed(b"", b"bob:two")

    def test_missing(self) -> None:
        error = self.assertMalformed(None, None)
        self.assertIn("missing", str(error))

    def test_not_utf8(self) -> None:
        self.assertMalformed(b"Bearer alice:\xff\xfe")
        self.assertMalformed(b"Bearer \xc3(:secret")
        self.assertMalformed(None, b"alice:\x80secret")

    def test_agent_id_not_validated(self) -> None:
        """
        Id syntax is the registry's decision (a 403 like an unknown agent),
        not a parse error.
        """
        self.assertEqual(
            parse_credentials(b"Bearer ../etc:s3cret", None), ("../etc", "s3cret")
        )
        self.assertEqual(parse_credentials(None, b"a/b:s3cret"), ("a/b", "s3cret"))

    def test_message_never_has_the_secret(self) -> None:
        secret = b"TOPSECRETVALUE"
        for authorization, x_api_key in [
            (b"Basic alice:" + secret, None),
            (b"Bearer " + secret, None),
            (b"Bearer :" + secret, None),
            (b"Bearer alice:" + secret + b"\xff", None),
            (None, secret),
            (None, b":" + secret),
            (None, secret + b"\xff"),
        ]:
            error = self.assertMalformed(authorization, x_api_key)
            self.assertNotIn("TOPSECRET", str(error))
            self.assertNotIn("TOPSECRET", repr(error))
            self.assertTrue(str(error))


class ExpectedSecretTests(SynchronousTestCase):
    """
    L{expected_secret} normalises the C{token} field of C{metadata.json}.
    """

    def test_agent_and_secret(self) -> None:
        self.assertEqual(expected_secret("alice:" + SECRET, "alice"), SECRET)

    def test_bearer(self) -> None:
        for token in [
            "Bearer alice:s3cret",
            "bearer alice:s3cret",
            "BEARER   alice:s3cret",
            "  Bearer\talice:s3cret ",
        ]:
            self.assertEqual(expected_secret(token, "alice"), "s3cret", token)

    def test_bare(self) -> None:
        self.assertEqual(expected_secret(SECRET, "alice"), SECRET)
        self.assertEqual(expected_secret(" " + SECRET + "\n", "alice"), SECRET)
        self.assertEqual(expected_secret("Bearer " + SECRET, "alice"), SECRET)

    def test_secret_with_colons(self) -> None:
        self.assertEqual(expected_secret("alice:a:b:c", "alice"), "a:b:c")

    def test_other_agent(self) -> None:
        """
        A token that names another agent is no secret for this one.
        """
        self.assertIsNone(expected_secret("bob:s3cret", "alice"))
        self.assertIsNone(expected_secret("Bearer bob:s3cret", "alice"))
        self.assertIsNone(expected_secret("Alice:s3cret", "alice"))
        self.assertIsNone(expected_secret(":s3cret", "alice"))

    def test_empty(self) -> None:
        for token in ["", "   ", "alice:", "Bearer alice:", "Bearer", "bearer  ", "\n"]:
            self.assertIsNone(expected_secret(token, "alice"), repr(token))

    def test_not_a_string(self) -> None:
        for token in [None, 42, 1.5, True, ["alice:x"], {"alice": "x"}, b"alice:x"]:
            self.assertIsNone(expected_secret(token, "alice"), repr(token))


class SecretsEqualTests(SynchronousTestCase):
    """
    L{secrets_equal} compares in constant time.
    """

    def test_equal(self) -> None:
        self.assertTrue(secrets_equal(SECRET, SECRET))
        self.assertTrue(secrets_equal("sé:crêt", "sé:crêt"))

    def test_different(self) -> None:
        self.assertFalse(secrets_equal(SECRET, SECRET[:-1] + "0"))
        self.assertFalse(secrets_equal(SECRET, SECRET[:-1]))
        self.assertFalse(secrets_equal("", SECRET))
        self.assertFalse(secrets_equal("é", "e"))

    def test_lone_surrogate(self) -> None:
        """
        A JSON file may hold a lone surrogate; comparing it must not raise.
        """
        self.assertFalse(secrets_equal("\ud800", "x"))
        self.assertTrue(secrets_equal("\ud800", "\ud800"))

    def test_uses_compare_digest(self) -> None:
        """
        The comparison goes through L{hmac.compare_digest}, on UTF-8 bytes.
        """
        calls = []
        original = hmac.compare_digest

        def spy(a: bytes, b: bytes) -> bool:
            calls.append((a, b))
            return original(a, b)

        self.patch(tokens.hmac, "compare_digest", spy)
        self.assertTrue(secrets_equal("sé", "sé"))
        self.assertFalse(secrets_equal("a", "b"))
        self.assertEqual(calls, [("sé".encode(), "sé".encode()), (b"a", b"b")])
