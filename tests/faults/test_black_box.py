"""The black-box contract through the running service: the streamer streams through any
downloader a plugin's importer hands out, relying only on ``handle_data()`` and ``finalize()``.

A plugin downloader written from Pulp's documentation (its own HTTP client, no ``writer=`` or
``headers_ready_callback=``) is streamed cold, then served warm from the store; one that
breaks the contract (never calls ``handle_data``) is a 502 at once, never a hang.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
import pytest_twisted

from importer import sync_remote
from tests.support.clients import run_curl
from tests.support.faults import Serve
from tests.support.lazy import parse_response
from tests.support.polling import holds_within

BODY = bytes(range(256)) * 2048 + b"tail"  # 512 KiB and a bit: several chunks
#: A body the streamer holds in memory until validated (`streamer.inflight.MEMORY_BODY`).
SMALL = 16 * 1024


def plugin(name: str) -> str:
    return plugin_spec(f"tests.importer.plugins:{name}")


def plugin_spec(spec: str) -> str:
    return f'importer = "{spec}"\n'


async def get(env, path: str, timeout: float = 10.0) -> tuple[int, dict[str, list[str]], bytes]:
    code, out, err = await run_curl("-i", "--max-time", str(timeout), env.url(path))
    assert out.startswith(b"HTTP/"), (code, err)
    return parse_response(out)


@pytest.mark.parametrize(
    ("importer", "client"), [("OwnClientImporter", "own"), ("DuckImporter", "duck")]
)
@pytest.mark.parametrize("size", [len(BODY), SMALL], ids=["streamed", "held-in-memory"])
@pytest_twisted.ensureDeferred
async def test_a_plugin_downloader_is_streamed_cold_then_served_warm(
    make_service, upstream, importer, client, size
):
    """Whether the body streams through a temp file or is held in memory until validated
    (up to `streamer.inflight.MEMORY_BODY`), the bytes the plugin passed are what is checked
    against the catalog's sha256."""
    whole = BODY[:size]
    url = upstream.register("/pool/a.bin", Serve(whole))
    env = await make_service(remote_extra=plugin(importer))
    await env.add("a.bin", whole, stored=False, url=url)

    status, headers, body = await get(env, "fixtures/a.bin")
    assert (status, body) == (200, whole), "streamed cold through the plugin's downloader"
    assert headers["content-length"] == [str(size)]
    assert headers["content-type"] == ["application/octet-stream"]  # from the catalog
    [request] = upstream.requests("/pool/a.bin")
    assert request.headers.get("x-client") == client, "the plugin's own client fetched it"

    sha = hashlib.sha256(whole).hexdigest()
    committed = await holds_within(lambda: env.storage.has(sha) and not env.lazy.in_flight)
    assert committed, "the cold answer was committed"
    [entry] = await env.catalog.lookup("fixtures/a.bin")
    assert entry.stored

    status, _, body = await get(env, "fixtures/a.bin")
    assert (status, body) == (200, whole)
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
    assert await holds_within(lambda: env.temp_files() == [] and not env.lazy.in_flight)


def readme_importer() -> str:
    """The Python block of the README's "Write an importer" section."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    after = readme.split("<!-- the importer example:", 1)[1]
    return after.split("```python\n", 1)[1].split("```", 1)[0]


@pytest_twisted.ensureDeferred
async def test_the_readme_importer_syncs_and_streams(make_service, upstream, tmp_path, monkeypatch):
    (tmp_path / "readme_importer.py").write_text(readme_importer())
    monkeypatch.syspath_prepend(str(tmp_path))
    files = {"docs/a.txt": b"alpha\n" * 100, "b.bin": BODY}
    index = [
        {
            "path": name,
            "url": upstream.register(f"/blobs/{n}", Serve(data)),
            "sha256": hashlib.sha256(data).hexdigest(),
            "size": len(data),
        }
        for n, (name, data) in enumerate(files.items())
    ]
    upstream.register("/PULP_MANIFEST", Serve(json.dumps(index).encode()))
    env = await make_service(remote_extra=plugin_spec("readme_importer:JsonIndexImporter"))

    report = await sync_remote(env.service.remotes["fixtures"], env.catalog, env.storage)
    assert (report.total, report.failed) == (2, [])

    for name, data in files.items():
        status, _, body = await get(env, f"fixtures/{name}")
        assert (status, body) == (200, data)
    sha = hashlib.sha256(BODY).hexdigest()
    assert await holds_within(lambda: env.storage.has(sha) and not env.lazy.in_flight)
    status, _, body = await get(env, "fixtures/b.bin")
    assert (status, body) == (200, BODY)
    assert len(upstream.requests("/blobs/1")) == 1


@pytest_twisted.ensureDeferred
async def test_bytes_a_foreign_downloader_did_not_validate_are_never_completed_or_stored(
    make_service, upstream
):
    """A downloader that is not a BaseDownloader is hashed by the streamer itself: other bytes
    of the right size reach the client truncated (its connection aborted), never stored."""
    url = upstream.register("/pool/c.bin", Serve(BODY))
    env = await make_service(remote_extra=plugin("LyingDuckImporter"))
    await env.add("c.bin", BODY, stored=False, url=url)

    code, out, _ = await run_curl("-s", "-o", "-", "--max-time", "10", env.url("fixtures/c.bin"))
    assert code != 0, "curl saw the response cut short"
    assert len(out) < len(BODY)
    assert await holds_within(lambda: not env.lazy.in_flight and env.temp_files() == [])
    assert not env.storage.has(hashlib.sha256(BODY).hexdigest())
