"""
Tests for L{cllama_tx.providers.scrub}: configured secrets never leave in what an
upstream sends back.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from cllama_tx.providers.scrub import MIN_SECRET_LENGTH, REDACTED, SecretScrubber

KEY = "sk-proj-scrubme-0123456789abcdef"
OTHER = "sk-ant-api03-scrubme-fedcba9876543210"


class ScrubTests(SynchronousTestCase):
    def test_every_occurrence_of_every_secret(self):
        scrubber = SecretScrubber([KEY, OTHER])
        body = f'{{"error":{{"message":"headers: Authorization: Bearer {KEY}, x-api-key: {OTHER}; again {KEY}"}}}}'
        out = scrubber.scrub(body.encode())
        self.assertNotIn(KEY.encode(), out)
        self.assertNotIn(OTHER.encode(), out)
        self.assertEqual(out.count(REDACTED), 3)
        self.assertEqual(
            out,
            b'{"error":{"message":"headers: Authorization: Bearer [redacted], x-api-key: [redacted]; again [redacted]"}}',
        )

    def test_clean_data_is_returned_as_is(self):
        scrubber = SecretScrubber([KEY])
        body = b'{"error":{"message":"model not found"}}'
        self.assertIs(scrubber.scrub(body), body)
        self.assertIs(SecretScrubber().scrub(body), body)

    def test_a_secret_containing_another_is_replaced_whole(self):
        scrubber = SecretScrubber(["abcdefgh", "abcdefgh-longer-secret"])
        self.assertEqual(scrubber.scrub(b"x abcdefgh-longer-secret y abcdefgh"), b"x [redacted] y [redacted]")

    def test_short_values_are_not_scrubbed(self):
        short = "x" * (MIN_SECRET_LENGTH - 1)
        scrubber = SecretScrubber([short, ""])
        self.assertEqual(len(scrubber), 0)
        self.assertEqual(scrubber.scrub(short.encode()), short.encode())

    def test_secrets_are_only_added(self):
        scrubber = SecretScrubber([KEY])
        scrubber.add([OTHER])
        scrubber.add([])
        self.assertEqual(len(scrubber), 2)
        self.assertEqual(scrubber.scrub(KEY.encode()), REDACTED)
        self.assertEqual(scrubber.scrub(OTHER.encode()), REDACTED)

    def test_regex_characters_in_secrets(self):
        odd = "key+with.(regex)*chars"
        self.assertEqual(SecretScrubber([odd]).scrub(f"[{odd}]".encode()), b"[[redacted]]")

    def test_headers_in_place(self):
        scrubber = SecretScrubber([KEY])
        headers = Headers(
            {
                b"x-echo": [f"Bearer {KEY}".encode(), b"clean"],
                b"content-type": [b"application/json"],
            }
        )
        scrubber.scrub_headers(headers)
        self.assertEqual(headers.getRawHeaders(b"x-echo"), [b"Bearer [redacted]", b"clean"])
        self.assertEqual(headers.getRawHeaders(b"content-type"), [b"application/json"])

    def test_repr_has_no_secret(self):
        self.assertNotIn(KEY, repr(SecretScrubber([KEY])))
