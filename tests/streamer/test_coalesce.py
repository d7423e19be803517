"""Coalescing: many concurrent cold requests for one artifact cause one upstream request, and
every client streams while the bytes arrive; late joiners read the temp file, then follow."""

from __future__ import annotations

import hashlib

import pytest_twisted
from treq.client import HTTPClient
from twisted.internet import defer, protocol, reactor
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone

from tests.support.clients import run_curl
from tests.support.faults import Gated, Generated, Serve, Trickle
from tests.support.polling import holds_within

BIG = Generated(2 * 1024 * 1024 + 7, block_size=65536, seed=b"coalesce")
BIG_BODY = b"".join(BIG.chunks())


def _client() -> HTTPClient:
    """A treq client opening one connection per request (no pool left behind)."""
    return HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))


@pytest_twisted.inlineCallbacks
def test_many_concurrent_cold_requests_make_one_upstream_request(lazy_env):
    env = lazy_env.start()
    env.remote("up")
    gate = Gated(BIG)
    url = env.upstream.register("/big", gate)
    yield env.publish("repo/big", BIG_BODY, ("up", url))
    client = _client()

    pending = [client.get(env.url("repo/big")) for _ in range(24)]
    assert (yield holds_within(lambda: gate.waiting == 1))
    # Every request reached the streamer and follows the one download.
    inflight = env.streamer.in_flight[hashlib.sha256(BIG_BODY).hexdigest()]
    assert (yield holds_within(lambda: len(inflight.followers) == 24))
    gate.release()
    responses = yield defer.gatherResults(pending)
    bodies = yield defer.gatherResults([r.content() for r in responses])
    assert all(r.code == 200 for r in responses)
    assert all(body == BIG_BODY for body in bodies)
    assert len(env.upstream.requests("/big")) == 1
    assert (yield holds_within(lambda: env.stored(BIG_BODY)))
    assert env.metrics.value("streamer_downloads_total") == 1
    assert env.temp_files() == []


@pytest_twisted.inlineCallbacks
def test_curl_clients_coalesce_and_a_late_joiner_reads_the_file_then_follows(lazy_env):
    env = lazy_env.start()
    env.remote("up")
    body = bytes(range(256)) * 2048  # 512 KiB, at ~1 MiB/s
    url = env.upstream.register("/slow", Trickle(body, bytes_per_sec=1024 * 1024, interval=0.02))
    yield env.publish("repo/slow", body, ("up", url))

    early = [run_curl("-f", env.url("repo/slow")) for _ in range(3)]
    sha = hashlib.sha256(body).hexdigest()
    assert (yield holds_within(lambda: sha in env.streamer.in_flight))
    inflight = env.streamer.in_flight[sha]
    assert (yield holds_within(lambda: inflight.written >= len(body) // 2))
    assert not inflight.succeeded
    late = yield run_curl("-f", env.url("repo/slow"))
    results = yield defer.gatherResults(early)
    for code, out, err in [*results, late]:
        assert code == 0, err
        assert out == body
    assert len(env.upstream.requests("/slow")) == 1
    assert (yield holds_within(lambda: env.stored(body)))


class _Chunks(protocol.Protocol):
    """Collects a body, noting whether each chunk arrived while the download was in flight."""

    def __init__(self, env, done):
        self.env = env
        self.done = done
        self.data = []
        self.while_in_flight = []

    def dataReceived(self, data):
        self.data.append(data)
        self.while_in_flight.append(bool(self.env.streamer.in_flight))

    def connectionLost(self, reason):
        self.done.callback(reason.check(ResponseDone) is not None)


@pytest_twisted.inlineCallbacks
def test_clients_stream_as_bytes_arrive(lazy_env):
    env = lazy_env.start()
    env.remote("up")
    body = b"0123456789abcdef" * 16384  # 256 KiB over ~0.5 s
    url = env.upstream.register("/t", Trickle(body, bytes_per_sec=512 * 1024, interval=0.02))
    yield env.publish("repo/t", body, ("up", url))
    client = _client()
    collectors = []
    for _ in range(2):
        response = yield client.get(env.url("repo/t"), unbuffered=True)
        done = defer.Deferred()
        collector = _Chunks(env, done)
        response.deliverBody(collector)
        collectors.append((collector, done))
    for collector, done in collectors:
        assert (yield done), "the body ended cleanly"
        assert b"".join(collector.data) == body
        # Most of the body reached the client before the download finished.
        assert sum(collector.while_in_flight) > len(collector.while_in_flight) // 2
    assert len(env.upstream.requests("/t")) == 1
    yield holds_within(lambda: not env.streamer.in_flight)


@pytest_twisted.inlineCallbacks
def test_same_artifact_under_two_paths_is_downloaded_once(lazy_env):
    env = lazy_env.start()
    env.remote("up")
    gate = Gated(Serve(BIG_BODY))
    url = env.upstream.register("/one", gate)
    url_two = env.upstream.register("/two", Serve(BIG_BODY))
    yield env.publish("repo/one.bin", BIG_BODY, ("up", url))
    yield env.publish("repo/two.bin", BIG_BODY, ("up", url_two))
    first = run_curl("-f", env.url("repo/one.bin"))
    assert (yield holds_within(lambda: gate.waiting == 1))
    second = run_curl("-f", env.url("repo/two.bin"))
    inflight = next(iter(env.streamer.in_flight.values()))
    assert (yield holds_within(lambda: len(inflight.followers) == 2))
    gate.release()
    for code, out, err in (yield defer.gatherResults([first, second])):
        assert code == 0, err
        assert out == BIG_BODY
    assert env.upstream.requests("/two") == []
