"""Temporary files made ahead in a thread (`TempFilePool`) and the factory's opt-in pools:
downloads take ready files, failures still leave nothing, closing removes the spare ones."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task

from downloaders import DigestValidationError, DownloaderFactory, RemoteSettings
from downloaders.tempfiles import TEMP_PREFIX, TempFilePool, create_temp_file
from tests.support.faults import Serve
from tests.support.polling import until

BODY = b"pooled body\n" * 100
SHA256 = hashlib.sha256(BODY).hexdigest()


def test_create_temp_file_is_new_private_and_unique(tmp_path: Path) -> None:
    made = [create_temp_file(str(tmp_path)) for _ in range(50)]
    try:
        paths = {path for _fd, path in made}
        assert len(paths) == 50
        for _fd, path in made:
            assert os.path.dirname(path) == str(tmp_path)
            assert os.path.basename(path).startswith(TEMP_PREFIX)
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    finally:
        for fd, _path in made:
            os.close(fd)


def test_create_temp_file_reports_a_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        create_temp_file(str(tmp_path / "missing"))


@pytest_twisted.ensureDeferred
async def test_pool_refills_in_a_thread_and_close_removes_the_spares(tmp_path: Path) -> None:
    pool = TempFilePool(str(tmp_path), size=8)
    assert list(tmp_path.iterdir()) == []  # nothing is made before the first take
    fd, path = pool.take()  # the pool is empty: made inline
    os.close(fd)
    await until(lambda: len(list(tmp_path.iterdir())) == 1 + 8)
    taken = [pool.take() for _ in range(5)]  # ready-made files
    assert all(os.path.exists(p) for _fd, p in taken)
    for fd, _p in taken:
        os.close(fd)
    await pool.close()
    assert sorted(tmp_path.iterdir()) == sorted(Path(p) for p in [path] + [p for _f, p in taken])
    fd, late = pool.take()  # still works after close, inline, without a refill
    os.close(fd)
    await task.deferLater(reactor, 0.05, lambda: None)
    assert len(list(tmp_path.iterdir())) == 1 + 5 + 1


@pytest_twisted.ensureDeferred
async def test_close_waits_for_a_refill_under_way(tmp_path: Path) -> None:
    pool = TempFilePool(str(tmp_path), size=64)
    fd, path = pool.take()
    os.close(fd)
    await pool.close()  # the refill may still be running: its files are removed as well
    assert list(tmp_path.iterdir()) == [Path(path)]


@pytest_twisted.ensureDeferred
async def test_factory_pool_is_opt_in_and_failures_leave_nothing(upstream, tmp_path: Path) -> None:
    good = upstream.register("/good", Serve(BODY))
    temp = tmp_path / "tmp"
    temp.mkdir()
    factory = DownloaderFactory(RemoteSettings(url=good, max_retries=0), temp_dir=str(temp))
    plain = factory.build(good, expected_digests={"sha256": SHA256})
    assert plain.temp_files is None  # no pool unless asked for
    pool = factory.temp_files(str(temp))
    assert factory.temp_files(str(temp)) is pool
    results = await defer.gatherResults(
        [factory.build(good, expected_digests={"sha256": SHA256}).run() for _ in range(20)]
    )
    for result in results:
        assert Path(result.path).read_bytes() == BODY
        assert Path(result.path).parent == temp
    streamed = factory.build(good, writer=open(os.devnull, "wb"))  # noqa: SIM115
    assert streamed.temp_files is None  # a writer takes the bytes: no file needed
    streamed.writer.close()
    with pytest.raises(DigestValidationError):
        await factory.build(good, expected_digests={"sha256": "0" * 64}).run()
    await factory.release_temp_files(str(temp))
    left = sorted(temp.iterdir())
    assert left == sorted(Path(r.path) for r in results)  # spares and the bad file are gone
    await factory.close()


@pytest_twisted.inlineCallbacks
def test_pool_mode_is_used_for_made_ahead_and_inline_files(tmp_path):
    old = os.umask(0o022)
    try:
        pool = TempFilePool(str(tmp_path), size=2, mode=0o644)
        fd, path = pool.take()  # made inline: nothing ready yet; a refill starts
        os.close(fd)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
        while pool._refilling is not None:
            yield task.deferLater(reactor, 0.01, lambda: None)
        fd, ahead = pool.take()  # made ahead by the thread
        os.close(fd)
        assert stat.S_IMODE(os.stat(ahead).st_mode) == 0o644
        yield pool.close()
        fd, path = create_temp_file(str(tmp_path), 0o640)
        os.close(fd)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    finally:
        os.umask(old)


@pytest_twisted.inlineCallbacks
def test_pool_of_size_zero_creates_inline_without_a_thread(tmp_path):
    old = os.umask(0o022)
    try:
        pool = TempFilePool(str(tmp_path), size=0, mode=0o644)
        made = [pool.take() for _ in range(3)]
        assert pool._refilling is None  # no refill, no thread
        for fd, path in made:
            os.close(fd)
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
        yield task.deferLater(reactor, 0.05, lambda: None)
        assert sorted(tmp_path.iterdir()) == sorted(Path(p) for _fd, p in made)  # nothing ahead
        yield pool.close()
    finally:
        os.umask(old)


def test_factory_temp_files_ahead_zero_is_an_inline_pool(tmp_path):
    factory = DownloaderFactory(RemoteSettings(url="http://127.0.0.1:9/"), temp_dir=str(tmp_path))
    pool = factory.temp_files(str(tmp_path), mode=0o644, ahead=0)
    assert pool.size == 0 and pool.mode == 0o644
    downloader = factory.build("http://127.0.0.1:9/x", expected_size=1)
    assert downloader.temp_files is pool
    assert list(tmp_path.iterdir()) == []
    factory.close()
