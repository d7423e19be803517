"""BaseDownloader through a protocol of our own: a subclass that only overrides `_run()` and keeps
the two calls of the seeds (`handle_data` per chunk, then `finalize`) gets digests, validation,
retries with fresh state, temp-file clean-up and the semaphore. A `Clock` drives the backoff."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer, task
from twisted.python.failure import Failure

from downloaders import (
    DEFAULT_DIGESTS,
    Backoff,
    BaseDownloader,
    ConnectionFailed,
    DigestValidationError,
    DownloadError,
    DownloadResult,
    SizeValidationError,
    UnsupportedDigestValidationError,
)
from tests.downloaders.support import delayed_at

BODY = bytes(range(256)) * 1000
SHA256 = hashlib.sha256(BODY).hexdigest()
URL = "mem://store/a.bin"
NO_JITTER = Backoff(base=1.0, factor=2.0, jitter=0.0)


def chunks(data: bytes, size: int = 10_000) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


class MemoryDownloader(BaseDownloader):
    """Bytes from memory, written the way Pulp's seeds write `_run`: ``async def``, every
    chunk through `handle_data`, then `finalize`, returning a `DownloadResult`.

    ``plans`` holds one list per attempt: chunks, and optionally an exception to raise after
    them or a Deferred to wait on (the last plan repeats)."""

    def __init__(self, url: str, plans: list[list[Any]], **kwargs: Any) -> None:
        kwargs.setdefault("reactor", task.Clock())
        kwargs.setdefault("backoff", NO_JITTER)
        super().__init__(url, **kwargs)
        self.plans = plans
        self.calls = 0
        self.delivered: list[int] = []  # bytes handed to handle_data, per attempt
        self.extra: list[Any] = []

    async def _run(self, extra_data: Any = None) -> DownloadResult:
        plan = self.plans[min(self.calls, len(self.plans) - 1)]
        self.calls += 1
        self.extra.append(extra_data)
        self.delivered.append(0)
        for item in plan:
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, defer.Deferred):
                await item
                continue
            self.handle_data(item)
            self.delivered[-1] += len(item)
        self.finalize()
        return DownloadResult(self.url, self.artifact_attributes, self.path, {"x-mem": "1"})


class DeferredDownloader(BaseDownloader):
    """A Deferred-style `_run` that calls `handle_data` but leaves `finalize` to `run()`."""

    def __init__(self, url: str, body: bytes, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self.body = body

    def _run(self, extra_data: Any = None) -> defer.Deferred[None]:
        for chunk in chunks(self.body):
            self.handle_data(chunk)
        return defer.succeed(None)


def outcome(d: defer.Deferred[Any]) -> Any:
    """The result of an already-fired Deferred, or its Failure."""
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "the Deferred has not fired"
    return box[0]


def error_of(d: defer.Deferred[Any], kind: type[BaseException]) -> BaseException:
    failure = outcome(d)
    assert isinstance(failure, Failure), f"expected {kind.__name__}, got {failure!r}"
    assert failure.check(kind), failure.getTraceback()
    return failure.value


def test_pulp_style_subclass_validates_and_returns_its_result(tmp_path: Path):
    downloader = MemoryDownloader(
        URL,
        [chunks(BODY)],
        expected_digests={"sha256": SHA256},
        expected_size=len(BODY),
        temp_dir=str(tmp_path),
    )
    result = outcome(downloader.run(extra_data={"k": 1}))
    assert isinstance(result, DownloadResult)
    assert result.artifact_attributes == {"size": len(BODY), "sha256": SHA256}
    assert result.headers == {"x-mem": "1"}  # the subclass's own result is returned
    assert Path(result.path).read_bytes() == BODY
    assert Path(result.path).parent == tmp_path
    assert downloader.extra == [{"k": 1}]


def test_run_finalizes_when_the_subclass_does_not(tmp_path: Path, assert_no_temp_files):
    good = outcome(DeferredDownloader(URL, BODY, temp_dir=str(tmp_path)).run())
    assert good.artifact_attributes == {"size": len(BODY), "sha256": SHA256}
    assert Path(good.path).read_bytes() == BODY
    os.unlink(good.path)

    bad = DeferredDownloader(URL, BODY, expected_digests={"sha256": "0" * 64}, temp_dir=tmp_path)
    error = error_of(bad.run(), DigestValidationError)
    assert (error.expected, error.actual) == ("0" * 64, SHA256)
    assert_no_temp_files(tmp_path)


class FinalizingDownloader(BaseDownloader):
    """A plain (not async) `_run` that ends as Pulp's do: ``return self.finalize()``."""

    def _run(self, extra_data: Any = None) -> Any:
        self.handle_data(BODY)
        return self.finalize()


