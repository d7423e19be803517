"""A follower's wake-ups (`streamer.claims`): inotify at each of the owner's writes; and where
inotify sees no other writer (NFS: the owner is on another machine), a poll that speeds up
while it finds unannounced progress, so it carries the stream, and backs off to the slow
safety net when it finds nothing (on a `Clock`, with real files)."""

from __future__ import annotations

import errno
import fcntl
import os
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.task import Clock

from downloaders.errors import (
    ConnectionFailed,
    DigestValidationError,
    SizeValidationError,
    http_error,
)
from store import ArtifactStorage, CatalogEntry
from store.errors import LocalFault, local_fault
from streamer import claims as claims_module
from streamer.busy import busy_seconds
from streamer.claims import (
    LOCKS_FILE,
    POLL_MIN_SECONDS,
    POLL_SECONDS,
    Claim,
    Claims,
    PeerDownload,
)
from tests.support.polling import until

DATA = os.urandom(10_000)


def entry() -> CatalogEntry:
    import hashlib

    digest = hashlib.sha256(DATA).hexdigest()
    return CatalogEntry("r/a.bin", "r", "http://127.0.0.1:1/a.bin", len(DATA), {"sha256": digest})


def boards(claims: Claims) -> list[str]:
    """The notice boards in the claims folder (everything but the shared locks file)."""
    return [name for name in os.listdir(claims.folder) if name != LOCKS_FILE]


def held(claims: Claims, sha256: str) -> bool:
    """Whether some process (or node) holds the lock owning *sha256*'s download."""
    fd = os.open(os.path.join(claims.folder, LOCKS_FILE), os.O_RDONLY)
    try:
        return claims_module._holder(fd, claims_module._slot(sha256)) != fcntl.F_UNLCK
    finally:
        os.close(fd)


def delays(clock: Clock) -> list[float]:
    return [round(call.getTime() - clock.seconds(), 6) for call in clock.getDelayedCalls()]


class _Client:
    def __init__(self) -> None:
        self.woken = 0

    def progress(self) -> None:
        self.woken += 1

    def failed(self, error: BaseException) -> None:
        raise AssertionError(error)


class _FailureRecorder(_Client):
    """A follower's client that keeps the errors it is failed with."""

    def __init__(self) -> None:
        super().__init__()
        self.errors: list[BaseException] = []

    def failed(self, error: BaseException) -> None:
        self.errors.append(error)


def unnotified_sides(storage: ArtifactStorage, clock: Any) -> tuple[Claims, Claims]:
    """An owner's and a follower's `Claims` on one storage (two processes); the follower gets
    no inotify event, as on NFS where no event tells of another machine's writes: it lives on
    its poll, which *clock* drives."""
    owner_side, follower_side = Claims(storage, clock), Claims(storage, clock)
    follower_side._notify = False
    return owner_side, follower_side


def owner_and_follower(owner_side: Claims, follower_side: Claims) -> tuple[Claim, PeerDownload]:
    """The owner's claim of `entry()` on *owner_side*, then the follower of it on
    *follower_side*."""
    owner = owner_side.claim_or_follow(entry(), lambda _: None)
    peer = follower_side.claim_or_follow(entry(), lambda _: None)
    assert isinstance(owner, Claim) and isinstance(peer, PeerDownload)
    return owner, peer


def test_the_poll_speeds_up_while_an_unseen_writer_makes_progress(tmp_path):
    storage = ArtifactStorage(tmp_path / "var")
    clock = Clock()
    owner_side, follower_side = unnotified_sides(storage, clock)
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
    owner, peer = owner_and_follower(owner_side, follower_side)
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


