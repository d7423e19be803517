"""The fault matrix through the downloaders (the sync side).

Every fault of the fault-injecting upstream runs through a bare `HttpDownloader` (its default
agent and pool) and through a `DownloaderFactory` (the way the importer and the streamer build
downloaders). For each, the documented outcome (retry and succeed, or a clear error type and
message), then: no temp file left, no connection left open at the upstream beyond the idle
keep-alive ones the pool holds, and the next download through the same builder still works.
Backoffs are recorded and shortened, so no test sleeps through one.
"""

from __future__ import annotations

import email.utils
import gzip
import hashlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task

from downloaders import (
    ConnectionFailed,
    DigestValidationError,
    DownloaderFactory,
    DownloadError,
    DownloadTimeout,
    HttpDownloader,
    HttpError,
    RemoteSettings,
    SizeValidationError,
    TooManyRedirects,
    TruncatedBody,
)
from downloaders.http import default_pool
from tests.support import faults
from tests.support.upstream import UpstreamServer

BODY = bytes(range(256)) * 256  # 64 KiB, every byte value
#: Chunked faults write their whole body at once; above the transport's 64 KiB buffer the
#: fault server's close would wait for a paused producer, so these stay small.
SMALL = BODY[:16384]
PAYLOAD = b"a text file, compressed on the upstream\n" * 500
GZ_BODY = gzip.compress(PAYLOAD, mtime=0)
PATH = "/artifact.bin"

