"""
TLS on both sides: the daemon's own sites on C{ssl:} endpoints, and the
upstream client against an HTTPS provider signed by a private CA.

Every certificate is generated here with C{cryptography}.
"""

import datetime
import ipaddress
import os

import attrs
import treq
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet import defer, reactor, ssl
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool, ResponseFailed, ResponseNeverReceived

from cllama_tx.pipeline.tls_failures import describe_tls_failure
from cllama_tx.runtime.config import Config, ConfigError
from cllama_tx.runtime.tls import (
    UpstreamCAError,
    UpstreamTLSPolicy,
    load_ca_certificates,
    upstream_tls_policy,
)
from cllama_tx.runtime.upstream import UpstreamClient
from tests import support
from tests.runtime.test_daemon import spawn_daemon
from tests.support import AGENT, PROVIDER_KEY, SECRET, ProxyHarness, chat_body, write_agent


def _name(common_name):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key):
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_ca(common_name="cllama test CA"):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def make_server_cert(ca_key, ca_cert, dns_names=("localhost",), ips=("127.0.0.1",)):
    """(cert PEM, key PEM) of a server certificate signed by the CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    names = [x509.DNSName(n) for n in dns_names] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(dns_names[0] if dns_names else "server"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


class Certificates:
    """A CA, a good server certificate and a wrong-hostname one, on disk."""

    def __init__(self, directory):
        os.makedirs(directory, exist_ok=True)
        self.directory = directory
        self.ca_key, self.ca_cert = make_ca()
        other_key, other_cert = make_ca("some other CA")
        self.ca_pem = self.ca_cert.public_bytes(serialization.Encoding.PEM)
        self.other_ca_pem = other_cert.public_bytes(serialization.Encoding.PEM)
        self.ca_file = self._write("ca.pem", self.ca_pem)
        # A bundle as operators have them: several certificates in one file.
        self.bundle_file = self._write("bundle.pem", self.other_ca_pem + self.ca_pem)
        self.server_cert, self.server_key = make_server_cert(self.ca_key, self.ca_cert)
        self.server_cert_file = self._write("server.pem", self.server_cert)
        self.server_key_file = self._write("server.key", self.server_key)
        self.wrong_cert, self.wrong_key = make_server_cert(
            self.ca_key, self.ca_cert, dns_names=("wrong.example",), ips=()
        )

    def _write(self, name, data):
        path = os.path.join(self.directory, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def server_options(self, wrong=False):
        cert, key = (self.wrong_cert, self.wrong_key) if wrong else (self.server_cert, self.server_key)
        return ssl.PrivateCertificate.loadPEM(cert + key).options()


def _https_client(testcase, policy):
    pool = HTTPConnectionPool(reactor, persistent=False)
    testcase.addCleanup(pool.closeCachedConnections)
    kwargs = {"pool": pool}
    if policy is not None:
        kwargs["contextFactory"] = policy
    return treq.client.HTTPClient(Agent(reactor, **kwargs))


class PolicyTests(TestCase):
    """Loading the operator CA bundle and describing failures."""

    def setUp(self):
        self.certs = Certificates(os.path.abspath(self.mktemp()))

    def test_no_file_is_the_platform_store(self):
        from twisted.web.client import BrowserLikePolicyForHTTPS

        self.assertIsInstance(upstream_tls_policy(None), BrowserLikePolicyForHTTPS)
        self.assertIsInstance(upstream_tls_policy(""), BrowserLikePolicyForHTTPS)

    def test_bundle_of_several_certificates(self):
        self.assertEqual(len(load_ca_certificates(self.certs.bundle_file)), 2)
        policy = upstream_tls_policy(self.certs.bundle_file)
        self.assertIsInstance(policy, UpstreamTLSPolicy)
        self.assertEqual(policy.extra_count, 2)

    def test_missing_file(self):
        missing = os.path.join(self.certs.directory, "nope.pem")
        e = self.assertRaises(UpstreamCAError, upstream_tls_policy, missing)
        self.assertIsInstance(e, ConfigError)
        self.assertIn("CLLAMA_UPSTREAM_CA_FILE", str(e))
        self.assertIn("cannot read", str(e))

    def test_not_pem(self):
        path = self.certs._write("junk.pem", b"hello, not a certificate\n")
        e = self.assertRaises(UpstreamCAError, upstream_tls_policy, path)
        self.assertIn("no PEM certificate", str(e))

    def test_corrupt_pem(self):
        path = self.certs._write(
            "bad.pem", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
        )
        e = self.assertRaises(UpstreamCAError, upstream_tls_policy, path)
        self.assertIn("not a valid PEM certificate bundle", str(e))

    def test_private_key_is_not_read_out(self):
        """An operator who points at a key by mistake gets no key material back."""
        e = self.assertRaises(UpstreamCAError, upstream_tls_policy, self.certs.server_key_file)
        self.assertNotIn("PRIVATE KEY", str(e))

    def test_describe_verify_failed(self):
        error = SSL.Error([("SSL routines", "", "certificate verify failed")])
        text = describe_tls_failure(ResponseNeverReceived([_failure(error)]))
        self.assertIn("certificate verify failed", text)
        self.assertIn("CLLAMA_UPSTREAM_CA_FILE", text)

    def test_describe_other(self):
        self.assertIsNone(describe_tls_failure(ConnectionRefusedError("refused")))
        text = describe_tls_failure(SSL.Error([("SSL routines", "", "wrong version number")]))
        self.assertEqual(text, "TLS handshake failed: wrong version number")


def _failure(error):
    from twisted.python.failure import Failure

    return Failure(error)


class UpstreamTLSTests(TestCase):
    """The proxy in front of an HTTPS fake provider signed by a private CA."""

    timeout = 30

    def setUp(self):
        self.certs = Certificates(os.path.abspath(self.mktemp()))

    @defer.inlineCallbacks
    def proxy(self, policy, wrong=False):
        from cllama_tx.testing import FakeProvider

        # A second fake behind TLS: the harness's own fake stays on plain TCP
        # and unused; this one answers on https://localhost:<port>/v1.
        fake = FakeProvider(reactor)
        yield fake.start()
        self.addCleanup(fake.stop)
        tls_port = reactor.listenSSL(0, fake._factory, self.certs.server_options(wrong), interface="127.0.0.1")
        self.addCleanup(tls_port.stopListening)
        # ProxyHarness builds its own UpstreamClient; give it this policy
        # (works whether or not the harness takes a tls_policy argument).
        self.patch(
            support, "UpstreamClient",
            lambda reactor, connect_timeout, **_: UpstreamClient(reactor, connect_timeout, tls_policy=policy),
        )
        h = ProxyHarness(self, env={"OPENAI_BASE_URL": f"https://localhost:{tls_port.getHost().port}/v1"})
        yield h.start()
        return h, fake

    @defer.inlineCallbacks
    def test_private_ca_trusted(self):
        h, fake = yield self.proxy(upstream_tls_policy(self.certs.bundle_file))
        response = yield h.chat(chat_body())
        body = yield response.json()
        self.assertEqual(response.code, 200, body)
        self.assertEqual(body["object"], "chat.completion")
        self.assertTrue(body["choices"][0]["message"]["content"])
        self.assertEqual(len(fake.received), 1)

    @defer.inlineCallbacks
    def test_unknown_ca_is_502(self):
        h, fake = yield self.proxy(upstream_tls_policy(None))
        response = yield h.chat(chat_body())
        body = yield response.json()
        self.assertEqual(response.code, 502, body)
        message = body["error"]["message"]
        self.assertIn("certificate verif", message)
        self.assertNotIn(PROVIDER_KEY, message)
        self.assertEqual(len(fake.received), 0)

    @defer.inlineCallbacks
    def test_wrong_hostname_is_502(self):
        h, fake = yield self.proxy(upstream_tls_policy(self.certs.ca_file), wrong=True)
        response = yield h.chat(chat_body())
        body = yield response.json()
        self.assertEqual(response.code, 502, body)
        message = body["error"]["message"]
        self.assertIn("hostname", message.lower())
        self.assertIn("localhost", message)
        self.assertEqual(len(fake.received), 0)

    @defer.inlineCallbacks
    def test_streaming_through_private_ca(self):
        h, fake = yield self.proxy(upstream_tls_policy(self.certs.ca_file))
        response = yield h.chat(chat_body(stream=True))
        text = (yield response.content()).decode()
        self.assertEqual(response.code, 200, text)
        self.assertIn("data: [DONE]", text)


class DaemonTLSListenTests(TestCase):
    """`twistd -n cllama` with both sites on ssl: endpoints."""

    timeout = 60

    @defer.inlineCallbacks
    def test_both_sites_over_https(self):
        certs = Certificates(os.path.abspath(self.mktemp()))
        base = os.path.abspath(self.mktemp())
        context_root = os.path.join(base, "context")
        auth_dir = os.path.join(base, "auth")
        os.makedirs(auth_dir)
        write_agent(context_root, AGENT, SECRET)
        keys = f"privateKey={certs.server_key_file}:certKey={certs.server_cert_file}"
        process, _ = spawn_daemon(self, {
            "LISTEN_ADDR": f"ssl:0:interface=127.0.0.1:{keys}",
            "UI_ADDR": f"ssl:port=0:interface=127.0.0.1:{keys}",
            "CLAW_CONTEXT_ROOT": context_root,
            "CLAW_AUTH_DIR": auth_dir,
            "OPENAI_API_KEY": PROVIDER_KEY,
            "OPENAI_BASE_URL": "https://localhost:1/v1",
            "CLLAMA_UI_TOKEN": "ui-token-never-logged-77",
            "CLLAMA_STATE_DIR": os.path.join(base, "state"),
        })
        ports = yield process.ready
        http = _https_client(self, upstream_tls_policy(certs.ca_file))
        for kind in ("API", "UI"):
            response = yield http.get(f"https://localhost:{ports[kind]}/health")
            self.assertEqual(response.code, 200)
            self.assertEqual((yield response.json()), {"ok": True})
        # Plain HTTP on a TLS port is refused, not served.
        plain = _https_client(self, None)
        with self.assertRaises(ResponseFailed):  # the TLS side closes: no HTTP response
            yield plain.get(f"http://127.0.0.1:{ports['API']}/health")
        # A client that does not trust the CA cannot talk to it.
        untrusting = _https_client(self, upstream_tls_policy(None))
        with self.assertRaises(ResponseNeverReceived):
            yield untrusting.get(f"https://localhost:{ports['API']}/health")


class DescribeRealFailuresTests(TestCase):
    """describe_tls_failure on what the upstream client really raises."""

    timeout = 30

    @defer.inlineCallbacks
    def failure_of(self, policy, wrong=False):
        from twisted.web.http_headers import Headers

        from cllama_tx.testing import FakeProvider

        certs = Certificates(os.path.abspath(self.mktemp()))
        fake = FakeProvider(reactor)
        yield fake.start()
        self.addCleanup(fake.stop)
        port = reactor.listenSSL(0, fake._factory, certs.server_options(wrong), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = UpstreamClient(reactor, 5.0, tls_policy=policy(certs))
        self.addCleanup(client.close)
        url = f"https://localhost:{port.getHost().port}/v1/models".encode()
        try:
            yield client.request(b"GET", url, Headers(), None)
        except Exception as e:
            return e
        self.fail("the request succeeded")

    @defer.inlineCallbacks
    def test_unknown_ca(self):
        error = yield self.failure_of(lambda certs: upstream_tls_policy(None))
        text = describe_tls_failure(error)
        self.assertTrue(text.startswith("TLS certificate verify failed: "), text)

    @defer.inlineCallbacks
    def test_wrong_hostname(self):
        error = yield self.failure_of(lambda certs: upstream_tls_policy(certs.ca_file), wrong=True)
        self.assertEqual(
            describe_tls_failure(error),
            "TLS hostname mismatch: the provider's certificate is not valid for 'localhost'",
        )


_WIRED = "upstream_ca_file" in attrs.fields_dict(Config)


class DaemonUpstreamCATests(TestCase):
    """CLLAMA_UPSTREAM_CA_FILE end to end (needs the config/daemon wiring)."""

    timeout = 60
    if not _WIRED:
        skip = "CLLAMA_UPSTREAM_CA_FILE is not wired into Config/daemon yet"

    @defer.inlineCallbacks
    def daemon(self, ca_file):
        from cllama_tx.testing import FakeProvider

        self.certs = Certificates(os.path.abspath(self.mktemp()))
        fake = FakeProvider(reactor)
        yield fake.start()
        self.addCleanup(fake.stop)
        tls_port = reactor.listenSSL(0, fake._factory, self.certs.server_options(), interface="127.0.0.1")
        self.addCleanup(tls_port.stopListening)
        base = os.path.abspath(self.mktemp())
        auth_dir = os.path.join(base, "auth")
        os.makedirs(auth_dir)
        write_agent(os.path.join(base, "context"), AGENT, SECRET)
        env = {
            "LISTEN_ADDR": "tcp:0:interface=127.0.0.1",
            "UI_ADDR": "127.0.0.1:0",
            "CLAW_CONTEXT_ROOT": os.path.join(base, "context"),
            "CLAW_AUTH_DIR": auth_dir,
            "OPENAI_API_KEY": PROVIDER_KEY,
            "OPENAI_BASE_URL": f"https://localhost:{tls_port.getHost().port}/v1",
            "CLLAMA_UI_TOKEN": "ui-token-never-logged-77",
            "CLLAMA_STATE_DIR": os.path.join(base, "state"),
            "CLLAMA_UPSTREAM_CA_FILE": ca_file(self.certs),
        }
        process, _ = spawn_daemon(self, env)
        return process

    @defer.inlineCallbacks
    def test_daemon_trusts_the_operator_ca(self):
        process = yield self.daemon(lambda certs: certs.bundle_file)
        ports = yield process.ready
        http = _https_client(self, None)
        response = yield http.post(
            f"http://127.0.0.1:{ports['API']}/v1/chat/completions",
            json=chat_body(),
            headers={"Authorization": [f"Bearer {AGENT}:{SECRET}"]},
        )
        body = yield response.json()
        self.assertEqual(response.code, 200, body)
        self.assertEqual(body["object"], "chat.completion")

    @defer.inlineCallbacks
    def test_bad_ca_file_stops_the_start(self):
        process = yield self.daemon(lambda certs: os.path.join(certs.directory, "missing.pem"))
        with self.assertRaises(RuntimeError):
            yield process.ready
        yield process.ended
        # twistd prints a usage error (with the options help) and exits.
        output = process.stdout + process.stderr
        self.assertIn(b"CLLAMA_UPSTREAM_CA_FILE: cannot read", output)
        self.assertIn(b"No such file or directory", output)
