"""Security review items, each proven on real sockets.

* The streamer only ever fetches catalog entries, never a URL a client supplies.
* file:// downloads are confined to the allowed import paths (downloaders and streamer).
* TLS verification is on by default everywhere.
* Credentials never appear in logs or error messages.
* Signed URLs are compared in constant time (through ``hmac.compare_digest``).
* Coalescing is keyed by artifact digest and applied only after authorisation.
* Listings carry security headers and escape hostile file names.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import time
from urllib.parse import quote

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from downloaders import (
    ConnectionFailed,
    DownloaderFactory,
    DownloadError,
    ForbiddenPath,
    HttpDownloader,
    RemoteSettings,
)
from downloaders.http import default_pool
from streamer.signing import sign_path
from tests.faults.test_hostile_clients import request, status_of
from tests.support import faults
from tests.support.clients import free_port, raw_http, run_curl
from tests.support.polling import holds_within

BODY = bytes(range(256)) * 64  # 16 KiB
PASSWORD = "S3cret-Pa55word"
PROXY_PASSWORD = "Pr0xy-S3cret-word"
SECRETS = (
    PASSWORD,
    PROXY_PASSWORD,
    base64.b64encode(f"alice:{PASSWORD}".encode()).decode(),
    base64.b64encode(f"bob:{PROXY_PASSWORD}".encode()).decode(),
)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- the streamer never fetches what a client names ----------------------------------------


@pytest_twisted.ensureDeferred
async def test_client_supplied_urls_never_reach_any_upstream(make_service, upstream):
    env = await make_service()
    bait = upstream.register("/bait.bin", faults.Serve(b"fetched for a client\n"))
    url = upstream.register("/real.bin", faults.Serve(BODY))
    await env.add("real.bin", BODY, stored=False, url=url)
    hostile = [
        request(bait),  # absolute-form request line naming the upstream
        request(f"/fixtures/{bait}"),
        request(f"/fixtures/real.bin?url={bait}"),
        request(f"/fixtures/bait.bin?url={bait}&redirect={bait}"),
        request("/bait.bin", f"Host: 127.0.0.1:{upstream.port}"),
        request("/fixtures/bait.bin", f"X-Forwarded-Host: 127.0.0.1:{upstream.port}"),
        request(f"/fixtures/http:%2f%2f127.0.0.1:{upstream.port}%2fbait.bin"),
        b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: x\r\n\r\n" % upstream.port,
    ]
    for payload in hostile:
        result = await raw_http("127.0.0.1", env.port, payload, timeout=5)
        assert b"fetched for a client" not in result.data
    assert upstream.requests("/bait.bin") == []
    # Only the catalog's url was fetched, for the one request naming a catalog path.
    assert [path for path, _ in upstream.all_requests()] == ["/real.bin"]


# --- file:// confinement ---------------------------------------------------------------------


@pytest.fixture
def import_tree(tmp_path):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "ok.bin").write_bytes(BODY)
    evil = tmp_path / "allowed_evil"
    evil.mkdir()
    (evil / "secret.bin").write_bytes(b"prefix trick\n")
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"outside\n")
    os.symlink(outside, allowed / "escape.bin")
    return allowed


@pytest.mark.parametrize(
    "target",
    [
        "/etc/passwd",
        "{root}/allowed_evil/secret.bin",
        "{root}/allowed/escape.bin",
        "{root}/allowed/../outside.bin",
    ],
    ids=["etc-passwd", "prefix-trick", "symlink-escape", "dot-dot"],
)
@pytest_twisted.ensureDeferred
async def test_file_urls_confined_to_allowed_import_paths(import_tree, tmp_path, target):
    remote = RemoteSettings(url="http://127.0.0.1/x", allowed_import_paths=[str(import_tree)])
    factory = DownloaderFactory(remote, temp_dir=str(tmp_path))
    path = target.format(root=tmp_path)
    with pytest.raises(ForbiddenPath) as caught:
        await factory.build(f"file://{path}").run()
    assert "outside the allowed import paths" in str(caught.value)
    good = await factory.build(f"file://{import_tree}/ok.bin").run()
    assert good.artifact_attributes["sha256"] == sha256(BODY)
    os.unlink(good.path)


@pytest_twisted.ensureDeferred
async def test_streamer_serves_file_urls_only_from_allowed_paths(make_service, import_tree):
    env = await make_service(security_extra=f'allowed_import_paths = ["{import_tree}"]\n')
    with open("/etc/passwd", "rb") as f:
        passwd = f.read()
    await env.add("passwd", passwd, stored=False, url="file:///etc/passwd")
    await env.add("ok.bin", BODY, stored=False, url=f"file://{import_tree}/ok.bin")
    result = await raw_http("127.0.0.1", env.port, request("/fixtures/passwd"), timeout=5)
    assert status_of(result.data) == 502 and b"root:" not in result.data
    result = await raw_http("127.0.0.1", env.port, request("/fixtures/ok.bin"), timeout=5)
    assert status_of(result.data) == 200 and result.data.endswith(BODY)


# --- TLS verification on by default ------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_tls_verified_by_default_everywhere(tls_upstream, certs, tmp_path, make_service):
    url = tls_upstream.register("/a.bin", faults.Serve(BODY))
    # A bare HttpDownloader: its default agent trusts the system CAs only.
    with pytest.raises(ConnectionFailed, match="TLS handshake failed"):
        await HttpDownloader(url, max_retries=0, temp_dir=str(tmp_path)).run()
    await default_pool(reactor).closeCachedConnections()
    # A factory with default settings.
    factory = DownloaderFactory(RemoteSettings(url=url, max_retries=0), temp_dir=str(tmp_path))
    with pytest.raises(ConnectionFailed, match="TLS handshake failed"):
        await factory.build(url).run()
    # The same factory settings trusting the test CA: the control.
    trusting = DownloaderFactory(
        RemoteSettings(url=url, max_retries=0, ca_cert=str(certs.ca_pem)), temp_dir=str(tmp_path)
    )
    result = await trusting.build(url, expected_digests={"sha256": sha256(BODY)}).run()
    os.unlink(result.path)
    await trusting.close()
    assert len(tls_upstream.requests("/a.bin")) == 1
    # The service's remotes, configured without a CA: 502, nothing served.
    env = await make_service(tls_upstream)
    await env.add("a.bin", BODY, stored=False, url=url)
    result = await raw_http("127.0.0.1", env.port, request("/fixtures/a.bin"), timeout=5)
    assert status_of(result.data) == 502
    assert len(tls_upstream.requests("/a.bin")) == 1


# --- credentials never in logs or errors ---------------------------------------------------------


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in text, f"a secret leaked: ...{text[:200]}..."


@pytest_twisted.ensureDeferred
async def test_credentials_never_in_errors(upstream, tmp_path):
    url = upstream.register("/a.bin", faults.Status(500))
    remote = RemoteSettings(
        url=url,
        username="alice",
        password=PASSWORD,
        max_retries=0,
        proxy_url=f"http://127.0.0.1:{free_port()}",
        proxy_username="bob",
        proxy_password=PROXY_PASSWORD,
    )
    factory = DownloaderFactory(remote, temp_dir=str(tmp_path))
    with pytest.raises(DownloadError) as via_proxy:
        await factory.build(url).run()
    direct = DownloaderFactory(
        RemoteSettings(url=url, username="alice", password=PASSWORD, max_retries=0),
        temp_dir=str(tmp_path),
    )
    with pytest.raises(DownloadError) as refused:
        await direct.build(url).run()
    await direct.close()
    userinfo = url.replace("http://", f"http://alice:{PASSWORD}@")
    with pytest.raises(DownloadError) as in_url:
        await HttpDownloader(userinfo, max_retries=0, temp_dir=str(tmp_path)).run()
    await default_pool(reactor).closeCachedConnections()
    for caught in (via_proxy, refused, in_url):
        assert_no_secret(str(caught.value), repr(caught.value), caught.value.url)
    assert_no_secret(repr(remote))
    assert upstream.requests("/a.bin")[0].headers["authorization"]  # it was sent, not logged


@pytest_twisted.ensureDeferred
async def test_credentials_never_in_service_logs(make_service, upstream, log_events):
    proxy_port = free_port()
    url = upstream.register("/a.bin", faults.Status(500))
    env = await make_service(
        remote_extra=(
            f'username = "alice"\npassword = "{PASSWORD}"\n'
            f'proxy_url = "http://127.0.0.1:{proxy_port}"\n'
            f'proxy_username = "bob"\nproxy_password = "{PROXY_PASSWORD}"\n'
        )
    )
    await env.add("a.bin", BODY, stored=False, url=url)
    await env.add(
        "b.bin", BODY[::-1], stored=False, url=url.replace("http://", f"http://alice:{PASSWORD}@")
    )
    for path in ("/fixtures/a.bin", "/fixtures/b.bin"):
        result = await raw_http("127.0.0.1", env.port, request(path), timeout=5)
        assert status_of(result.data) == 502
        assert_no_secret(result.data.decode("latin-1"))
    failures = [event for event in log_events if event.startswith("upstream failure: ")]
    # The url is logged with its userinfo masked (``http://***@host/...``), not dropped.
    where = url.split("://", 1)[1]
    assert len(failures) == 2 and all(where in event for event in failures)
    assert any(f"http://***@{where}" in event for event in failures)
    assert_no_secret(*log_events)


# --- signed URLs -----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_signed_urls_are_checked_with_compare_digest(make_service, monkeypatch):
    env = await make_service(signed=True)
    await env.add("a.bin", BODY, stored=True)
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    good = sign_path(env.key, "/fixtures/a.bin", int(time.time()) + 60)
    expired = sign_path(env.key, "/fixtures/a.bin", int(time.time()) - 1)
    tampered = good[:-1] + ("0" if good[-1] != "0" else "1")
    other_path = sign_path(env.key, "/fixtures/b.bin", int(time.time()) + 60).replace(
        "/fixtures/b.bin", "/fixtures/a.bin"
    )
    cases = {
        good: 200,
        "/fixtures/a.bin": 403,
        expired: 403,
        tampered: 403,
        other_path: 403,
        good.replace("signature=", "signature=" + "0" * 64 + "&signature="): 403,
    }
    for target, status in cases.items():
        result = await raw_http("127.0.0.1", env.port, request(target), timeout=5)
        assert status_of(result.data) == status, target
        if status == 200:
            assert result.data.endswith(BODY)
    # Every signature that was compared went through compare_digest ...
    assert len(calls) == 4  # good, expired, tampered, other_path
    # ... and its answer decides: refusing every comparison refuses the good URL too.
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: False)
    result = await raw_http("127.0.0.1", env.port, request(good), timeout=5)
    assert status_of(result.data) == 403


@pytest_twisted.ensureDeferred
async def test_coalescing_only_after_authorisation(make_service, upstream):
    env = await make_service(signed=True)
    gate = faults.Gated(faults.Serve(BODY))
    url = upstream.register("/gated.bin", gate)
    await env.add("gated.bin", BODY, stored=False, url=url)
    signed = sign_path(env.key, "/fixtures/gated.bin", int(time.time()) + 60)

    # Unsigned: 403, and no download starts.
    result = await raw_http("127.0.0.1", env.port, request("/fixtures/gated.bin"), timeout=5)
    assert status_of(result.data) == 403
    assert upstream.requests("/gated.bin") == [] and not env.lazy.in_flight

    # A signed request starts the download ...
    first = run_curl("-f", env.url(signed))
    assert await holds_within(lambda: gate.waiting == 1)
    [inflight] = env.lazy.in_flight.values()
    assert len(inflight.followers) == 1
    # ... and unsigned or badly signed requests do not join it.
    for target in ("/fixtures/gated.bin", signed[:-1] + "x"):
        result = await raw_http("127.0.0.1", env.port, request(target), timeout=5)
        assert status_of(result.data) == 403
        assert len(inflight.followers) == 1
    gate.release()
    code, out, err = await first
    assert (code, out) == (0, BODY), err
    assert len(upstream.requests("/gated.bin")) == 1


@pytest_twisted.ensureDeferred
async def test_coalescing_is_keyed_by_artifact_digest(make_service, upstream):
    env = await make_service()
    gate_a = faults.Gated(faults.Serve(BODY))
    gate_b = faults.Gated(faults.Serve(BODY))
    await env.add("a.bin", BODY, stored=False, url=upstream.register("/a.bin", gate_a))
    await env.add("copy-of-a.bin", BODY, stored=False, url=upstream.register("/b.bin", gate_b))
    clients = [run_curl("-f", env.url("fixtures/a.bin"))]
    assert await holds_within(lambda: gate_a.waiting == 1)
    clients.append(run_curl("-f", env.url("fixtures/copy-of-a.bin")))
    assert await holds_within(lambda: len(next(iter(env.lazy.in_flight.values())).followers) == 2)
    gate_a.release()
    for code, out, err in await defer.gatherResults(clients):
        assert (code, out) == (0, BODY), err
    assert len(upstream.requests("/a.bin")) == 1
    assert upstream.requests("/b.bin") == []  # same digest: joined, not fetched again


# --- listings ----------------------------------------------------------------------------------

HOSTILE_NAMES = [
    "<script>alert(1)<script>.txt",
    "<svg onload=alert(1)>.txt",
    '"><img src=x onerror=alert(1)>.bin',
    "javascript:alert(1)",
    "a&b'c.txt",
]


@pytest_twisted.ensureDeferred
async def test_listing_headers_and_no_script_injection(make_service):
    env = await make_service()
    for name in HOSTILE_NAMES:
        await env.add(name, name.encode(), stored=True)
    result = await raw_http("127.0.0.1", env.port, request("/fixtures/"), timeout=5)
    head, _, page = result.data.partition(b"\r\n\r\n")
    assert status_of(result.data) == 200
    headers = head.decode("latin-1").lower()
    assert "content-type: text/html; charset=utf-8" in headers
    assert "content-security-policy: default-src 'none'" in headers
    assert "x-content-type-options: nosniff" in headers
    for raw in (b"<script", b"<img", b"<svg", b'href="javascript:'):
        assert raw not in page
    assert b"&lt;script&gt;alert(1)&lt;script&gt;.txt" in page
    for name in HOSTILE_NAMES:  # every file is still reachable by its (quoted) link
        target = "/fixtures/" + quote(name, safe="")
        result = await raw_http("127.0.0.1", env.port, request(target), timeout=5)
        assert status_of(result.data) == 200 and result.data.endswith(name.encode())
