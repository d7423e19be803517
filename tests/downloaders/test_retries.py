"""Retries: which failures are retried, how long we wait (driven by a Clock), fresh state."""

from __future__ import annotations

import email.utils
import hashlib
import os
import time
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import task

from downloaders import (
    Backoff,
    ConnectionFailed,
    DigestValidationError,
    HttpDownloader,
    HttpError,
    NotFound,
    TruncatedBody,
)
from downloaders.retry import parse_retry_after
from tests.downloaders.support import agent_fixture, delayed_at, pool_fixture, through_backoffs  # noqa: F401 (fixtures)
from tests.support.clients import free_port
from tests.support.faults import (
    CloseEarly,
    ResetAfter,
    Serve,
    Status,
    StatusThenServe,
    Steps,
    WrongBytes,
)
from tests.support.polling import until

BODY = b"0123456789abcdef" * 4096
SHA256 = hashlib.sha256(BODY).hexdigest()
NO_JITTER = Backoff(base=1.0, factor=2.0, jitter=0.0)


def clocked(url, agent, tmp_path, clock, **kwargs):
    kwargs.setdefault("backoff", NO_JITTER)
    kwargs.setdefault("sock_read_timeout", 0)  # only backoff delays on the clock
    return HttpDownloader(url, agent=agent, temp_dir=str(tmp_path), reactor=clock, **kwargs)


@pytest_twisted.inlineCallbacks
def test_429_then_success_honours_retry_after_seconds(upstream, agent, tmp_path):
    url = upstream.register("/a", StatusThenServe(429, 1, Serve(BODY), retry_after=7))
    clock = task.Clock()
    d = clocked(url, agent, tmp_path, clock, expected_digests={"sha256": SHA256}).run()
    assert (yield until(lambda: delayed_at(clock) == [7.0]))
    assert len(upstream.requests("/a")) == 1
    clock.advance(6.9)
    assert len(upstream.requests("/a")) == 1
    clock.advance(0.1)
    result = yield d
    assert result.artifact_attributes["sha256"] == SHA256
    assert len(upstream.requests("/a")) == 2
    assert os.listdir(tmp_path) == [os.path.basename(result.path)]


@pytest_twisted.inlineCallbacks
def test_retry_after_http_date(upstream, agent, tmp_path):
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    url = upstream.register("/a", StatusThenServe(503, 1, Serve(BODY), retry_after=when))
    clock = task.Clock()
    d = clocked(url, agent, tmp_path, clock).run()
    (delay,) = yield until(lambda: delayed_at(clock))
    assert 25.0 < delay <= 30.0
    clock.advance(delay)
    result = yield d
    assert result.artifact_attributes["size"] == len(BODY)


@pytest_twisted.inlineCallbacks
def test_retry_after_is_capped(upstream, agent, tmp_path):
    url = upstream.register("/a", StatusThenServe(429, 1, Serve(BODY), retry_after=86400))
    clock = task.Clock()
    backoff = Backoff(jitter=0.0, retry_after_cap=120.0)
    d = clocked(url, agent, tmp_path, clock, backoff=backoff).run()
    assert (yield until(lambda: delayed_at(clock) == [120.0]))
    clock.advance(120)
    yield d


@pytest_twisted.inlineCallbacks
def test_503_until_retries_run_out_with_exponential_backoff(upstream, agent, tmp_path):
    url = upstream.register("/down", Status(503))
    clock = task.Clock()
    d = clocked(url, agent, tmp_path, clock, max_retries=3).run()
    for n, delay in enumerate([1.0, 2.0, 4.0], start=1):
        yield until(lambda n=n: len(upstream.requests("/down")) == n and clock.getDelayedCalls())
        assert delayed_at(clock) == [clock.seconds() + delay]
        clock.advance(delay)
    with pytest.raises(HttpError) as caught:
        yield d
    assert caught.value.status == 503
    assert caught.value.retryable
    assert str(caught.value) == f"HTTP 503 Service Unavailable ({url})"
    assert len(upstream.requests("/down")) == 4
    assert clock.getDelayedCalls() == []
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("status", [500, 502, 504])
@pytest_twisted.inlineCallbacks
def test_other_5xx_are_retried(upstream, agent, tmp_path, status):
    url = upstream.register("/flaky", StatusThenServe(status, 1, Serve(BODY)))
    clock = task.Clock()
    d = clocked(url, agent, tmp_path, clock).run()
    assert (yield through_backoffs(clock, d)) == [1.0]
    result = yield d
    assert result.artifact_attributes["size"] == len(BODY)
    assert len(upstream.requests("/flaky")) == 2


