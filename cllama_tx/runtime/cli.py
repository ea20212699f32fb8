"""
The `cllama-tx` command.

`cllama-tx --healthcheck` (or the Go spelling `-healthcheck`) probes the API
of a running daemon for Docker and compose health checks; `cllama-tx migrate`
brings the configured database's schema up to date (PostgreSQL named by
CLLAMA_DATABASE_URL or DATABASE_URL, else the state directory's SQLite file)
and prints its version, for a deployment step before the daemons start;
anything else runs the daemon in the foreground, exactly like
`twistd -n cllama ...`.
"""

from __future__ import annotations

import os
import ssl
import sys
import urllib.error
import urllib.request

from cllama_tx.runtime.config import (
    DEFAULT_API_ADDR,
    default_state_dir,
    endpoint_port,
    listen_endpoint,
)
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


def migrate(env=None, out=None, err=None) -> int:
    """
    C{cllama-tx migrate}: 0 once the schema is up to date (its version
    printed), 2 for a database URL that cannot be used, 1 when the database
    cannot be reached or is newer than this cllama_tx.  Never prints a
    password.
    """
    from cllama_tx.store.backends import DatabaseConfigError, migrate_database

    env = os.environ if env is None else env
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    try:
        where, version = migrate_database(env, default_state_dir(env))
    except DatabaseConfigError as e:
        print(f"cllama-tx migrate: {e}", file=err)
        return 2
    except Exception as e:
        print(f"cllama-tx migrate: {e}", file=err)
        return 1
    print(f"{where}: schema version {version}", file=out)
    return 0


def openrouter_prices(args: list[str], env=None, out=None, err=None) -> int:
    """
    C{cllama-tx openrouter-prices [--url URL] [--output FILE]}: fetch
    OpenRouter's published prices (C{OPENROUTER_BASE_URL}/models, else its
    public API) and write them where the daemon reads them
    (C{CLLAMA_OPENROUTER_PRICES_FILE}, else the state directory); a running
    daemon picks them up within 30 s.  0 on success, 2 for bad arguments,
    1 when the prices could not be fetched or written.
    """
    from cllama_tx.accounting import openrouter_prices as prices

    env = os.environ if env is None else env
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    options = {"--url": prices.models_url(env), "--output": prices.default_path(env, default_state_dir(env))}
    rest = list(args)
    while rest:
        name = rest.pop(0)
        if name not in options or not rest:
            print("usage: cllama-tx openrouter-prices [--url URL] [--output FILE]", file=err)
            return 2
        options[name] = rest.pop(0)
    try:
        count = prices.refresh(options["--url"], options["--output"])
    except (prices.RefreshError, ValueError) as e:
        print(f"cllama-tx openrouter-prices: {e}", file=err)
        return 1
    print(f"{options['--output']}: {count} OpenRouter model prices from {options['--url']}", file=out)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("--healthcheck", "-healthcheck"):
        return healthcheck(health_url())
    if args and args[0] == "migrate":
        if len(args) > 1:
            print("cllama-tx migrate takes no arguments: it reads the environment", file=sys.stderr)
            return 2
        return migrate()
    if args and args[0] == "openrouter-prices":
        return openrouter_prices(args[1:])
    from twisted.scripts.twistd import run

    # In the foreground a pid file is only litter (and fails on a read-only
    # working directory, as in a container).
    sys.argv = ["twistd", "--nodaemon", "--pidfile=", "cllama", *args]
    run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