def test_a_plain_run_may_return_what_finalize_returned(tmp_path: Path, assert_no_temp_files):
    """`finalize` returns `DONE`, an awaitable that is neither a coroutine nor a Deferred:
    a `_run` handing it back is a finished attempt, not a NotACoroutineError."""
    good = outcome(FinalizingDownloader(URL, temp_dir=str(tmp_path)).run())
    assert good.artifact_attributes == {"size": len(BODY), "sha256": SHA256}
    assert Path(good.path).read_bytes() == BODY
    os.unlink(good.path)
    bad = FinalizingDownloader(URL, expected_digests={"sha256": "0" * 64}, temp_dir=tmp_path)
    error_of(bad.run(), DigestValidationError)
    assert_no_temp_files(tmp_path)


def test_empty_body_is_an_empty_file(tmp_path: Path):
    result = outcome(MemoryDownloader(URL, [[]], expected_size=0, temp_dir=str(tmp_path)).run())
    assert result.artifact_attributes == {"size": 0, "sha256": hashlib.sha256().hexdigest()}
    assert Path(result.path).read_bytes() == b""


def test_retry_starts_a_fresh_file_and_fresh_digests(tmp_path: Path):
    clock = task.Clock()
    half = BODY[: len(BODY) // 2]
    downloader = MemoryDownloader(
        URL,
        [[*chunks(half), ConnectionFailed(URL, "reset")], chunks(BODY)],
        expected_digests={"sha256": SHA256},
        expected_size=len(BODY),
        temp_dir=str(tmp_path),
        reactor=clock,
    )
    d = downloader.run()
    assert not d.called
    assert downloader.delivered == [len(half)]
    assert os.listdir(tmp_path) == []  # the first attempt's file is gone before the retry
    assert delayed_at(clock) == [1.0]
    clock.advance(1.0)
    result = outcome(d)
    assert downloader.delivered == [len(half), len(BODY)]
    # Stale digests or an appended file would give the digest of half + BODY here.
    assert result.artifact_attributes == {"size": len(BODY), "sha256": SHA256}
    assert Path(result.path).read_bytes() == BODY
    assert os.listdir(tmp_path) == [os.path.basename(result.path)]


def test_retries_run_out_with_exponential_backoff(tmp_path: Path, assert_no_temp_files):
    clock = task.Clock()
    downloader = MemoryDownloader(
        URL,
        [[b"partial", ConnectionFailed(URL, "reset")]],
        temp_dir=str(tmp_path),
        reactor=clock,
        max_retries=3,
    )
    d = downloader.run()
    for delay in (1.0, 2.0, 4.0):
        assert delayed_at(clock) == [clock.seconds() + delay]
        clock.advance(delay)
    error = error_of(d, ConnectionFailed)
    assert str(error) == f"reset ({URL})"
    assert downloader.calls == 4
    assert clock.getDelayedCalls() == []
    assert_no_temp_files(tmp_path)


@pytest.mark.parametrize(
    ("plan", "error_type"),
    [
        ([BODY], DigestValidationError),  # finalize fails: the same bytes again would not help
        ([BODY + b"x"], SizeValidationError),  # overflow, caught inside handle_data
        ([b"a", DownloadError(URL, "not retryable")], DownloadError),
        ([b"a", RuntimeError("a bug in the subclass")], RuntimeError),
    ],
)
def test_not_retried(tmp_path: Path, assert_no_temp_files, plan, error_type):
    downloader = MemoryDownloader(
        URL,
        [plan],
        expected_digests={"sha256": hashlib.sha256(b"other").hexdigest()},
        expected_size=len(BODY),
        temp_dir=str(tmp_path),
        max_retries=5,
    )
    error_of(downloader.run(), error_type)
    assert downloader.calls == 1
    assert_no_temp_files(tmp_path)


@pytest.mark.parametrize("algorithm", ["md5", "sha1", "MD5", "crc32", "blake2b"])
def test_unsupported_or_untrusted_digest_refused_before_any_byte(algorithm):
    created: list[MemoryDownloader] = []
    with pytest.raises(UnsupportedDigestValidationError) as caught:
        created.append(MemoryDownloader(URL, [[BODY]], expected_digests={algorithm: "ab"}))
    assert created == []  # refused in the constructor: no _run, so no byte fetched
    assert caught.value.algorithm == algorithm.lower()
    message = str(caught.value)
    assert message.startswith(f"unsupported or untrusted digest algorithm {algorithm.lower()!r}")
    assert message.endswith(f"({URL})")
    if algorithm.lower() in ("md5", "sha1"):  # the refusal names the switch that allows it
        assert "allowed_digests" in message
    else:
        assert "unknown" in message
    with pytest.raises(UnsupportedDigestValidationError):
        MemoryDownloader(URL, [[BODY]], digest_algorithms=(algorithm,))


def test_digests_computed_are_the_expected_ones_plus_the_configured_set(tmp_path: Path):
    assert DEFAULT_DIGESTS == ("sha256",)
    default = outcome(MemoryDownloader(URL, [[BODY]], temp_dir=str(tmp_path)).run())
    assert set(default.artifact_attributes) == {"size", "sha256"}

    sha512 = hashlib.sha512(BODY).hexdigest()
    union = outcome(
        MemoryDownloader(
            URL,
            [[BODY]],
            expected_digests={"SHA512": sha512.upper()},  # names and values normalised
            digest_algorithms=("sha224", "sha256"),
            temp_dir=str(tmp_path),
        ).run()
    )
    assert union.artifact_attributes == {
        "size": len(BODY),
        "sha512": sha512,
        "sha224": hashlib.sha224(BODY).hexdigest(),
        "sha256": SHA256,
    }

    only_size = outcome(
        MemoryDownloader(URL, [[BODY]], digest_algorithms=(), temp_dir=str(tmp_path)).run()
    )
    assert only_size.artifact_attributes == {"size": len(BODY)}


class ListWriter:
    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.chunks.append(data)


def test_writer_takes_the_bytes_and_path_is_none(tmp_path: Path):
    writer = ListWriter()
    result = outcome(
        MemoryDownloader(
            URL,
            [chunks(BODY)],
            expected_digests={"sha256": SHA256},
            writer=writer,
            temp_dir=str(tmp_path),
        ).run()
    )
    assert result.path is None
    assert b"".join(writer.chunks) == BODY
    assert result.artifact_attributes["sha256"] == SHA256
    assert os.listdir(tmp_path) == []


def test_a_tap_gets_each_chunk_before_it_is_hashed(tmp_path: Path):
    """The streamer's tap sends a chunk to the clients waiting for it: it gets the chunk
    before the downloader hashes it (the first body bytes of a cold request wait for no
    hashing), and the digests validated at finalize still cover every byte."""
    events: list[tuple[Any, ...]] = []

    class Tap:
        def write(self, data: bytes) -> None:
            events.append(("tap", len(data)))

        def headers_ready(self, headers: Any) -> None:
            pass

        def finalized(self) -> None:
            events.append(("finalized",))

    downloader = MemoryDownloader(
        URL,
        [chunks(BODY, 100_000)],
        expected_digests={"sha256": SHA256},
        expected_size=len(BODY),
        temp_dir=str(tmp_path),
    )
    update = downloader._calculator.update

    def hashing(data: bytes) -> None:
        events.append(("hash", len(data)))
        update(data)

    downloader._calculator.update = hashing  # type: ignore[method-assign]
    downloader.add_tap(Tap())
    result = outcome(downloader.run())
    assert result.artifact_attributes == {"size": len(BODY), "sha256": SHA256}
    sizes = [len(chunk) for chunk in chunks(BODY, 100_000)]
    assert events == [e for n in sizes for e in (("tap", n), ("hash", n))] + [("finalized",)]
    # An overflowing chunk is refused before the tap sees it.
    events.clear()
    over = MemoryDownloader(URL, [[BODY, b"x"]], expected_size=len(BODY), temp_dir=str(tmp_path))
    over.add_tap(Tap())
    error_of(over.run(), SizeValidationError)
    assert events == [("tap", len(BODY))]


def test_no_retry_once_bytes_reached_the_writer(tmp_path: Path):
    writer = ListWriter()
    downloader = MemoryDownloader(
        URL,
        [[b"abc", ConnectionFailed(URL, "reset")], [BODY]],
        writer=writer,
        temp_dir=str(tmp_path),
    )
    error_of(downloader.run(), ConnectionFailed)
    assert downloader.calls == 1
    assert writer.chunks == [b"abc"]


def test_writer_exception_aborts_without_retry(tmp_path: Path):
    class Full:
        def write(self, data: bytes) -> None:
            raise OSError(28, "No space left on device")

    downloader = MemoryDownloader(URL, [chunks(BODY)], writer=Full(), temp_dir=str(tmp_path))
    error = error_of(downloader.run(), OSError)
    assert error.errno == 28
    assert downloader.calls == 1
    assert downloader.delivered == [0]  # stopped at the first chunk
    assert os.listdir(tmp_path) == []


def test_cancel_mid_attempt_removes_the_temp_file(tmp_path: Path, assert_no_temp_files):
    cancelled: list[bool] = []
    waiting: defer.Deferred[None] = defer.Deferred(lambda _: cancelled.append(True))
    downloader = MemoryDownloader(URL, [[b"some bytes", waiting, b"more"]], temp_dir=tmp_path)
    d = downloader.run()
    assert len(os.listdir(tmp_path)) == 1
    d.cancel()
    error_of(d, defer.CancelledError)
    assert cancelled == [True]
    assert downloader.calls == 1
    assert_no_temp_files(tmp_path)


def test_temp_file_errors_carry_the_url(tmp_path: Path):
    missing = tmp_path / "no-such-folder"
    downloader = MemoryDownloader(
        "mem://alice:s3cret@store/a.bin", [[BODY]], temp_dir=str(missing), max_retries=3
    )
    error = error_of(downloader.run(), DownloadError)
    assert str(error).startswith(f"cannot write the temporary file in {missing}: ")
    assert str(error).endswith("(mem://store/a.bin)")
    assert "s3cret" not in str(error)
    assert downloader.calls == 1


def test_semaphore_bounds_concurrent_attempts(tmp_path: Path):
    semaphore = defer.DeferredSemaphore(1)
    gate: defer.Deferred[None] = defer.Deferred()
    first = MemoryDownloader(URL, [[b"a", gate]], semaphore=semaphore, temp_dir=tmp_path)
    second = MemoryDownloader(URL, [[b"b"]], semaphore=semaphore, temp_dir=str(tmp_path))
    d1, d2 = first.run(), second.run()
    assert (first.calls, second.calls) == (1, 0)
    gate.callback(None)
    assert outcome(d1).artifact_attributes["size"] == 1
    assert second.calls == 1
    assert outcome(d2).artifact_attributes["size"] == 1


def test_defaults():
    downloader = BaseDownloader(URL)
    assert downloader.max_retries == 3
    assert downloader.digest_algorithms == ("sha256",)
    assert downloader.backoff == Backoff(base=1.0, factor=2.0, max_delay=60.0, jitter=0.5)
    assert downloader.backoff.retry_after_cap == 120.0
    with pytest.raises(ValueError, match="max_retries"):
        BaseDownloader(URL, max_retries=-1)


def test_describe_error_is_one_line_without_the_url_secrets():
    """The one log reason for a failed download (the sync's report, the streamer's log)."""
    from downloaders.errors import ConnectionFailed, describe_error

    error = ConnectionFailed("https://user:pw@mirror.example/a.deb?token=s3cret", "refused")
    assert describe_error(error) == error.message
    assert "pw" not in describe_error(error) and "s3cret" not in describe_error(error)
    assert describe_error(OSError(28, "No space left on device")) == (
        "OSError: [Errno 28] No space left on device"
    )
    assert describe_error(KeyError()) == "KeyError"
