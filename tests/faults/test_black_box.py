"""The black-box contract through the running service: the streamer streams through any
downloader a plugin's importer hands out, relying only on ``handle_data()`` and ``finalize()``.

A plugin downloader written from Pulp's documentation (its own HTTP client, no ``writer=`` or
``headers_ready_callback=``) is streamed cold, then served warm from the store; one that
breaks the contract (never calls ``handle_data``) is a 502 at once, never a hang.
"""

from __future__ import annotations

import hashlib
import time

import pytest
import pytest_twisted

from tests.faults.service_env import settle
from tests.streamer.test_lazy_support import parse_response
from tests.support.clients import run_curl
from tests.support.faults import Serve

BODY = bytes(range(256)) * 2048 + b"tail"  # 512 KiB and a bit: several chunks


def plugin(name: str) -> str:
    return f'importer = "tests.importer.plugins:{name}"\n'


async def get(env, path: str, timeout: float = 10.0) -> tuple[int, dict[str, list[str]], bytes]:
    code, out, err = await run_curl("-i", "--max-time", str(timeout), env.url(path))
    assert out.startswith(b"HTTP/"), (code, err)
    return parse_response(out)


@pytest.mark.parametrize(
    ("importer", "client"), [("OwnClientImporter", "own"), ("DuckImporter", "duck")]
)
@pytest_twisted.ensureDeferred
async def test_a_plugin_downloader_is_streamed_cold_then_served_warm(
    make_service, upstream, importer, client
):
    url = upstream.register("/pool/a.bin", Serve(BODY))
    env = await make_service(remote_extra=plugin(importer))
    await env.add("a.bin", BODY, stored=False, url=url)

    status, headers, body = await get(env, "fixtures/a.bin")
    assert (status, body) == (200, BODY), "streamed cold through the plugin's downloader"
    assert headers["content-length"] == [str(len(BODY))]
    assert headers["content-type"] == ["application/octet-stream"]  # from the catalog
    [request] = upstream.requests("/pool/a.bin")
    assert request.headers.get("x-client") == client, "the plugin's own client fetched it"

    sha = hashlib.sha256(BODY).hexdigest()
    committed = await settle(lambda: env.storage.has(sha) and not env.lazy.in_flight)
    assert committed, "the cold answer was committed"
    [entry] = await env.catalog.lookup("fixtures/a.bin")
    assert entry.stored

    status, _, body = await get(env, "fixtures/a.bin")
    assert (status, body) == (200, BODY)
    assert len(upstream.requests("/pool/a.bin")) == 1, "the warm answer came from the store"
    assert env.temp_files() == []


@pytest_twisted.ensureDeferred
async def test_a_downloader_that_never_calls_handle_data_is_a_502_at_once(make_service, upstream):
    url = upstream.register("/pool/b.bin", Serve(BODY))
    env = await make_service(remote_extra=plugin("SilentImporter"))
    await env.add("b.bin", BODY, stored=False, url=url)

    started = time.monotonic()
    status, _, body = await get(env, "fixtures/b.bin", timeout=5.0)
    elapsed = time.monotonic() - started

    assert status == 502
    assert b"handle_data" in body, body
    assert elapsed < 1.0, f"answered after {elapsed:.2f} s"
    assert not env.storage.has(hashlib.sha256(BODY).hexdigest())
    assert await settle(lambda: env.temp_files() == [] and not env.lazy.in_flight)
