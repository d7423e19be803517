"""treq where it serves: `remote.http_client()` is a treq client on the remote's own agent
stack (its headers, credentials and concurrency limit; gzip and JSON decoded), and
`fetch_to_file` fetches a listing through it with retries and an idle timeout."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import pytest_twisted
from treq.client import HTTPClient

from downloaders import DownloadError, DownloadTimeout, NotFound
from downloaders.retry import Backoff
from downloaders.session import fetch_to_file
from importer import Remote
from tests.support.faults import (
    CloseEarly,
    Gated,
    Gzip,
    RequireBasicAuth,
    Serve,
    StallAfterHeaders,
    StatusThenServe,
)
from tests.support.polling import until

DOC = {"name": "repo", "files": 3}
REPO = Path(__file__).resolve().parents[2]


@pytest_twisted.ensureDeferred
async def test_the_client_speaks_with_the_remotes_own_settings(upstream):
    url = upstream.register(
        "/api/repo",
        RequireBasicAuth(
            "me", "pw", Gzip(Gzip.of(json.dumps(DOC).encode()).body, "application/json")
        ),
    )
    remote = Remote(name="api", url=url, username="me", password="pw", headers={"X-Team": "blue"})
    client = remote.http_client()
    assert isinstance(client, HTTPClient) and remote.http_client() is client
    response = await client.get(url)
    assert response.code == 200
    assert await response.json() == DOC, "gzip content-encoding decoded, JSON parsed"
    [request] = upstream.requests("/api/repo")
    assert request.headers["x-team"] == "blue"
    assert request.headers["user-agent"] == remote.downloader_factory().user_agent()
    await remote.close()


@pytest_twisted.ensureDeferred
async def test_the_client_keeps_the_remotes_concurrency_limit(upstream):
    gate = Gated(Serve(b"slow"))
    url = upstream.register("/slow", gate)
    remote = Remote(name="one", url=url, download_concurrency=1)
    client = remote.http_client()
    first, second = client.get(url), client.get(url)
    await until(lambda: gate.waiting == 1)
    assert len(upstream.requests("/slow")) == 1, "the second waits for the first's slot"
    gate.release()
    assert await (await first).content() == b"slow"  # its body read: the slot is free
    assert await (await second).content() == b"slow"
    assert remote.downloader_factory().semaphore.tokens == 1
    await remote.close()


@pytest_twisted.ensureDeferred
async def test_fetch_to_file_retries_and_leaves_nothing_after_a_failure(upstream, tmp_path):
    remote = Remote(name="r", url=upstream.url("/x"))
    client = remote.http_client()
    fast = Backoff(base=0.0)
    url = upstream.register("/listing", StatusThenServe(503, 2, Serve(b"a,b,1\n")))
    path = await fetch_to_file(client, url, str(tmp_path), max_retries=2, backoff=fast)
    with open(path, "rb") as f:
        assert f.read() == b"a,b,1\n"
    assert len(upstream.requests("/listing")) == 3
    os_path = tmp_path / path.rsplit("/", 1)[1]
    os_path.unlink()

    with pytest.raises(NotFound):
        await fetch_to_file(client, upstream.url("/missing"), str(tmp_path), backoff=fast)
    stalled = upstream.register("/stalled", StallAfterHeaders())
    with pytest.raises(DownloadTimeout):
        await fetch_to_file(
            client, stalled, str(tmp_path), max_retries=0, read_timeout=0.3, backoff=fast
        )
    assert list(tmp_path.iterdir()) == []
    await remote.close()
    assert await upstream.wait_until_idle(2.0), "the stalled connection was aborted"


@pytest_twisted.ensureDeferred
async def test_fetch_to_file_stops_at_max_size_of_the_decoded_body(upstream, tmp_path):
    """*max_size* counts the bytes written, after gzip is undone: 20 KiB on the wire that
    decode to 8 MiB (a gzip bomb) fail at the limit, once, and leave nothing behind."""
    remote = Remote(name="r", url=upstream.url("/x"))
    client = remote.http_client()
    bomb = Gzip.of(b"\0" * (8 << 20))
    assert len(bomb.body) < 20 * 1024
    url = upstream.register("/bomb", bomb)
    with pytest.raises(DownloadError, match="listing bigger than 1048576 bytes"):
        await fetch_to_file(
            client, url, str(tmp_path), max_size=1 << 20, max_retries=2, backoff=Backoff(base=0.0)
        )
    assert len(upstream.requests("/bomb")) == 1, "not tried again"
    assert list(tmp_path.iterdir()) == []
    await remote.close()


@pytest_twisted.ensureDeferred
async def test_fetch_to_file_says_why_a_body_is_incomplete_in_words(upstream, tmp_path):
    """A listing cut short is one readable reason (before: the repr of Twisted's list of
    failures, ``listing body incomplete: [<twisted.python.failure.Failure ...>]``)."""
    remote = Remote(name="r", url=upstream.url("/x"))
    url = upstream.register("/short", CloseEarly(100, b"a,b,c\n" * 100))
    with pytest.raises(DownloadError) as caught:
        await fetch_to_file(remote.http_client(), url, str(tmp_path), max_retries=0)
    message = str(caught.value)
    assert message.startswith("listing body incomplete: "), message
    assert "Failure" not in message and "<" not in message, message
    assert list(tmp_path.iterdir()) == []
    await remote.close()


IDNA_TABLES_AFTER_A_REQUEST = """
import json, sys
from twisted.internet import task
from importer import Remote

def main(reactor):
    remote = Remote(name="api", url=sys.argv[1])
    d = remote.http_client().get(sys.argv[1])
    d.addCallback(lambda response: response.content())
    d.addCallback(lambda body: print(json.dumps(
        {"body": body.decode(), "idna_tables": "idna.uts46data" in sys.modules})))
    return d.addCallback(lambda _: remote.close())

task.react(main)
"""


@pytest_twisted.ensureDeferred
async def test_a_request_to_an_ip_address_does_not_idna_encode_its_host(upstream):
    """The host of ``http://127.0.0.1:PORT/`` is its own IDNA encoding: a request there (a
    sync's listing) does not load the IDNA mapping tables first (2-3 ms of every ``streamer
    sync`` before its listing was asked for). Run in a fresh interpreter: nothing else may
    have loaded them."""
    from twisted.internet import utils

    url = upstream.register("/listing", Serve(b"a listing"))
    out, err, code = await utils.getProcessOutputAndValue(
        sys.executable,
        ["-c", IDNA_TABLES_AFTER_A_REQUEST, url],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        path=str(REPO),
    )
    assert code == 0, err.decode()
    assert json.loads(out.decode().splitlines()[-1]) == {"body": "a listing", "idna_tables": False}