@pytest_twisted.inlineCallbacks
def test_connection_refused_retried_until_exhausted(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/x"
    clock = task.Clock()
    downloader = HttpDownloader(
        url,
        reactor=clock,
        temp_dir=str(tmp_path),
        max_retries=2,
        backoff=NO_JITTER,
        sock_read_timeout=0,
    )
    d = downloader.run()
    assert (yield through_backoffs(clock, d)) == [1.0, 2.0]
    with pytest.raises(ConnectionFailed, match="connection refused"):
        yield d
    assert downloader.attempts == 3
    assert os.listdir(tmp_path) == []


@pytest_twisted.inlineCallbacks
def test_max_retries_zero_means_one_attempt(upstream, agent, tmp_path):
    url = upstream.register("/down", Status(503))
    with pytest.raises(HttpError):
        yield HttpDownloader(url, agent=agent, max_retries=0).run()
    assert len(upstream.requests("/down")) == 1


@pytest_twisted.inlineCallbacks
def test_404_and_validation_errors_not_retried(upstream, agent, tmp_path):
    upstream.register("/nf", Status(404))
    upstream.register("/bad", WrongBytes(BODY))
    with pytest.raises(NotFound):
        yield HttpDownloader(upstream.url("/nf"), agent=agent, max_retries=5).run()
    with pytest.raises(DigestValidationError):
        yield HttpDownloader(
            upstream.url("/bad"), agent=agent, max_retries=5, expected_digests={"sha256": SHA256}
        ).run()
    assert len(upstream.requests("/nf")) == 1
    assert len(upstream.requests("/bad")) == 1


class Recording(HttpDownloader):
    """Records how many bytes each attempt handed to `handle_data`."""

    def _run(self, extra_data=None):
        self.delivered = [*getattr(self, "delivered", []), 0]
        return super()._run(extra_data)

    def handle_data(self, data):
        self.delivered[-1] += len(data)
        super().handle_data(data)


@pytest.mark.parametrize("fault", [CloseEarly, ResetAfter], ids=["short-body", "reset"])
@pytest_twisted.inlineCallbacks
def test_retry_starts_fresh_file_and_digests(upstream, agent, tmp_path: Path, fault):
    url = upstream.register("/r", Steps([fault(20000, BODY), Serve(BODY)]))
    clock = task.Clock()
    downloader = Recording(
        url,
        expected_digests={"sha256": SHA256},
        expected_size=len(BODY),
        agent=agent,
        temp_dir=str(tmp_path),
        reactor=clock,
        backoff=NO_JITTER,
        sock_read_timeout=0,
    )
    d = downloader.run()
    yield until(lambda: clock.getDelayedCalls())
    (first,) = downloader.delivered
    if fault is CloseEarly:
        assert first == 20000  # the first attempt hashed and stored 20000 bytes
    else:
        assert first <= 20000  # a RST may drop bytes the client had not read yet
    assert os.listdir(tmp_path) == []  # its file is gone before the retry
    clock.advance(1.0)
    result = yield d
    assert downloader.attempts == 2
    assert downloader.delivered == [first, len(BODY)]
    # Stale digests or an appended file would give the sha256 of 20000 bytes + BODY here.
    assert result.artifact_attributes == {"size": len(BODY), "sha256": SHA256}
    assert Path(result.path).read_bytes() == BODY
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(result.path)]


@pytest_twisted.inlineCallbacks
def test_truncation_retried_until_exhausted(upstream, agent, tmp_path, assert_no_temp_files):
    url = upstream.register("/r", ResetAfter(100, BODY))
    clock = task.Clock()
    d = clocked(url, agent, tmp_path, clock, max_retries=2).run()
    assert (yield through_backoffs(clock, d)) == [1.0, 2.0]
    with pytest.raises(TruncatedBody):
        yield d
    assert len(upstream.requests("/r")) == 3
    assert_no_temp_files(tmp_path)


@pytest_twisted.inlineCallbacks
def test_no_retry_once_bytes_reached_a_writer(upstream, agent, tmp_path):
    url = upstream.register("/r", Steps([ResetAfter(20000, BODY), Serve(BODY)]))
    received = []
    clock = task.Clock()
    with pytest.raises(TruncatedBody):
        yield clocked(
            url,
            agent,
            tmp_path,
            clock,
            writer=type("W", (), {"write": lambda self, b: received.append(b)})(),
        ).run()
    assert clock.getDelayedCalls() == []  # no backoff was even scheduled
    assert len(upstream.requests("/r")) == 1
    assert sum(map(len, received)) == 20000


def test_backoff_exponential_with_jitter_and_cap():
    backoff = Backoff(base=1.0, factor=2.0, max_delay=10.0, jitter=0.5, random=lambda: 1.0)
    assert [backoff.delay(n) for n in range(5)] == [0.5, 1.0, 2.0, 4.0, 5.0]
    exact = Backoff(base=1.0, factor=2.0, max_delay=10.0, jitter=0.5, random=lambda: 0.0)
    assert [exact.delay(n) for n in range(5)] == [1.0, 2.0, 4.0, 8.0, 10.0]
    assert exact.delay(0, retry_after=300) == 120.0
    assert exact.delay(3, retry_after=0) == 0.0


def test_parse_retry_after():
    now = 1_700_000_000.0
    assert parse_retry_after(b"42") == 42.0
    assert parse_retry_after(email.utils.formatdate(now + 90, usegmt=True), now=now) == 90.0
    assert parse_retry_after(email.utils.formatdate(now - 90, usegmt=True), now=now) == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


@pytest_twisted.inlineCallbacks
def test_headers_callback_once_across_retries_result_has_the_last_headers(
    upstream, agent, tmp_path
):
    url = upstream.register(
        "/r", Steps([CloseEarly(100, BODY), Serve(BODY, headers={"X-Attempt": "2"})])
    )
    seen = []
    clock = task.Clock()
    d = clocked(url, agent, tmp_path, clock, headers_ready_callback=seen.append).run()
    assert (yield through_backoffs(clock, d)) == [1.0]
    result = yield d
    (headers,) = seen
    assert not headers.hasHeader(b"x-attempt")
    assert result.headers.getRawHeaders(b"x-attempt") == [b"2"]
