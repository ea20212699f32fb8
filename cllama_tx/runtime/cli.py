"""
The `cllama-tx` command.

`cllama-tx --healthcheck` (or the Go spelling `-healthcheck`) probes the API
of a running daemon for Docker and compose health checks; anything else runs
the daemon in the foreground, exactly like `twistd -n cllama ...`.
"""

from __future__ import annotations

import os
import ssl
import sys
import urllib.error
import urllib.request

from cllama_tx.runtime.config import DEFAULT_API_ADDR, endpoint_port, listen_endpoint
from cllama_tx.runtime.errors import ConfigError

HEALTHCHECK_TIMEOUT = 3.0


def health_url(env=None) -> str:
    """The loopback URL of the API's /health, from LISTEN_ADDR (https for ssl:)."""
    env = os.environ if env is None else env
    try:
        endpoint = listen_endpoint(env.get("LISTEN_ADDR") or DEFAULT_API_ADDR)
        port = endpoint_port(endpoint)
    except ConfigError:
        endpoint, port = "", None
    scheme = "https" if endpoint.startswith("ssl:") else "http"
    return f"{scheme}://127.0.0.1:{port or 8080}/health"


def healthcheck(url: str, timeout: float = HEALTHCHECK_TIMEOUT) -> int:
    """
    0 when C{url} answers 200 within C{timeout} seconds, else 1.  Over TLS
    the certificate is not checked: this probes our own loopback port, whose
    certificate names the public host, not 127.0.0.1.
    """
    context = None
    if url.startswith("https:"):
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as response:
            ok = response.status == 200
    except (urllib.error.URLError, OSError, ValueError) as e:
        print(f"unhealthy: {e}", file=sys.stderr)
        return 1
    if not ok:
        print(f"unhealthy: status {response.status}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("--healthcheck", "-healthcheck"):
        return healthcheck(health_url())
    from twisted.scripts.twistd import run

    # In the foreground a pid file is only litter (and fails on a read-only
    # working directory, as in a container).
    sys.argv = ["twistd", "--nodaemon", "--pidfile=", "cllama", *args]
    run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
