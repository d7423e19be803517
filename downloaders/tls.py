"""TLS for a remote: which certificates to trust, which client certificate to show, and whether
to verify at all. One `RemoteTLSPolicy` (an ``IPolicyForHTTPS``) per remote.

* Default: the system's trust store (``platformTrust``), hostname checked by service_identity.
* ``ca_cert``: every certificate of the PEM bundle is trusted (Twisted's ``Certificate.loadPEM``
  reads only the first one, so the bundle is parsed with ``cryptography``).
* ``client_cert``/``client_key``: presented when the server asks for one.
* ``tls_validation=False``: no chain or hostname check, said explicitly; SNI is still sent so
  virtual hosts keep working.
"""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet._sslverify import IOpenSSLTrustRoot
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from downloaders.settings import load_certificates, load_private_key

__all__ = ["RemoteTLSPolicy", "trust_root_from_bundle"]


def _twisted_certificate(certificate: Any) -> ssl.Certificate:
    return ssl.Certificate(crypto.X509.from_cryptography(certificate))


def trust_root_from_bundle(path: str, setting: str = "ca_cert") -> IOpenSSLTrustRoot:
    """A trust root holding every certificate of the PEM bundle at ``path``."""
    return ssl.trustRootFromCertificates(
        [_twisted_certificate(c) for c in load_certificates(setting, path)]
    )


def _client_identity(cert_path: str, key_path: str) -> tuple[ssl.PrivateCertificate, list]:
    """The client certificate with its key, and any further (intermediate) certificates."""
    certificates = load_certificates("client_cert", cert_path)
    key = load_private_key("client_key" if key_path else "client_cert", key_path or cert_path)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    leaf_pem = certificates[0].public_bytes(serialization.Encoding.PEM)
    identity = ssl.PrivateCertificate.loadPEM(leaf_pem + key_pem)
    chain = [_twisted_certificate(c).original for c in certificates[1:]]
    return identity, chain


@implementer(IOpenSSLClientConnectionCreator)
class _UnverifiedClientTLS:
    """Connections that check nothing about the server, but still send SNI for DNS names."""

    def __init__(self, options: ssl.CertificateOptions, hostname: str) -> None:
        self._options = options
        is_ip = isIPAddress(hostname) or isIPv6Address(hostname)
        self._server_name = None if is_ip else hostname.encode("idna")

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self._options.getContext(), None)
        connection.set_app_data(tlsProtocol)
        if self._server_name is not None:
            connection.set_tlsext_host_name(self._server_name)
        return connection


@implementer(IPolicyForHTTPS)
class RemoteTLSPolicy:
    """Client TLS for one remote (see the module docstring); builds from `RemoteSettings`."""

    def __init__(
        self,
        trust_root: IOpenSSLTrustRoot | None = None,
        client_certificate: ssl.PrivateCertificate | None = None,
        extra_chain: list | None = None,
        verify: bool = True,
    ) -> None:
        self.trust_root = trust_root if trust_root is not None else ssl.platformTrust()
        self.client_certificate = client_certificate
        self.extra_chain = extra_chain or []
        self.verify = verify
        self._unverified_options: ssl.CertificateOptions | None = None

    @classmethod
    def from_settings(cls, settings: Any) -> RemoteTLSPolicy:
        trust_root = trust_root_from_bundle(settings.ca_cert) if settings.ca_cert else None
        identity, chain = None, None
        if settings.client_cert:
            identity, chain = _client_identity(settings.client_cert, settings.client_key)
        return cls(trust_root, identity, chain, verify=settings.tls_validation)

    def _client_options(self) -> dict[str, Any]:
        if self.client_certificate is None:
            return {}
        return {
            "privateKey": self.client_certificate.privateKey.original,
            "certificate": self.client_certificate.original,
            "extraCertChain": self.extra_chain,
        }

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        name = hostname.decode("ascii") if isinstance(hostname, bytes) else hostname
        if not self.verify:
            if self._unverified_options is None:
                self._unverified_options = ssl.CertificateOptions(
                    verify=False, **self._client_options()
                )
            return _UnverifiedClientTLS(self._unverified_options, name)
        extra = {"extraCertChain": self.extra_chain} if self.extra_chain else None
        return ssl.optionsForClientTLS(
            name,
            trustRoot=self.trust_root,
            clientCertificate=self.client_certificate,
            extraCertificateOptions=extra,
        )
