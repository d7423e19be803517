"""Test certificates made with trustme: a CA, server certificates (good, wrong host, untrusted)
and client certificates for mutual TLS, written as PEM files clients such as curl can use."""

from __future__ import annotations

import datetime
from pathlib import Path

import attrs
import trustme
from twisted.internet.ssl import Certificate, CertificateOptions, PrivateCertificate

__all__ = ["Certs", "ServerTLS", "make_certs"]

SERVER_NAMES = ("127.0.0.1", "::1", "localhost")


@attrs.frozen
class ServerTLS:
    """What an HTTPS upstream presents: its key and certificate, and optionally the CA whose
    client certificates it requires (mutual TLS)."""

    key_and_cert_pem: bytes
    client_ca_pem: bytes | None = None

    def requiring_client_cert(self, client_ca_pem: bytes) -> ServerTLS:
        """The same server identity, but refusing clients without a certificate from
        ``client_ca_pem``."""
        return attrs.evolve(self, client_ca_pem=client_ca_pem)

    def options(self) -> CertificateOptions:
        """Twisted server TLS options for this configuration."""
        identity = PrivateCertificate.loadPEM(self.key_and_cert_pem)
        if self.client_ca_pem is None:
            return identity.options()
        return identity.options(Certificate.loadPEM(self.client_ca_pem))


@attrs.frozen
class Certs:
    """A trustme CA and everything issued from it, with PEM files under ``folder``.

    * ``ca_pem``: the CA bundle a client must trust (curl ``--cacert``).
    * ``server``: valid for 127.0.0.1, ::1 and localhost, signed by the CA.
    * ``wrong_host``: signed by the CA but only for ``wrong.invalid`` (hostname mismatch).
    * ``untrusted``: valid names, signed by another CA that nobody trusts.
    * ``expired``: valid names, signed by the CA, but expired yesterday.
    * ``client_cert``/``client_key`` (and ``client_pem`` with both): a client certificate
      from the CA, accepted by ``server.requiring_client_cert(ca.cert_pem.bytes())``.
    * ``untrusted_client_cert``/``untrusted_client_key``: a client certificate from the
      untrusted CA, which such a server refuses.
    """

    folder: Path
    ca: trustme.CA
    ca_pem: Path
    server: ServerTLS
    wrong_host: ServerTLS
    untrusted: ServerTLS
    expired: ServerTLS
    client_cert: Path
    client_key: Path
    client_pem: Path
    untrusted_client_cert: Path
    untrusted_client_key: Path

    @property
    def ca_pem_bytes(self) -> bytes:
        return self.ca.cert_pem.bytes()

    def server_tls(self, require_client_cert: bool = False) -> ServerTLS:
        """The valid server identity, optionally requiring a client certificate from the CA."""
        if require_client_cert:
            return self.server.requiring_client_cert(self.ca_pem_bytes)
        return self.server


def _server(cert: trustme.LeafCert) -> ServerTLS:
    return ServerTLS(cert.private_key_and_cert_chain_pem.bytes())


def make_certs(folder: Path) -> Certs:
    """Create a CA and its certificates, writing the PEM files into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    now, day = datetime.datetime.now(datetime.UTC), datetime.timedelta(days=1)
    ca = trustme.CA()
    other_ca = trustme.CA()
    ca_pem = folder / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    client = ca.issue_cert("client@example.org", common_name="test client")
    client_cert, client_key, client_pem = (
        folder / "client-cert.pem",
        folder / "client-key.pem",
        folder / "client.pem",
    )
    client.cert_chain_pems[0].write_to_path(str(client_cert))
    client.private_key_pem.write_to_path(str(client_key))
    client.private_key_and_cert_chain_pem.write_to_path(str(client_pem))
    stranger = other_ca.issue_cert("stranger@example.org", common_name="untrusted client")
    untrusted_client_cert = folder / "untrusted-client-cert.pem"
    untrusted_client_key = folder / "untrusted-client-key.pem"
    stranger.cert_chain_pems[0].write_to_path(str(untrusted_client_cert))
    stranger.private_key_pem.write_to_path(str(untrusted_client_key))
    return Certs(
        folder=folder,
        ca=ca,
        ca_pem=ca_pem,
        server=_server(ca.issue_cert(*SERVER_NAMES)),
        wrong_host=_server(ca.issue_cert("wrong.invalid")),
        untrusted=_server(other_ca.issue_cert(*SERVER_NAMES)),
        expired=_server(
            ca.issue_cert(*SERVER_NAMES, not_before=now - day * 2, not_after=now - day)
        ),
        client_cert=client_cert,
        client_key=client_key,
        client_pem=client_pem,
        untrusted_client_cert=untrusted_client_cert,
        untrusted_client_key=untrusted_client_key,
    )
