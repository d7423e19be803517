"""Broken upstreams: short bodies, resets, wrong bytes, overflow and cancellation."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task

from downloaders import (
    ConnectionFailed,
    DigestValidationError,
    DownloadTimeout,
    HttpDownloader,
    HttpError,
    SizeValidationError,
    TruncatedBody,
)
from downloaders.http import default_pool
from tests.downloaders.support import agent_fixture, pool_fixture  # noqa: F401 (fixtures)
from tests.support.clients import free_port
from tests.support.faults import (
    ChunkedNoLastChunk,
    CloseEarly,
    Generated,
    Redirect,
    ResetAfter,
    ResetBeforeHeaders,
    Serve,
    StallMidBody,
    Status,
    WrongBytes,
    WrongSize,
)
from tests.support.polling import until
from tests.support.upstream import UpstreamServer

BODY = bytes(range(256)) * 400
SHA256 = hashlib.sha256(BODY).hexdigest()


def no_retry(url, agent, tmp_path, **kwargs):
    return HttpDownloader(url, agent=agent, temp_dir=str(tmp_path), max_retries=0, **kwargs)


@pytest_twisted.inlineCallbacks
def test_body_shorter_than_content_length(upstream, agent, tmp_path, assert_no_temp_files):
    url = upstream.register("/short", CloseEarly(1000, BODY))
    with pytest.raises(TruncatedBody) as caught:
        yield no_retry(url, agent, tmp_path).run()
    message = str(caught.value)
    assert f"body truncated after 1000 of {len(BODY)} bytes" in message
    assert url in message
    assert caught.value.retryable
    assert_no_temp_files(tmp_path)


@pytest_twisted.inlineCallbacks
def test_chunked_body_without_last_chunk(upstream, agent, tmp_path, assert_no_temp_files):
    # A body that fits the socket buffers: with more, the fault's close waits for the flush.
    url = upstream.register("/chunked", ChunkedNoLastChunk(BODY[:10000], chunk_size=1024))
    with pytest.raises(TruncatedBody) as caught:
        yield no_retry(url, agent, tmp_path).run()
    assert "body truncated after" in str(caught.value)
    assert_no_temp_files(tmp_path)


@pytest_twisted.inlineCallbacks
def test_connection_reset_mid_body(upstream, agent, tmp_path, assert_no_temp_files):
    url = upstream.register("/reset", ResetAfter(5000, BODY))
    with pytest.raises(TruncatedBody) as caught:
        yield no_retry(url, agent, tmp_path).run()
    assert isinstance(caught.value, ConnectionFailed)
    assert "body truncated after" in str(caught.value)
    assert_no_temp_files(tmp_path)


@pytest_twisted.inlineCallbacks
def test_reset_before_headers(upstream, agent, tmp_path):
    url = upstream.register("/rst", ResetBeforeHeaders())
    with pytest.raises(ConnectionFailed) as caught:
        yield no_retry(url, agent, tmp_path).run()
    assert "no complete response" in str(caught.value)
    assert not isinstance(caught.value, TruncatedBody)


@pytest_twisted.inlineCallbacks
def test_connection_refused(tmp_path):
    url = f"http://user:pw@127.0.0.1:{free_port()}/x"
    downloader = HttpDownloader(url, temp_dir=str(tmp_path), max_retries=0)
    with pytest.raises(ConnectionFailed) as caught:
        yield downloader.run()
    assert str(caught.value) == (
        f"connection refused (http://127.0.0.1:{url.rsplit(':', 1)[1].split('/')[0]}/x)"
    )
    assert "pw" not in str(caught.value)
    assert caught.value.retryable


@pytest_twisted.inlineCallbacks
def test_digest_mismatch_removes_file(upstream, agent, tmp_path, assert_no_temp_files):
    url = upstream.register("/wrong", WrongBytes(BODY))
    with pytest.raises(DigestValidationError) as caught:
        yield HttpDownloader(
            url, expected_digests={"sha256": SHA256}, agent=agent, temp_dir=str(tmp_path)
        ).run()
    error = caught.value
    actual = hashlib.sha256(WrongBytes(BODY).served).hexdigest()
    assert (error.algorithm, error.expected, error.actual) == ("sha256", SHA256, actual)
    assert str(error) == f"sha256 mismatch: expected {SHA256}, got {actual} ({url})"
    assert len(upstream.requests("/wrong")) == 1  # the same bytes again would not help
    assert_no_temp_files(tmp_path)


@pytest_twisted.inlineCallbacks
def test_size_mismatch_short(upstream, agent, tmp_path, assert_no_temp_files):
    url = upstream.register("/small", WrongSize(BODY, extra=-10))
    with pytest.raises(SizeValidationError) as caught:
        yield HttpDownloader(
            url, expected_size=len(BODY), agent=agent, temp_dir=str(tmp_path)
        ).run()
    assert (caught.value.expected, caught.value.actual) == (len(BODY), len(BODY) - 10)
    assert str(caught.value) == (
        f"size mismatch: expected {len(BODY)} bytes, got {len(BODY) - 10} ({url})"
    )
    assert len(upstream.requests("/small")) == 1
    assert_no_temp_files(tmp_path)


@pytest_twisted.inlineCallbacks
def test_oversized_body_aborts_the_transfer(upstream, agent, tmp_path, assert_no_temp_files):
    big = Generated(64 * 1024 * 1024)
    url = upstream.register("/big", big)
    with pytest.raises(SizeValidationError) as caught:
        yield HttpDownloader(url, expected_size=1000, agent=agent, temp_dir=str(tmp_path)).run()
    assert caught.value.expected == 1000
    assert caught.value.actual < 1024 * 1024  # stopped at the first chunk past the size
    assert_no_temp_files(tmp_path)
    assert (yield upstream.wait_until_idle(2.0))


@pytest_twisted.inlineCallbacks
def test_cancel_aborts_connection_and_removes_temp_file(
    upstream: UpstreamServer, agent, tmp_path: Path, assert_no_temp_files
):
    url = upstream.register("/stall", StallMidBody(3000, BODY))
    downloader = HttpDownloader(url, agent=agent, temp_dir=str(tmp_path))
    d = downloader.run()
    yield until(lambda: downloader.artifact_attributes["size"] == 3000)
    assert len(os.listdir(tmp_path)) == 1
    d.cancel()
    with pytest.raises(defer.CancelledError):
        yield d
    assert_no_temp_files(tmp_path)
    assert (yield upstream.wait_until_idle(2.0))


@pytest_twisted.inlineCallbacks
def test_cancel_before_response(upstream: UpstreamServer, agent, tmp_path):
    from tests.support.faults import Gated

    gate = Gated(Serve(BODY))
    url = upstream.register("/gated", gate)
    d = HttpDownloader(url, agent=agent, temp_dir=str(tmp_path)).run()
    yield until(lambda: gate.waiting == 1)
    d.cancel()
    with pytest.raises(defer.CancelledError):
        yield d
    assert os.listdir(tmp_path) == []
    assert (yield upstream.wait_until_idle(2.0))


@pytest_twisted.inlineCallbacks
def test_failing_writer_aborts(upstream: UpstreamServer, agent):
    url = upstream.register("/big", Generated(32 * 1024 * 1024))

    class Full:
        def write(self, data: bytes) -> None:
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        yield HttpDownloader(url, agent=agent, writer=Full()).run()
    assert (yield upstream.wait_until_idle(2.0))


@pytest_twisted.inlineCallbacks
def test_connect_timeout_is_a_download_timeout():
    """The default agent passes connect_timeout to the reactor; its expiry is reported as a
    DownloadTimeout of kind "connect" (a MemoryReactor stands in for an unreachable host)."""
    from twisted.internet.error import TimeoutError as ConnectTimeout
    from twisted.internet.testing import MemoryReactorClock
    from twisted.python.failure import Failure

    memory = MemoryReactorClock()
    d = HttpDownloader("http://127.0.0.1:8/x", reactor=memory, connect_timeout=5, max_retries=0)
    d = d.run()
    yield until(lambda: memory.tcpClients)
    host, port, factory, timeout, _ = memory.tcpClients[0]
    assert (host, port, timeout) == ("127.0.0.1", 8, 5)
    factory.clientConnectionFailed(memory.connectors[0], Failure(ConnectTimeout()))
    memory.advance(1)  # the endpoint reports the failure after its attempt delay
    with pytest.raises(DownloadTimeout) as caught:
        yield d
    assert (caught.value.kind, caught.value.seconds) == ("connect", 5)
    assert str(caught.value) == "connect timeout after 5s (http://127.0.0.1:8/x)"


@pytest_twisted.inlineCallbacks
def test_unfollowed_redirect_is_not_content(upstream, agent, tmp_path, assert_no_temp_files):
    url = upstream.register("/moved", Redirect("/elsewhere", 302))
    with pytest.raises(HttpError) as caught:
        yield no_retry(url, agent, tmp_path).run()
    assert caught.value.status == 302
    assert str(caught.value) == f"HTTP 302 Found ({url})"
    assert_no_temp_files(tmp_path)


@pytest_twisted.inlineCallbacks
def test_default_agent_follows_redirects(upstream, tmp_path):
    upstream.register("/b", Serve(BODY))
    url = upstream.register("/a", Redirect("/b", 301))
    try:
        result = yield HttpDownloader(url, temp_dir=str(tmp_path)).run()
    finally:
        yield default_pool(reactor).closeCachedConnections()
    assert result.url == url
    assert result.artifact_attributes["sha256"] == SHA256
    assert [path for path, _ in upstream.all_requests()] == ["/a", "/b"]


@pytest_twisted.inlineCallbacks
def test_cancel_during_backoff(upstream, agent, tmp_path):
    url = upstream.register("/down", Status(503))
    clock = task.Clock()
    d = HttpDownloader(
        url, agent=agent, reactor=clock, temp_dir=str(tmp_path), sock_read_timeout=0
    ).run()
    yield until(lambda: clock.getDelayedCalls())
    d.cancel()
    with pytest.raises(defer.CancelledError):
        yield d
    assert clock.getDelayedCalls() == []
    assert len(upstream.requests("/down")) == 1
    assert os.listdir(tmp_path) == []
