"""Redirects through DownloaderFactory: limits, loops, non-HTTP targets, and credentials that
never follow a redirect to another host."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from downloaders import DownloaderFactory, DownloadError, RemoteSettings, TooManyRedirects
from tests.support.faults import Redirect, RedirectLoop, RedirectTo, RequireBasicAuth, Serve

#: Every test here runs over both HTTP clients (see tests.support.fixtures.http_client).
pytestmark = pytest.mark.usefixtures("http_client")

BODY = b"final body\n" * 20
SHA256 = hashlib.sha256(BODY).hexdigest()


def make_factory(url: str, tmp_path: Path, **kwargs: Any) -> DownloaderFactory:
    return DownloaderFactory(
        RemoteSettings(url=url, max_retries=0, **kwargs), temp_dir=str(tmp_path)
    )


@pytest_twisted.ensureDeferred
async def test_redirects_followed_final_headers_seen(upstream, tmp_path: Path) -> None:
    final = upstream.register("/final", Serve(BODY, headers={"X-Final": "yes"}))
    upstream.register("/b", Redirect(final, 307))
    upstream.register("/a", Redirect("/b", 301))  # relative Location
    factory = make_factory(upstream.url("/a"), tmp_path)
    seen: list[Any] = []
    downloader = factory.build(
        upstream.url("/a"), expected_digests={"sha256": SHA256}, headers_ready_callback=seen.append
    )
    result = await downloader.run()
    await factory.close()
    assert Path(result.path).read_bytes() == BODY
    assert result.headers.getRawHeaders(b"x-final") == [b"yes"]
    assert len(seen) == 1 and seen[0].getRawHeaders(b"x-final") == [b"yes"]
    assert [p for p, _ in upstream.all_requests()] == ["/a", "/b", "/final"]


@pytest_twisted.ensureDeferred
async def test_every_redirect_status(upstream, tmp_path: Path) -> None:
    final = upstream.register("/final", Serve(BODY))
    factory = make_factory(final, tmp_path)
    for status in (301, 302, 303, 307, 308):
        url = upstream.register(f"/r{status}", Redirect(final, status))
        result = await factory.build(url, expected_digests={"sha256": SHA256}).run()
        assert result.artifact_attributes["size"] == len(BODY)
    await factory.close()
    assert len(upstream.requests("/final")) == 5
    assert upstream.total_connections == 1  # redirect bodies drained, connection reused


@pytest_twisted.ensureDeferred
async def test_endless_redirects_give_too_many_redirects(upstream, tmp_path: Path) -> None:
    url = upstream.register("/loop", RedirectLoop())
    factory = make_factory(url, tmp_path, max_redirects=5)
    with pytest.raises(TooManyRedirects) as caught:
        await factory.build(url).run()
    await factory.close()
    assert caught.value.url == url
    assert "more than 5 redirects" in str(caught.value)
    assert len(upstream.requests("/loop")) == 6
    assert list(tmp_path.iterdir()) == []


@pytest_twisted.ensureDeferred
async def test_redirect_loop_detected(upstream, tmp_path: Path) -> None:
    a = upstream.register("/a", Redirect(upstream.url("/b")))
    upstream.register("/b", Redirect(a))
    factory = make_factory(a, tmp_path)
    with pytest.raises(TooManyRedirects, match="redirect loop") as caught:
        await factory.build(a).run()
    await factory.close()
    assert caught.value.url == a
    assert len(upstream.all_requests()) == 2


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("location", ["file:///etc/passwd", "ftp://127.0.0.1/x", "data:,x"])
async def test_redirect_to_non_http_refused(upstream, tmp_path: Path, location: str) -> None:
    url = upstream.register("/evil", RedirectTo(location))
    factory = make_factory(url, tmp_path, allowed_import_paths=["/etc"])
    with pytest.raises(DownloadError, match="non-HTTP") as caught:
        await factory.build(url).run()
    await factory.close()
    assert caught.value.url == url
    assert list(tmp_path.iterdir()) == []


@pytest_twisted.ensureDeferred
async def test_basic_auth_not_sent_after_cross_host_redirect(upstream, tmp_path: Path) -> None:
    other_host = upstream.register("/elsewhere", Serve(BODY))
    same_host = upstream.register("/private", RequireBasicAuth("alice", "pw-123", Serve(BODY)))
    to_other = upstream.register(
        "/to-other", Redirect(upstream.url("/elsewhere", host="localhost"))
    )
    to_same = upstream.register("/to-same", Redirect("/private"))
    factory = make_factory(
        same_host,
        tmp_path,
        username="alice",
        password="pw-123",
        headers={"Authorization": "Bearer remote-token", "Cookie": "s=1", "X-Keep": "1"},
    )
    # Basic auth (set per hop, for the remote's own origin) replaces the configured
    # Authorization there; another host gets neither, nor any other secret header.
    result = await factory.build(to_other, expected_digests={"sha256": SHA256}).run()
    assert result.artifact_attributes["size"] == len(BODY)
    assert other_host.endswith("/elsewhere")
    (first,) = upstream.requests("/to-other")
    (followed,) = upstream.requests("/elsewhere")
    assert first.headers["authorization"].startswith("Basic ")
    assert "authorization" not in followed.headers
    assert "cookie" not in followed.headers
    assert followed.headers["x-keep"] == "1"
    # A redirect on the same host keeps the credentials.
    await factory.build(to_same, expected_digests={"sha256": SHA256}).run()
    (private,) = upstream.requests("/private")
    assert private.headers["authorization"].startswith("Basic ")
    await factory.close()
