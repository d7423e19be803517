"""TLS through DownloaderFactory against real loopback HTTPS servers with trustme certificates."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import trustme
from twisted.internet import ssl

from downloaders import ConnectionFailed, DownloaderFactory, RemoteSettings
from tests.support.certs import Certs, ServerTLS
from tests.support.faults import Serve

#: Every test here runs over both HTTP clients (see tests.support.fixtures.http_client).
pytestmark = pytest.mark.usefixtures("http_client")

BODY = b"tls body\n" * 100
SHA256 = hashlib.sha256(BODY).hexdigest()


class SniRecordingTLS:
    """Server TLS options (like `ServerTLS`) that record the SNI name of every handshake."""

    def __init__(self, server: ServerTLS) -> None:
        self._server = server
        self.names: list[bytes | None] = []

    def options(self) -> ssl.CertificateOptions:
        options = self._server.options()
        options.getContext().set_tlsext_servername_callback(
            lambda connection: self.names.append(connection.get_servername())
        )
        return options


def remote_for(url: str, **kwargs: Any) -> RemoteSettings:
    return RemoteSettings(url=url, max_retries=0, **kwargs)


async def download(remote: RemoteSettings, url: str, tmp_path: Path) -> Any:
    factory = DownloaderFactory(remote, temp_dir=str(tmp_path))
    try:
        return await factory.build(url, expected_digests={"sha256": SHA256}).run()
    finally:
        await factory.close()


async def refused(remote: RemoteSettings, url: str, tmp_path: Path) -> ConnectionFailed:
    with pytest.raises(ConnectionFailed) as caught:
        await download(remote, url, tmp_path)
    # A handshake failure, or service_identity's hostname/IP mismatch after it.
    assert "TLS" in str(caught.value) or "Mismatch" in str(caught.value)
    assert list(tmp_path.iterdir()) == []
    return caught.value


@pytest_twisted.ensureDeferred
async def test_unknown_ca_refused_by_system_trust(upstream_factory, certs: Certs, tmp_path):
    server = upstream_factory(tls=certs.server)
    url = server.register("/f", Serve(BODY))
    await refused(remote_for(url), url, tmp_path)
    assert server.requests("/f") == []


@pytest_twisted.ensureDeferred
async def test_ca_bundle_trusts_every_certificate_not_only_the_first(
    upstream_factory, certs: Certs, tmp_path
):
    server = upstream_factory(tls=certs.server)
    url = server.register("/f", Serve(BODY))
    bundle = tmp_path.parent / f"{tmp_path.name}-bundle.pem"
    # Another CA first, the server's CA second.
    bundle.write_bytes(trustme.CA().cert_pem.bytes() + certs.ca_pem.read_bytes())
    result = await download(remote_for(url, ca_cert=str(bundle)), url, tmp_path)
    assert result.artifact_attributes["sha256"] == SHA256
    assert Path(result.path).read_bytes() == BODY


@pytest_twisted.ensureDeferred
async def test_bundle_without_the_servers_ca_is_refused(upstream_factory, certs: Certs, tmp_path):
    server = upstream_factory(tls=certs.server)
    url = server.register("/f", Serve(BODY))
    bundle = tmp_path.parent / f"{tmp_path.name}-other.pem"
    bundle.write_bytes(trustme.CA().cert_pem.bytes())
    await refused(remote_for(url, ca_cert=str(bundle)), url, tmp_path)


@pytest_twisted.ensureDeferred
async def test_hostname_mismatch_refused(upstream_factory, certs: Certs, tmp_path):
    server = upstream_factory(tls=certs.wrong_host)
    url = server.register("/f", Serve(BODY))
    await refused(remote_for(url, ca_cert=str(certs.ca_pem)), url, tmp_path)
    assert server.requests("/f") == []


@pytest_twisted.ensureDeferred
async def test_client_certificate_required_and_supplied(upstream_factory, certs: Certs, tmp_path):
    server = upstream_factory(tls=certs.server_tls(require_client_cert=True))
    url = server.register("/f", Serve(BODY))
    # Without a client certificate the server ends the handshake.
    with pytest.raises(ConnectionFailed):
        await download(remote_for(url, ca_cert=str(certs.ca_pem)), url, tmp_path)
    assert server.requests("/f") == []
    remote = remote_for(
        url,
        ca_cert=str(certs.ca_pem),
        client_cert=str(certs.client_cert),
        client_key=str(certs.client_key),
    )
    result = await download(remote, url, tmp_path)
    assert result.artifact_attributes["sha256"] == SHA256
    assert len(server.requests("/f")) == 1
    # A combined certificate+key PEM works the same.
    combined = remote_for(url, ca_cert=str(certs.ca_pem), client_cert=str(certs.client_pem))
    assert (await download(combined, url, tmp_path)).artifact_attributes["size"] == len(BODY)


@pytest_twisted.ensureDeferred
async def test_client_certificate_from_another_ca_refused(upstream_factory, certs, tmp_path):
    server = upstream_factory(tls=certs.server_tls(require_client_cert=True))
    url = server.register("/f", Serve(BODY))
    remote = remote_for(
        url,
        ca_cert=str(certs.ca_pem),
        client_cert=str(certs.untrusted_client_cert),
        client_key=str(certs.untrusted_client_key),
    )
    with pytest.raises(ConnectionFailed):
        await download(remote, url, tmp_path)
    assert server.requests("/f") == []


@pytest_twisted.ensureDeferred
async def test_validation_off_accepts_untrusted_and_still_sends_sni(
    upstream_factory, certs: Certs, tmp_path
):
    tls = SniRecordingTLS(certs.untrusted)
    server = upstream_factory(tls=tls)
    server.register("/f", Serve(BODY))
    url = server.url("/f", host="localhost")
    await refused(remote_for(url), url, tmp_path)
    result = await download(remote_for(url, tls_validation=False), url, tmp_path)
    assert result.artifact_attributes["sha256"] == SHA256
    assert tls.names and set(tls.names) == {b"localhost"}
    # The wrong-host certificate too: no hostname check when validation is off.
    wrong = upstream_factory(tls=certs.wrong_host)
    wrong_url = wrong.register("/f", Serve(BODY))
    result = await download(remote_for(wrong_url, tls_validation=False), wrong_url, tmp_path)
    assert result.artifact_attributes["size"] == len(BODY)


@pytest_twisted.ensureDeferred
async def test_sni_sent_with_verification_on(upstream_factory, certs: Certs, tmp_path):
    tls = SniRecordingTLS(certs.server)
    server = upstream_factory(tls=tls)
    server.register("/f", Serve(BODY))
    url = server.url("/f", host="localhost")
    result = await download(remote_for(url, ca_cert=str(certs.ca_pem)), url, tmp_path)
    assert result.artifact_attributes["sha256"] == SHA256
    assert set(tls.names) == {b"localhost"}
