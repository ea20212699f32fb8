"""
L{LeanHeaders} behaves as twisted.web's L{Headers}: the same operations
give the same answers, names and values, for bytes and str, and none of
Headers' public methods is left to the parent class (whose table it does
not use).
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers, InvalidHeaderName

from cllama_tx.providers.lean_headers import LeanHeaders


def both(rawHeaders=None):
    return LeanHeaders(rawHeaders), Headers(rawHeaders)


class SameAsTwisted(SynchronousTestCase):
    def same(self, lean: LeanHeaders, twisted: Headers) -> None:
        self.assertEqual(list(lean.getAllRawHeaders()), list(twisted.getAllRawHeaders()))
        self.assertEqual(lean, twisted)
        self.assertEqual(twisted, lean)
        self.assertFalse(lean != twisted)

    def test_a_sequence_of_operations(self) -> None:
        lean, twisted = both({b"content-type": [b"application/json"], "X-Str": ["v\u00e9"]})
        self.same(lean, twisted)
        operations = [
            ("addRawHeader", b"x-forwarded-for", b"10.0.0.1"),
            ("addRawHeader", b"X-FORWARDED-FOR", b"10.0.0.2"),
            ("setRawHeaders", b"authorization", [b"Bearer a", b"Bearer b"]),
            ("setRawHeaders", "Www-Authenticate", ["Basic", b"Bearer"]),
            ("addRawHeader", b"te", b"trailers"),
            ("addRawHeader", b"x-injected", b"a\r\nSet-Cookie: b\nc\rd"),
            ("setRawHeaders", b"x-injected-too", [b"e\r\nf"]),
            ("removeHeader", b"AUTHORIZATION"),
            ("removeHeader", b"absent"),
            ("setRawHeaders", b"x-empty", []),
        ]
        for name, *args in operations:
            getattr(lean, name)(*args)
            getattr(twisted, name)(*args)
            self.same(lean, twisted)
        for name in (b"x-forwarded-for", "x-forwarded-for", b"X-Str", "x-str", b"www-authenticate",
                     b"x-injected", b"x-empty", b"absent", b"TE", b"authorization"):
            self.assertEqual(lean.getRawHeaders(name), twisted.getRawHeaders(name), name)
            self.assertEqual(lean.getRawHeaders(name, "dflt"), twisted.getRawHeaders(name, "dflt"), name)
            self.assertEqual(lean.hasHeader(name), twisted.hasHeader(name), name)
        # Twisted's canonical spellings, and no line break survives in a value.
        names = [n for n, _ in lean.getAllRawHeaders()]
        self.assertIn(b"WWW-Authenticate", names)
        self.assertIn(b"TE", names)
        self.assertEqual(lean.getRawHeaders(b"x-injected"), [b"a Set-Cookie: b c d"])

    def test_copy_is_independent_and_a_lean_one(self) -> None:
        lean = LeanHeaders({b"a": [b"1"]})
        copied = lean.copy()
        self.assertIsInstance(copied, LeanHeaders)
        copied.addRawHeader(b"a", b"2")
        copied.setRawHeaders(b"b", [b"3"])
        self.assertEqual(lean.getRawHeaders(b"a"), [b"1"])
        self.assertFalse(lean.hasHeader(b"b"))
        self.assertEqual(copied, Headers({b"a": [b"1", b"2"], b"b": [b"3"]}))

    def test_inequality_and_identity_hash(self) -> None:
        lean, twisted = both({b"a": [b"1"]})
        twisted.addRawHeader(b"a", b"2")
        self.assertNotEqual(lean, twisted)
        self.assertNotEqual(twisted, lean)
        self.assertNotEqual(lean, {b"a": [b"1"]})
        self.assertEqual(len({lean, lean.copy()}), 2)

    def test_invalid_names_are_refused_as_twisted_refuses_them(self) -> None:
        for bad in (b"bad name", b"bad:name", b"", "t\u00ebst"):
            lean, twisted = both()
            self.assertRaises(InvalidHeaderName, twisted.setRawHeaders, bad, [b"x"])
            self.assertRaises(InvalidHeaderName, lean.setRawHeaders, bad, [b"x"])
            self.assertRaises(InvalidHeaderName, lean.addRawHeader, bad, b"x")

    def test_every_public_method_is_its_own(self) -> None:
        public = {n for n in vars(Headers) if not n.startswith("_")} | {"__init__", "__repr__", "__cmp__", "__eq__", "__ne__"}
        self.assertEqual(public - set(vars(LeanHeaders)), set())
        self.assertIn("_fields", LeanHeaders.__slots__)
