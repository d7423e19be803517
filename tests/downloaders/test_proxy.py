"""Downloads through a real squid forward proxy: plain HTTP, CONNECT tunnels for HTTPS, proxy
credentials on the proxy hop only, and 407 as a clear ProxyError."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer

from downloaders import DownloaderFactory, DownloadError, ProxyError, RemoteSettings
from tests.support.certs import Certs
from tests.support.faults import Redirect, Serve
from tests.support.squid import PROXY_NAME, Squid

BODY = b"through the proxy\n" * 64
SHA256 = hashlib.sha256(BODY).hexdigest()


def make_factory(url: str, tmp_path: Path, certs: Certs, **kwargs: Any) -> DownloaderFactory:
    remote = RemoteSettings(url=url, max_retries=0, ca_cert=str(certs.ca_pem), **kwargs)
    return DownloaderFactory(remote, temp_dir=str(tmp_path))


def download(factory: DownloaderFactory, url: str) -> defer.Deferred[Any]:
    return factory.build(url, expected_digests={"sha256": SHA256}).run()


def logged(squid: Squid, text: str) -> list[str]:
    return [line for line in squid.access_log() if text in line]


@pytest_twisted.ensureDeferred
async def test_http_through_open_proxy(squid: Squid, upstream, certs, tmp_path: Path) -> None:
    url = upstream.register("/plain", Serve(BODY))
    factory = make_factory(url, tmp_path, certs, proxy_url=squid.open_url)
    result = await download(factory, url)
    await factory.close()
    assert Path(result.path).read_bytes() == BODY
    (request,) = upstream.requests("/plain")
    assert "squid" in request.headers.get("via", "")  # it really went through squid
    assert "proxy-authorization" not in request.headers


@pytest_twisted.ensureDeferred
async def test_https_through_connect_tunnel(squid: Squid, tls_upstream, certs, tmp_path) -> None:
    url = tls_upstream.register("/secret", Serve(BODY))
    factory = make_factory(url, tmp_path, certs, proxy_url=squid.open_url)
    results = []
    for _ in range(3):
        results.append(await download(factory, url))
    await factory.close()
    assert all(Path(r.path).read_bytes() == BODY for r in results)
    requests = tls_upstream.requests("/secret")
    assert len(requests) == 3
    # Inside the tunnel squid sees nothing: no Via header added to the request.
    assert all("via" not in r.headers for r in requests)
    assert logged(squid, f"CONNECT 127.0.0.1:{tls_upstream.port}")
    # The tunnel was pooled: one TLS connection reached the server for three downloads.
    assert tls_upstream.total_connections == 1


@pytest_twisted.ensureDeferred
async def test_https_tunnel_still_verifies_the_target(
    squid: Squid, upstream_factory, certs, tmp_path
):
    server = upstream_factory(tls=certs.untrusted)
    url = server.register("/f", Serve(BODY))
    factory = make_factory(url, tmp_path, certs, proxy_url=squid.open_url)
    with pytest.raises(Exception) as caught:  # any refusal, checked below
        await download(factory, url)
    await factory.close()
    assert "TLS" in str(caught.value)
    assert server.requests("/f") == []


@pytest_twisted.ensureDeferred
async def test_proxy_credentials_http_and_https(
    squid: Squid, upstream, tls_upstream, certs, tmp_path
) -> None:
    plain = upstream.register("/plain", Serve(BODY))
    secure = tls_upstream.register("/secure", Serve(BODY))
    for settings in (
        {
            "proxy_url": squid.auth_url,
            "proxy_username": squid.username,
            "proxy_password": squid.password,
        },
        {"proxy_url": squid.auth_url.replace("//", f"//{squid.username}:{squid.password}@")},
    ):
        factory = make_factory(plain, tmp_path, certs, **settings)
        await defer.gatherResults([download(factory, plain), download(factory, secure)])
        await factory.close()
    for request in upstream.requests("/plain") + tls_upstream.requests("/secure"):
        assert "proxy-authorization" not in request.headers
    assert len(tls_upstream.requests("/secure")) == 2
    assert logged(squid, f" {squid.username} ")  # squid saw the authenticated user


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("scheme", ["http", "https"])
@pytest.mark.parametrize("password", [None, "wrong-password"])
async def test_407_becomes_proxy_error(
    squid: Squid, upstream, tls_upstream, certs, tmp_path, scheme: str, password: str | None
) -> None:
    server = upstream if scheme == "http" else tls_upstream
    url = server.register("/f", Serve(BODY))
    credentials = (
        {} if password is None else {"proxy_username": squid.username, "proxy_password": password}
    )
    factory = make_factory(url, tmp_path, certs, proxy_url=squid.auth_url, **credentials)
    with pytest.raises(ProxyError) as caught:
        await download(factory, url)
    await factory.close()
    assert "407" in str(caught.value)
    assert caught.value.retryable is False
    assert "wrong-password" not in str(caught.value)
    assert server.requests("/f") == []
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1", "2130706433", "0x7f.0.0.1", "0177.0.0.1"])
@pytest_twisted.ensureDeferred
async def test_a_redirect_to_an_internal_address_is_refused_before_the_proxy(
    squid: Squid, upstream, certs, tmp_path, host
) -> None:
    """A remote on a public name (only squid resolves it) redirecting to loopback, written in
    any form of an IPv4 address squid connects to (``127.1``, one number, hex, octal): refused
    before the proxy is asked. Names are the proxy's to resolve; an address is ours to judge.
    Before, only the dotted-quad form was: squid fetched the others from loopback."""
    inside = upstream.register("/inside", Serve(BODY))
    upstream.register("/out", Redirect(f"http://{host}:{upstream.port}/inside"))
    url = upstream.url("/out").replace("127.0.0.1", PROXY_NAME)
    factory = make_factory(url, tmp_path, certs, proxy_url=squid.open_url)
    with pytest.raises(DownloadError, match="redirect to a private address refused"):
        await download(factory, url)
    await factory.close()
    assert upstream.requests("/out"), "the remote itself was reached through the proxy"
    assert not upstream.requests("/inside"), inside