#: Any case must finish well within this, proving that no real backoff was slept through.
CASE_TIME_LIMIT = 5.0


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class RecordingBackoff:
    """A backoff that records what the downloader asked for (attempt, Retry-After seconds) and
    answers a tiny delay, so retries are exercised without real waits."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, float | None]] = []

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        self.calls.append((attempt, retry_after))
        return 0.01

    @property
    def retry_afters(self) -> list[float | None]:
        return [retry_after for _, retry_after in self.calls]


def in_seconds(seconds: int) -> str:
    """An HTTP-date ``seconds`` from now (for Retry-After)."""
    return email.utils.formatdate(time.time() + seconds, usegmt=True)


@attrs.frozen
class Case:
    """One row of the fault table.

    ``error`` None means the download must succeed with ``body``; otherwise it must fail with
    that type and ``message`` in its text. ``requests`` is how many requests the upstream must
    see (retries included); ``retry_after`` the Retry-After values handed to the backoff.
    ``by_builder`` overrides ``(error, message, requests)`` for one builder.
    """

    id: str
    behaviour: Callable[[], faults.Behaviour]
    error: type[Exception] | None = None
    message: str = ""
    requests: int = 1
    options: dict[str, Any] = attrs.field(factory=dict)
    body: bytes = BODY
    tls: str | None = None
    retry_after: list[float | None] | Callable[[list[float | None]], bool] | None = None
    by_builder: dict[str, tuple[type[Exception] | None, str, int]] = attrs.field(factory=dict)

    def expected(self, builder: str) -> tuple[type[Exception] | None, str, int]:
        return self.by_builder.get(builder, (self.error, self.message, self.requests))


RETRY_ONCE = {"max_retries": 1}
TIMEOUTS = {"max_retries": 1, "sock_read_timeout": 0.2}


def _about(seconds: float) -> Callable[[list[float | None]], bool]:
    def check(values: list[float | None]) -> bool:
        return bool(values) and all(v is not None and seconds - 3 <= v <= seconds for v in values)

    return check


CASES = [
    # --- broken bodies: retried, then the next attempt succeeds or the error is clear --------
    Case(
        "reset-after-n-bytes-once",
        lambda: faults.Steps([faults.ResetAfter(4096, BODY), faults.Serve(BODY)]),
        requests=2,
    ),
    Case(
        "reset-after-n-bytes-always",
        lambda: faults.ResetAfter(4096, BODY),
        TruncatedBody,
        f"body truncated after 4096 of {len(BODY)} bytes",
        requests=2,
        options=RETRY_ONCE,
    ),
    Case(
        "reset-before-headers-once",
        lambda: faults.Steps([faults.ResetBeforeHeaders(), faults.Serve(BODY)]),
        requests=2,
    ),
    Case(
        "close-early-under-content-length-once",
        lambda: faults.Steps([faults.CloseEarly(1000, BODY), faults.Serve(BODY)]),
        requests=2,
    ),
    Case(
        "close-early-under-content-length-always",
        lambda: faults.CloseEarly(1000, BODY),
        TruncatedBody,
        f"body truncated after 1000 of {len(BODY)} bytes",
        requests=2,
        options=RETRY_ONCE,
    ),
    Case(
        "chunked-without-last-chunk-once",
        lambda: faults.Steps([faults.ChunkedNoLastChunk(SMALL, 4096), faults.Serve(SMALL)]),
        requests=2,
        body=SMALL,
    ),
    Case(
        "chunked-without-last-chunk-always",
        lambda: faults.ChunkedNoLastChunk(SMALL, 4096),
        TruncatedBody,
        "body truncated after",
        requests=2,
        options=RETRY_ONCE,
        body=SMALL,
    ),
    # --- wrong bytes: a validation error, never retried (the same bytes would come back) -----
    Case(
        "wrong-bytes-too-many",
        lambda: faults.WrongSize(BODY, extra=100),
        SizeValidationError,
        f"size mismatch: expected {len(BODY)} bytes, got",
    ),
    Case(
        "wrong-bytes-too-few",
        lambda: faults.WrongSize(BODY, extra=-100),
        SizeValidationError,
        f"size mismatch: expected {len(BODY)} bytes, got {len(BODY) - 100}",
    ),
    Case(
        "right-size-wrong-content",
        lambda: faults.WrongBytes(BODY),
        DigestValidationError,
        f"sha256 mismatch: expected {sha256(BODY)}, got {sha256(faults.WrongBytes(BODY).served)}",
    ),
    # --- slow and stalled: timeouts, retried, then a clear DownloadTimeout --------------------
    Case(
        "stall-after-headers",
        lambda: faults.StallAfterHeaders(BODY),
        DownloadTimeout,
        "read timeout after 0.2s",
        requests=2,
        options=TIMEOUTS,
    ),
    Case(
        "stall-mid-body",
        lambda: faults.StallMidBody(8192, BODY),
        DownloadTimeout,
        "read timeout after 0.2s",
        requests=2,
        options=TIMEOUTS,
    ),
    Case(
        "trickle-1-byte-per-second",
        lambda: faults.Trickle(BODY, 1),
        DownloadTimeout,
        "read timeout after 0.2s",
        requests=2,
        options=TIMEOUTS,
    ),
    Case(
        "trickle-under-total-timeout",
        lambda: faults.Trickle(BODY, 40, interval=0.05),
        DownloadTimeout,
        "total timeout after 0.4s",
        requests=2,
        options={**TIMEOUTS, "total_timeout": 0.4},
    ),
    # --- busy servers: 429/503, with and without Retry-After, then success -------------------
    Case(
        "429-retry-after-seconds-then-ok",
        lambda: faults.StatusThenServe(429, 2, faults.Serve(BODY), retry_after=7),
        requests=3,
        retry_after=[7.0, 7.0],
    ),
    Case(
        "429-without-retry-after-then-ok",
        lambda: faults.StatusThenServe(429, 2, faults.Serve(BODY)),
        requests=3,
        retry_after=[None, None],
    ),
    Case(
        "503-retry-after-http-date-then-ok",
        lambda: faults.StatusThenServe(503, 1, faults.Serve(BODY), retry_after=in_seconds(30)),
        requests=2,
        retry_after=_about(30),
    ),
    Case(
        "503-without-retry-after-then-ok",
        lambda: faults.StatusThenServe(503, 2, faults.Serve(BODY)),
        requests=3,
        retry_after=[None, None],
    ),
    Case(
        "500-forever",
        lambda: faults.Status(500),
        HttpError,
        "HTTP 500",
        requests=3,
        options={"max_retries": 2},
    ),
    # --- redirects: the factory follows them and refuses loops and non-HTTP targets ----------
    Case(
        "redirect-loop",
        lambda: faults.RedirectLoop(),
        TooManyRedirects,
        "more than 10 redirects",
        requests=11,
    ),
    Case(
        "redirect-to-file-url",
        lambda: faults.RedirectTo("file:///etc/passwd"),
        DownloadError,
        "redirect to a non-HTTP url refused: file:///etc/passwd",
    ),
    # --- protocol abuse ----------------------------------------------------------------------
    Case(
        "huge-headers",
        lambda: faults.HugeHeaders(64 * 1024, BODY),
        ConnectionFailed,
        "no complete response",
        requests=2,
        options=RETRY_ONCE,
    ),
    Case(
        "gzip-content-encoding-on-gz",
        lambda: faults.Gzip(GZ_BODY),
        body=GZ_BODY,
    ),
    # --- TLS: a certificate the client must refuse; never retried -----------------------------
    Case(
        "tls-untrusted-certificate",
        lambda: faults.Serve(BODY),
        ConnectionFailed,
        "TLS handshake failed",
        requests=0,
        tls="untrusted",
    ),
    Case(
        "tls-wrong-host-certificate",
        lambda: faults.Serve(BODY),
        ConnectionFailed,
        "TLS handshake failed",
        requests=0,
        tls="wrong_host",
    ),
    Case(
        "tls-expired-certificate",
        lambda: faults.Serve(BODY),
        ConnectionFailed,
        "TLS handshake failed",
        requests=0,
        tls="expired",
    ),
]


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


@pytest.fixture(params=["HttpDownloader", "DownloaderFactory"])
def builder(request, tmp_path, certs):
    temp_dir = tmp_path / "tmp"
    temp_dir.mkdir()
    made = (
        BareBuilder(temp_dir)
        if request.param == "HttpDownloader"
        else FactoryBuilder(temp_dir, certs.ca_pem)
    )
    yield made
    pytest_twisted.blockon(made.close())


def temp_files(builder: Builder, tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "tmp").iterdir())


async def settle(predicate: Callable[[], bool], timeout: float = 2.0) -> bool:
    """Let the reactor run until ``predicate`` holds (True) or ``timeout`` passes (False)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await task.deferLater(reactor, 0.01, lambda: None)
    return True


