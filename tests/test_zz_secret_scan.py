"""
Runs last (trial orders modules by name): no secret used anywhere in the
test run reached a log event or an audit line.
"""

from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase

from tests.secret_scan import SCANNER, SecretScanner


class SecretScanTests(SynchronousTestCase):
    def test_no_secret_in_any_log_or_audit_line(self):
        self.assertGreater(len(SCANNER.secrets), 5)
        self.assertEqual(SCANNER.leaks, [])

    def test_the_scanner_catches_a_leak(self):
        scanner = SecretScanner()
        scanner.register("sk-planted-0042")
        scanner({"log_format": "key is {k}", "k": "sk-planted-0042", "log_namespace": "x"})
        scanner.scan("audit", '{"error": "nothing here"}')
        self.assertEqual(len(scanner.leaks), 1)
        self.assertEqual(scanner.lines_scanned, 2)

    def test_the_scanner_sees_log_events(self):
        before = SCANNER.lines_scanned
        Logger().info("a line")
        self.assertEqual(SCANNER.lines_scanned, before + 1)