@pytest_twisted.ensureDeferred
async def test_the_owner_letting_go_wakes_a_follower_without_a_poll(tmp_path, monkeypatch):
    """A small body's owner writes nothing a follower could see when it lets go: its close of
    the locks file, after it let go, is what wakes the follower (inotify), which finds the lock
    free and serves the stored artifact; the poll (a minute here) plays no part."""
    from twisted.internet import reactor

    monkeypatch.setattr(claims_module, "POLL_MIN_SECONDS", 60.0)
    monkeypatch.setattr(claims_module, "POLL_SECONDS", 60.0)
    storage = ArtifactStorage(tmp_path / "var")
    owner_side, follower_side = Claims(storage, reactor), Claims(storage, reactor)
    owner = owner_side.claim_or_follow(entry(), lambda _: None)
    assert isinstance(owner, Claim)
    owner.stored_later([], 200)  # validated before anyone followed: no notice at all
    peer = follower_side.claim_or_follow(entry(), lambda _: None)
    assert isinstance(peer, PeerDownload) and peer.validated
    client = _Client()
    peer.add(client)
    try:
        source = tmp_path / "incoming"
        source.write_bytes(DATA)
        storage.import_file(str(source))
        owner.release()
        await until(lambda: peer.succeeded, timeout=5)
        assert peer.read(0, len(DATA)) == DATA and client.woken
    finally:
        owner.release()
        peer.remove(client)
        owner_side.close()
        follower_side.close()


@pytest_twisted.ensureDeferred
async def test_other_downloads_letting_go_do_not_wake_a_followers_clients(tmp_path, monkeypatch):
    """Every download's owner closes the one locks file when it lets go, and that close is
    what wakes followers: a follower tests its own lock then, and only its own owner's
    letting go reaches its clients (not 20 other downloads finishing meanwhile)."""
    import hashlib

    from twisted.internet import reactor

    monkeypatch.setattr(claims_module, "POLL_MIN_SECONDS", 60.0)
    monkeypatch.setattr(claims_module, "POLL_SECONDS", 60.0)
    storage = ArtifactStorage(tmp_path / "var")
    owner_side, follower_side = Claims(storage, reactor), Claims(storage, reactor)
    events: list[str] = []
    seen = follower_side._event

    def counted(watch, path, mask):
        events.append(os.path.basename(os.fsdecode(path.path)))
        seen(watch, path, mask)

    monkeypatch.setattr(follower_side, "_event", counted)  # (before the watch is made)
    owner, peer = owner_and_follower(owner_side, follower_side)
    client = _Client()
    peer.add(client)
    try:
        for n in range(20):
            other = owner_side.claim_or_follow(
                _entry_of(hashlib.sha256(b"other%d" % n).hexdigest()), lambda _: None
            )
            other.release()
            await until(lambda n=n: events.count(LOCKS_FILE) == n + 1, timeout=5)
        assert client.woken == 0
        source = tmp_path / "incoming"
        source.write_bytes(DATA)
        storage.import_file(str(source))
        owner.release()
        await until(lambda: peer.succeeded, timeout=5)
        assert client.woken == 1
    finally:
        owner.release()
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
    # The claim was let go at once (the lock; no claim file is made any more, none is left).
    assert not held(claims, entry().sha256) and boards(claims) == []
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
    owner_side, follower_side = unnotified_sides(storage, clock)
    owner = owner_side.claim_or_follow(entry(), lambda _: None)
    assert isinstance(owner, Claim)
    temp = os.path.join(storage.temp_dir, ".download-b")
    with open(temp, "wb") as out:
        owner.announce(temp)
        assert not os.path.exists(owner.path)  # nothing a follower could use yet
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


def test_a_folder_planted_at_a_board_is_removed_and_the_follower_streams(tmp_path):
    """A folder at ``tmp/claims/<sha256>`` when a follower comes (after the owner claimed):
    removed (with what it holds, never through a link in it), so the follower's board is made
    and the owner's notices reach it: it streams the owner's temp file. Before: the folder
    stayed, the follower had no board and the owner could not write one, so the follower
    waited for the lock and, with nothing stored (``streamed``), downloaded again."""
    storage = ArtifactStorage(tmp_path / "var")
    clock = Clock()
    owner_side, follower_side = unnotified_sides(storage, clock)
    owner = owner_side.claim_or_follow(entry(), lambda _: None)
    assert isinstance(owner, Claim)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    os.makedirs(os.path.join(owner.path, "inside"))
    os.symlink(victim, os.path.join(owner.path, "inside", "link"))
    peer = follower_side.claim_or_follow(entry(), lambda _: None)
    assert isinstance(peer, PeerDownload)
    client = _Client()
    peer.add(client)
    temp = os.path.join(storage.temp_dir, ".download-c")
    with open(temp, "wb") as out:
        owner.announce(temp)
        owner.headers([], 200)
        out.write(DATA)
    clock.advance(POLL_SECONDS)
    assert peer.temp_path == temp and peer.written == len(DATA)
    owner.succeeded()
    clock.advance(POLL_SECONDS)
    assert peer.succeeded and client.woken
    owner.release()
    peer.remove(client)
    assert boards(owner_side) == [] and victim.read_bytes() == b"precious\n"
    owner_side.close()
    follower_side.close()


