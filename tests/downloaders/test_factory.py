"""DownloaderFactory against real loopback servers: classes by scheme, settings applied, one
shared pool, the per-remote concurrency limit, the rate limit, basic auth on the own host."""

from __future__ import annotations

import base64
import hashlib
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.web.http import Request

import twisted
from downloaders import (
    ConnectionFailed,
    DownloaderFactory,
    FileDownloader,
    HttpDownloader,
    NotAuthorized,
    RemoteSettings,
)
from tests.support.faults import Behaviour, Delay, RequireBasicAuth, Serve
from tests.support.resolver import mapped_names

#: Every test here runs over both HTTP clients (see tests.support.fixtures.http_client).
pytestmark = pytest.mark.usefixtures("http_client")

REPO = Path(__file__).resolve().parents[2]
BODY = b"factory body\n" * 50
SHA256 = hashlib.sha256(BODY).hexdigest()


class InFlight:
    """Counts requests being answered at once over several paths (high-water mark)."""

    def __init__(self) -> None:
        self.active = 0
        self.peak = 0

    def started(self, request: Request) -> None:
        self.active += 1
        self.peak = max(self.peak, self.active)
        request.notifyFinish().addBoth(self._done)

    def _done(self, _: Any) -> None:
        self.active -= 1


class CountInFlight(Behaviour):
    """Answers after ``seconds`` with ``body``, reporting each request to ``tracker``."""

    def __init__(self, body: bytes, seconds: float, tracker: InFlight) -> None:
        self.body = body
        self.seconds = seconds
        self.tracker = tracker

    def render(self, request: Request) -> Any:
        self.tracker.started(request)
        return Delay(self.seconds, Serve(self.body)).render(request)


def make_factory(url: str, tmp_path: Path, **kwargs: Any) -> DownloaderFactory:
    kwargs.setdefault("max_retries", 0)
    return DownloaderFactory(RemoteSettings(url=url, **kwargs), temp_dir=str(tmp_path))


def test_classes_by_scheme_and_overrides(tmp_path: Path) -> None:
    class Mirrors(HttpDownloader):
        pass

    factory = make_factory("https://example.org/", tmp_path, allowed_import_paths=[str(tmp_path)])
    assert type(factory.build("http://example.org/a")) is HttpDownloader
    assert type(factory.build("https://example.org/a")) is HttpDownloader
    file_downloader = factory.build((tmp_path / "x").as_uri())
    assert type(file_downloader) is FileDownloader
    assert file_downloader.allowed_import_paths == (str(tmp_path),)
    with pytest.raises(ValueError, match="ftp"):
        factory.build("ftp://example.org/a")
    overridden = DownloaderFactory(factory.remote, {"https": Mirrors})
    assert type(overridden.build("https://example.org/a")) is Mirrors
    assert type(overridden.build("http://example.org/a")) is HttpDownloader


def test_settings_and_kwargs_reach_the_downloader(tmp_path: Path) -> None:
    factory = make_factory(
        "https://example.org/",
        tmp_path,
        headers={"X-Remote": "1", "X-Both": "remote"},
        max_retries=5,
        connect_timeout=7,
        sock_read_timeout=8,
        total_timeout=9,
        user_agent="pulp/3.0",
    )
    written: list[bytes] = []

    class Writer:
        def write(self, data: bytes) -> None:
            written.append(data)

    writer = Writer()
    downloader = factory.build(
        "https://example.org/a",
        expected_digests={"sha256": SHA256},
        expected_size=len(BODY),
        headers={"X-Both": "call"},
        method="HEAD",
        writer=writer,
    )
    assert downloader.request_headers["X-Remote"] == "1"
    assert downloader.request_headers["X-Both"] == "call"
    assert downloader.request_headers["User-Agent"] == factory.user_agent()
    assert (downloader.connect_timeout, downloader.sock_read_timeout) == (7, 8)
    assert downloader.total_timeout == 9 and downloader.max_retries == 5
    assert downloader.method == "HEAD" and downloader.writer is writer
    assert downloader.expected_size == len(BODY)
    assert downloader.semaphore is factory.semaphore
    assert downloader.agent is factory.agent
    assert downloader.temp_dir == str(tmp_path)
    other = factory.build("https://example.org/b")
    assert other.agent is downloader.agent and other.semaphore is downloader.semaphore