async def download(downloader: Any) -> tuple[Any, BaseException | None]:
    try:
        return await downloader.run(), None
    except Exception as error:  # noqa: BLE001 - the test inspects whatever came out
        return None, error


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
@pytest_twisted.ensureDeferred
async def test_fault(case: Case, builder: Builder, upstream_factory, certs, tmp_path):
    tls = getattr(certs, case.tls) if case.tls else None
    server: UpstreamServer = upstream_factory(tls=tls)
    url = server.register(PATH, case.behaviour())
    error_type, message, requests = case.expected(builder.name)
    backoff = RecordingBackoff()
    options = {"max_retries": 3, **case.options}
    downloader = builder.build(
        url,
        expected_digests={"sha256": sha256(case.body)},
        expected_size=len(case.body),
        backoff=backoff,
        **options,
    )

    started = time.monotonic()
    result, error = await download(downloader)
    elapsed = time.monotonic() - started

    # The documented outcome.
    if error_type is None:
        assert error is None, f"expected success, got {error!r}"
        assert Path(result.path).read_bytes() == case.body
        assert result.artifact_attributes["sha256"] == sha256(case.body)
        assert result.artifact_attributes["size"] == len(case.body)
        Path(result.path).unlink()
    else:
        assert isinstance(error, error_type), f"expected {error_type.__name__}, got {error!r}"
        assert message in str(error)
        assert server.url("/") in str(error) or url in str(error)
        assert "Traceback" not in str(error)
    assert len(server.requests(PATH)) == requests
    if case.tls:
        assert server.total_connections == 1, "a certificate failure must not be retried"
    if case.retry_after is not None:
        if callable(case.retry_after):
            assert case.retry_after(backoff.retry_afters), backoff.retry_afters
        else:
            assert backoff.retry_afters == case.retry_after
    assert elapsed < CASE_TIME_LIMIT

    # No temp file, and no connection left open beyond the pool's idle keep-alive ones.
    assert temp_files(builder, tmp_path) == []
    assert await settle(lambda: server.open_connections <= builder.idle_connections()), (
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
    assert temp_files(builder, tmp_path) == []


def fault_table() -> list[tuple[str, str]]:
    """(fault, documented outcome) rows, for the issue note."""
    rows = []
    for case in CASES:
        error, message, requests = case.expected("DownloaderFactory")
        outcome = "success" if error is None else f"{error.__name__}: {message}"
        rows.append((case.id, f"{outcome} after {requests} request(s)"))
    return rows
