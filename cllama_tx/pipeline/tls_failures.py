"""
How a failed connection to a provider is described to the agent: short,
secret-free, and for a failed TLS handshake naming the setting that fixes a
private CA.
"""

from __future__ import annotations

from OpenSSL import SSL
from service_identity import VerificationError

CA_FILE_ENV = "CLLAMA_UPSTREAM_CA_FILE"


def _ssl_reasons(error: BaseException) -> list[str]:
    """The reason strings of an OpenSSL error ('certificate verify failed')."""
    reasons = []
    for item in getattr(error, "args", ())[:1]:
        if isinstance(item, list):
            for entry in item:
                if isinstance(entry, tuple) and entry:
                    reasons.append(str(entry[-1]))
    return reasons


def describe_tls_failure(error: BaseException) -> str | None:
    """
    A short, secret-free description of a TLS failure for a 502 message, or
    L{None} when C{error} (or the first of its C{reasons}) is not one.
    """
    reasons = getattr(error, "reasons", None)
    if reasons:
        error = reasons[0].value
    if isinstance(error, VerificationError):
        names = []
        for mismatch in getattr(error, "errors", ()):
            wanted = getattr(getattr(mismatch, "mismatched_id", None), "hostname", None)
            if wanted is None:
                wanted = getattr(getattr(mismatch, "mismatched_id", None), "ip", None)
            if isinstance(wanted, bytes):
                wanted = wanted.decode("ascii", "replace")
            if wanted is not None:
                names.append(str(wanted))
        target = f" {names[0]!r}" if names else ""
        return f"TLS hostname mismatch: the provider's certificate is not valid for{target}"
    if isinstance(error, SSL.Error):
        texts = _ssl_reasons(error)
        if any("certificate verify failed" in t for t in texts):
            return (
                "TLS certificate verify failed: the provider's certificate chain is not "
                "trusted (unknown or private CA, expired or self-signed certificate; "
                f"a private CA can be added with {CA_FILE_ENV})"
            )
        detail = ", ".join(t for t in texts if t) or error.__class__.__name__
        return f"TLS handshake failed: {detail}"
    return None


__all__ = ["CA_FILE_ENV", "describe_tls_failure"]


def describe_failure(error: BaseException) -> str:
    """A short, secret-free description of a transport failure."""
    tls = describe_tls_failure(error)
    if tls is not None:
        return tls
    reasons = getattr(error, "reasons", None)
    if reasons:
        error = reasons[0].value
    text = error.__class__.__name__
    detail = str(error).strip()
    if detail and len(detail) < 200:
        text += f": {detail}"
    return text
