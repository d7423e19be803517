"""`BaseDownloader.run` on plain callbacks: cancelling during a backoff, and the semaphore
slot given back whatever the outcome (success, failure, cancellation, queued callers)."""

from __future__ import annotations

from pathlib import Path

from twisted.internet import defer, task

from downloaders import ConnectionFailed, DigestValidationError
from tests.downloaders.test_base import URL, MemoryDownloader, error_of, outcome


def test_cancel_during_backoff_stops_retrying(tmp_path: Path, assert_no_temp_files):
    clock = task.Clock()
    downloader = MemoryDownloader(
        URL, [[b"partial", ConnectionFailed(URL, "reset")]], temp_dir=str(tmp_path), reactor=clock
    )
    d = downloader.run()
    assert len(clock.getDelayedCalls()) == 1  # waiting for the backoff
    d.cancel()
    error_of(d, defer.CancelledError)
    assert clock.getDelayedCalls() == []
    clock.advance(60)
    assert downloader.calls == 1
    assert_no_temp_files(tmp_path)


def test_semaphore_slot_given_back_after_every_outcome(tmp_path: Path):
    semaphore = defer.DeferredSemaphore(1)
    ok = MemoryDownloader(URL, [[b"ok"]], semaphore=semaphore, temp_dir=str(tmp_path))
    assert outcome(ok.run()).artifact_attributes["size"] == 2
    assert semaphore.tokens == 1
    bad = MemoryDownloader(
        URL,
        [[b"x"]],
        expected_digests={"sha256": "0" * 64},
        semaphore=semaphore,
        temp_dir=str(tmp_path),
    )
    error_of(bad.run(), DigestValidationError)
    assert semaphore.tokens == 1
    gate: defer.Deferred[None] = defer.Deferred()
    stuck = MemoryDownloader(URL, [[b"a", gate]], semaphore=semaphore, temp_dir=str(tmp_path))
    queued = MemoryDownloader(URL, [[b"b"]], semaphore=semaphore, temp_dir=str(tmp_path))
    d1, d2 = stuck.run(), queued.run()
    assert semaphore.tokens == 0 and queued.calls == 0
    d1.cancel()  # the slot goes to the queued download at once
    error_of(d1, defer.CancelledError)
    assert outcome(d2).artifact_attributes["size"] == 1
    assert semaphore.tokens == 1
