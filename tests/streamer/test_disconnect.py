"""Clients that go away: an ``on_demand`` download still completes and is stored; a
``streamed`` download nobody reads any more is cancelled (the upstream sees its connection
closed); a download other clients still read continues. No temp file or descriptor stays."""

from __future__ import annotations

import os

import pytest_twisted
from twisted.internet import defer

from store.tempdirs import LOCK_SUFFIX
from tests.streamer.test_flow import _connect, _SlowClient
from tests.support.clients import run_curl
from tests.support.faults import Gated, Serve, Trickle
from tests.support.polling import holds_within

BODY = bytes(range(256)) * 1024  # 256 KiB
SLOW = Trickle(BODY, bytes_per_sec=512 * 1024, interval=0.02)  # about half a second


def _files_open_under(folder: str) -> list[str]:
    """Paths under *folder* this process holds a descriptor for, but the lock on its own
    temporary folder (held for as long as the storage is in use: see store.tempdirs)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(folder) and not target.endswith(LOCK_SUFFIX):
            found.append(target)
    return found


def _hang_up_after(client: _SlowClient, nbytes: int) -> None:
    """Make *client* reset its connection once it has *nbytes* of the body."""
    received = client.dataReceived

    def data(chunk: bytes) -> None:
        received(chunk)
        if client.body_bytes >= nbytes and client.transport.connected:
            client.transport.abortConnection()

    client.dataReceived = data  # type: ignore[method-assign]


@pytest_twisted.inlineCallbacks
def test_on_demand_download_completes_and_is_stored_after_the_client_left(lazy_env):
    env = lazy_env.start()
    env.remote("up")
    url = env.upstream.register("/f", SLOW)
    yield env.publish("repo/f", BODY, ("up", url))
    client = _connect(env, "repo/f", reading=True)
    _hang_up_after(client, 20000)
    assert not (yield client.ended)
    assert client.body_bytes < len(BODY)
    inflight = next(iter(env.streamer.in_flight.values()))
    assert not inflight.finished, "the client left while the download was running"
    assert (yield holds_within(lambda: not inflight.followers))
    assert (yield holds_within(lambda: env.stored(BODY)))
    assert (yield holds_within(lambda: not env.streamer.in_flight))
    assert env.temp_files() == []
    assert (yield holds_within(lambda: not _files_open_under(env.storage.root)))
    # The next request is a hit.
    code, out, err = yield run_curl("-f", env.url("repo/f"))
    assert code == 0, err
    assert out == BODY
    assert len(env.upstream.requests("/f")) == 1


@pytest_twisted.inlineCallbacks
def test_streamed_download_nobody_reads_is_cancelled(lazy_env):
    env = lazy_env.start()
    env.remote("up", policy="streamed")
    url = env.upstream.register("/f", SLOW)
    yield env.publish("repo/f", BODY, ("up", url))
    client = _connect(env, "repo/f", reading=True)
    _hang_up_after(client, 20000)
    assert not (yield client.ended)
    assert (yield holds_within(lambda: not env.streamer.in_flight))
    # The upstream saw its connection closed long before the body was complete.
    assert (yield env.upstream.wait_until_idle(timeout=2.0))
    assert env.temp_files() == []
    assert not env.stored(BODY)
    assert (yield holds_within(lambda: not _files_open_under(env.storage.root)))
    assert env.metrics.value("streamer_downloads_in_flight") == 0
    assert env.metrics.value("streamer_upstream_failures_total", {"reason": "other"}) == 0


@pytest_twisted.inlineCallbacks
def test_streamed_download_continues_while_another_client_reads(lazy_env):
    env = lazy_env.start()
    env.remote("up", policy="streamed")
    url = env.upstream.register("/f", SLOW)
    yield env.publish("repo/f", BODY, ("up", url))
    leaver = _connect(env, "repo/f", reading=True)
    _hang_up_after(leaver, 20000)
    stayer = _connect(env, "repo/f", reading=True)
    assert not (yield leaver.ended)
    assert (yield stayer.ended)
    assert stayer.body_bytes == len(BODY)
    assert len(env.upstream.requests("/f")) == 1
    assert (yield holds_within(lambda: not env.streamer.in_flight))
    assert env.temp_files() == [] and not env.stored(BODY)


@pytest_twisted.inlineCallbacks
def test_client_leaving_before_the_first_byte(lazy_env):
    env = lazy_env.start()
    env.remote("lazy")
    env.remote("stream", policy="streamed")
    other = BODY[::-1]
    gate_lazy = Gated(Serve(BODY))
    gate_stream = Gated(Serve(other))
    url_lazy = env.upstream.register("/lazy", gate_lazy)
    url_stream = env.upstream.register("/stream", gate_stream)
    yield env.publish("repo/lazy", BODY, ("lazy", url_lazy))
    yield env.publish("repo/stream", other, ("stream", url_stream))
    clients = [_connect(env, "repo/lazy", reading=True), _connect(env, "repo/stream", True)]
    assert (yield holds_within(lambda: gate_lazy.waiting == 1 and gate_stream.waiting == 1))
    for client in clients:
        client.transport.abortConnection()
    yield defer.gatherResults([c.ended for c in clients])
    # streamed: the parked upstream request was cancelled; on_demand: it is still waiting.
    assert (yield holds_within(lambda: gate_stream.waiting == 0))
    assert gate_lazy.waiting == 1
    gate_lazy.release()
    assert (yield holds_within(lambda: env.stored(BODY)))
    assert (yield holds_within(lambda: not env.streamer.in_flight))
    assert env.temp_files() == []


@pytest_twisted.inlineCallbacks
def test_shutdown_cancels_downloads_and_refuses_new_ones(lazy_env):
    env = lazy_env.start()
    env.remote("up")
    url = env.upstream.register("/f", SLOW)
    yield env.publish("repo/f", BODY, ("up", url))
    client = _connect(env, "repo/f", reading=True)
    assert (yield holds_within(lambda: client.body_bytes > 0))
    env.resource.close()
    assert not (yield client.ended), "a cut-off body must not end cleanly"
    assert client.body_bytes < len(BODY)
    assert not env.streamer.in_flight
    assert (yield env.upstream.wait_until_idle(timeout=2.0))
    assert env.temp_files() == [] and not env.stored(BODY)
    code, out, _ = yield run_curl("-sS", "-o", "/dev/null", "-w", "%{http_code}", env.url("repo/f"))
    assert out == b"503"