def test_an_owner_that_stops_writing_mid_stream_fails_its_followers_as_a_read_timeout(tmp_path):
    """An owner stopped or frozen mid-body (``SIGSTOP``) keeps its lock, so its followers see
    no death: once it wrote nothing for longer than its remote's ``sock_read_timeout`` (and a
    second), they fail as its read timeout would (before: they waited as long as it was
    stopped). An owner that keeps writing, however slowly, is followed to its end."""
    from downloaders.errors import DownloadTimeout

    storage = ArtifactStorage(tmp_path / "var")
    clock = Clock()
    owner_side, follower_side = unnotified_sides(storage, clock)
    owner, peer = owner_and_follower(owner_side, follower_side)
    peer.stall_limit = 3.0
    client = _FailureRecorder()
    errors = client.errors
    peer.add(client)
    temp = os.path.join(storage.temp_dir, ".download-d")
    with open(temp, "wb", buffering=0) as out:
        owner.announce(temp)
        owner.headers([], 200)
        for offset in range(0, 5000, 100):  # 100 bytes every 4 s: slow, never stalled
            for _ in range(8):
                clock.advance(POLL_SECONDS)
            out.write(DATA[offset : offset + 100])
            peer.check()  # (as inotify tells of the write)
        assert errors == [] and peer.written == 5000
        for _ in range(8):  # then nothing for 4 s: 3 s and a second
            clock.advance(POLL_SECONDS)
        assert errors == []
        clock.advance(POLL_SECONDS)
    assert [type(e) for e in errors] == [DownloadTimeout] and errors[0].seconds == 3.0
    assert peer.finished
    owner.release()
    # A temp file this follower cannot open (gone, or not its to read): its growth is not
    # seen, so no verdict is made on it; the outcome or the lock decides, as before.
    owner, peer = owner_and_follower(owner_side, follower_side)
    peer.stall_limit = 3.0
    peer.add(client)
    owner.announce(os.path.join(storage.temp_dir, ".download-missing"))
    owner.headers([], 200)
    for _ in range(20):
        clock.advance(POLL_SECONDS)
    assert len(errors) == 1 and not peer.finished
    peer.remove(client)
    owner.release()
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
    owner, peer = owner_and_follower(owner_side, follower_side)
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
    owner_side, follower_side = unnotified_sides(storage, clock)
    owner, peer = owner_and_follower(owner_side, follower_side)
    client = _FailureRecorder()
    errors = client.errors
    peer.add(client)
    owner.stored_later([], 200)
    clock.advance(POLL_SECONDS)
    assert not peer.finished and errors == []
    owner.release()
    clock.advance(POLL_SECONDS)
    assert peer.finished and not peer.succeeded
    assert [type(e) for e in errors] == [OwnerGone] and isinstance(errors[0], DownloadError)
    assert boards(follower_side) == []  # the board the follower made is swept
    peer.remove(client)
    owner_side.close()
    follower_side.close()