def test_user_agent_names_project_python_twisted_and_the_remotes_own(tmp_path: Path) -> None:
    plain = make_factory("https://example.org/", tmp_path).user_agent()
    assert plain.startswith("twisted-streamer/")
    assert f"Python {platform.python_version()}" in plain
    assert f"Twisted {twisted.__version__}" in plain
    own = make_factory("https://example.org/", tmp_path, user_agent="pulp/3.0").user_agent()
    assert own == plain + " pulp/3.0"


def test_user_agent_states_the_installed_version_without_a_metadata_look_up() -> None:
    """The version comes from `downloaders.version` (setup.py reads it there): the start of
    every command and helper process does not scan the installed distributions for it."""
    from importlib import metadata

    code = (
        "import sys\n"
        "from downloaders import DownloaderFactory\n"
        "print(DownloaderFactory.user_agent().split()[0])\n"
        "print('importlib.metadata' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    ).stdout.split()
    assert out == [f"twisted-streamer/{metadata.version('twisted-streamer')}", "False"]


@pytest_twisted.ensureDeferred
async def test_an_address_is_connected_to_without_a_lookup_a_name_after_one(
    upstream, tmp_path: Path
) -> None:
    """A remote named by an IP address is connected to directly (no lookup in the reactor's
    thread pool for each new connection, as aiohttp does); a host name is still looked up
    for every new connection."""
    url = upstream.register("/f", Serve(BODY))
    by_name = upstream.url("/f", host="mirror.test")
    with mapped_names({"mirror.test": ["127.0.0.1"]}) as resolver:
        for target in (url, by_name):
            factory = make_factory(target, tmp_path, download_concurrency=2)
            downloads = [factory.build(target, expected_digests={"sha256": SHA256}) for _ in "ab"]
            results = await defer.gatherResults([d.run() for d in downloads])
            await factory.close()
            assert [r.artifact_attributes["sha256"] for r in results] == [SHA256, SHA256]
    assert resolver.lookups == ["mirror.test", "mirror.test"]  # two connections, by name


@pytest_twisted.ensureDeferred
async def test_odd_address_literals_fail_as_connection_failures(tmp_path: Path) -> None:
    """An address with a zone, or with a port out of range, still fails as a connection
    that could not be made (through the resolver), not with a socket module's error."""
    for url in ("http://[fe80::1%25lo]:1/x", "http://[::1]:99999/x", "http://127.0.0.1:0/x"):
        factory = make_factory(url, tmp_path)
        with pytest.raises(ConnectionFailed) as caught:
            await factory.build(url).run()
        await factory.close()
        assert "gaierror" not in str(caught.value) and "Overflow" not in str(caught.value)


@pytest_twisted.ensureDeferred
async def test_download_with_headers_and_user_agent(upstream, tmp_path: Path) -> None:
    url = upstream.register("/f", Serve(BODY))
    factory = make_factory(url, tmp_path, headers={"X-Token": "abc"})
    result = await factory.build(url, expected_digests={"sha256": SHA256}).run()
    await factory.close()
    assert Path(result.path).read_bytes() == BODY
    (request,) = upstream.requests("/f")
    assert request.headers["x-token"] == "abc"
    assert request.headers["user-agent"] == factory.user_agent()
    assert "authorization" not in request.headers


@pytest_twisted.ensureDeferred
async def test_header_names_merge_case_insensitively(upstream, tmp_path: Path) -> None:
    """A remote's ``user-agent`` replaces ours: one User-Agent header, never two."""
    url = upstream.register("/ua", Serve(BODY))
    factory = make_factory(url, tmp_path, headers={"user-agent": "mirror-bot/1"})
    await factory.build(url, headers={"X-TOKEN": "call"}).run()
    await factory.close()
    (request,) = upstream.requests("/ua")
    assert request.headers["user-agent"] == "mirror-bot/1"  # joined with ", " if sent twice
    assert request.headers["x-token"] == "call"


@pytest_twisted.ensureDeferred
async def test_file_url_through_the_factory(tmp_path: Path) -> None:
    folder = tmp_path / "allowed"
    folder.mkdir()
    (folder / "f").write_bytes(BODY)
    temp = tmp_path / "tmp"
    temp.mkdir()
    factory = DownloaderFactory(
        RemoteSettings(url=folder.as_uri(), allowed_import_paths=[str(folder)]),
        temp_dir=str(temp),
    )
    result = await factory.build((folder / "f").as_uri(), expected_digests={"sha256": SHA256}).run()
    assert result.artifact_attributes["size"] == len(BODY)
    await factory.close()


@pytest_twisted.ensureDeferred
async def test_200_downloads_never_exceed_download_concurrency(
    upstream, tmp_path: Path, capsys
) -> None:
    paths = [f"/f{i}" for i in range(8)]
    tracker = InFlight()
    for path in paths:
        upstream.register(path, CountInFlight(BODY, 0.002, tracker))
    factory = make_factory(upstream.url("/"), tmp_path, download_concurrency=4)
    downloads = [
        factory.build(upstream.url(paths[i % len(paths)]), expected_digests={"sha256": SHA256})
        for i in range(200)
    ]
    results = await defer.gatherResults([d.run() for d in downloads], consumeErrors=True)
    await factory.close()
    assert len(results) == 200
    assert all(r.artifact_attributes["sha256"] == SHA256 for r in results)
    with capsys.disabled():
        print(
            f"\n[concurrency] 200 downloads, download_concurrency=4: peak concurrent "
            f"connections at the server = {upstream.max_concurrent_connections}, "
            f"connections opened in total = {upstream.total_connections}, peak requests in "
            f"flight = {tracker.peak}"
        )
    assert upstream.max_concurrent_connections <= 4
    assert upstream.max_concurrent_connections >= 2  # they did run in parallel
    assert upstream.total_connections <= 8  # persistent connections were reused
    assert 2 <= tracker.peak <= 4
    assert len(upstream.all_requests()) == 200


@pytest_twisted.ensureDeferred
async def test_rate_limit_spaces_request_starts(upstream, tmp_path: Path) -> None:
    url = upstream.register("/f", Serve(BODY))
    factory = make_factory(url, tmp_path, rate_limit=50)  # one start every 20 ms
    started = time.monotonic()
    await defer.gatherResults([factory.build(url).run() for _ in range(6)])
    elapsed = time.monotonic() - started
    await factory.close()
    assert len(upstream.requests("/f")) == 6
    assert elapsed >= 5 * 0.02 * 0.9


@pytest_twisted.ensureDeferred
async def test_basic_auth_sent_to_the_remotes_own_host(upstream, tmp_path: Path) -> None:
    url = upstream.register("/private", RequireBasicAuth("alice", "pässword", Serve(BODY)))
    factory = make_factory(url, tmp_path, username="alice", password="pässword")
    result = await factory.build(url, expected_digests={"sha256": SHA256}).run()
    assert result.artifact_attributes["size"] == len(BODY)
    (request,) = upstream.requests("/private")
    expected = base64.b64encode("alice:pässword".encode()).decode()
    assert request.headers["authorization"] == f"Basic {expected}"
    wrong = make_factory(url, tmp_path, username="alice", password="wrong")
    with pytest.raises(NotAuthorized) as caught:
        await wrong.build(url).run()
    assert "wrong" not in str(caught.value)
    # Another host (localhost, not the remote's 127.0.0.1) gets no credentials.
    with pytest.raises(NotAuthorized):
        await factory.build(upstream.url("/private", host="localhost")).run()
    assert "authorization" not in upstream.requests("/private")[-1].headers
    await factory.close()
    await wrong.close()
