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


def test_a_download_hashes_once_and_builds_no_backoff_or_hasher_by_name(
    tmp_path: Path, monkeypatch
):
    """What a download costs apart from its bytes: the default backoff is one shared (frozen)
    object, hashers come from hashlib's own constructors, and the digests validated are the
    ones reported (computed once, not once for each)."""
    import hashlib

    from downloaders import digests

    by_name: list[str] = []
    real_new = hashlib.new
    monkeypatch.setattr(hashlib, "new", lambda name, *a: by_name.append(name) or real_new(name))
    finished: list[str] = []
    real_hexdigests = digests.DigestCalculator.hexdigests

    def hexdigests(self: digests.DigestCalculator) -> dict[str, str]:
        if self._final is None or self._final[0] != self.size:
            finished.append("computed")
        return real_hexdigests(self)

    monkeypatch.setattr(digests.DigestCalculator, "hexdigests", hexdigests)
    body = b"one small file"
    expected = {"sha256": hashlib.sha256(body).hexdigest()}
    first, second = (
        MemoryDownloader(URL, [[body]], expected_digests=expected, temp_dir=str(tmp_path))
        for _ in range(2)
    )
    assert first.backoff is second.backoff
    result = outcome(first.run())
    assert result.artifact_attributes["sha256"] == expected["sha256"]
    assert finished == ["computed"]
    assert by_name == []
    # A later byte is hashed: the digests are computed afresh, never a stale copy.
    calculator = digests.DigestCalculator(["sha256", "sha512"])
    calculator.update(b"a")
    assert calculator.hexdigests()["sha256"] == hashlib.sha256(b"a").hexdigest()
    calculator.update(b"b")
    assert calculator.hexdigests() == {
        "sha256": hashlib.sha256(b"ab").hexdigest(),
        "sha512": hashlib.sha512(b"ab").hexdigest(),
    }
    calculator.hexdigests()["sha256"] = "changed by a caller"
    assert calculator.hexdigests()["sha256"] == hashlib.sha256(b"ab").hexdigest()
