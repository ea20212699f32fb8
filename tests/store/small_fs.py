"""
A real, small filesystem to fill: a tmpfs mounted in the test's temporary
directory.  Mounting needs root, as CI has; elsewhere the test fails and
says so (a skipped test would hide that the full-disk path went untested).
"""

from __future__ import annotations

import os
import subprocess


def mount_tmpfs(testcase, size_kib: int = 2048) -> str:
    """A fresh tmpfs of C{size_kib} KiB, unmounted in the test's cleanup (after what it started later)."""
    if os.geteuid() != 0:
        testcase.fail(
            "this test fills a real filesystem: it mounts a small tmpfs, which needs root. "
            "Run the suite as root (CI does), e.g. in the project's container."
        )
    path = os.path.abspath(testcase.mktemp())
    os.makedirs(path)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_kib}k,mode=0700", "tmpfs", path],
        check=True, capture_output=True,
    )
    testcase.addCleanup(subprocess.run, ["umount", "-l", path], check=False, capture_output=True)
    return path


def fill(directory: str) -> str:
    """Fill the filesystem of C{directory} to its last byte with one file; return its path."""
    filler = os.path.join(directory, "filler")
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (1 << 20, 65536, 4096, 512, 1):
            block = b"\0" * size
            while True:
                try:
                    if os.write(fd, block) < size:
                        break
                except OSError:
                    break
    finally:
        os.close(fd)
    return filler


def free(filler: str) -> None:
    """Give the space back."""
    os.unlink(filler)
