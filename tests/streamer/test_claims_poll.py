"""A follower's wake-ups (`streamer.claims`): inotify at each of the owner's writes; and where
inotify sees no other writer (NFS: the owner is on another machine), a poll that speeds up
while it finds unannounced progress, so it carries the stream, and backs off to the slow
safety net when it finds nothing (on a `Clock`, with real files)."""

from __future__ import annotations

import os

import pytest_twisted
from twisted.internet.task import Clock

from store import ArtifactStorage, CatalogEntry
from streamer import claims as claims_module
from streamer.claims import POLL_MIN_SECONDS, POLL_SECONDS, Claim, Claims, PeerDownload
from tests.support.polling import until

DATA = os.urandom(10_000)


def entry() -> CatalogEntry:
    import hashlib

    digest = hashlib.sha256(DATA).hexdigest()
    return CatalogEntry("r/a.bin", "r", "http://127.0.0.1:1/a.bin", len(DATA), {"sha256": digest})


def delays(clock: Clock) -> list[float]:
    return [round(call.getTime() - clock.seconds(), 6) for call in clock.getDelayedCalls()]


class _Client:
    def __init__(self) -> None:
        self.woken = 0

    def progress(self) -> None:
        self.woken += 1

    def failed(self, error: BaseException) -> None:
        raise AssertionError(error)


def test_the_poll_speeds_up_while_an_unseen_writer_makes_progress(tmp_path):
    storage = ArtifactStorage(tmp_path / "var")
    clock = Clock()
    owner_side, follower_side = Claims(storage, clock), Claims(storage, clock)
    follower_side._notify = False  # as on NFS: no event tells of another machine's writes
    owner = owner_side.claim_or_follow(entry(), lambda _: None)
    assert isinstance(owner, Claim)
    peer = follower_side.claim_or_follow(entry(), lambda _: None)
    assert isinstance(peer, PeerDownload)
    client = _Client()
    peer.add(client)
    assert delays(clock) == [POLL_MIN_SECONDS]  # a quick upstream is seen quickly
    waited = 0.0
    while delays(clock)[0] < POLL_SECONDS:  # nothing happens: back off, doubling
        waited += delays(clock)[0]
        clock.advance(delays(clock)[0])
    assert delays(clock) == [POLL_SECONDS] and waited < 1.0

    temp = os.path.join(storage.temp_dir, ".download-a")
    with open(temp, "wb") as out:
        owner.announce(temp)
        owner.headers([(b"Content-Type", [b"application/octet-stream"])], 200)
        clock.advance(POLL_SECONDS)
        assert peer.headers is not None
        assert delays(clock) == [POLL_MIN_SECONDS]  # unannounced progress: poll fast
        for start in range(0, 8000, 1000):
            out.write(DATA[start : start + 1000])
            out.flush()
            clock.advance(POLL_MIN_SECONDS)
            assert peer.written == start + 1000
            assert delays(clock) == [POLL_MIN_SECONDS]
        woken = client.woken
        clock.advance(POLL_MIN_SECONDS)  # nothing new: back off, doubling
        assert delays(clock) == [2 * POLL_MIN_SECONDS]
        clock.advance(2 * POLL_MIN_SECONDS)
        assert delays(clock) == [4 * POLL_MIN_SECONDS]
        for _ in range(10):
            clock.advance(delays(clock)[0])
        assert delays(clock) == [POLL_SECONDS]
        out.write(DATA[8000:])
    owner.succeeded()
    clock.advance(POLL_SECONDS)
    assert peer.succeeded and peer.readable() == len(DATA) and client.woken > woken
    assert clock.getDelayedCalls() == []
    owner.release()
    peer.remove(client)
    owner_side.close()
    follower_side.close()


