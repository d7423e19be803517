"""Upstream statuses, conditions, retries and cooldowns, driven through the running service.

The whole `StreamerService` in-process (`make_service`), the fault upstream of
`tests.support`, real clients (curl, wget) and the real ``streamer sync`` command in a child
process writing the catalog the service reads.
"""

from __future__ import annotations

import email.utils
import hashlib
import os
import sys
import time

import pytest_twisted

from store import CatalogEntry
from tests.support import faults
from tests.support.clients import run_curl, run_process
from tests.support.polling import until

V1 = b"<repomd>" + b"1" * 3056 + b"</repomd>\n"
V2 = b"<repomd>" + b"2" * 3065 + b"</repomd>\n"


def manifest(*files: tuple[str, bytes]) -> bytes:
    """A PULP_MANIFEST listing *files* (relative path, body)."""
    return b"".join(
        b"%s,%s,%d\n" % (path.encode(), hashlib.sha256(body).hexdigest().encode(), len(body))
        for path, body in files
    )


async def streamer_sync(env) -> None:
    """``streamer --config FILE sync`` in a child process, as an operator runs it."""
    config = env.tmp_path / "streamer.toml"
    code, out, err = await run_process(
        sys.executable, "-m", "streamer.cli", "--config", str(config), "sync", timeout=60
    )
    assert code == 0, (out, err)


async def curl(env, path: str, *args: str) -> tuple[int, bytes]:
    """(status, body) of ``GET path``."""
    code, out, err = await run_curl("-s", "-w", "\n%{http_code}", *args, env.url(path))
    assert code == 0, err
    body, _, status = out.rpartition(b"\n")
    return int(status), body


async def head_and_body(env, path: str, *args: str) -> dict[str, str]:
    """The response headers (lower-case names) of ``GET path``, plus ``status`` and ``body``
    (latin-1)."""
    code, out, err = await run_curl("-s", "-i", *args, env.url(path))
    assert code == 0, err
    head, _, body = out.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {"status": lines[0].split()[1], "body": body.decode("latin-1")}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return headers


def parsedate(value: str) -> int:
    return int(email.utils.parsedate_to_datetime(value).timestamp())


@pytest_twisted.ensureDeferred
async def test_a_cooldown_ends_when_a_sync_changes_the_entry(make_service, upstream):
    # The upstream already publishes v2, the catalog still lists v1: the size differs, so the
    # source fails and goes on a cooldown. A sync of v2 makes it a new entry, tried at once.
    upstream.register("/repodata/repomd.xml", faults.Serve(V2))
    upstream.register("/PULP_MANIFEST", faults.Serve(manifest(("repodata/repomd.xml", V1))))
    env = await make_service()
    await streamer_sync(env)
    status, body = await curl(env, "fixtures/repodata/repomd.xml")
    assert status == 502 and b"expected 3074 bytes, got 3083" in body, body
    assert len(upstream.requests("/repodata/repomd.xml")) == 1
    status, _ = await curl(env, "fixtures/repodata/repomd.xml")
    assert status == 502, "the old entry stays on its cooldown"
    assert len(upstream.requests("/repodata/repomd.xml")) == 1

    upstream.register("/PULP_MANIFEST", faults.Serve(manifest(("repodata/repomd.xml", V2))))
    await streamer_sync(env)
    # The service keeps a path's catalog entries for up to a second; then the new entry.
    deadline = time.monotonic() + 5
    status, body = await curl(env, "fixtures/repodata/repomd.xml")
    while status == 502 and time.monotonic() < deadline:
        status, body = await curl(env, "fixtures/repodata/repomd.xml")
    assert (status, body) == (200, V2), status
    assert len(upstream.requests("/repodata/repomd.xml")) == 2
    await until(lambda: env.storage.has(hashlib.sha256(V2).hexdigest()))


@pytest_twisted.ensureDeferred
async def test_a_last_modified_in_the_future_is_sent_and_stored_as_now(make_service, upstream):
    body = b"dated by an upstream whose clock runs a week ahead\n"
    ahead = email.utils.formatdate(time.time() + 7 * 86400, usegmt=True)
    url = upstream.register("/ahead.txt", faults.Serve(body, last_modified=ahead))
    env = await make_service()
    await env.add("ahead.txt", body, stored=False, url=url)
    before = int(time.time())
    cold = await head_and_body(env, "fixtures/ahead.txt")
    cold_date = parsedate(cold["last-modified"])
    assert before <= cold_date <= time.time(), cold["last-modified"]
    await until(lambda: env.storage.has(hashlib.sha256(body).hexdigest()))
    stored = os.stat(env.storage.path_for(hashlib.sha256(body).hexdigest())).st_mtime
    assert int(stored) == cold_date
    warm = await head_and_body(env, "fixtures/ahead.txt")
    assert warm["last-modified"] == cold["last-modified"]
    assert len(upstream.requests("/ahead.txt")) == 1


@pytest_twisted.ensureDeferred
async def test_retry_after_fails_over_at_once_and_holds_the_origin(
    make_service, upstream, upstream_factory
):
    # The first source answers 429 with "Retry-After: 120": its origin is not asked again
    # before then. The request fails over to the mirror (another origin) at once; a path only
    # the busy origin has gets our own 503 and Retry-After, without asking it again.
    mirror = upstream_factory()
    busy = upstream.register("/a.bin", faults.StatusThenServe(429, 1, faults.Serve(V1), 120))
    only_busy = upstream.register("/b.bin", faults.Serve(V2))
    good = mirror.register("/a.bin", faults.Serve(V1))
    env = await make_service()
    sha = hashlib.sha256
    await env.catalog.replace_remote(
        "fixtures",
        [
            CatalogEntry(
                "fixtures/a.bin", "fixtures", busy, len(V1), {"sha256": sha(V1).hexdigest()}
            ),
            CatalogEntry(
                "fixtures/a.bin",
                "fixtures",
                good,
                len(V1),
                {"sha256": sha(V1).hexdigest()},
                position=1,
            ),
            CatalogEntry(
                "fixtures/b.bin", "fixtures", only_busy, len(V2), {"sha256": sha(V2).hexdigest()}
            ),
        ],
    )
    started = time.monotonic()
    answer = await head_and_body(env, "fixtures/a.bin")
    assert (answer["status"], answer["body"].encode("latin-1")) == ("200", V1)
    assert time.monotonic() - started < 2, "failover must not wait for the Retry-After"
    assert len(upstream.requests("/a.bin")) == 1, "no retry before the Retry-After"
    assert len(mirror.requests("/a.bin")) == 1
    answer = await head_and_body(env, "fixtures/b.bin")
    assert answer["status"] == "503" and "upstream busy" in answer["body"], answer
    assert 118 <= int(answer["retry-after"]) <= 120
    assert upstream.requests("/b.bin") == []
