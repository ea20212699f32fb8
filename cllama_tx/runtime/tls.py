"""
TLS towards the providers: which certificates the upstream client trusts
(how a failed handshake is described to the agent is
L{cllama_tx.pipeline.tls_failures}).

The daemon always verifies upstream certificates (chain and hostname, the
latter with C{service_identity}).  By default it trusts the platform's CA
store; an operator running a provider behind a private CA (a corporate
gateway, a self-hosted model server) adds that CA with
C{CLLAMA_UPSTREAM_CA_FILE} / C{--upstream-ca-file}: a PEM file of one or more
certificates that are trusted I{in addition to} the platform store.
"""

from __future__ import annotations

from cryptography import x509
from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.web.client import BrowserLikePolicyForHTTPS
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from cllama_tx.pipeline.tls_failures import CA_FILE_ENV
from cllama_tx.runtime.errors import ConfigError
from cllama_tx.runtime.twisted_private import TrustRootUnavailable, platform_trust_plus


class UpstreamCAError(ConfigError):
    """The operator CA bundle cannot be used; the message says why."""


def load_ca_certificates(path: str) -> list[x509.Certificate]:
    """
    Every certificate of the PEM bundle at C{path}.

    @raise UpstreamCAError: the file is unreadable, holds no certificate, or
        a certificate in it does not parse.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UpstreamCAError(f"{CA_FILE_ENV}: cannot read {path!r}: {e.strerror or e}") from None
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise UpstreamCAError(f"{CA_FILE_ENV}: {path!r} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise UpstreamCAError(f"{CA_FILE_ENV}: {path!r} is not a valid PEM certificate bundle: {e}") from None
    return certificates


def _adder(extra: list[x509.Certificate]):
    """What adds C{extra} to an OpenSSL context's trust store (after the platform's CAs)."""
    certs = [crypto.X509.from_cryptography(cert) for cert in extra]

    def add(context: SSL.Context) -> None:
        store = context.get_cert_store()
        if store is None:
            raise SSL.Error("this TLS context has no certificate store to add CLLAMA_UPSTREAM_CA_FILE to")
        for cert in certs:
            try:
                store.add_cert(cert)
            except crypto.Error:
                pass  # already in the store (the same CA in both places)

    return add


@implementer(IPolicyForHTTPS)
class UpstreamTLSPolicy:
    """
    Verifies the chain against the platform store plus the operator's CAs and
    the hostname with service_identity (what L{BrowserLikePolicyForHTTPS}
    does, with a wider trust root).
    """

    def __init__(self, extra: list[x509.Certificate]) -> None:
        self.extra_count = len(extra)
        try:
            self._trust = platform_trust_plus(_adder(extra))
        except TrustRootUnavailable as e:
            raise UpstreamCAError(f"{CA_FILE_ENV}: {e}") from None

    def creatorForNetloc(self, hostname: bytes, port: int):
        return ssl.optionsForClientTLS(hostname.decode("ascii"), trustRoot=self._trust)


def upstream_tls_policy(extra_ca_file: str | None) -> IPolicyForHTTPS:
    """
    The upstream client's TLS policy: the platform trust store, plus the
    certificates of C{extra_ca_file} when given.

    @raise UpstreamCAError: C{extra_ca_file} is unreadable or invalid (so the
        daemon stops at start-up instead of failing every request).
    """
    if not extra_ca_file:
        return BrowserLikePolicyForHTTPS()
    return UpstreamTLSPolicy(load_ca_certificates(extra_ca_file))


__all__ = [
    "CA_FILE_ENV",
    "UpstreamCAError",
    "UpstreamTLSPolicy",
    "load_ca_certificates",
    "upstream_tls_policy",
]
