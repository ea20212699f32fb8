"""
The pinned agent runners, installed from their registries on first use into
a cache outside the repository and reused afterwards.

C{CLLAMA_RUNNER_CACHE} moves the cache (default
C{~/.cache/cllama_tx/runners}); each runner gets C{<name>-<version>}, filled
under an exclusive lock and marked complete only once its install command
succeeded, so an interrupted install is redone and two test processes never
install the same runner at once.  An install that fails raises
L{InstallError} with the command's output: the test fails, never skips.
"""

from __future__ import annotations

import fcntl
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field

# Installs are bounded: a registry that hangs fails the test with the output so far.
INSTALL_TIMEOUT = 900.0
MARKER = ".installed"


class InstallError(Exception):
    """A runner could not be installed; the message carries the command's output."""


def cache_root() -> str:
    return os.environ.get("CLLAMA_RUNNER_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "cllama_tx", "runners"
    )


def _node_package() -> str:
    """The npm package that ships Node's own binary for this machine."""
    arch = {"x86_64": "x64", "amd64": "x64", "aarch64": "arm64", "arm64": "arm64"}.get(platform.machine().lower())
    if arch is None:
        raise InstallError(f"no Node binary package for machine {platform.machine()!r}")
    return f"node-linux-{arch}"


@dataclass(frozen=True)
class NpmRunner:
    """
    A runner from the npm registry.  C{node} pins a Node release for runners
    whose engines need a newer Node than the machine's (it comes from the
    registry's C{node-linux-<arch>} package and runs npm and the runner).
    """

    name: str
    package: str
    version: str
    # The package's command, or None for a library driven by a script of ours
    # (the executable is then Node itself).
    bin: str | None
    extra: tuple[str, ...] = ()
    node: str | None = None

    @property
    def directory(self) -> str:
        return os.path.join(cache_root(), f"{self.name}-{self.version}")

    @property
    def executable(self) -> str:
        if self.bin is None:
            if self.node_bin_dir is not None:
                return os.path.join(self.node_bin_dir, "node")
            return shutil.which("node") or "node"
        return os.path.join(self.directory, "node_modules", ".bin", self.bin)

    @property
    def node_bin_dir(self) -> str | None:
        """The directory of the pinned Node binary, to put first on C{PATH}."""
        if self.node is None:
            return None
        return os.path.join(self.directory, "node", "node_modules", _node_package(), "bin")

    def commands(self) -> list[list[str]]:
        npm = shutil.which("npm")
        if npm is None:
            raise InstallError("npm is not on PATH: the npm runners need Node and npm")
        flags = ["--no-audit", "--no-fund", "--loglevel=warn"]
        steps = []
        if self.node is not None:
            steps.append([npm, "install", *flags, "--prefix", os.path.join(self.directory, "node"),
                          f"{_node_package()}@{self.node}"])
            # npm itself, and the packages' install scripts, run on the pinned Node.
            npm_cli = os.path.join(os.path.dirname(os.path.realpath(npm)), "npm-cli.js")
            npm = [os.path.join(self.node_bin_dir, "node"), npm_cli]
        else:
            npm = [npm]
        steps.append([*npm, "install", *flags, "--prefix", self.directory,
                      f"{self.package}@{self.version}", *self.extra])
        return steps

    def env(self) -> dict[str, str]:
        path = os.environ.get("PATH", "")
        if self.node_bin_dir is not None:
            path = self.node_bin_dir + os.pathsep + path
        return {**os.environ, "PATH": path}


@dataclass(frozen=True)
class PipRunner:
    """A runner from PyPI, in a virtual environment of its own."""

    name: str
    package: str
    version: str
    bin: str
    extra: tuple[str, ...] = ()
    python: str = field(default_factory=lambda: shutil.which("python3") or sys.executable)

    @property
    def directory(self) -> str:
        return os.path.join(cache_root(), f"{self.name}-{self.version}")

    @property
    def executable(self) -> str:
        return os.path.join(self.directory, "bin", self.bin)

    @property
    def node_bin_dir(self) -> None:
        return None

    def commands(self) -> list[list[str]]:
        pip = os.path.join(self.directory, "bin", "pip")
        return [
            [self.python, "-m", "venv", self.directory],
            [pip, "install", "-q", "--disable-pip-version-check", f"{self.package}=={self.version}", *self.extra],
        ]

    def env(self) -> dict[str, str]:
        return dict(os.environ)


Runner = NpmRunner | PipRunner


def ensure(runner: Runner) -> float:
    """
    Install C{runner} unless its cache directory is complete; return the
    seconds the install took (0 when reused).  Blocking: call it in a thread.
    """
    os.makedirs(cache_root(), exist_ok=True)
    marker = os.path.join(runner.directory, MARKER)
    with open(runner.directory + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(marker) and os.path.exists(runner.executable):
            return 0.0
        shutil.rmtree(runner.directory, ignore_errors=True)
        os.makedirs(runner.directory)
        started = time.monotonic()
        for command in runner.commands():
            try:
                done = subprocess.run(
                    command, env=runner.env(), stdin=subprocess.DEVNULL, capture_output=True,
                    timeout=INSTALL_TIMEOUT, cwd=runner.directory,
                )
            except subprocess.TimeoutExpired as e:
                raise InstallError(
                    f"installing {runner.name} {runner.version}: {' '.join(command)} did not finish in "
                    f"{INSTALL_TIMEOUT:.0f} s\n{_text(e.stdout)}\n{_text(e.stderr)}"
                ) from None
            if done.returncode != 0:
                raise InstallError(
                    f"installing {runner.name} {runner.version}: {' '.join(command)} exited {done.returncode}\n"
                    f"{_text(done.stdout)[-4000:]}\n{_text(done.stderr)[-4000:]}"
                )
        if not os.path.exists(runner.executable):
            raise InstallError(f"installing {runner.name} {runner.version}: no {runner.executable} afterwards")
        elapsed = time.monotonic() - started
        with open(marker, "w") as f:
            f.write(f"{runner.package}=={runner.version} installed in {elapsed:.1f} s\n")
        return elapsed


def _text(data) -> str:
    if data is None:
        return ""
    return data.decode("utf-8", "replace") if isinstance(data, bytes) else data


# The runners, pinned.
CLAUDE_CODE = NpmRunner("claude-code", "@anthropic-ai/claude-code", "2.1.337", "claude")
OPENCODE = NpmRunner("opencode", "opencode-ai", "1.18.33", "opencode")
# OpenClaw's engines want Node >= 24.16 (its install script refuses older ones).
OPENCLAW = NpmRunner("openclaw", "openclaw", "2026.9.6", "openclaw", node="24.22.3")
AIDER = PipRunner("aider", "aider-chat", "0.86.2", "aider")
# Libraries, driven by the scripts in tests/runners/scripts/.
# The AI SDK's engines want Node >= 22.
AI_SDK = NpmRunner(
    "ai-sdk", "ai", "7.0.185", None, extra=("@ai-sdk/openai@4.0.126", "@ai-sdk/anthropic@4.0.112"), node="24.22.3"
)
LANGCHAIN = PipRunner("langchain", "langchain-openai", "1.8.1", "python", extra=("langchain-anthropic==1.7.10",))
# Codex CLI: a Node launcher and a native binary (its platform's optional package).
CODEX = NpmRunner("codex", "@openai/codex", "0.171.0", "codex")
