"""
L{cllama_tx.surfaces.validate}: the request body as the proxy reads it.
"""

import json
import os

from twisted.trial.unittest import SynchronousTestCase

from cllama_tx.surfaces import validate
from cllama_tx.surfaces.errors import ProxyError
from cllama_tx.surfaces.validate import (
    MAX_CHOICES,
    MAX_DEPTH,
    MAX_TOKEN_LIMIT,
    check_fields,
    parse_body,
    within_depth,
)

SPEC = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "SPEC.md")


def arrays(levels: int) -> list:
    value: list = []
    for _ in range(levels - 1):
        value = [value]
    return value


def objects(levels: int) -> dict:
    value: dict = {}
    for _ in range(levels - 1):
        value = {"a": value, "b": "leaf"}
    return value


class WithinDepthTests(SynchronousTestCase):
    def test_scalars_and_empty(self):
        for value in (1, "x", None, True, 1.5, [], {}):
            self.assertTrue(within_depth(value, 1))

    def test_boundaries(self):
        for make in (arrays, objects):
            self.assertTrue(within_depth(make(5), 5))
            self.assertFalse(within_depth(make(6), 5))
        mixed = {"a": [{"b": [{"c": []}]}]}  # six levels
        self.assertTrue(within_depth(mixed, 6))
        self.assertFalse(within_depth(mixed, 5))

    def test_deepest_branch_counts(self):
        doc = {"wide": [[1, 2, 3]] * 50, "deep": arrays(10)}
        self.assertTrue(within_depth(doc, 11))
        self.assertFalse(within_depth(doc, 10))

    def test_no_recursion(self):
        """Far past Python's recursion limit, the walk still answers."""
        self.assertFalse(within_depth(arrays(50_000), MAX_DEPTH))


