"""Read-idle and total timeouts, driven by a Clock while a real upstream serves or stalls."""

from __future__ import annotations

import hashlib

import pytest
import pytest_twisted
from twisted.internet import defer, task

from downloaders import Backoff, DownloadTimeout, HttpDownloader
from tests.downloaders.support import agent_fixture, delayed_at, pool_fixture  # noqa: F401 (fixtures)
from tests.support.faults import Serve, StallAfterHeaders, StallMidBody, Steps, Trickle
from tests.support.polling import until

BODY = b"abcdefghij" * 1000


class ClockWriter:
    """A writer that moves the clock forward by ``step`` seconds per chunk received."""

    def __init__(self, clock: task.Clock, step: float) -> None:
        self.clock = clock
        self.step = step
        self.received = b""

    def write(self, data: bytes) -> None:
        self.received += data
        self.clock.advance(self.step)


def test_defaults_are_read_idle_not_total():
    downloader = HttpDownloader("http://127.0.0.1:1/x")
    assert (downloader.connect_timeout, downloader.sock_read_timeout) == (60.0, 60.0)
    assert downloader.total_timeout == 0.0
    with pytest.raises(ValueError, match="total_timeout"):
        HttpDownloader("http://127.0.0.1:1/x", total_timeout=-1)


@pytest_twisted.inlineCallbacks
def test_read_idle_timeout_mid_body(upstream, agent, tmp_path, assert_no_temp_files):
    url = upstream.register("/stall", StallMidBody(3000, BODY))
    clock = task.Clock()
    downloader = HttpDownloader(
        url, agent=agent, reactor=clock, temp_dir=str(tmp_path), max_retries=0
    )
    d = downloader.run()
    yield until(lambda: downloader.artifact_attributes["size"] == 3000)
    clock.advance(59.9)
    assert not d.called
    clock.advance(0.1)
    with pytest.raises(DownloadTimeout) as caught:
        yield d
    assert (caught.value.kind, caught.value.seconds) == ("read", 60.0)
    assert str(caught.value) == f"read timeout after 60s ({url})"
    assert caught.value.retryable
    assert_no_temp_files(tmp_path)
    assert (yield upstream.wait_until_idle(2.0))


@pytest_twisted.inlineCallbacks
def test_read_idle_timeout_waiting_for_headers(upstream, agent, tmp_path):
    from tests.support.faults import Gated

    gate = Gated(Serve(BODY))
    url = upstream.register("/slow", gate)
    clock = task.Clock()
    d = HttpDownloader(url, agent=agent, reactor=clock, max_retries=0, sock_read_timeout=5).run()
    yield until(lambda: gate.waiting == 1)
    clock.advance(5)
    with pytest.raises(DownloadTimeout, match="read timeout after 5s"):
        yield d
    assert (yield upstream.wait_until_idle(2.0))


@pytest_twisted.inlineCallbacks
def test_slow_but_steady_download_is_not_cut(upstream, agent):
    """Bytes keep coming every 50 (clock) seconds: 10 minutes in all, never 60 s idle."""
    body = b"0123456789" * 2
    url = upstream.register("/trickle", Trickle(body, bytes_per_sec=200, interval=0.01))
    clock = task.Clock()
    writer = ClockWriter(clock, 50.0)
    result = yield HttpDownloader(url, agent=agent, reactor=clock, writer=writer).run()
    assert writer.received == body
    assert clock.seconds() >= 50.0 * 10
    assert result.artifact_attributes["sha256"] == hashlib.sha256(body).hexdigest()


@pytest_twisted.inlineCallbacks
def test_total_timeout_while_bytes_flow(upstream, agent):
    body = b"0123456789" * 2
    url = upstream.register("/trickle", Trickle(body, bytes_per_sec=200, interval=0.01))
    clock = task.Clock()
    writer = ClockWriter(clock, 30.0)
    d = HttpDownloader(
        url, agent=agent, reactor=clock, writer=writer, total_timeout=100, max_retries=0
    ).run()
    with pytest.raises(DownloadTimeout) as caught:
        yield d
    assert (caught.value.kind, caught.value.seconds) == ("total", 100.0)
    assert str(caught.value) == f"total timeout after 100s ({url})"
    assert 0 < len(writer.received) < len(body)
    assert (yield upstream.wait_until_idle(2.0))


@pytest_twisted.inlineCallbacks
def test_timeout_is_retried_with_backoff(upstream, agent, tmp_path):
    url = upstream.register("/r", Steps([StallAfterHeaders(), Serve(BODY)]))
    clock = task.Clock()
    downloader = HttpDownloader(
        url,
        agent=agent,
        reactor=clock,
        temp_dir=str(tmp_path),
        sock_read_timeout=10,
        backoff=Backoff(base=2.0, jitter=0.0),
    )
    d = downloader.run()
    yield until(lambda: downloader.headers is not None)
    assert delayed_at(clock) == [10.0]
    clock.advance(10)  # read timeout: the backoff timer replaces it
    assert delayed_at(clock) == [12.0]
    clock.advance(2)
    result = yield d
    assert downloader.attempts == 2
    assert result.artifact_attributes["size"] == len(BODY)


@pytest_twisted.inlineCallbacks
def test_read_timeouts_of_concurrent_attempts_share_one_timer(upstream, agent):
    """Each attempt times out at its own deadline, moved by its own bytes, while the clock
    holds one call for all of them; none is left once they ended."""
    from tests.support.faults import Gated

    gate = Gated(Serve(BODY))
    url = upstream.register("/parked", gate)
    stalled = upstream.register("/stalled", StallMidBody(3000, BODY))
    clock = task.Clock()

    def start(where: str) -> tuple[HttpDownloader, defer.Deferred]:
        downloader = HttpDownloader(
            where, agent=agent, reactor=clock, max_retries=0, sock_read_timeout=5, writer=Sink()
        )
        return downloader, downloader.run()

    _, first = start(url)
    clock.advance(2)
    _, second = start(url)
    midway, third = start(stalled)
    yield until(lambda: gate.waiting == 2 and midway.artifact_attributes["size"] == 3000)
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(2.5)  # 4.5 s: nobody is late yet
    assert not (first.called or second.called or third.called)
    clock.advance(0.5)  # 5 s: the first one's deadline
    assert first.called and not (second.called or third.called)
    clock.advance(2)  # 7 s: the second's and the third's (their bytes came at 2 s)
    assert second.called and third.called
    for d in (first, second, third):
        with pytest.raises(DownloadTimeout, match="read timeout after 5s"):
            yield d
    assert clock.getDelayedCalls() == []
    gate.release()
    assert (yield upstream.wait_until_idle(2.0))


class Sink:
    def write(self, data: bytes) -> None:
        pass
