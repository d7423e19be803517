"""Pulp's DownloaderFactory and Remote.get_downloader on Twisted: overrides for new schemes get
only the arguments their class takes, user_agent() is static, allowed_digests is a factory
argument and a remote setting (TOML too), remote_artifact= is understood, and the remote's rate
limiter is a throttler."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import task

from downloaders import (
    BaseDownloader,
    DownloaderFactory,
    RemoteSettings,
    UnsupportedDigestValidationError,
)
from downloaders.context import DownloadContext
from importer import Remote
from store import CatalogEntry
from streamer.config import ConfigError, load_config
from tests.support.faults import Serve

#: Every test here runs over both HTTP clients (see tests.support.fixtures.http_client).
pytestmark = pytest.mark.usefixtures("http_client")

BODY = b"factory seeds\n" * 40
MD5 = hashlib.md5(BODY).hexdigest()  # what an old repository publishes
SHA256 = hashlib.sha256(BODY).hexdigest()


class FtpDownloader(BaseDownloader):
    """A new scheme the seeds' way: no __init__ of its own, bytes through handle_data."""

    def _run(self, extra_data: Any = None) -> None:
        self.handle_data(b"ftp:" + self.url.encode())


class Closed(BaseDownloader):
    """A closed signature: it takes nothing but these."""

    def __init__(self, url: str, expected_size: int | None = None, semaphore: Any = None) -> None:
        super().__init__(url, expected_size=expected_size, semaphore=semaphore)

    def _run(self, extra_data: Any = None) -> None:
        self.handle_data(b"x")


@pytest_twisted.ensureDeferred
async def test_an_override_for_a_new_scheme_gets_only_what_it_takes(tmp_path):
    remote = RemoteSettings(url="http://127.0.0.1:1/", allowed_digests=["md5", "sha256"])
    factory = DownloaderFactory(remote, {"ftp": FtpDownloader, "closed": Closed})
    downloader = factory.build("ftp://host/file", temp_dir=str(tmp_path))
    assert isinstance(downloader, FtpDownloader)
    assert downloader.semaphore is factory.semaphore
    assert downloader.context is factory.context and isinstance(factory.context, DownloadContext)
    assert downloader.allowed_digests == ("md5", "sha256")
    assert not hasattr(downloader, "agent")
    result = await downloader.run()
    with open(result.path, "rb") as f:
        assert f.read() == b"ftp:ftp://host/file"

    closed = factory.build("closed://x", expected_size=1)
    assert closed.semaphore is factory.semaphore and closed.expected_size == 1
    with pytest.raises(TypeError):  # a caller's own keyword is not dropped silently
        factory.build("closed://x", expected_digests={"sha256": SHA256})
    await factory.close()


def test_user_agent_is_a_static_method():
    plain = DownloaderFactory.user_agent()
    assert plain.startswith("twisted-streamer/")
    factory = DownloaderFactory(RemoteSettings(url="http://127.0.0.1:1/", user_agent="pulp/3"))
    assert factory.user_agent() == f"{plain} pulp/3"


@pytest_twisted.ensureDeferred
async def test_md5_allowed_by_the_remote_setting(upstream, tmp_path):
    url = upstream.register("/old.tar", Serve(BODY))
    strict = Remote(name="strict", url=url)
    with pytest.raises(UnsupportedDigestValidationError, match="allowed_digests"):
        strict.get_downloader(url, expected_digests={"md5": MD5})
    relaxed = Remote(name="relaxed", url=url, allowed_digests=["md5", "sha256"])
    result = await relaxed.get_downloader(
        url, expected_digests={"md5": MD5}, temp_dir=str(tmp_path)
    ).run()
    assert result.artifact_attributes == {"size": len(BODY), "md5": MD5, "sha256": SHA256}
    # The factory argument wins over the remote's setting.
    factory = DownloaderFactory(relaxed, allowed_digests=["sha256"])
    with pytest.raises(UnsupportedDigestValidationError, match="allowed_digests"):
        factory.build(url, expected_digests={"md5": MD5})
    await relaxed.close()
    await factory.close()


def test_allowed_digests_in_the_configuration_file(tmp_path):
    def config(line: str) -> Any:
        path = tmp_path / "streamer.toml"
        path.write_text(
            f'[[remotes]]\nname = "r"\nurl = "http://127.0.0.1:1/PULP_MANIFEST"\n{line}\n'
        )
        return load_config(path, environ={})

    assert config("").remotes[0].allowed_digests == ("sha224", "sha256", "sha384", "sha512")
    assert config('allowed_digests = ["sha256", "md5"]').remotes[0].allowed_digests == (
        "sha256",
        "md5",
    )
    with pytest.raises(ConfigError, match=r"remotes\[0\]\.allowed_digests: unknown algorithm"):
        config('allowed_digests = ["crc32"]')


@pytest_twisted.ensureDeferred
async def test_get_downloader_takes_the_seeds_remote_artifact(upstream, tmp_path):
    url = upstream.register("/a", Serve(BODY))
    remote = Remote(name="r", url=url)
    artifact = CatalogEntry("r/a", "r", url, len(BODY), {"sha256": SHA256})
    downloader = remote.get_downloader(remote_artifact=artifact, temp_dir=str(tmp_path))
    assert (downloader.url, downloader.expected_size) == (url, len(BODY))
    assert downloader.expected_digests == {"sha256": SHA256}
    await downloader.run()
    assert remote.get_downloader(entry=artifact).expected_size == len(BODY)  # the older name
    await remote.close()


def test_the_remotes_rate_limiter_is_a_throttler():
    clock = task.Clock()
    factory = DownloaderFactory(
        RemoteSettings(url="http://127.0.0.1:1/", rate_limit=2), reactor=clock
    )
    throttler = factory.throttler
    fired: list[int] = []
    for n in range(3):
        throttler.acquire().addCallback(lambda _, n=n: fired.append(n))
        throttler.release()
    assert fired == [0]
    clock.advance(0.5)
    assert fired == [0, 1]
    clock.advance(0.5)
    assert fired == [0, 1, 2]
    assert DownloaderFactory(RemoteSettings(url="http://127.0.0.1:1/")).throttler is None
