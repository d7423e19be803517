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

import attrs
import pytest
import pytest_twisted

from store import CatalogEntry
from tests.support import faults
from tests.support.clients import run_curl, run_process, run_wget
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
    assert b"streamer_upstream_failures_total{" in env.service.metrics.render()
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
@pytest.mark.parametrize(
    "date",
    [
        "a week ahead",
        # Not a date we can keep (Twisted's parser refuses years before 1970): cold and warm
        # alike say now. Before, the cold answer forwarded them as they were and the warm one
        # gave the time of the commit.
        "yesterday",
        "Mon, 01 Jan 1900 00:00:00 GMT",
    ],
)
async def test_a_last_modified_in_the_future_is_sent_and_stored_as_now(
    make_service, upstream, date
):
    body = f"dated by an upstream's Last-Modified: {date}\n".encode()
    if date == "a week ahead":  # an upstream whose clock runs a week ahead
        date = email.utils.formatdate(time.time() + 7 * 86400, usegmt=True)
    url = upstream.register("/ahead.txt", faults.Serve(body, last_modified=date))
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


PUBLISHED = "Mon, 01 Jan 2024 00:00:00 GMT"
SHA_V1 = hashlib.sha256(V1).hexdigest()


@pytest_twisted.ensureDeferred
async def test_if_modified_since_on_cold_content_goes_upstream(make_service, upstream):
    url = upstream.register("/a.xml", faults.Serve(V1, last_modified=PUBLISHED))
    env = await make_service()
    await env.add("a.xml", V1, stored=False, url=url)

    # The client's copy is current: the upstream's 304 is ours, no body is downloaded.
    answer = await head_and_body(env, "fixtures/a.xml", "-H", f"If-Modified-Since: {PUBLISHED}")
    assert (answer["status"], answer["body"]) == ("304", ""), answer
    assert answer["etag"] == f'"{SHA_V1}"' and answer["last-modified"] == PUBLISHED
    [(_, sent)] = upstream.requests("/a.xml")
    assert sent["if-modified-since"] == PUBLISHED
    assert env.temp_files() == [] and not env.storage.has(SHA_V1)
    # Not a failure: no cooldown, the next plain GET goes upstream and is stored.
    answer = await head_and_body(env, "fixtures/a.xml")
    assert (answer["status"], answer["body"].encode("latin-1")) == ("200", V1)
    assert "if-modified-since" not in upstream.requests("/a.xml")[1][1]
    await until(lambda: env.storage.has(SHA_V1))
    metrics = env.service.metrics
    await until(lambda: metrics.value("streamer_downloads_in_flight") == 0)
    assert metrics.value("streamer_downloads_total") == 2
    assert b"streamer_upstream_failures_total{" not in metrics.render(), "a 304 is no failure"


@pytest_twisted.ensureDeferred
async def test_if_modified_since_older_than_the_upstream_gets_the_body(make_service, upstream):
    url = upstream.register("/a.xml", faults.Serve(V1, last_modified=PUBLISHED))
    env = await make_service()
    await env.add("a.xml", V1, stored=False, url=url)
    older = "Sun, 31 Dec 2023 00:00:00 GMT"
    answer = await head_and_body(env, "fixtures/a.xml", "-H", f"If-Modified-Since: {older}")
    assert (answer["status"], answer["body"].encode("latin-1")) == ("200", V1)
    assert upstream.requests("/a.xml")[0][1]["if-modified-since"] == older
    await until(lambda: env.storage.has(SHA_V1))
    # An invalid date, one in the future, or an If-None-Match beside it: not passed on. Each
    # on content of its own, never stored before (a stored copy answers by its own date).
    cases = (
        ("If-Modified-Since: yesterday",),
        ("If-Modified-Since: Mon, 01 Jan 99999 00:00:00 GMT",),
        ('If-None-Match: "other"', f"If-Modified-Since: {PUBLISHED}"),
    )
    for number, headers in enumerate(cases):
        body = V2 + b"%d" % number
        url = upstream.register(f"/b{number}.xml", faults.Serve(body, last_modified=PUBLISHED))
        await env.add(f"b{number}.xml", body, stored=False, url=url)
        extra = [option for header in headers for option in ("-H", header)]
        answer = await head_and_body(env, f"fixtures/b{number}.xml", *extra)
        assert (answer["status"], answer["body"].encode("latin-1")) == ("200", body), headers
        [(_, sent)] = upstream.requests(f"/b{number}.xml")
        assert "if-modified-since" not in sent, headers


