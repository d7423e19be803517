"""HttpDownloader against a real loopback upstream: success, status errors, HEAD, headers."""

from __future__ import annotations

import gzip
import hashlib
import os
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor, tcp
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.iweb import UNKNOWN_LENGTH

from downloaders import (
    DownloadResult,
    HttpDownloader,
    HttpError,
    NotAuthorized,
    NotFound,
)
from downloaders.http import READ_SIZE, _Receiver, default_pool
from tests.downloaders.support import agent_fixture, pool_fixture  # noqa: F401 (fixtures)
from tests.support.faults import Gzip, Redirect, RequireBasicAuth, Serve, Status
from tests.support.upstream import UpstreamServer

BODY = b"the quick brown fox jumps over the lazy dog\n" * 1000
SHA256 = hashlib.sha256(BODY).hexdigest()


@pytest_twisted.inlineCallbacks
def test_success_with_digests(upstream: UpstreamServer, agent, tmp_path: Path):
    url = upstream.register("/a.bin", Serve(BODY))
    downloader = HttpDownloader(
        url,
        expected_digests={"sha256": SHA256},
        expected_size=len(BODY),
        digest_algorithms=("sha512",),
        temp_dir=str(tmp_path),
        agent=agent,
    )
    result = yield downloader.run()
    assert isinstance(result, DownloadResult)
    assert result.url == url
    assert result.artifact_attributes == {
        "size": len(BODY),
        "sha256": SHA256,
        "sha512": hashlib.sha512(BODY).hexdigest(),
    }
    assert Path(result.path).read_bytes() == BODY
    assert Path(result.path).parent == tmp_path
    assert result.headers.getRawHeaders(b"content-length") == [str(len(BODY)).encode()]
    assert downloader.response.code == 200


@pytest_twisted.inlineCallbacks
def test_chunked_body_complete(upstream: UpstreamServer, agent, tmp_path: Path):
    url = upstream.register("/c.bin", Serve(BODY, chunked=True, chunk_size=1000))
    result = yield HttpDownloader(
        url, expected_digests={"sha256": SHA256}, temp_dir=str(tmp_path), agent=agent
    ).run()
    assert result.artifact_attributes["size"] == len(BODY)
    assert Path(result.path).read_bytes() == BODY


@pytest.mark.parametrize(
    ("status", "error_type"),
    [(404, NotFound), (401, NotAuthorized), (403, NotAuthorized), (410, HttpError)],
)
@pytest_twisted.inlineCallbacks
def test_client_errors_are_typed_and_not_retried(
    upstream: UpstreamServer, agent, tmp_path: Path, assert_no_temp_files, status, error_type
):
    url = upstream.register("/missing", Status(status))
    downloader = HttpDownloader(url, temp_dir=str(tmp_path), agent=agent, max_retries=3)
    with pytest.raises(error_type) as caught:
        yield downloader.run()
    error = caught.value
    assert error.status == status
    assert error.url == url
    assert not error.retryable
    assert str(error).startswith(f"HTTP {status} ")
    assert str(error).endswith(f"({url})")
    assert len(upstream.requests("/missing")) == 1
    assert_no_temp_files(tmp_path)


@pytest_twisted.inlineCallbacks
def test_credentials_in_url_are_sent_but_never_shown(upstream: UpstreamServer, agent, tmp_path):
    upstream.register("/private", RequireBasicAuth("alice", "s3cret", Serve(BODY)))
    port = upstream.port
    result = yield HttpDownloader(
        f"http://alice:s3cret@127.0.0.1:{port}/private", temp_dir=str(tmp_path), agent=agent
    ).run()
    assert result.url == f"http://127.0.0.1:{port}/private"
    assert result.artifact_attributes["sha256"] == SHA256

    with pytest.raises(NotAuthorized) as caught:
        yield HttpDownloader(
            f"http://alice:wrong@127.0.0.1:{port}/private", temp_dir=str(tmp_path), agent=agent
        ).run()
    assert "wrong" not in str(caught.value)
    assert "alice" not in str(caught.value)
    assert caught.value.url == f"http://127.0.0.1:{port}/private"


@pytest_twisted.inlineCallbacks
def test_extra_request_headers_are_sent(upstream: UpstreamServer, agent, tmp_path):
    url = upstream.register("/h", Serve(BODY))
    yield HttpDownloader(
        url, temp_dir=str(tmp_path), agent=agent, headers={"X-Test": "yes", "User-Agent": "ua/1"}
    ).run()
    (request,) = upstream.requests("/h")
    assert request.headers["x-test"] == "yes"
    assert request.headers["user-agent"] == "ua/1"
    assert "accept-encoding" not in request.headers


@pytest_twisted.inlineCallbacks
def test_head_returns_headers_without_body(upstream: UpstreamServer, agent, tmp_path):
    url = upstream.register("/a.bin", Serve(BODY))
    downloader = HttpDownloader(
        url,
        method="HEAD",
        expected_size=len(BODY),
        expected_digests={"sha256": SHA256},
        temp_dir=str(tmp_path),
        agent=agent,
    )
    result = yield downloader.run()
    assert result.path is None
    assert result.artifact_attributes == {"size": 0}
    assert result.headers.getRawHeaders(b"content-length") == [str(len(BODY)).encode()]
    assert [r.method for r in upstream.requests("/a.bin")] == ["HEAD"]
    assert os.listdir(tmp_path) == []


