"""Failover between catalog entries while no byte reached the client, cooldowns, and the
answers when every entry fails: 502, 504 on timeouts, 404 when every upstream said 404.
Once bytes were sent, a failure (digest mismatch, stall, reset) aborts the connection."""

from __future__ import annotations

import pytest_twisted
from twisted.internet import defer

from tests.support.clients import free_port, run_curl
from tests.support.faults import (
    Gated,
    ResetAfter,
    Serve,
    StallAfterHeaders,
    StallMidBody,
    Status,
    WrongBytes,
    WrongSize,
)
from tests.support.lazy import parse_response
from tests.support.polling import holds_within

BODY = bytes(range(256)) * 1024  # 256 KiB


@pytest_twisted.inlineCallbacks
def test_digest_mismatch_aborts_stores_nothing_and_the_next_request_uses_the_next_entry(
    lazy_env,
):
    env = lazy_env.start()
    env.remote("bad")
    env.remote("good")
    bad = env.upstream.register("/bad", WrongBytes(BODY))
    good = env.upstream.register("/good", Serve(BODY))
    yield env.publish("repo/f", BODY, ("bad", bad), ("good", good))

    code, out, _ = yield run_curl("-f", env.url("repo/f"))
    assert code != 0, "the client must see an error"
    assert len(out) < len(BODY)
    assert (yield holds_within(lambda: not env.streamer.in_flight))
    assert not env.stored(BODY)
    assert env.temp_files() == []
    assert env.metrics.value("streamer_upstream_failures_total", {"reason": "digest_mismatch"}) == 1

    code, out, err = yield run_curl("-f", env.url("repo/f"))
    assert code == 0, err
    assert out == BODY
    assert len(env.upstream.requests("/bad")) == 1, "the bad entry is cooling down"
    assert len(env.upstream.requests("/good")) == 1
    assert (yield holds_within(lambda: env.stored(BODY)))


@pytest_twisted.inlineCallbacks
def test_wrong_content_length_fails_over_before_the_first_byte(lazy_env):
    env = lazy_env.start()
    env.remote("a")
    env.remote("b")
    long = env.upstream.register("/long", WrongSize(BODY, extra=10))
    good = env.upstream.register("/good", Serve(BODY))
    yield env.publish("repo/f", BODY, ("a", long), ("b", good))
    code, out, err = yield run_curl("-f", env.url("repo/f"))
    assert code == 0, err
    assert out == BODY
    assert env.metrics.value("streamer_upstream_failures_total", {"reason": "size_mismatch"}) == 1
    assert (yield holds_within(lambda: env.stored(BODY)))


@pytest_twisted.inlineCallbacks
def test_too_long_chunked_body_never_reaches_the_client_complete(lazy_env):
    env = lazy_env.start()
    env.remote("up")
    url = env.upstream.register("/long", Serve(BODY + b"extra", chunked=True))
    yield env.publish("repo/long", BODY, ("up", url))
    code, out, _ = yield run_curl("-f", env.url("repo/long"))
    assert code != 0
    assert len(out) < len(BODY)
    assert (yield holds_within(lambda: not env.streamer.in_flight))
    assert not env.stored(BODY) and env.temp_files() == []


@pytest_twisted.inlineCallbacks
def test_failover_before_the_first_byte(lazy_env):
    env = lazy_env.start()
    env.remote("a")
    env.remote("b")
    env.remote("c")
    env.remote("d")
    env.remote("e")
    refused = f"http://127.0.0.1:{free_port()}/nothing"
    no_downloader = "ftp://127.0.0.1/f"  # the remote cannot even build a downloader
    e500 = env.upstream.register("/500", Status(500))
    reset = env.upstream.register("/reset", ResetAfter(0, BODY))
    good = env.upstream.register("/good", Serve(BODY))
    yield env.publish(
        "repo/f",
        BODY,
        ("e", no_downloader),
        ("a", refused),
        ("b", e500),
        ("c", reset),
        ("d", good),
    )
    code, out, err = yield run_curl("-f", env.url("repo/f"))
    assert code == 0, err
    assert out == BODY
    assert [len(env.upstream.requests(p)) for p in ("/500", "/reset", "/good")] == [1, 1, 1]
    failures = env.metrics.value
    assert failures("streamer_upstream_failures_total", {"reason": "other"}) == 1
    assert failures("streamer_upstream_failures_total", {"reason": "connection"}) == 2
    assert (yield holds_within(lambda: env.stored(BODY)))