class ParseBodyTests(SynchronousTestCase):
    def refused(self, raw: bytes, code: str = "invalid_json") -> str:
        with self.assertRaises(ProxyError) as caught:
            parse_body(raw)
        error = caught.exception
        self.assertEqual((error.status, error.code), (400, code))
        self.assertNotIn("sys.", error.message)
        self.assertNotIn("int_max_str_digits", error.message)
        self.assertNotIn("recursion", error.message)
        return error.message

    def test_a_body(self):
        raw = b'{"model":"openai/x","messages":[{"role":"user","content":"hi"}],"temperature":0.5,"n":1}'
        self.assertEqual(parse_body(raw), json.loads(raw))

    def test_depth_limit_both_ways(self):
        """
        The limit holds whether the brackets are counted (small bodies) or
        the body is walked (large ones).
        """
        deep = f"nested deeper than {MAX_DEPTH} levels"
        for padding in (b"", b'"pad":"' + b"x" * (validate._COUNT_BELOW + 1) + b'",'):
            at_limit = b"{" + padding + b'"x":' + json.dumps(arrays(MAX_DEPTH - 1)).encode() + b"}"
            self.assertEqual(parse_body(at_limit)["x"], arrays(MAX_DEPTH - 1))
            over = b"{" + padding + b'"x":' + json.dumps(arrays(MAX_DEPTH)).encode() + b"}"
            self.assertEqual(self.refused(over), f"the request body is refused: {deep}")
            objects_over = b"{" + padding + b'"x":' + json.dumps(objects(MAX_DEPTH)).encode() + b"}"
            self.assertEqual(self.refused(objects_over), f"the request body is refused: {deep}")

    def test_brackets_in_strings_are_not_nesting(self):
        raw = json.dumps({"text": "[{" * 500, "list": [[1]] * 200}).encode()
        self.assertEqual(parse_body(raw)["text"], "[{" * 500)

    def test_past_the_recursion_limit(self):
        for raw in (b'{"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}", b'{"x":' + b'{"a":' * 20_000 + b"0" + b"}" * 20_001):
            self.assertEqual(
                self.refused(raw), f"the request body is refused: nested deeper than {MAX_DEPTH} levels"
            )

    def test_non_numbers(self):
        for literal in ("NaN", "Infinity", "-Infinity"):
            self.assertEqual(
                self.refused(b'{"t":[1,' + literal.encode() + b"]}"),
                f"the request body is not valid JSON: {literal} is not a JSON number",
            )

    def test_numbers_out_of_range(self):
        for literal in (b"1e400", b"-1e400", b"1.5E+999", b"123456789" * 40 + b".0"):
            self.assertEqual(
                self.refused(b'{"t":' + literal + b"}"),
                "the request body is refused: a number is out of range (beyond about 1.8e308)",
            )
        self.assertEqual(
            self.refused(b'{"t":' + b"9" * 5000 + b"}"),
            "the request body is refused: a number has too many digits",
        )

    def test_large_numbers_in_range(self):
        doc = parse_body(b'{"a":1e308,"b":-1.7976931348623157e308,"c":1e-400,"d":' + b"9" * 400 + b"}")
        self.assertEqual((doc["a"], doc["c"], doc["d"]), (1e308, 0.0, int("9" * 400)))

    def test_encodings(self):
        """As C{json.loads} reads bytes: UTF-8 with or without a BOM, UTF-16."""
        self.assertEqual(parse_body(b'\xef\xbb\xbf{"a":1}'), {"a": 1})
        self.assertEqual(parse_body('{"a":"\u00e9"}'.encode("utf-16")), {"a": "\u00e9"})
        self.assertEqual(self.refused(b'{"a":"\xff"}'), "the request body is not valid JSON: the text is not UTF-8")

    def test_syntax(self):
        self.assertEqual(
            self.refused(b"{not json"),
            "the request body is not valid JSON: Expecting property name enclosed in double quotes: "
            "line 1 column 2 (char 1)",
        )
        self.assertEqual(self.refused(b""), "the request body is not valid JSON: Expecting value: line 1 column 1 (char 0)")
        for raw in (b"[1]", b"1", b'"x"', b"null"):
            self.assertEqual(self.refused(raw, "invalid_body"), "the request body must be a JSON object")


class CheckFieldsTests(SynchronousTestCase):
    def refused(self, doc: dict, api_format: str = "openai") -> str:
        with self.assertRaises(ProxyError) as caught:
            check_fields(doc, api_format)
        self.assertEqual((caught.exception.status, caught.exception.code), (400, "invalid_parameter"))
        return caught.exception.message

    def test_accepted(self):
        for api_format in ("openai", "anthropic"):
            for doc in (
                {},
                {"stream": True, "max_tokens": 1},
                {"stream": False, "max_tokens": MAX_TOKEN_LIMIT},
                {"stream": None, "max_tokens": None},
            ):
                check_fields(doc, api_format, counting=True)
                if doc.get("max_tokens") is not None or api_format == "openai":
                    check_fields(doc, api_format)
        check_fields(
            {"max_completion_tokens": 5, "n": MAX_CHOICES, "stream": True, "stream_options": {"include_usage": False}},
            "openai",
        )
        check_fields({"n": None, "stream_options": None, "max_completion_tokens": None}, "openai")
        check_fields({"stream_options": {}}, "openai")

    def test_stream(self):
        for api_format in ("openai", "anthropic"):
            for value, kind in (("true", "a string"), (1, "an integer"), (0.0, "a decimal number"),
                                ([], "an array"), ({}, "an object")):
                self.assertEqual(
                    self.refused({"stream": value}, api_format),
                    f"'stream' must be a boolean (true or false), not {kind}",
                )

    def test_token_limits(self):
        cases = [("openai", "max_tokens"), ("openai", "max_completion_tokens"), ("anthropic", "max_tokens")]
        for api_format, name in cases:
            for value, kind in ((True, "a boolean"), (10.0, "a decimal number"), ("10", "a string"), ([10], "an array")):
                self.assertEqual(
                    self.refused({name: value}, api_format), f"'{name}' must be an integer, not {kind}"
                )
            for value in (0, -1, MAX_TOKEN_LIMIT + 1, 10**400):
                self.assertEqual(
                    self.refused({name: value}, api_format), f"'{name}' must be an integer from 1 to {MAX_TOKEN_LIMIT}"
                )

    def test_chat_only_fields(self):
        """C{n}, C{max_completion_tokens} and C{stream_options} are the chat surface's."""
        self.assertEqual(self.refused({"n": 0}), f"'n' must be an integer from 1 to {MAX_CHOICES}")
        self.assertEqual(self.refused({"n": MAX_CHOICES + 1}), f"'n' must be an integer from 1 to {MAX_CHOICES}")
        self.assertEqual(self.refused({"n": 2.0}), "'n' must be an integer, not a decimal number")
        self.assertEqual(self.refused({"stream_options": True}), "'stream_options' must be an object, not a boolean")
        self.assertEqual(
            self.refused({"stream_options": {"include_usage": 1}}),
            "'stream_options.include_usage' must be a boolean, not an integer",
        )
        # Not ours to judge on the messages surface: the provider's.
        check_fields({"n": 0, "max_completion_tokens": "x", "stream_options": 1, "max_tokens": 1}, "anthropic")

    def test_messages_need_max_tokens(self):
        """One rule for every provider: the Messages surface asks for max_tokens; a token count does not."""
        self.assertEqual(
            self.refused({"stream": True}, "anthropic"),
            "'max_tokens' is required: the Messages API needs it for every model",
        )
        check_fields({"messages": []}, "anthropic", counting=True)
        check_fields({"messages": []}, "openai")


class DocumentedTests(SynchronousTestCase):
    def test_limits_are_in_the_spec(self):
        with open(SPEC, encoding="utf-8") as f:
            text = f.read()
        section = text[text.index("## Request bodies"):]
        for figure in (f"{MAX_DEPTH} levels", f"{MAX_TOKEN_LIMIT:,}", f"1 to {MAX_CHOICES}"):
            self.assertIn(figure, section)