@pytest_twisted.ensureDeferred
async def test_wget_timestamping_on_a_streamed_remote_downloads_once(
    make_service, upstream, tmp_path
):
    url = upstream.register("/repomd.xml", faults.Serve(V1, last_modified=PUBLISHED))
    env = await make_service(policy="streamed")
    await env.add("repomd.xml", V1, stored=False, url=url)
    folder = tmp_path / "mirror"
    folder.mkdir()
    outputs = []
    for _ in range(2):
        code, out, err = await run_wget(
            "-N", "-P", str(folder), env.url("fixtures/repomd.xml"), timeout=30
        )
        assert code == 0, err
        outputs.append(err.decode())
    assert (folder / "repomd.xml").read_bytes() == V1
    assert "304 Not Modified" in outputs[1] and "Omitting download" in outputs[1], outputs[1]
    assert "ignored If-Modified-Since" not in outputs[1]
    assert [sent.get("if-modified-since") for _, sent in upstream.requests("/repomd.xml")] == [
        None,
        PUBLISHED,
    ]
    assert not env.storage.has(SHA_V1) and env.temp_files() == []


@pytest_twisted.ensureDeferred
async def test_a_conditional_request_never_hands_its_304_to_another_client(make_service, upstream):
    gate = faults.Gated(faults.Serve(V1, last_modified=PUBLISHED))
    url = upstream.register("/a.xml", gate)
    env = await make_service()
    await env.add("a.xml", V1, stored=False, url=url)
    target = env.url("fixtures/a.xml")

    # A conditional request first, a plain one while its upstream request waits: the plain
    # one does not join the conditional download (its own request), and gets the body.
    conditional = run_curl("-s", "-i", "-H", f"If-Modified-Since: {PUBLISHED}", target)
    await until(lambda: gate.waiting == 1)
    plain = run_curl("-s", target)
    await until(lambda: gate.waiting == 2)
    gate.release()
    code, out, _ = await conditional
    assert code == 0 and out.startswith(b"HTTP/1.1 304"), out
    code, out, _ = await plain
    assert (code, out) == (0, V1)
    await until(lambda: env.storage.has(SHA_V1))


@pytest_twisted.ensureDeferred
async def test_a_conditional_download_answered_with_the_body_is_shared(make_service, upstream):
    gate = faults.Gated(faults.Trickle(V1, bytes_per_sec=20_000, interval=0.02))
    url = upstream.register("/a.xml", gate)
    env = await make_service()
    await env.add("a.xml", V1, stored=False, url=url)
    target = env.url("fixtures/a.xml")

    # The upstream has no Last-Modified to compare: it answers the conditional request with
    # the body, and a client arriving after that joins the same download.
    conditional = run_curl("-s", "-H", f"If-Modified-Since: {PUBLISHED}", target)
    await until(lambda: gate.waiting == 1)
    gate.release()
    await until(lambda: env.lazy.in_flight)
    code, out, _ = await run_curl("-s", target)
    assert (code, out) == (0, V1)
    assert (await conditional)[:2] == (0, V1)
    assert len(upstream.requests("/a.xml")) == 1


@pytest_twisted.ensureDeferred
async def test_a_download_in_flight_answers_if_modified_since_by_its_date(make_service, upstream):
    slow = faults.Trickle(V1, bytes_per_sec=10_000, interval=0.02)
    url = upstream.register("/a.xml", _Dated(slow, PUBLISHED))
    env = await make_service()
    await env.add("a.xml", V1, stored=False, url=url)
    target = env.url("fixtures/a.xml")
    plain = run_curl("-s", target)
    await until(lambda: env.lazy.in_flight and next(iter(env.lazy.in_flight.values())).headers)
    # Its Last-Modified is known: a conditional client gets 304 without another request.
    answer = await head_and_body(env, "fixtures/a.xml", "-H", f"If-Modified-Since: {PUBLISHED}")
    assert answer["status"] == "304" and answer["last-modified"] == PUBLISHED
    older = "Sun, 31 Dec 2023 00:00:00 GMT"
    answer = await head_and_body(env, "fixtures/a.xml", "-H", f"If-Modified-Since: {older}")
    assert (answer["status"], answer["body"].encode("latin-1")) == ("200", V1)
    assert (await plain)[:2] == (0, V1)
    assert len(upstream.requests("/a.xml")) == 1


@attrs.frozen
class _Dated(faults.Behaviour):
    """*then*, with a ``Last-Modified`` header."""

    then: faults.Behaviour
    last_modified: str

    def render(self, request):
        request.setHeader(b"last-modified", self.last_modified.encode())
        return self.then.render(request)
