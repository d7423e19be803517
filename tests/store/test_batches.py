"""BatchCommitter: validated temp files enter storage in batches (one filesystem flush each),
whole or not at all; a file still waiting for its batch when cancelled is removed."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer, task
from twisted.logger import globalLogPublisher

from store import ArtifactStorage
from store.batches import BatchCommitter, _flushed, flush_filesystem


@pytest.fixture
def storage(tmp_path: Path) -> ArtifactStorage:
    return ArtifactStorage(tmp_path / "var")


def temp_file(storage, data: bytes) -> tuple[str, str, int]:
    with storage.new_temp_file() as f:
        f.write(data)
    return f.name, hashlib.sha256(data).hexdigest(), len(data)


def test_flush_filesystem_flushes_a_folder_and_reports_a_missing_one(tmp_path):
    """An existing folder's filesystem is flushed (no error, no descriptor left open); a
    folder that is gone raises OSError, which `_flushed` turns into False so that the batch
    falls back to an fsync per file."""
    fds = len(os.listdir("/proc/self/fd"))
    assert flush_filesystem(str(tmp_path)) is None
    assert _flushed(str(tmp_path)) is True
    with pytest.raises(FileNotFoundError):
        flush_filesystem(str(tmp_path / "gone"))
    assert _flushed(str(tmp_path / "gone")) is False
    assert len(os.listdir("/proc/self/fd")) == fds


@pytest_twisted.ensureDeferred
async def test_files_gather_into_one_batch(storage, monkeypatch):
    flushes = []
    monkeypatch.setattr("store.batches.flush_filesystem", flushes.append)
    clock = task.Clock()
    committer = BatchCommitter(storage, delay=0.05, clock=clock)
    files = [temp_file(storage, b"x" * n) for n in (1, 2, 3)]
    done = [committer.commit(*f) for f in files]

    assert not any(d.called for d in done) and not storage.has(files[0][1])
    clock.advance(0.05)
    await defer.gatherResults(done)
    assert flushes == [storage.temp_dir]
    assert all(storage.has(sha) for _, sha, _ in files)


@pytest_twisted.ensureDeferred
async def test_a_full_batch_goes_at_once(storage):
    committer = BatchCommitter(storage, max_batch=2, clock=task.Clock())
    files = [temp_file(storage, b"a"), temp_file(storage, b"b")]
    await defer.gatherResults([committer.commit(*f) for f in files])
    assert all(storage.has(sha) for _, sha, _ in files)


@pytest_twisted.ensureDeferred
async def test_hurried_files_go_as_soon_as_the_batch_under_way_is_done(storage, monkeypatch):
    """A caller that waits for a queued file (a sync whose download slots all wait for
    their batch) hurries the committer: the queue goes once the batch under way is done,
    not a whole ``delay`` later, and the one after gathers for ``delay`` again. (Without
    it a sync with a full backlog stored about ten files per ``delay``.)"""
    flushing: list[defer.Deferred[None]] = []
    monkeypatch.setattr(
        "store.batches.threads.deferToThread",
        lambda f, *a: flushing.append(defer.Deferred()) or flushing[-1],
    )
    clock = task.Clock()
    committer = BatchCommitter(storage, delay=10.0, clock=clock, inline_renames=True)
    first = committer.commit(*temp_file(storage, b"first"))
    committer.hurry()  # nothing under way: at once
    assert len(flushing) == 1
    waiting = [temp_file(storage, b"w%d" % n) for n in range(3)]
    done = [committer.commit(*f) for f in waiting]
    committer.hurry()  # a batch is under way: the queue goes right after it
    flushing[0].callback(True)
    await first
    assert len(flushing) == 2 and not clock.getDelayedCalls()
    flushing[1].callback(True)
    await defer.gatherResults(done)
    assert all(storage.has(sha) for _, sha, _ in waiting)
    later = committer.commit(*temp_file(storage, b"later"))
    assert len(flushing) == 2 and [c.getTime() for c in clock.getDelayedCalls()] == [10.0]
    clock.advance(10)
    flushing[2].callback(True)
    await later


@pytest_twisted.ensureDeferred
async def test_files_that_come_in_numbers_gather_longer_and_a_lone_one_does_not(storage):
    """A lone file waits ``delay`` (a first request on a quiet server: its second request may
    come from another process and wait for the commit). Right after a batch of ``busy_files``
    or more began, files gather for ``busy_delay``: fewer, larger batches, each of which costs
    a trip to the committing thread and one to the catalog's. After a quiet spell, ``delay``
    again."""
    clock = task.Clock()
    committer = BatchCommitter(storage, delay=0.01, clock=clock, busy_delay=0.05, busy_files=3)

    async def gathering() -> float:
        """How long the queued files wait (once the batch before has let go: its callers
        hear of their files before the committer is free again)."""
        from twisted.internet import reactor

        await task.deferLater(reactor, 0, lambda: None)
        (call,) = clock.getDelayedCalls()
        return round(call.getTime() - clock.seconds(), 6)

    lone = temp_file(storage, b"lone")
    done = committer.commit(*lone)
    assert await gathering() == 0.01
    clock.advance(0.01)
    await done
    assert storage.has(lone[1])

    crowd = [temp_file(storage, b"crowd %d" % n) for n in range(3)]
    done = defer.gatherResults([committer.commit(*f) for f in crowd])
    assert await gathering() == 0.01  # the batch before was a lone file
    clock.advance(0.01)
    await done

    follower = temp_file(storage, b"follows the crowd")
    done = committer.commit(*follower)
    assert await gathering() == 0.05
    clock.advance(0.01)
    assert not done.called and not storage.has(follower[1])
    clock.advance(0.04)
    await done
    assert storage.has(follower[1])

    clock.advance(1)  # quiet
    late = temp_file(storage, b"after a quiet spell")
    done = committer.commit(*late)
    assert await gathering() == 0.01
    clock.advance(0.01)
    await done
    assert all(storage.has(sha) for _, sha, _ in crowd + [late])


@pytest_twisted.ensureDeferred
async def test_cancelled_before_its_batch_the_file_is_removed(storage):
    clock = task.Clock()
    committer = BatchCommitter(storage, clock=clock)
    path, sha, size = temp_file(storage, b"never stored")
    d = committer.commit(path, sha, size)
    d.cancel()
    with pytest.raises(defer.CancelledError):
        await d
    clock.advance(1)
    assert not storage.has(sha)
    assert list(Path(storage.temp_dir).iterdir()) == []


@pytest_twisted.ensureDeferred
async def test_a_bad_file_fails_alone(storage):
    clock = task.Clock()
    committer = BatchCommitter(storage, clock=clock)
    good = temp_file(storage, b"good")
    bad_path, bad_sha, _ = temp_file(storage, b"short")
    results = [committer.commit(*good), committer.commit(bad_path, bad_sha, 999)]
    clock.advance(1)
    outcome = await defer.DeferredList(results, consumeErrors=True)
    assert outcome[0] == (True, None)
    assert not outcome[1][0] and "size mismatch" in outcome[1][1].getErrorMessage()
    assert storage.has(good[1]) and not storage.has(bad_sha)


@pytest_twisted.ensureDeferred
async def test_flush_commits_the_last_files_without_waiting(storage):
    committer = BatchCommitter(storage, delay=3600, clock=task.Clock())
    path, sha, size = temp_file(storage, b"last one")
    done = committer.commit(path, sha, size)
    committer.flush()
    await done
    assert storage.has(sha)


@pytest_twisted.ensureDeferred
async def test_inline_renames_flush_in_a_thread_then_rename_in_the_reactor(storage, monkeypatch):
    where = {}

    def flush(path: str) -> None:
        where["flush"] = threading.current_thread()

    commit = storage.commit

    def recording_commit(path, sha256, size, *, durable=True):
        where.setdefault("commits", []).append((threading.current_thread(), durable))
        return commit(path, sha256, size, durable=durable)

    monkeypatch.setattr("store.batches.flush_filesystem", flush)
    monkeypatch.setattr(storage, "commit", recording_commit)
    committer = BatchCommitter(storage, clock=task.Clock(), inline_renames=True)
    files = [temp_file(storage, b"inline %d" % n) for n in range(3)]
    done = [committer.commit(*f) for f in files]
    committer.flush()
    await defer.gatherResults(done)
    assert where["flush"] is not threading.main_thread()
    assert where["commits"] == [(threading.main_thread(), False)] * 3  # no fsync: flushed
    assert all(storage.has(sha) for _, sha, _ in files)
    assert list(Path(storage.temp_dir).iterdir()) == []


@pytest_twisted.ensureDeferred
async def test_inline_renames_fsync_each_file_in_a_thread_when_the_flush_fails(
    storage, monkeypatch
):
    def flush(path: str) -> None:
        raise OSError(5, "Input/output error")

    durable = []
    commit = storage.commit

    def recording_commit(path, sha256, size, **kwargs):
        durable.append((threading.current_thread(), kwargs["durable"]))
        return commit(path, sha256, size, **kwargs)

    monkeypatch.setattr("store.batches.flush_filesystem", flush)
    monkeypatch.setattr(storage, "commit", recording_commit)
    committer = BatchCommitter(storage, clock=task.Clock(), inline_renames=True)
    good = temp_file(storage, b"good")
    bad_path, bad_sha, _ = temp_file(storage, b"short")
    results = [committer.commit(*good), committer.commit(bad_path, bad_sha, 999)]
    committer.flush()
    outcome = await defer.DeferredList(results, consumeErrors=True)
    assert outcome[0] == (True, None)
    assert not outcome[1][0] and "size mismatch" in outcome[1][1].getErrorMessage()
    assert [d for _t, d in durable] == [True, True]  # each file fsynced on its own
    assert all(t is not threading.main_thread() for t, _d in durable)
    assert storage.has(good[1]) and not storage.has(bad_sha)


@pytest_twisted.ensureDeferred
async def test_then_runs_in_the_committing_thread_once_the_file_is_stored(storage):
    """What a caller hands as *then* (the streamer lets go of its claim there: that close may
    wait for the journal) runs off the reactor thread, after the rename, and only for the
    files that entered storage."""
    calls = []

    def then_for(sha: str):
        return lambda: calls.append((sha, threading.current_thread(), storage.has(sha)))

    committer = BatchCommitter(storage, clock=task.Clock())
    good = temp_file(storage, b"stored, then released")
    bad_path, bad_sha, _ = temp_file(storage, b"short")
    results = [
        committer.commit(*good, then=then_for(good[1])),
        committer.commit(bad_path, bad_sha, 999, then=then_for(bad_sha)),
    ]
    committer.flush()
    outcome = await defer.DeferredList(results, consumeErrors=True)
    assert outcome[0] == (True, None) and not outcome[1][0]
    assert [(sha, stored) for sha, _thread, stored in calls] == [(good[1], True)]
    assert calls[0][1] is not threading.main_thread()


@pytest_twisted.ensureDeferred
async def test_a_failing_then_does_not_fail_the_commit(storage):
    def boom() -> None:
        raise OSError(9, "Bad file descriptor")

    committer = BatchCommitter(storage, clock=task.Clock())
    path, sha, size = temp_file(storage, b"committed anyway")
    done = committer.commit(path, sha, size, then=boom)
    committer.flush()
    await done
    assert storage.has(sha)


@pytest_twisted.ensureDeferred
async def test_callers_added_without_a_deferred_are_each_told_their_own_outcome(storage):
    """`add`: each file's caller is called once, in the reactor thread, with None (stored) or
    its own error; one that raises is logged and keeps none of the others from being told,
    and the file that could not be written leaves nothing behind."""
    told: list[tuple[str, object, threading.Thread]] = []
    all_told: defer.Deferred[None] = defer.Deferred()

    def settle_for(name: str, *, raises: bool = False):
        def settle(error: object) -> None:
            told.append((name, error, threading.current_thread()))
            if len(told) == 3:
                all_told.callback(None)
            if raises:
                raise RuntimeError("the caller's own fault")

        return settle

    def cannot_write() -> str:
        raise OSError(28, "No space left on device")

    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    committer = BatchCommitter(storage, clock=task.Clock())
    first, second = temp_file(storage, b"first"), temp_file(storage, b"second")
    committer.add(*first, settle_for("first", raises=True))
    committer.add(None, hashlib.sha256(b"x").hexdigest(), 1, settle_for("full"), write=cannot_write)
    committer.add(*second, settle_for("second"))
    committer.flush()
    try:
        await all_told
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert [(name, error) for name, error, _ in told[::2]] == [("first", None), ("second", None)]
    name, error, _ = told[1]
    assert name == "full" and isinstance(error, OSError) and error.errno == 28
    assert all(thread is threading.main_thread() for _, _, thread in told)
    assert storage.has(first[1]) and storage.has(second[1])
    assert list(Path(storage.temp_dir).iterdir()) == []
    [logged] = [event for event in events if event.get("log_failure") is not None]
    assert logged["log_failure"].check(RuntimeError) and logged["sha256"] == first[1]
