"""
A watch on every log event and audit line of the test run: each is checked
for every secret the tests use.  tests/test_zz_secret_scan.py, which trial
runs last, fails the run if anything leaked.
"""

from __future__ import annotations

from twisted.logger import formatEvent, globalLogPublisher


class SecretScanner:
    def __init__(self) -> None:
        self.secrets: set[str] = set()
        self.leaks: list[tuple[str, str]] = []
        self.lines_scanned = 0

    def register(self, *secrets: str) -> None:
        self.secrets.update(s for s in secrets if s)

    def scan(self, where: str, text: str) -> None:
        self.lines_scanned += 1
        for secret in self.secrets:
            if secret in text:
                self.leaks.append((where, text[:300]))

    def __call__(self, event) -> None:
        text = formatEvent(event) + " " + repr(event)
        failure = event.get("log_failure")
        if failure is not None:
            text += failure.getTraceback()
        self.scan(f"log:{event.get('log_namespace')}", text)


SCANNER = SecretScanner()
globalLogPublisher.addObserver(SCANNER)