@pytest_twisted.ensureDeferred
async def test_inotify_wakes_a_follower_at_each_write(tmp_path, monkeypatch):
    """With the poll out of the way (a minute), only inotify can wake the follower: the
    owner's announce, headers and every write reach it at once (INotify hands bytes paths;
    they were compared with str ones, so no event ever matched and the poll did the work)."""
    from twisted.internet import reactor

    monkeypatch.setattr(claims_module, "POLL_MIN_SECONDS", 60.0)
    monkeypatch.setattr(claims_module, "POLL_SECONDS", 60.0)
    storage = ArtifactStorage(tmp_path / "var")
    owner_side, follower_side = Claims(storage, reactor), Claims(storage, reactor)
    owner = owner_side.claim_or_follow(entry(), lambda _: None)
    peer = follower_side.claim_or_follow(entry(), lambda _: None)
    assert isinstance(owner, Claim) and isinstance(peer, PeerDownload)
    client = _Client()
    peer.add(client)
    temp = os.path.join(storage.temp_dir, ".download-a")
    try:
        with open(temp, "wb") as out:
            owner.announce(temp)
            owner.headers([(b"Content-Type", [b"application/octet-stream"])], 200)
            await until(lambda: peer.headers is not None, timeout=5)
            for start in range(0, 5000, 1000):
                out.write(DATA[start : start + 1000])
                out.flush()
                await until(lambda s=start: peer.written == s + 1000, timeout=5)
    finally:
        owner.failed(None)
        peer.remove(client)
        owner_side.close()
        follower_side.close()


def test_an_artifact_committed_before_the_claim_is_served_not_downloaded(tmp_path):
    """Another node committed the artifact and let go of its claim between this request's
    look on disk and its claim: the claim serves the stored artifact (an upstream request
    was made here once in a dozen two-node runs)."""
    storage = ArtifactStorage(tmp_path / "var")
    source = tmp_path / "incoming"
    source.write_bytes(DATA)
    storage.import_file(str(source))
    claims = Claims(storage, Clock())
    found = claims.claim_or_follow(entry(), lambda _: None)
    assert isinstance(found, PeerDownload)
    assert found.succeeded and found.finished and found.readable() == len(DATA)
    assert found.read(0, len(DATA)) == DATA
    assert dict(found.headers)[b"last-modified"]
    assert os.listdir(claims.folder) == []  # the claim was let go at once
    client = _Client()
    found.add(client)
    found.remove(client)  # closes the artifact
    claims.close()


def test_a_download_writes_two_notices_and_a_follower_reads_both(tmp_path):
    """The owner's temp file and headers are one line (written before the first byte), the
    outcome a second: two writes per download, and a follower learns from the first line
    everything it needs to start sending."""
    import json

    storage = ArtifactStorage(tmp_path / "var")
    clock = Clock()
    owner_side, follower_side = Claims(storage, clock), Claims(storage, clock)
    follower_side._notify = False
    owner = owner_side.claim_or_follow(entry(), lambda _: None)
    assert isinstance(owner, Claim)
    temp = os.path.join(storage.temp_dir, ".download-b")
    with open(temp, "wb") as out:
        owner.announce(temp)
        assert os.path.getsize(owner.path) == 0  # nothing a follower could use yet
        owner.headers([(b"Content-Type", [b"application/octet-stream"])], 200)
        owner.headers([(b"Content-Type", [b"text/plain"])], 200)  # once only
        out.write(DATA)
    peer = follower_side.claim_or_follow(entry(), lambda _: None)
    assert isinstance(peer, PeerDownload)
    client = _Client()
    peer.add(client)
    assert peer.temp_path == temp and peer.upstream_status == 200
    assert peer.headers == [(b"Content-Type", [b"application/octet-stream"])]
    assert peer.written == len(DATA) and not peer.succeeded
    owner.succeeded()
    with open(owner.path, "rb") as notices:
        lines = notices.read().splitlines()
    assert [sorted(json.loads(line)) for line in lines] == [
        ["headers", "pid", "status", "temp"],
        ["outcome"],
    ]
    clock.advance(POLL_SECONDS)
    assert peer.succeeded and peer.readable() == len(DATA)
    owner.release()
    peer.remove(client)
    owner_side.close()
    follower_side.close()


