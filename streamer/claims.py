"""One download per artifact across the server processes of one storage folder.

Within a process, `streamer.lazy.LazyStreamer` coalesces requests by sha256 in memory. Across
processes (``[server] processes``) the owner of an artifact's download is whoever holds an
exclusive ``flock`` on ``tmp/claims/<sha256>``; the kernel drops the lock when the owner ends,
however it ends. The claim file is also the owner's notice board, written as JSON lines
appended in this order:

1. ``{"pid": ..., "temp": "proc-.../NAME", "headers": [[name, [values]], ...], "status": N}``
   before the first byte is written to its temp file (under ``tmp/``, in the owner's own
   folder: `store.tempdirs`), with the forwarded headers and the upstream's status: a
   follower needs both before it can send anything;
2. ``{"outcome": "done"}`` once size and digests were validated (then, for ``on_demand``,
   the file is committed), or ``{"outcome": "failed", "error": {...}}``;

a small body the owner holds in memory until it was validated (`streamer.inflight.MEMORY_BODY`)
has no temp file: one notice says it all, ``{"headers": ..., "status": N, "outcome": "done",
"body": "stored"}``, and the bytes are in storage once the owner let go of the claim (it does
right after the commit's rename). A follower then reads the stored artifact; not finding it
(the commit failed, the owner died first), it starts the download again (`OwnerGone`);

and the owner unlinks the claim file before it lets go of the lock, so a later request never
finds a finished claim. Another process wanting the artifact meanwhile cannot take the lock
and becomes a follower: a `PeerDownload` (the same source interface as
`streamer.inflight.InFlight`) reads the owner's temp file as it grows, withholds the last
byte until the outcome says ``done``, and aborts its clients on ``failed``. It is woken by
inotify (the owner's writes to the temp file, its appends to the claim file, and the close of
its descriptors, which the kernel also does for a killed owner), with a slow timer as a
safety net. A follower that finds the lock free and no outcome knows the owner died: its
clients that got nothing yet start the download again (`OwnerGone`), the others are aborted.

A follower holds a shared ``flock`` on ``tmp/claims/<sha256>.readers``; the owner of a
``streamed`` download whose own clients all left cancels it only if it can lock that file
exclusively (no reader elsewhere).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.filepath import FilePath

from downloaders.errors import DownloadError, DownloadTimeout, NotFound
from store.errors import StorageError
from store.tempdirs import remove_quietly

__all__ = ["CLAIMS_FOLDER", "NO_CLAIM", "Claim", "Claims", "OwnerGone", "PeerDownload"]

log = Logger()

#: The folder of the claims under the storage's ``tmp/`` (not a process's folder: shared).
CLAIMS_FOLDER = "claims"
#: Seconds between two checks of a followed download when no event arrived (the safety net
#: for a filesystem without inotify events from other writers, such as NFS). The poll adapts:
#: it starts at `POLL_MIN_SECONDS` (a quick upstream's first bytes are seen quickly), a check
#: that finds progress no event announced (another machine is writing) brings it back down
#: there, so the poll carries the stream; checks that find nothing new double it up to
#: `POLL_SECONDS`. Where inotify works, events find the progress first and the poll backs off
#: after a few checks.
POLL_SECONDS = 0.5
POLL_MIN_SECONDS = 0.02


class OwnerGone(DownloadError):
    """The process that owned the download stopped before it finished: start it again."""


def _error_record(error: BaseException) -> dict[str, Any]:
    """What a follower needs to answer as the owner would (404, 504 or 502)."""
    url = getattr(error, "url", "")
    message = getattr(error, "message", type(error).__name__)
    if isinstance(error, NotFound):
        return {"kind": "not_found", "url": url, "status": error.status}
    if isinstance(error, DownloadTimeout):
        return {"kind": "timeout", "url": url, "what": error.kind, "seconds": error.seconds}
    return {"kind": "other", "url": url, "message": message}


def _error_from(record: dict[str, Any]) -> DownloadError:
    url = str(record.get("url", ""))
    kind = record.get("kind")
    if kind == "not_found":
        return NotFound(url, int(record.get("status", 404)))
    if kind == "timeout":
        return DownloadTimeout(url, str(record.get("what", "read")), float(record["seconds"]))
    if kind == "gone":
        return OwnerGone(url, "the download's owner stopped")
    return DownloadError(url, str(record.get("message", "upstream failed")))


#: Opening a claim: one we make, or one that exists (never through a symbolic link, never
#: waiting on a FIFO: `_open_claim_file`).
_OPEN_CLAIM = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
_NEW_CLAIM = _OPEN_CLAIM | os.O_CREAT | os.O_EXCL
#: The notice of a validated download (a constant: no encoder needed).
_DONE = b'{"outcome":"done"}\n'
#: The outcome of a validated body held in memory: read it from storage once the claim is free.
_STORED_LATER = {"outcome": "done", "body": "stored"}


def _header_pairs(headers: list[tuple[bytes, list[bytes]]] | None) -> list[Any]:
    return [
        [name.decode("latin-1"), [v.decode("latin-1") for v in values]]
        for name, values in headers or []
    ]


def _try_lock(fd: int, kind: int) -> bool:
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


class Claim:
    """The owner's side: holds the lock and writes the notice board (see the module)."""

    def __init__(self, path: str, fd: int, root: str) -> None:
        self.path = path
        self.root = root
        self._fd: int | None = fd
        self._temp: str | None = None
        self._headers_written = False

    def announce(self, temp_path: str) -> None:
        """Name the temp file; it is published with the headers (`headers`), in one write."""
        self._temp = os.path.relpath(temp_path, self.root)

    def headers(
        self, headers: list[tuple[bytes, list[bytes]]] | None, status: int | None = None
    ) -> None:
        """Publish the temp file, the forwarded headers and the upstream's status (once,
        before the first byte is written)."""
        if self._headers_written:
            return
        self._headers_written = True
        record: dict[str, Any] = {"headers": _header_pairs(headers), "status": status}
        if self._temp is not None:
            record = {"pid": os.getpid(), "temp": self._temp, **record}
        self._append(record)

    def succeeded(self) -> None:
        self._write(_DONE)

    def stored_later(
        self, headers: list[tuple[bytes, list[bytes]]] | None, status: int | None = None
    ) -> None:
        """Publish a validated body held in memory, in one notice: the forwarded headers,
        the upstream's status and the outcome; its bytes are in storage once the claim is
        let go (`release`, right after the commit)."""
        self._headers_written = True
        self._append(
            {"headers": _header_pairs(headers), "status": status, **_STORED_LATER},
        )

    def failed(self, error: BaseException | None) -> None:
        """Publish a failure (None: cancelled, followers start again) and let go."""
        record = _error_record(error) if error is not None else {"kind": "gone"}
        self._append({"outcome": "failed", "error": record})
        self.release()

    def has_readers(self) -> bool:
        """Whether a follower in another process reads this download now."""
        try:
            fd = os.open(self.path + ".readers", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            return not _try_lock(fd, fcntl.LOCK_EX)
        finally:
            os.close(fd)

    def release(self) -> None:
        """Unlink the claim (a finished claim is never found) and drop the lock."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        for path in (self.path, self.path + ".readers"):
            remove_quietly(path)
        os.close(fd)

    def _append(self, record: dict[str, Any]) -> None:
        self._write((json.dumps(record, separators=(",", ":")) + "\n").encode())

    def _write(self, line: bytes) -> None:
        if self._fd is None:
            return
        try:
            os.write(self._fd, line)
        except OSError as exc:
            log.warn("cannot write the claim {path}: {exc}", path=self.path, exc=exc)


class _NoClaim:
    """The claim of a process that is alone on its storage: every call does nothing."""

    def announce(self, temp_path: str) -> None: ...
    def headers(self, headers: Any, status: int | None = None) -> None: ...
    def succeeded(self) -> None: ...
    def stored_later(self, headers: Any, status: int | None = None) -> None: ...
    def failed(self, error: BaseException | None) -> None: ...
    def release(self) -> None: ...

    def has_readers(self) -> bool:
        return False


NO_CLAIM: Any = _NoClaim()


class PeerDownload:
    """A follower's view of a download another process owns (the source interface of
    `streamer.inflight.InFlight`: ``readable``, ``read``, ``add``, ``remove``, ``headers``,
    ``succeeded``, ``error``, ``finished``)."""

    def __init__(
        self,
        claims: Claims,
        entry: Any,
        claim_fd: int | None,
        readers_fd: int | None,
        on_done: Callable[[PeerDownload], None],
    ) -> None:
        self.claims = claims
        self.entry = entry
        self.sha256: str = entry.sha256
        self.size: int = entry.size
        self.headers: Any = None
        #: The status the owner's upstream answered (for the access log).
        self.upstream_status: int | None = None
        self.written = 0
        self.succeeded = False
        self.error: BaseException | None = None
        self.followers: set[Any] = set()
        #: The owner's temp file (absolute), once it announced it.
        self.temp_path: str | None = None
        self._claim_fd: int | None = claim_fd
        self._readers_fd = readers_fd
        self._data_fd: int | None = None
        self._claim_read = 0
        self._partial = b""
        self._on_done = on_done
        self._timer: IDelayedCall | None = None
        self._poll_seconds = POLL_MIN_SECONDS
        self._closed = False
        #: The owner validated a body it held in memory: it is in storage once the owner
        #: let go of the claim.
        self._stored_later = False

    @property
    def finished(self) -> bool:
        return self.succeeded or self.error is not None

    @property
    def validated(self) -> bool:
        """Whether the owner validated the body: succeeded, or held in memory and said done
        (readable once its commit let go of the claim). A client joining now waits for no
        upstream byte: a hit, as one joining a validated download in its own process."""
        return self.succeeded or self._stored_later

    # -- the source interface -------------------------------------------------------------

    def readable(self) -> int:
        if self.succeeded:
            return self.size
        return max(0, min(self.written, self.size - 1))

    def read(self, offset: int, length: int) -> bytes:
        if self._data_fd is None:
            raise OSError("the followed file is closed")
        return os.pread(self._data_fd, length, offset)

    def add(self, follower: Any) -> None:
        self.followers.add(follower)

    def remove(self, follower: Any) -> None:
        self.followers.discard(follower)
        if not self.followers:
            self._close()

    def settled(self) -> Any:
        from twisted.internet import defer

        return defer.succeed(None)

    def cancel(self) -> None:
        """Stop following (at shutdown); the owner's download goes on."""
        self._close()

    # -- driven by Claims ---------------------------------------------------------------------

    def stored(self, data_fd: int, mtime: float) -> None:
        """Finished before it was followed: the committed artifact, open as *data_fd*."""
        from twisted.web.http import datetimeToString

        self._data_fd = data_fd
        self.headers = [(b"last-modified", [datetimeToString(mtime)])]
        self.written = self.size
        self.succeeded = True

    def start(self) -> None:
        self.check()
        if not self.finished:
            self._timer = self.claims.reactor.callLater(self._poll_seconds, self._poll)

    def check(self) -> None:
        """Catch up with the owner: notices, bytes written, outcome, or its death."""
        if self._closed or self.finished:
            return
        outcome = self._read_notices()
        self._open_data()
        if self._data_fd is not None:
            self.written = os.fstat(self._data_fd).st_size
        if outcome is not None and outcome.get("body") == "stored" and self.temp_path is None:
            self._stored_later = True  # (below: the owner may have let go already)
            outcome = None
        if outcome is not None:
            self._settle(outcome)
        elif self._claim_fd is not None and _try_lock(self._claim_fd, fcntl.LOCK_SH):
            fcntl.flock(self._claim_fd, fcntl.LOCK_UN)
            if self._stored_later:
                self._take_stored()
            else:  # the owner's lock is gone and it said nothing: it died (or was killed)
                self._fail(OwnerGone(self.entry.url, "the download's owner stopped"))
        else:
            self._wake()

    def _poll(self) -> None:
        self._timer = None
        before = (self._claim_read, self.written)
        self.check()
        if not self.finished and not self._closed:
            if (self._claim_read, self.written) != before:  # nobody told us: poll faster
                self._poll_seconds = POLL_MIN_SECONDS
            else:
                self._poll_seconds = min(POLL_SECONDS, self._poll_seconds * 2)
            self._timer = self.claims.reactor.callLater(self._poll_seconds, self._poll)

    def _read_notices(self) -> dict[str, Any] | None:
        assert self._claim_fd is not None
        outcome = None
        while True:
            data = os.pread(self._claim_fd, 65536, self._claim_read)
            if not data:
                break
            self._claim_read += len(data)
            *lines, self._partial = (self._partial + data).split(b"\n")
            for line in lines:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                temp = self.claims.temp_path(record.get("temp"))
                if temp is not None:
                    self.temp_path = temp
                    self.claims.watch_temp(temp, self)
                if "headers" in record:
                    status = record.get("status")
                    self.upstream_status = status if isinstance(status, int) else None
                    self.headers = [
                        (name.encode("latin-1"), [v.encode("latin-1") for v in values])
                        for name, values in record["headers"]
                    ]
                if "outcome" in record:
                    outcome = record
        return outcome

    def _open_data(self) -> None:
        if self._data_fd is not None or self.temp_path is None:
            return
        try:
            flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
            self._data_fd = os.open(self.temp_path, flags)
        except OSError:
            self._data_fd = self.claims.open_stored(self.sha256)  # committed meanwhile

    def _settle(self, outcome: dict[str, Any]) -> None:
        if outcome.get("outcome") == "done":
            if self._data_fd is None or os.fstat(self._data_fd).st_size != self.size:
                # The bytes are gone (a streamed download's file was dropped): start again.
                self._fail(OwnerGone(self.entry.url, "the followed file is gone"))
                return
            self.written = self.size
            self.succeeded = True
            self._finish()
            self._wake()
        else:
            self._fail(_error_from(outcome.get("error") or {}))

    def _take_stored(self) -> None:
        """The owner of a body it held in memory let go: serve the stored artifact, or start
        again if it is not there (its commit failed, or the owner died before it)."""
        fd = self.claims.open_stored(self.sha256)
        if fd is not None and os.fstat(fd).st_size == self.size:
            self._data_fd = fd
            self.written = self.size
            self.succeeded = True
            self._finish()
            self._wake()
            return
        if fd is not None:
            os.close(fd)
        self._fail(OwnerGone(self.entry.url, "the validated artifact was not stored"))

    def _fail(self, error: DownloadError) -> None:
        self.error = error
        self._finish()
        for follower in list(self.followers):
            follower.failed(error)
        if not self.followers:
            self._close()

    def _wake(self) -> None:
        for follower in list(self.followers):
            follower.progress()

    def _finish(self) -> None:
        """Take no new followers (they would start from the claim again)."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._on_done(self)
        self._release_claim()

    def _release_claim(self) -> None:
        self.claims.unwatch(self)
        for name in ("_claim_fd", "_readers_fd"):
            fd = getattr(self, name)
            setattr(self, name, None)
            if fd is not None:
                os.close(fd)
        if isinstance(self.error, OwnerGone):
            self.claims.sweep(self.sha256)  # the dead owner's claim, if nobody took it over
            # and its temp folder: on another node, no parent process notices it died.
            self.claims.storage.clean_stale_temp()

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self.finished:
            self._finish()
        fd, self._data_fd = self._data_fd, None
        if fd is not None:
            os.close(fd)


class Claims:
    """The claims of one storage folder's temp folder, for one process.

    :param storage: the `store.ArtifactStorage` (its ``temp_root`` and ``path_for``).
    """

    def __init__(self, storage: Any, reactor: Any) -> None:
        self.storage = storage
        self.reactor = reactor
        self.root: str = os.path.abspath(storage.temp_root)
        self.folder = os.path.join(self.root, CLAIMS_FOLDER)
        os.makedirs(self.folder, exist_ok=True)
        self._watched: dict[str, int] = {}
        self._by_temp: dict[str, set[PeerDownload]] = {}
        self._by_claim: dict[str, set[PeerDownload]] = {}
        #: The INotify reader (None until needed, False where inotify is unavailable).
        self._notify: Any = None

    def check_locks(self) -> None:
        """Raise ``OSError`` unless ``flock`` excludes other holders in the claims folder
        (some network filesystems accept the call and lock nothing)."""
        probe = os.path.join(self.folder, f".probe-{os.getpid()}-{os.urandom(4).hex()}")
        fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            other = os.open(probe, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _try_lock(other, fcntl.LOCK_SH):
                    raise OSError(errno.ENOLCK, "flock does not exclude another holder")
            finally:
                os.close(other)
        finally:
            os.close(fd)
            os.unlink(probe)

    def claim_or_follow(
        self, entry: Any, on_done: Callable[[PeerDownload], None]
    ) -> Claim | PeerDownload:
        """Take the download of *entry*'s artifact, or follow the process that has it."""
        path = os.path.join(self.folder, entry.sha256)
        while True:
            try:
                # Nearly always new: made by us, it is this path's file and holds no notices.
                fd, made = os.open(path, _NEW_CLAIM, 0o644), True
            except FileExistsError:
                try:
                    opened = _open_claim_file(path, _OPEN_CLAIM)
                except FileNotFoundError:  # its owner just let go: try again
                    continue
                if opened is None:  # something planted there, now removed: try again
                    continue
                fd, made = opened, False
            except FileNotFoundError:  # the folder was removed by a process that stopped
                os.makedirs(self.folder, exist_ok=True)
                continue
            if _try_lock(fd, fcntl.LOCK_EX):
                # (Only a lock holder unlinks a claim: one we made and locked is still ours.)
                if made or _same_file(fd, path):
                    if not made:
                        self._drop_leftovers(fd)
                    claim = Claim(path, fd, self.root)
                    stored = self._stored(entry, on_done)
                    if stored is None:
                        return claim
                    # Its owner (another process or node) committed it after the caller
                    # looked on disk and let go before we asked: serve the artifact.
                    claim.release()
                    return stored
                # Its owner finished (and unlinked it) meanwhile: its outcome tells.
                return self._follow(entry, fd, None, on_done)
            readers = _open_claim_file(path + ".readers", _OPEN_CLAIM | os.O_CREAT)
            if readers is None:
                os.close(fd)
                continue
            fcntl.flock(readers, fcntl.LOCK_SH)
            return self._follow(entry, fd, readers, on_done)

    def _follow(
        self, entry: Any, fd: int, readers: int | None, on_done: Callable[[PeerDownload], None]
    ) -> PeerDownload:
        peer = PeerDownload(self, entry, fd, readers, on_done)
        self._watch()
        self._by_claim.setdefault(entry.sha256, set()).add(peer)
        peer.start()
        return peer

    def _stored(self, entry: Any, on_done: Callable[[PeerDownload], None]) -> PeerDownload | None:
        """A finished `PeerDownload` of *entry*'s committed artifact, if it is on disk now."""
        try:  # nearly always missing: one stat says so, before the careful open
            os.stat(self.storage.path_for(entry.sha256))
        except OSError:
            return None
        data = self.open_stored(entry.sha256)
        if data is None:
            return None
        info = os.fstat(data)
        if info.st_size != entry.size:
            os.close(data)
            return None
        peer = PeerDownload(self, entry, None, None, on_done)
        peer.stored(data, info.st_mtime)
        return peer

    def open_stored(self, sha256: str) -> int | None:
        """A descriptor of the stored artifact, or None: only a regular file counts (never a
        FIFO, which would block the reactor, or a symbolic link: `ArtifactStorage.open`)."""
        try:
            with self.storage.open(sha256) as stored:
                return os.dup(stored.fileno())
        except (OSError, StorageError):
            return None

    def _drop_leftovers(self, fd: int) -> None:
        """Empty a claim whose owner died (we hold its lock), and remove that owner's temp
        file: nobody can be writing it any more."""
        notices = b""
        while chunk := os.pread(fd, 65536, len(notices)):
            notices += chunk
        if not notices:
            return
        for line in notices.split(b"\n"):
            try:
                temp = self.temp_path(json.loads(line).get("temp"))
            except (ValueError, AttributeError):
                continue
            remove_quietly(temp)
        os.ftruncate(fd, 0)

    def sweep(self, sha256: str | None = None) -> int:
        """Remove the claims nobody holds and their temp files (left by killed owners), all or
        those of *sha256*; return how many files. The first process calls it at start and when
        a helper died; the last follower of a dead owner for its artifact."""
        removed = 0
        try:
            names = os.listdir(self.folder) if sha256 is None else [sha256, sha256 + ".readers"]
        except FileNotFoundError:
            return 0
        for name in names:
            path = os.path.join(self.folder, name)
            try:
                fd = _open_claim_file(path, _OPEN_CLAIM)
            except OSError:
                continue
            if fd is None:
                removed += 1
                continue
            try:
                if _try_lock(fd, fcntl.LOCK_EX) and _same_file(fd, path):
                    self._drop_leftovers(fd)
                    os.unlink(path)
                    removed += 1
            except OSError:
                pass
            finally:
                os.close(fd)
        return removed

    # -- inotify ---------------------------------------------------------------------------

    def temp_path(self, announced: object) -> str | None:
        """The absolute path of an announced temp file, if it is one under ``tmp/``."""
        if not isinstance(announced, str) or not announced:
            return None
        path = os.path.normpath(os.path.join(self.root, announced))
        return path if path.startswith(self.root + os.sep) else None

    def watch_temp(self, path: str, peer: PeerDownload) -> None:
        peers = self._by_temp.setdefault(path, set())
        if not peers:
            self._add_watch(os.path.dirname(path))
        peers.add(peer)

    def unwatch(self, peer: PeerDownload) -> None:
        for table, key in ((self._by_temp, peer.temp_path), (self._by_claim, peer.sha256)):
            peers = table.get(key or "")
            if peers is not None:
                peers.discard(peer)
                if not peers:
                    del table[key or ""]
                    if table is self._by_temp:
                        self._drop_watch(os.path.dirname(key or ""))
        if not self._by_claim:
            self._drop_watch(self.folder)

    def _watch(self) -> None:
        if not self._by_claim:
            self._add_watch(self.folder)

    def _add_watch(self, folder: str) -> None:
        """Watch *folder* for writes and closes (counted: one watch per folder)."""
        count = self._watched.get(folder, 0)
        self._watched[folder] = count + 1
        if count or self._notify is False:
            return
        try:
            from twisted.internet import inotify

            if self._notify is None:
                self._notify = inotify.INotify(self.reactor)
                self._notify.startReading()
            mask = inotify.IN_MODIFY | inotify.IN_CLOSE_WRITE
            self._notify.watch(FilePath(folder), mask, callbacks=[self._event])
        except Exception as exc:  # no inotify here: the followers' timers do the work
            log.debug("no inotify for {folder}: {exc}", folder=folder, exc=exc)
            self._notify = False

    def _drop_watch(self, folder: str) -> None:
        count = self._watched.get(folder, 0)
        if count > 1:
            self._watched[folder] = count - 1
            return
        self._watched.pop(folder, None)
        if count and self._notify:
            try:
                self._notify.ignore(FilePath(folder))
            except (KeyError, OSError):
                pass

    def _event(self, _watch: Any, path: FilePath, _mask: int) -> None:
        full = os.fsdecode(path.path)  # INotify hands bytes paths; ours are str
        if os.path.dirname(full) == self.folder:
            peers = self._by_claim.get(os.path.basename(full))
        else:
            peers = self._by_temp.get(full)
        for peer in list(peers or ()):
            peer.check()

    def close(self) -> None:
        """Stop watching; remove the claims folder if it is empty (a later claim makes it)."""
        try:
            os.rmdir(self.folder)
        except OSError:
            pass
        for folder in list(self._watched):
            self._watched[folder] = 1
            self._drop_watch(folder)
        if self._notify:
            self._notify.loseConnection()
            self._notify = None


def _open_claim_file(path: str, flags: int) -> int | None:
    """Open *path*, a claim or its readers' file, with *flags* (``O_NOFOLLOW``,
    ``O_NONBLOCK``): a descriptor of a regular file, or None where something else was planted
    (a symbolic link, whose target must never be written; a FIFO), which is removed, since no
    process makes one there."""
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as error:
        if error.errno != errno.ELOOP:
            raise
        _remove_planted(path, "a symbolic link")
        return None
    mode = os.fstat(fd).st_mode
    if stat.S_ISREG(mode):
        return fd
    os.close(fd)
    _remove_planted(path, "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file")
    return None


def _remove_planted(path: str, what: str) -> None:
    """Remove *path* from the claims folder if it still is no regular file (a claim always
    is one: a claim made meanwhile in its place is left alone)."""
    try:
        if stat.S_ISREG(os.lstat(path).st_mode):
            return
        os.unlink(path)
    except FileNotFoundError:
        return
    log.warn("{path} is {what}, not a claim: removed", path=path, what=what)


def _same_file(fd: int, path: str) -> bool:
    """Whether *path* still names the file open as *fd* (not unlinked or replaced)."""
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False
