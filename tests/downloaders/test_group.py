"""GroupDownloader against a real loopback server: groups reported when all their downloads
ended, failures isolated, bounded memory on a generator of 10,000 groups, and stopping early
without leaking connections or temporary files."""

from __future__ import annotations

import gc
import hashlib
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, task

from downloaders import (
    DownloaderFactory,
    Group,
    GroupDownloader,
    GroupResult,
    HttpDownloader,
    NotFound,
    RemoteSettings,
)
from tests.support.faults import Gated, Serve, Status

BODY_A, BODY_B = b"a" * 100, b"b" * 200


def sha(body: bytes) -> dict[str, str]:
    return {"sha256": hashlib.sha256(body).hexdigest()}


def make_factory(url: str, tmp_path: Path, overrides: Any = None, **kwargs: Any) -> Any:
    remote = RemoteSettings(url=url, max_retries=0, **kwargs)
    return DownloaderFactory(remote, overrides, temp_dir=str(tmp_path))


class LiveCounter:
    """Counts downloader objects alive right now (weakref finalizers) and the peak."""

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0
        self.built = 0

    def downloader_class(self) -> type[HttpDownloader]:
        counter = self

        class Counted(HttpDownloader):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                counter.built += 1
                counter.live += 1
                counter.peak = max(counter.peak, counter.live)
                weakref.finalize(self, counter.died)

        return Counted

    def died(self) -> None:
        self.live -= 1


@pytest_twisted.ensureDeferred
async def test_group_reported_when_all_its_downloads_are_done(upstream, tmp_path: Path):
    a = upstream.register("/a", Serve(BODY_A))
    gate = Gated(Serve(BODY_B))
    slow_b = upstream.register("/slow-b", gate)
    b = upstream.register("/b", Serve(BODY_B))
    missing = upstream.register("/missing", Status(404))
    factory = make_factory(a, tmp_path)
    groups = [
        Group("slow", [(a, {"expected_digests": sha(BODY_A)}), slow_b]),
        Group("fast", [a, (b, {"expected_digests": sha(BODY_B)})]),
        Group("broken", [a, missing]),
    ]
    reported: list[GroupResult] = []

    def on_group(result: GroupResult) -> None:
        reported.append(result)
        if len(reported) == 2:  # the two others are in; the slow one still waits
            assert gate.waiting == 1
            gate.release()

    summary = await GroupDownloader(factory, groups).run(on_group)
    await factory.close()
    assert [r.key for r in reported[:2]] in (["fast", "broken"], ["broken", "fast"])
    assert reported[2].key == "slow" and reported[2].ok
    assert [Path(r.path).read_bytes() for r in reported[2].results] == [BODY_A, BODY_B]
    fast = next(r for r in reported if r.key == "fast")
    assert fast.ok and [r.artifact_attributes["size"] for r in fast.results] == [100, 200]
    broken = next(r for r in reported if r.key == "broken")
    assert not broken.ok and broken.results[0] is not None and broken.results[1] is None
    ((index, error),) = broken.errors
    assert index == 1 and isinstance(error, NotFound)
    assert (summary.succeeded, summary.failed, summary.stopped) == (2, 1, False)