@pytest_twisted.ensureDeferred
async def test_a_body_held_in_memory_is_read_from_storage_once_the_owner_lets_go(tmp_path):
    """An owner that held a small body in memory publishes one notice (headers, status and
    outcome) and has no temp file: its follower sends nothing until the owner let go of the
    claim after the commit, then reads the stored artifact (woken by inotify: no poll)."""
    import json

    from twisted.internet import reactor

    storage = ArtifactStorage(tmp_path / "var")
    owner_side, follower_side = Claims(storage, reactor), Claims(storage, reactor)
    owner = owner_side.claim_or_follow(entry(), lambda _: None)
    peer = follower_side.claim_or_follow(entry(), lambda _: None)
    assert isinstance(owner, Claim) and isinstance(peer, PeerDownload)
    client = _Client()
    peer.add(client)
    try:
        owner.stored_later([(b"Content-Type", [b"application/octet-stream"])], 200)
        with open(owner.path, "rb") as notices:
            (line,) = notices.read().splitlines()
        assert json.loads(line)["outcome"] == "done" and "temp" not in json.loads(line)
        await until(lambda: peer.headers is not None, timeout=5)
        assert peer.upstream_status == 200
        assert not peer.finished and peer.readable() == 0  # validated, but not stored yet
        source = tmp_path / "incoming"
        source.write_bytes(DATA)
        storage.import_file(str(source))  # the commit, then the owner lets go
        assert not peer.finished
        owner.release()
        await until(lambda: peer.succeeded, timeout=5)
        assert peer.readable() == len(DATA) and peer.read(0, len(DATA)) == DATA
        assert client.woken
    finally:
        owner.release()
        peer.remove(client)
        owner_side.close()
        follower_side.close()


def test_a_body_held_in_memory_that_was_not_stored_is_downloaded_again(tmp_path):
    """The owner validated a body held in memory, then let go without storing it (its commit
    failed, or it was killed before): the follower's clients start the download again."""
    from downloaders.errors import DownloadError
    from streamer.claims import OwnerGone

    storage = ArtifactStorage(tmp_path / "var")
    clock = Clock()
    owner_side, follower_side = Claims(storage, clock), Claims(storage, clock)
    follower_side._notify = False
    owner = owner_side.claim_or_follow(entry(), lambda _: None)
    peer = follower_side.claim_or_follow(entry(), lambda _: None)
    assert isinstance(owner, Claim) and isinstance(peer, PeerDownload)
    errors: list[BaseException] = []

    class Follower(_Client):
        def failed(self, error: BaseException) -> None:
            errors.append(error)

    client = Follower()
    peer.add(client)
    owner.stored_later([], 200)
    clock.advance(POLL_SECONDS)
    assert not peer.finished and errors == []
    owner.release()
    clock.advance(POLL_SECONDS)
    assert peer.finished and not peer.succeeded
    assert [type(e) for e in errors] == [OwnerGone] and isinstance(errors[0], DownloadError)
    assert os.listdir(follower_side.folder) == []  # the claim is swept
    peer.remove(client)
    owner_side.close()
    follower_side.close()


def test_a_new_claim_costs_one_open_a_lock_and_the_look_on_disk(tmp_path, monkeypatch):
    """A claim nobody holds is made with O_EXCL: no stat and fstat to check it is still this
    path's file, no read for a dead owner's notices (it has none); only the look for the
    artifact committed meanwhile. A leftover claim (its owner died) is still emptied."""
    import json

    storage = ArtifactStorage(tmp_path / "var")
    claims = Claims(storage, Clock())
    calls: list[str] = []
    for name in ("stat", "fstat", "pread"):
        real = getattr(os, name)

        def counted(*args, _name=name, _real=real, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(os, name, counted)
    claim = claims.claim_or_follow(entry(), lambda _: None)
    assert isinstance(claim, Claim)
    assert calls == ["stat"]  # the artifact's path: not stored
    claim.headers([], 200)
    os.close(claim._fd)  # dies without letting go: the claim and its notice stay
    claim._fd = None
    assert os.path.getsize(claim.path) > 0
    again = claims.claim_or_follow(entry(), lambda _: None)
    assert isinstance(again, Claim) and os.path.getsize(again.path) == 0
    again.stored_later([], 200)
    with open(again.path, "rb") as notices:
        assert [json.loads(line)["outcome"] for line in notices] == ["done"]
    again.release()
    claims.close()
