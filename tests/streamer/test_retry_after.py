"""Retry-After on live requests: never ask an origin again before it, fail over at once, wait
within the remote's ``sock_read_timeout`` when no entry is left, else 503 with our own
Retry-After.

The lazy streamer runs on a `task.Clock` (its waits and cooldowns), while the HTTP goes over
the real reactor to the loopback upstream: no test sleeps through a Retry-After.
"""

from __future__ import annotations

import email.utils
import time

import pytest_twisted
import treq
from twisted.internet import task

from tests.downloaders.support import delayed_at
from tests.support.faults import Serve, Status, StatusThenServe
from tests.support.polling import holds_within, until

BODY = bytes(range(256)) * 64


def clocked(lazy_env):
    """The lazy env started with its streamer's timers on a Clock."""
    env = lazy_env.start()
    clock = task.Clock()
    env.streamer.reactor = clock
    return env, clock


async def busy_file(lazy_env, behaviour, **settings):
    """``repo/f`` (BODY) from the upstream's ``/f`` answering with *behaviour*, through a
    remote ``busy`` with *settings*; the streamer on a Clock. Returns (env, clock)."""
    env, clock = clocked(lazy_env)
    env.remote("busy", **settings)
    url = env.upstream.register("/f", behaviour)
    await env.publish("repo/f", BODY, ("busy", url))
    return env, clock


async def one_client_waiting(lazy_env, **settings):
    """A client of ``repo/f`` waiting 2 s for its origin (503 "Retry-After: 2", then the
    body; ``sock_read_timeout`` 5 and *settings*). Returns (env, clock, the client's response
    Deferred)."""
    env, clock = await busy_file(
        lazy_env,
        StatusThenServe(503, 1, Serve(BODY), retry_after=2),
        sock_read_timeout=5,
        **settings,
    )
    d = treq.get(env.url("repo/f"))
    await until(lambda: delayed_at(clock) == [2.0])
    return env, clock, d


async def get(env, path: str) -> tuple[int, dict[str, str], bytes]:
    response = await treq.get(env.url(path))
    body = await response.content()
    headers = {
        name.decode().lower(): values[0].decode()
        for name, values in response.headers.getAllRawHeaders()
    }
    return response.code, headers, body


@pytest_twisted.ensureDeferred
async def test_waits_out_a_retry_after_within_sock_read_timeout(lazy_env):
    env, clock, d = await one_client_waiting(lazy_env, max_retries=3)
    answered: list[object] = []
    d.addCallback(lambda r: answered.append(r) or r)
    # One request, no retry inside the downloader (its retries would all come too early).
    assert len(env.upstream.requests("/f")) == 1
    clock.advance(1.9)
    await holds_within(lambda: False, timeout=0.2)
    assert len(env.upstream.requests("/f")) == 1 and answered == []
    clock.advance(0.1)
    response = await d
    assert response.code == 200
    assert await response.content() == BODY
    assert len(env.upstream.requests("/f")) == 2


@pytest_twisted.ensureDeferred
async def test_waits_out_a_retry_after_http_date(lazy_env):
    env, clock = clocked(lazy_env)
    env.remote("busy", max_retries=3, sock_read_timeout=5)
    when = email.utils.formatdate(time.time() + 4, usegmt=True)
    url = env.upstream.register("/f", StatusThenServe(429, 1, Serve(BODY), retry_after=when))
    await env.publish("repo/f", BODY, ("busy", url))

    d = treq.get(env.url("repo/f"))
    await until(lambda: delayed_at(clock))
    [due] = delayed_at(clock)
    assert 2.0 < due <= 4.0, due
    clock.advance(due)
    response = await d
    assert (response.code, await response.content()) == (200, BODY)
    assert len(env.upstream.requests("/f")) == 2


@pytest_twisted.ensureDeferred
async def test_a_retry_after_beyond_sock_read_timeout_is_a_503_with_ours(lazy_env):
    env, clock = clocked(lazy_env)
    env.remote("busy", max_retries=3, sock_read_timeout=5)
    url = env.upstream.register("/f", StatusThenServe(503, 1, Serve(BODY), retry_after=10))
    other = env.upstream.register("/g", Serve(BODY[::-1]))
    await env.publish("repo/f", BODY, ("busy", url))
    await env.publish("repo/g", BODY[::-1], ("busy", other))

    status, headers, body = await get(env, "repo/f")
    assert (status, headers["retry-after"]) == (503, "10"), body
    assert b"upstream busy" in body and headers["content-type"].startswith("text/plain")
    assert delayed_at(clock) == [], "nothing waits"
    clock.advance(4)
    # The origin is left alone until then, for this path and every other one.
    for path in ("repo/f", "repo/g"):
        status, headers, _ = await get(env, path)
        assert (status, headers["retry-after"]) == (503, "6")
    assert len(env.upstream.requests("/f")) == 1 and env.upstream.requests("/g") == []
    clock.advance(6)
    status, _, body = await get(env, "repo/f")
    assert (status, body) == (200, BODY)
    assert len(env.upstream.requests("/f")) == 2