@pytest_twisted.inlineCallbacks
def test_coalesced_clients_fail_over_together_with_one_request_per_entry(lazy_env):
    env = lazy_env.start()
    env.remote("a")
    env.remote("b")
    gate = Gated(Status(503))
    first = env.upstream.register("/first", gate)
    second = env.upstream.register("/second", Serve(BODY))
    yield env.publish("repo/f", BODY, ("a", first), ("b", second))
    pending = [run_curl("-f", env.url("repo/f")) for _ in range(5)]
    assert (yield holds_within(lambda: gate.waiting == 1))
    inflight = next(iter(env.streamer.in_flight.values()))
    assert (yield holds_within(lambda: len(inflight.followers) == 5))
    gate.release()
    for code, out, err in (yield defer.gatherResults(pending)):
        assert code == 0, err
        assert out == BODY
    assert len(env.upstream.requests("/first")) == 1
    assert len(env.upstream.requests("/second")) == 1


@pytest_twisted.inlineCallbacks
def test_all_entries_down_gives_502_plain_text_without_secrets(lazy_env):
    env = lazy_env.start(cooldown=1.0)
    env.remote("a", username="alice", password="s3cret-pw")
    env.remote("b")
    url_a = env.upstream.register("/a", Status(500)).replace("http://", "http://alice:s3cret-pw@")
    refused = f"http://127.0.0.1:{free_port()}/x"
    yield env.publish("repo/f", BODY, ("a", url_a), ("b", refused))
    code, out, err = yield run_curl("-sSi", env.url("repo/f"))
    assert code == 0, err
    status, headers, body = parse_response(out)
    assert status == 502
    assert headers["content-type"] == ["text/plain; charset=utf-8"]
    assert b"HTTP 500" in body
    assert b"s3cret" not in out and b"Traceback" not in out and b"alice" not in out
    assert len(body) < 600

    # Within the cooldown: the same answer without asking the upstream again.
    code, out, _ = yield run_curl("-sSi", env.url("repo/f"))
    status, headers, body = parse_response(out)
    assert status == 502
    assert "retry-after" in headers
    assert len(env.upstream.requests("/a")) == 1

    # After the cooldown the entries are tried again.
    env.upstream.register("/a", Serve(BODY))
    yield holds_within(lambda: False, timeout=1.05)
    code, out, err = yield run_curl("-f", env.url("repo/f"))
    assert code == 0, err
    assert out == BODY
    assert len(env.upstream.requests("/a")) == 2


@pytest_twisted.inlineCallbacks
def test_all_entries_404_gives_404(lazy_env):
    env = lazy_env.start()
    env.remote("a")
    env.remote("b")
    a = env.upstream.register("/a", Status(404))
    b = env.upstream.register("/b", Status(404))
    yield env.publish("repo/f", BODY, ("a", a), ("b", b))
    code, out, err = yield run_curl("-sSi", env.url("repo/f"))
    status, _headers, body = parse_response(out)
    assert status == 404
    assert b"not found upstream" in body


@pytest_twisted.inlineCallbacks
def test_stalled_upstream_before_the_first_byte_gives_504(lazy_env):
    env = lazy_env.start()
    env.remote("up", sock_read_timeout=0.3)
    url = env.upstream.register("/stall", StallAfterHeaders(BODY))
    yield env.publish("repo/f", BODY, ("up", url))
    code, out, err = yield run_curl("-sSi", env.url("repo/f"))
    assert code == 0, err
    status, _headers, body = parse_response(out)
    assert status == 504
    assert b"timeout" in body
    assert (yield holds_within(lambda: not env.streamer.in_flight))
    assert env.temp_files() == []


@pytest_twisted.inlineCallbacks
def test_stalled_upstream_after_bytes_aborts_the_client(lazy_env):
    env = lazy_env.start()
    env.remote("up", sock_read_timeout=0.3)
    url = env.upstream.register("/stall", StallMidBody(1000, BODY))
    yield env.publish("repo/f", BODY, ("up", url))
    code, out, _ = yield run_curl("-f", env.url("repo/f"))
    assert code != 0
    assert out == BODY[:1000]
    assert (yield holds_within(lambda: not env.streamer.in_flight))
    assert not env.stored(BODY) and env.temp_files() == []


@pytest_twisted.inlineCallbacks
def test_reset_mid_body_aborts_the_client(lazy_env):
    env = lazy_env.start()
    env.remote("a")
    env.remote("b")
    reset = env.upstream.register("/reset", ResetAfter(5000, BODY))
    good = env.upstream.register("/good", Serve(BODY))
    yield env.publish("repo/f", BODY, ("a", reset), ("b", good))
    code, out, _ = yield run_curl("-f", env.url("repo/f"))
    assert code != 0, "no silent retry into a response that already carries bytes"
    assert env.upstream.requests("/good") == []
    code, out, err = yield run_curl("-f", env.url("repo/f"))
    assert code == 0, err
    assert out == BODY