@pytest_twisted.inlineCallbacks
def test_head_error_status(upstream: UpstreamServer, agent):
    url = upstream.register("/gone", Status(404))
    with pytest.raises(NotFound):
        yield HttpDownloader(url, method="HEAD", agent=agent).run()


def test_unknown_method_refused():
    with pytest.raises(ValueError, match="method"):
        HttpDownloader("http://127.0.0.1:1/x", method="POST")


@pytest_twisted.inlineCallbacks
def test_headers_callback_once_before_first_byte(upstream: UpstreamServer, agent):
    url = upstream.register("/a.bin", Serve(BODY, chunked=True, chunk_size=4096))
    events: list[tuple[str, object]] = []

    class Writer:
        def write(self, data: bytes) -> None:
            events.append(("data", len(data)))

    result = yield HttpDownloader(
        url,
        agent=agent,
        writer=Writer(),
        headers_ready_callback=lambda headers: events.append(("headers", headers)),
    ).run()
    assert result.path is None
    assert events[0][0] == "headers"
    assert events[0][1].getRawHeaders(b"content-type") == [b"application/octet-stream"]
    assert [kind for kind, _ in events].count("headers") == 1
    assert sum(n for kind, n in events if kind == "data") == len(BODY)
    assert result.artifact_attributes["sha256"] == SHA256


@pytest_twisted.inlineCallbacks
def test_gzip_content_encoding_kept_as_wire_bytes(upstream: UpstreamServer, agent, tmp_path):
    payload = b"<xml>metadata</xml>\n" * 500
    served = Gzip.of(payload)
    url = upstream.register("/repodata/primary.xml.gz", served)
    published = hashlib.sha256(served.body).hexdigest()
    result = yield HttpDownloader(
        url,
        expected_digests={"sha256": published},
        expected_size=len(served.body),
        temp_dir=str(tmp_path),
        agent=agent,
    ).run()
    stored = Path(result.path).read_bytes()
    assert stored == served.body
    assert gzip.decompress(stored) == payload
    assert result.headers.getRawHeaders(b"content-encoding") == [b"gzip"]


@pytest_twisted.inlineCallbacks
def test_empty_body_is_an_empty_file(upstream: UpstreamServer, agent, tmp_path):
    url = upstream.register("/empty", Serve(b""))
    result = yield HttpDownloader(url, expected_size=0, temp_dir=str(tmp_path), agent=agent).run()
    assert result.artifact_attributes == {"size": 0, "sha256": hashlib.sha256().hexdigest()}
    assert Path(result.path).read_bytes() == b""


@pytest_twisted.inlineCallbacks
def test_headers_callback_gets_the_final_response_after_redirects(upstream, tmp_path):
    upstream.register("/final", Serve(BODY, headers={"X-Hop": "final"}, etag='"v1"'))
    url = upstream.register("/start", Redirect("/final", 302))
    seen = []
    try:
        result = yield HttpDownloader(
            url, temp_dir=str(tmp_path), headers_ready_callback=seen.append
        ).run()
    finally:
        yield default_pool(reactor).closeCachedConnections()
    (headers,) = seen
    assert headers.getRawHeaders(b"x-hop") == [b"final"]
    assert headers.getRawHeaders(b"etag") == [b'"v1"']
    assert headers.getRawHeaders(b"content-length") == [str(len(BODY)).encode()]
    assert result.headers.getRawHeaders(b"x-hop") == [b"final"]
    assert result.artifact_attributes["sha256"] == SHA256


@pytest.mark.parametrize(
    ("length", "widened"),
    [(16384, False), (65536, False), (65537, True), (10 << 30, True), (UNKNOWN_LENGTH, True)],
)
def test_reads_are_widened_for_large_bodies_and_restored_after(length, widened):
    """A large (or unknown-length) body is read 1 MiB per turn once its first two chunks
    arrived (those go to a waiting client before a 1 MiB read is processed ahead of them); a
    small one keeps Twisted's 64 KiB (a 1 MiB read allocates 1 MiB first); the pooled
    connection gets its size back."""
    connection = tcp.Connection.__new__(tcp.Connection)  # no socket needed: only bufferSize
    received = []

    class Attempt:
        _response = type("Response", (), {"length": length})()
        finished = False

        def data(self, data, discard):
            received.append((data, connection.bufferSize))

        def body_ended(self, reason, discard_then):
            received.append(("end", connection.bufferSize))

    receiver = _Receiver(Attempt())
    receiver.makeConnection(type("BodyTransport", (), {"transport": connection})())
    for chunk in (b"first", b"second", b"third"):
        receiver.dataReceived(chunk)
    receiver.connectionLost(Failure(ResponseDone()))
    narrow = tcp.Connection.bufferSize
    later = READ_SIZE if widened else narrow  # widened once the second chunk arrived
    assert received == [
        (b"first", narrow),
        (b"second", later),
        (b"third", later),
        ("end", narrow),
    ]