def test_a_new_claim_costs_one_open_a_lock_and_the_look_on_disk(tmp_path, monkeypatch):
    """A claim nobody holds is one open of the shared locks file and one lock: no file made
    for the download, no stat and fstat, no read for a dead owner's notices (one failed
    open says there are none); only the look for the artifact committed meanwhile. A dead
    owner's notices (and the temp file they name) are still removed by the next owner."""
    storage = ArtifactStorage(tmp_path / "var")
    claims = Claims(storage, Clock())
    first = claims.claim_or_follow(entry(), lambda _: None)
    assert isinstance(first, Claim)
    first.release()  # (the locks file is made once, by the first claim)
    calls: list[str] = []
    for name in ("stat", "fstat", "pread"):
        real = getattr(os, name)

        def counted(*args, _name=name, _real=real, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(os, name, counted)
    made: list[str] = []
    real_open = os.open

    def recording_open(path, flags, *args, **kwargs):
        fd = real_open(path, flags, *args, **kwargs)
        if flags & os.O_CREAT:
            made.append(os.path.basename(path))
        return fd

    monkeypatch.setattr(os, "open", recording_open)
    claim = claims.claim_or_follow(entry(), lambda _: None)
    assert isinstance(claim, Claim)
    assert calls == ["stat"]  # the artifact's path: not stored
    assert made == [] and boards(claims) == []
    claim.stored_later([], 200)  # a body held in memory: no reader, nothing to write
    assert made == [] and boards(claims) == [] and held(claims, entry().sha256)
    claim.release()
    assert made == [] and boards(claims) == [] and not held(claims, entry().sha256)
    assert os.path.getsize(os.path.join(claims.folder, LOCKS_FILE)) == 0

    temp = os.path.join(storage.temp_dir, ".download-dead")
    open(temp, "wb").close()
    dying = claims.claim_or_follow(entry(), lambda _: None)
    dying.announce(temp)
    dying.headers([], 200)  # a temp file's notices: a board is made
    os.close(dying._fd)  # dies without letting go: its board and temp file stay
    dying._fd = None
    assert os.path.getsize(dying.path) > 0 and os.path.exists(temp)
    again = claims.claim_or_follow(entry(), lambda _: None)
    assert isinstance(again, Claim)
    assert not os.path.exists(again.path) and not os.path.exists(temp)
    again.release()
    claims.close()


def test_a_reader_of_a_body_held_in_memory_gets_the_owners_failure(tmp_path):
    """A small body's owner writes no notice unless a reader is there; with one, its
    failure reaches the reader, whose clients answer as the owner's did (a 404 is a 404 in
    every process: no second upstream request), and no board is left behind."""
    from downloaders.errors import NotFound

    storage = ArtifactStorage(tmp_path / "var")
    clock = Clock()
    owner_side, follower_side = unnotified_sides(storage, clock)
    owner, peer = owner_and_follower(owner_side, follower_side)
    assert owner.has_readers()
    client = _FailureRecorder()
    errors = client.errors
    peer.add(client)
    owner.failed(NotFound(entry().url, 404))
    clock.advance(POLL_SECONDS)
    assert [type(e) for e in errors] == [NotFound] and errors[0].status == 404
    assert boards(owner_side) == [] and not held(owner_side, entry().sha256)
    peer.remove(client)
    owner_side.close()
    follower_side.close()


def owners_failure_as_followed(tmp_path, error: BaseException) -> BaseException:
    """The error a follower's client (another process) is failed with when the owner fails
    with *error*."""
    storage = ArtifactStorage(tmp_path / "var")
    clock = Clock()
    owner_side, follower_side = unnotified_sides(storage, clock)
    owner, peer = owner_and_follower(owner_side, follower_side)
    client = _FailureRecorder()
    peer.add(client)
    owner.failed(error)
    clock.advance(POLL_SECONDS)
    [got] = client.errors
    peer.remove(client)
    owner_side.close()
    follower_side.close()
    return got


@pytest.mark.parametrize(
    "error",
    [
        DigestValidationError("0" * 64, "1" * 64, url="http://h/a.bin", algorithm="sha256"),
        SizeValidationError(9, 10, url="http://h/a.bin"),
        http_error("http://h/a.bin", 500, "Oops"),
        http_error("http://h/a.bin", 503, "Busy", retry_after=7.0),
        ConnectionFailed("http://h/a.bin", "connection refused"),
    ],
    ids=lambda e: type(e).__name__ + str(getattr(e, "status", "")),
)
def test_a_follower_answers_an_owners_failure_as_the_owner_does(tmp_path, error):
    """What the owner's clients are told (the error's summary, its HTTP status, a Retry-After
    that makes a 503) is what a follower's clients are told (before: 502 "download failed"
    for all but a 404 or a timeout, so a client's answer depended on the process it
    reached)."""
    got = owners_failure_as_followed(tmp_path, error)
    assert got.summary == error.summary
    assert getattr(got, "status", None) == getattr(error, "status", None)
    assert busy_seconds(got) == busy_seconds(error)


def test_a_follower_answers_an_owners_local_fault_as_one(tmp_path):
    """The owner's disk full (its storage is the follower's too) reaches a follower as that
    local fault, so its clients get 503 ``storage full`` as the owner's do (before: a 502
    ``download failed``, as if the upstream had failed)."""
    got = owners_failure_as_followed(tmp_path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    assert local_fault(got) == LocalFault("storage full", errno.ENOSPC)


def test_a_follower_that_leaves_before_its_owner_is_done_leaves_no_board(tmp_path):
    """A follower makes the board its owner will write to if it sees a reader; its client
    leaves before the owner wrote anything: the empty board goes with it (before: it stayed
    in ``tmp/claims/`` once everything settled, since the owner, which saw no reader at the
    end, never opened it, and the follower's sweep skipped it while the owner lived). A board
    another follower still reads, or one the owner wrote to, stays."""
    storage = ArtifactStorage(tmp_path / "var")
    clock = Clock()
    owner_side, first_side, second_side = (Claims(storage, clock) for _ in range(3))
    first_side._notify = second_side._notify = False
    owner = owner_side.claim_or_follow(entry(), lambda _: None)
    first = first_side.claim_or_follow(entry(), lambda _: None)
    second = second_side.claim_or_follow(entry(), lambda _: None)
    assert isinstance(owner, Claim) and isinstance(first, PeerDownload)
    assert isinstance(second, PeerDownload)
    clients = [_Client(), _Client()]
    first.add(clients[0])
    second.add(clients[1])
    first.remove(clients[0])  # its client left: the second still reads the board
    assert boards(owner_side) == [entry().sha256]
    second.remove(clients[1])  # the last reader left
    assert boards(owner_side) == []
    owner.stored_later([], 200)  # validated: no reader, so no notice
    owner.release()
    assert boards(owner_side) == []
    for side in (owner_side, first_side, second_side):
        side.close()


def test_the_sweep_removes_the_empty_board_of_a_killed_follower(tmp_path):
    """A follower killed (its descriptors closed by the kernel, no sweep of its own) while
    its owner lives: the sweep after a helper died removes the empty board it made (before:
    it was skipped while its owner lived, and the owner, which saw no reader, never removed
    it). A board the owner wrote to stays: the owner removes it when done."""
    storage = ArtifactStorage(tmp_path / "var")
    clock = Clock()
    owner_side, follower_side = unnotified_sides(storage, clock)
    owner, peer = owner_and_follower(owner_side, follower_side)
    for fd in (peer._board_fd, peer._locks_fd):  # killed: the kernel closes its files
        os.close(fd)
    peer._board_fd = peer._locks_fd = None
    assert owner_side.sweep() == 1 and boards(owner_side) == []
    owner.release()
    second = owner_side.claim_or_follow(_entry_of("ab" * 32), lambda _: None)
    assert isinstance(second, Claim)
    temp = os.path.join(storage.temp_dir, ".download-e")
    open(temp, "wb").close()
    second.announce(temp)
    second.headers([], 200)  # its notices: the board is not empty
    assert owner_side.sweep() == 0 and boards(owner_side) == ["ab" * 32]
    second.release()
    assert boards(owner_side) == []
    owner_side.close()
    follower_side.close()


def test_a_request_after_validation_is_a_hit_and_leaves_no_board(tmp_path):
    """The owner of a validated body held in memory shares its lock: a request of another
    process arriving before the commit knows it is validated (a hit) though no notice was
    written, serves the stored artifact as a hit would once the lock is free, and the board
    it made for the owner is removed."""
    storage = ArtifactStorage(tmp_path / "var")
    clock = Clock()
    owner_side, follower_side = unnotified_sides(storage, clock)
    owner = owner_side.claim_or_follow(entry(), lambda _: None)
    assert isinstance(owner, Claim)
    owner.stored_later([(b"cache-control", [b"max-age=1"])], 200)
    assert boards(owner_side) == []  # no reader: nothing written
    peer = follower_side.claim_or_follow(entry(), lambda _: None)
    assert isinstance(peer, PeerDownload) and peer.validated and not peer.finished
    source = tmp_path / "incoming"
    source.write_bytes(DATA)
    storage.import_file(str(source))
    owner.release()
    clock.advance(POLL_SECONDS)
    assert peer.succeeded and peer.read(0, len(DATA)) == DATA
    assert list(dict(peer.headers)) == [b"last-modified"] and peer.upstream_status is None
    client = _Client()
    peer.add(client)
    peer.remove(client)
    assert boards(follower_side) == []
    owner_side.close()
    follower_side.close()


def test_a_sweep_leaves_live_claims_and_removes_dead_ones(tmp_path):
    """At start (and when a helper died) the sweep removes what dead owners left: their
    notices and temp files, empty boards nobody reads, the ``.readers`` files of the earlier
    protocol, something planted; never a live owner's board, a reader's, or the locks file."""
    import hashlib

    storage = ArtifactStorage(tmp_path / "var")
    claims, other = Claims(storage, Clock()), Claims(storage, Clock())
    shas = [hashlib.sha256(bytes([n])).hexdigest() for n in range(4)]
    live = claims.claim_or_follow(_entry_of(shas[0]), lambda _: None)
    live.headers([], 200)  # a live owner's board
    read = claims.claim_or_follow(_entry_of(shas[1]), lambda _: None)
    reader = other.claim_or_follow(_entry_of(shas[1]), lambda _: None)  # a reader's board
    assert isinstance(reader, PeerDownload) and os.path.exists(read.path)
    temp = os.path.join(storage.temp_dir, ".download-dead")
    open(temp, "wb").close()
    dead = claims.claim_or_follow(_entry_of(shas[2]), lambda _: None)
    dead.announce(temp)
    dead.headers([], 200)
    os.close(dead._fd)  # killed
    dead._fd = None
    open(os.path.join(claims.folder, shas[3]), "wb").close()  # an empty board nobody reads
    open(os.path.join(claims.folder, shas[3] + ".readers"), "wb").close()
    assert other.sweep() == 3
    assert sorted(boards(claims)) == sorted([shas[0], shas[1]]) and not os.path.exists(temp)
    assert held(claims, shas[0]) and held(claims, shas[1])
    for claim in (live, read):
        claim.release()
    reader.cancel()
    assert boards(claims) == []
    claims.close()
    other.close()


def _entry_of(sha256: str) -> CatalogEntry:
    return CatalogEntry("r/x.bin", "r", "http://127.0.0.1:1/x.bin", 1, {"sha256": sha256})


def test_a_folder_at_the_locks_files_path_costs_the_sharing_not_the_requests(tmp_path):
    """A folder planted at ``tmp/claims/downloads.lock`` (it cannot be opened as the locks
    file): a request is not failed for it but downloads on its own, with one error line
    for as long as it lasts; once the folder is gone, claims work again."""
    from twisted.logger import globalLogPublisher

    from streamer.claims import NO_CLAIM

    storage = ArtifactStorage(tmp_path / "var")
    claims = Claims(storage, Clock())
    os.mkdir(os.path.join(claims.folder, LOCKS_FILE))
    lines: list[str] = []

    def observer(event):
        if event.get("log_namespace") == claims_module.log.namespace:
            lines.append(event["log_format"])

    globalLogPublisher.addObserver(observer)
    try:
        assert claims.claim_or_follow(entry(), lambda _: None) is NO_CLAIM
        assert claims.claim_or_follow(entry(), lambda _: None) is NO_CLAIM
    finally:
        globalLogPublisher.removeObserver(observer)
    assert len(lines) == 1 and "downloads are not shared" in lines[0]
    os.rmdir(os.path.join(claims.folder, LOCKS_FILE))
    claim = claims.claim_or_follow(entry(), lambda _: None)
    assert isinstance(claim, Claim) and held(claims, entry().sha256)
    claim.release()
    claims.close()