@pytest_twisted.ensureDeferred
async def test_waiting_is_bounded_by_sock_read_timeout_in_all(lazy_env):
    env, clock = await busy_file(
        lazy_env, Status(503, {"Retry-After": "3"}), max_retries=3, sock_read_timeout=5
    )

    d = treq.get(env.url("repo/f"))
    await until(lambda: delayed_at(clock) == [3.0])
    clock.advance(3)
    # Asked again after 3 s, told 3 s more: 6 s in all would pass the 5 s the remote allows.
    await until(lambda: len(env.upstream.requests("/f")) == 2)
    response = await d
    assert response.code == 503
    assert response.headers.getRawHeaders(b"retry-after") == [b"3"]
    assert delayed_at(clock) == []


@pytest_twisted.ensureDeferred
async def test_a_client_leaving_during_the_wait_cancels_it(lazy_env):
    env, clock, d = await one_client_waiting(lazy_env)
    d.cancel()
    await until(lambda: delayed_at(clock) == [])
    assert not env.streamer.waiting
    clock.advance(2)
    assert len(env.upstream.requests("/f")) == 1


@pytest_twisted.ensureDeferred
async def test_stopping_answers_requests_waiting_for_a_busy_origin(lazy_env):
    env, clock, d = await one_client_waiting(lazy_env)
    await env.streamer.stop()
    response = await d
    assert response.code == 503
    assert b"shutting down" in await response.content()
    assert delayed_at(clock) == [] and not env.streamer.waiting


@pytest_twisted.ensureDeferred
async def test_retry_after_0_still_cools_down(lazy_env):
    env, clock = await busy_file(
        lazy_env, Status(503, {"Retry-After": "0"}), max_retries=1, sock_read_timeout=5
    )
    # "Now" is taken at its word (one retry at once), then the usual cooldown: a source that
    # keeps failing is not asked again by every request.
    status, headers, _ = await get(env, "repo/f")
    assert (status, headers["retry-after"]) == (503, "30")
    status, _, _ = await get(env, "repo/f")
    assert status == 503
    assert len(env.upstream.requests("/f")) == 2
    assert delayed_at(clock) == []


@pytest_twisted.ensureDeferred
async def test_clients_waiting_for_the_same_origin_share_one_request_after(lazy_env):
    env, clock = await busy_file(
        lazy_env, StatusThenServe(503, 1, Serve(BODY), retry_after=2), sock_read_timeout=5
    )

    first = treq.get(env.url("repo/f"))
    await until(lambda: len(env.streamer.waiting) == 1)
    second = treq.get(env.url("repo/f"))
    await until(lambda: len(env.streamer.waiting) == 2)
    assert len(env.upstream.requests("/f")) == 1, "the second client did not ask the origin"
    clock.advance(2)
    for d in (first, second):
        response = await d
        assert (response.code, await response.content()) == (200, BODY)
    assert len(env.upstream.requests("/f")) == 2


@pytest_twisted.ensureDeferred
async def test_no_read_timeout_waits_any_retry_after(lazy_env):
    env, clock = clocked(lazy_env)
    env.remote("busy", sock_read_timeout=0)  # no read timeout: the client may wait
    url = env.upstream.register("/f", StatusThenServe(503, 1, Serve(BODY), retry_after=300))
    await env.publish("repo/f", BODY, ("busy", url))
    d = treq.get(env.url("repo/f"))
    await until(lambda: delayed_at(clock) == [300.0])
    clock.advance(300)
    response = await d
    assert (response.code, await response.content()) == (200, BODY)


def test_with_no_busy_origin_a_request_parses_no_url(monkeypatch):
    """Every cold request asks whether its origin is busy; while none is (nearly always) the
    answer needs no url parsing."""
    import streamer.busy as busy_module

    def parse(url: str) -> str:
        raise AssertionError(f"parsed {url}")

    monkeypatch.setattr(busy_module, "origin_of", parse)
    origins = busy_module.BusyOrigins()
    assert origins.error("http://example.invalid/a", 0.0) is None
    assert origins.left("http://example.invalid/a", 0.0) is None