@pytest_twisted.ensureDeferred
async def test_ten_thousand_groups_from_a_generator_with_bounded_memory(
    upstream, tmp_path: Path, capsys
):
    a = upstream.register("/a", Serve(BODY_A))
    b = upstream.register("/b", Serve(BODY_B))
    counter = LiveCounter()
    factory = make_factory(
        a, tmp_path, {"http": counter.downloader_class()}, download_concurrency=10
    )
    pulled = 0

    def groups() -> Iterator[Group]:
        nonlocal pulled
        for i in range(10_000):
            pulled += 1
            # Every 10th group needs two files; the others one (keeps this test fast).
            yield Group(i, [(a, {"expected_digests": sha(BODY_A)})] + ([b] if i % 10 == 0 else []))

    grouper = GroupDownloader(factory, groups(), max_pending=20)
    seen = 0
    max_ahead = 0
    started = time.monotonic()
    async with grouper:
        async for result in grouper:
            assert result.ok, result.errors
            for downloaded in result.results:  # a real importer moves them into storage
                Path(downloaded.path).unlink()
            seen += 1
            max_ahead = max(max_ahead, pulled - seen)
            if seen % 2000 == 0:
                gc.collect()
    elapsed = time.monotonic() - started
    await factory.close()
    with capsys.disabled():
        print(
            f"\n[groups] 10,000 groups, 11,000 downloads in {elapsed:.1f}s: max live downloaders "
            f"= {counter.peak}, max groups in memory = {grouper.peak_pending}, "
            f"max pulled ahead of the consumer = {max_ahead}"
        )
    assert seen == 10_000 and counter.built == 11_000
    assert grouper.peak_pending <= 20
    assert max_ahead <= 20
    assert counter.peak <= 2 * 20 + 10  # 20 groups of 2, plus some not yet collected
    assert upstream.max_concurrent_connections <= 10
    assert list(tmp_path.iterdir()) == []


@pytest_twisted.ensureDeferred
async def test_stop_early_cancels_in_flight_without_leaks(
    upstream, tmp_path: Path, assert_no_temp_files
):
    gate = Gated(Serve(BODY_B))
    slow = upstream.register("/slow", gate)
    a = upstream.register("/a", Serve(BODY_A))
    temp = tmp_path / "tmp"
    temp.mkdir()
    factory = DownloaderFactory(
        RemoteSettings(url=a, max_retries=0, download_concurrency=4), temp_dir=str(temp)
    )
    pulled = 0

    def groups() -> Iterator[Group]:
        nonlocal pulled
        for i in range(1_000_000):
            pulled += 1
            yield Group(i, [slow] if i % 2 else [a])

    grouper = GroupDownloader(factory, groups(), max_pending=8)
    taken = []
    async with grouper:
        async for result in grouper:
            taken.append(result)
            if len(taken) == 3:
                break
    assert grouper.summary.stopped
    assert pulled <= 3 + 8 + 1
    await factory.close()
    assert await upstream.wait_until_idle(2.0)  # cancelled requests' connections are gone
    # Only the files of the three results handed over remain; they are the caller's.
    assert sorted(p.name for p in temp.iterdir()) == sorted(
        Path(r.results[0].path).name for r in taken
    )
    for result in taken:
        Path(result.results[0].path).unlink()
    assert_no_temp_files(temp)


@pytest_twisted.ensureDeferred
async def test_run_with_slow_callback_and_callback_errors(upstream, tmp_path: Path):
    a = upstream.register("/a", Serve(BODY_A))
    factory = make_factory(a, tmp_path, download_concurrency=2)
    from twisted.internet import reactor

    pulled = 0

    def groups() -> Iterator[Group]:
        nonlocal pulled
        for i in range(50):
            pulled += 1
            yield Group(i, [a])

    keys: list[int] = []

    def slow(result: GroupResult) -> defer.Deferred[None]:
        keys.append(result.key)
        # While the caller is busy, at most max_pending groups are pulled ahead.
        assert pulled - len(keys) <= 4
        return task.deferLater(reactor, 0.001, lambda: None)

    summary = await GroupDownloader(factory, groups(), max_pending=4).run(slow)
    assert sorted(keys) == list(range(50)) and summary.succeeded == 50

    def explode(result: GroupResult) -> None:
        raise RuntimeError("caller failed")

    with pytest.raises(RuntimeError, match="caller failed"):
        await GroupDownloader(factory, (Group(i, [a]) for i in range(100))).run(explode)
    await factory.close()


@pytest_twisted.ensureDeferred
async def test_broken_group_source_is_reported(upstream, tmp_path: Path):
    a = upstream.register("/a", Serve(BODY_A))
    factory = make_factory(a, tmp_path)

    def groups() -> Iterator[Group]:
        yield Group("first", [a])
        raise ValueError("bad manifest line 2")

    got = []
    with pytest.raises(ValueError, match="bad manifest"):
        async with GroupDownloader(factory, groups()) as grouper:
            async for result in grouper:
                got.append(result.key)
    assert got == ["first"]
    await factory.close()
