"""The catalog's PostgreSQL goes down under a running service and comes back: stored content
this node knows keeps being served, lazy and unknown paths get 503 (never 500), and the service
recovers by itself. Driven with curl against the real service and the session's private
cluster, stopped and started for real."""

from __future__ import annotations

import hashlib

import pytest_twisted
from twisted.internet import reactor, task

from tests.support.clients import run_curl
from tests.support.faults import Serve
from tests.support.lazy import parse_response
from tests.support.polling import holds_within

STORED = b"stored before the outage\n" * 100
LAZY = b"only upstream has these bytes\n" * 1000


async def get(env, path: str, *args: str) -> tuple[int, dict[str, list[str]], bytes]:
    code, out, err = await run_curl("-i", "--max-time", "10", *args, env.url(path))
    assert out.startswith(b"HTTP/"), (code, err)
    return parse_response(out)


@pytest_twisted.ensureDeferred
async def test_postgresql_outage_while_serving(
    make_service, upstream, postgres_cluster, postgres_url
):
    url = upstream.register("/pool/lazy.bin", Serve(LAZY))
    env = await make_service(catalog_url=postgres_url)
    env.service.content.lookup_cache_seconds = 0.05  # answers expire at once: the outage shows
    await env.add("stored.bin", STORED, stored=True)
    await env.add("lazy.bin", LAZY, stored=False, url=url)
    status, _, body = await get(env, "fixtures/stored.bin")
    assert (status, body) == (200, STORED)

    await postgres_cluster.stop()
    try:
        await task.deferLater(reactor, 0.1, lambda: None)  # the cached answer expires
        # Stored content this node looked up before is still served, whole, ranges too.
        status, headers, body = await get(env, "fixtures/stored.bin")
        assert (status, body) == (200, STORED)
        assert headers["etag"] == [f'"{hashlib.sha256(STORED).hexdigest()}"']
        status, _, body = await get(env, "fixtures/stored.bin", "-r", "0-9")
        assert (status, body) == (206, STORED[:10])
        # What needs the catalog is 503 with Retry-After, not 500: lazy, unknown, listings.
        for path in ("fixtures/lazy.bin", "fixtures/never-seen.bin", "fixtures/"):
            status, headers, body = await get(env, path)
            assert status == 503, (path, status, body)
            assert headers["retry-after"] == ["5"] and body == b"catalog unavailable\n"
        status, _, _ = await get(env, "fixtures/lazy.bin", "-I")
        assert status == 503
        assert upstream.requests("/pool/lazy.bin") == []
        assert env.in_flight_requests() == 0
    finally:
        await postgres_cluster.start()

    # Back without a restart: the lazy file streams from upstream and is stored.
    async def lazy_answers() -> bool:
        status, _, body = await get(env, "fixtures/lazy.bin")
        return status == 200 and body == LAZY

    for _ in range(100):
        if await lazy_answers():
            break
        await task.deferLater(reactor, 0.05, lambda: None)
    else:
        raise AssertionError("the service did not recover after the catalog came back")
    sha = hashlib.sha256(LAZY).hexdigest()
    assert await holds_within(lambda: env.storage.has(sha) and not env.lazy.in_flight)
    [entry] = await env.catalog.lookup("fixtures/lazy.bin")
    assert entry.stored
    status, _, body = await get(env, "fixtures/")
    assert status == 200 and b"lazy.bin" in body
