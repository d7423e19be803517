"""The fault matrix through the downloaders (the sync side).

Every fault of the fault-injecting upstream runs through a bare `HttpDownloader` (its default
agent and pool) and through a `DownloaderFactory` (the way the importer and the streamer build
downloaders) over each HTTP client (`DirectGetAgent` and Twisted's ``Agent``). For each, the
documented outcome (retry and succeed, or a clear error type and message), then: no temp file
left, no connection left open at the upstream beyond the idle keep-alive ones the pool holds,
and the next download through the same builder still works.
Backoffs are recorded and shortened, so no test sleeps through one.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from downloaders import DownloaderFactory, HttpDownloader, RemoteSettings
from downloaders.http import default_pool
from tests.faults.matrix import BODY, FAULTS, Fault, RecordingBackoff, fault_ids, sha256
from tests.support import faults
from tests.support.fixtures import HTTP_CLIENTS, use_http_client
from tests.support.polling import holds_within
from tests.support.upstream import UpstreamServer

PATH = "/artifact.bin"

#: Any case must finish well within this, proving that no real backoff was slept through.
CASE_TIME_LIMIT = 5.0


# --- builders: a bare HttpDownloader, and a DownloaderFactory --------------------------------


class Builder:
    """Builds downloaders one way, and knows their pool (to count and close idle connections)."""

    name: str

    def build(self, url: str, **kwargs: Any) -> Any:
        raise NotImplementedError

    @property
    def pool(self) -> Any:
        raise NotImplementedError

    def idle_connections(self) -> int:
        """Connections the pool keeps for reuse (healthy keep-alive connections only)."""
        return sum(len(c) for c in self.pool._connections.values())

    def close(self) -> defer.Deferred[None]:
        return self.pool.closeCachedConnections()


class BareBuilder(Builder):
    """`HttpDownloader` with its default agent: system CAs, its module's persistent pool."""

    name = "HttpDownloader"

    def __init__(self, temp_dir: Path) -> None:
        self.temp_dir = temp_dir

    def build(self, url: str, **kwargs: Any) -> Any:
        return HttpDownloader(url, temp_dir=str(self.temp_dir), **kwargs)

    @property
    def pool(self) -> Any:
        return default_pool(reactor)


class FactoryBuilder(Builder):
    """A `DownloaderFactory` for a remote trusting the test CA."""

    name = "DownloaderFactory"

    def __init__(self, temp_dir: Path, ca_pem: Path) -> None:
        remote = RemoteSettings(
            url="http://127.0.0.1/PULP_MANIFEST",
            ca_cert=str(ca_pem),
            connect_timeout=5,
            sock_read_timeout=5,
            max_retries=3,
        )
        self.factory = DownloaderFactory(remote, temp_dir=str(temp_dir))

    def build(self, url: str, **kwargs: Any) -> Any:
        return self.factory.build(url, **kwargs)

    @property
    def pool(self) -> Any:
        return self.factory.pool

    def idle_connections(self) -> int:
        return self.factory.idle_connections()  # Twisted's pool and the factory's own client

    def close(self) -> defer.Deferred[None]:
        return self.factory.close()


@pytest.fixture(params=["HttpDownloader", *(f"DownloaderFactory-{c}" for c in HTTP_CLIENTS)])
def builder(request, tmp_path, certs, monkeypatch):
    """A bare `HttpDownloader` (Twisted's agent only), or a factory over each HTTP client."""
    temp_dir = tmp_path / "tmp"
    temp_dir.mkdir()
    if request.param == "HttpDownloader":
        made: Builder = BareBuilder(temp_dir)
    else:
        use_http_client(request.param.removeprefix("DownloaderFactory-"), monkeypatch)
        made = FactoryBuilder(temp_dir, certs.ca_pem)
    yield made
    pytest_twisted.blockon(made.close())


def temp_files(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "tmp").iterdir())


async def download(downloader: Any) -> tuple[Any, BaseException | None]:
    try:
        return await downloader.run(), None
    except Exception as error:  # the test inspects whatever came out
        return None, error


@pytest.mark.parametrize("fault", FAULTS, ids=fault_ids)
@pytest_twisted.ensureDeferred
async def test_fault(fault: Fault, builder: Builder, upstream_factory, certs, tmp_path):
    tls = getattr(certs, fault.tls) if fault.tls else None
    server: UpstreamServer = upstream_factory(tls=tls)
    url = server.register(PATH, fault.behaviour())
    expected = fault.sync
    backoff = RecordingBackoff()
    downloader = builder.build(
        url,
        expected_digests={"sha256": sha256(fault.body)},
        expected_size=len(fault.body),
        backoff=backoff,
        **fault.settings,
    )

    started = time.monotonic()
    result, error = await download(downloader)
    elapsed = time.monotonic() - started

    # The documented outcome.
    if expected.error is None:
        assert error is None, f"expected success, got {error!r}"
        assert Path(result.path).read_bytes() == fault.body
        assert result.artifact_attributes["sha256"] == sha256(fault.body)
        assert result.artifact_attributes["size"] == len(fault.body)
        Path(result.path).unlink()
    else:
        assert isinstance(error, expected.error), (
            f"expected {expected.error.__name__}, got {error!r}"
        )
        assert expected.message in str(error)
        assert url in str(error)
        assert "Traceback" not in str(error)
    assert len(server.requests(PATH)) == expected.requests
    if fault.tls:
        assert server.total_connections == 1, "a certificate failure must not be retried"
    if fault.retry_after is not None:
        if callable(fault.retry_after):
            assert fault.retry_after(backoff.retry_afters), backoff.retry_afters
        else:
            assert backoff.retry_afters == fault.retry_after
    assert elapsed < CASE_TIME_LIMIT

    # No temp file, and no connection left open beyond the pool's idle keep-alive ones.
    assert temp_files(tmp_path) == []
    assert await holds_within(
        lambda: server.open_connections <= builder.idle_connections(), timeout=2.0
    ), (
        f"{server.open_connections} open at the upstream, "
        f"{builder.idle_connections()} idle in the pool"
    )
    await builder.close()
    assert await server.wait_until_idle(2.0), f"{server.open_connections} connections left open"

    # The next download through the same builder still works.
    healthy = upstream_factory()
    next_url = healthy.register("/next.bin", faults.Serve(BODY))
    after = await builder.build(next_url, expected_digests={"sha256": sha256(BODY)}).run()
    assert Path(after.path).read_bytes() == BODY
    Path(after.path).unlink()
    await builder.close()
    assert await healthy.wait_until_idle(2.0)
    assert temp_files(tmp_path) == []
