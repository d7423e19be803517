"""One download per artifact across the server processes and nodes of one storage folder.

Within a process, `streamer.lazy.LazyStreamer` coalesces requests by sha256 in memory. Across
processes (``[server] processes``) and nodes, the owner of an artifact's download is whoever
holds an exclusive ``fcntl`` lock (an open file description lock, ``F_OFD_SETLK``) on the
artifact's byte of ``tmp/claims/downloads.lock``: one shared, empty file, whose byte
``4 * (k + 1)``, *k* the sha256's first 60 bits, is the download's (`_slot`). The kernel (or
the NFS server) drops the lock when the owner's descriptor closes, however its process ends.
A claim is one ``open`` of that file and one ``fcntl``: no file is made per download. Another
process that cannot take the lock follows (`PeerDownload`, the same source interface as
`streamer.inflight.InFlight`) and holds a shared lock on the next byte (``slot + 1``): a
reader, which the owner sees (`Claim.has_readers`).

The owner tells its followers what they need on its notice board ``tmp/claims/<sha256>``, JSON
lines appended in this order, only where someone needs them:

1. a download streamed through a temp file (larger than `streamer.inflight.MEMORY_BODY`, or
   with bodies in memory off or over budget): ``{"pid": ..., "temp": "proc-.../NAME",
   "headers": [[name, [values]], ...], "status": N}`` before the first byte is written to its
   temp file (under ``tmp/``, in the owner's own folder: `store.tempdirs`), with the forwarded
   headers and the upstream's status: a follower needs all three before it can send anything;
   then ``{"outcome": "done"}`` once size and digests were validated (then, for
   ``on_demand``, the file is committed), or ``{"outcome": "failed", "error": {...}}``;
2. a small body held in memory until validated (`streamer.inflight.MEMORY_BODY`): no temp
   file and no notice at all unless a reader is there. Validated, the owner turns its lock
   into a shared one (a request joining now is a hit, as one joining a validated download in
   its own process) and, for its readers, writes ``{"headers": ..., "status": N, "outcome":
   "done", "body": "stored"}``; its bytes are in storage once the owner let go of the lock (it
   does right after the commit's rename). A failure is one ``{"outcome": "failed", ...}``
   line, for readers only.

A follower makes the notice board if it is not there yet (so the owner's later notices go to
the file it reads), reads the owner's temp file as it grows, withholds the last byte until the
outcome says ``done``, and aborts its clients on ``failed``. Once the lock is free: with a temp
file announced and no outcome, the owner died (`OwnerGone`: its clients that got nothing yet
start the download again, the others are aborted); without one, the stored artifact is
served, or, not there (the commit failed, the owner died, or failed as the follower came), its
clients start the download again. The owner removes its notice board before it lets go of the
lock, so a later request never finds a finished download's notices; a dead owner's are
removed by the next owner (with the temp file they name), by the sweep at start and when a
helper died, and by the last follower that saw it die.

A follower is woken by inotify on ``tmp/claims/`` (the owner's appends to the notice board, its
writes to the temp file, and the close of every owner's descriptor of the locks file, after
it let go: followers then test their byte again; a killed owner's lock goes just after its
descriptor's close, so that close brings the poll down to its quickest), with a slow poll as the
safety net (NFS). The owner of a ``streamed`` download whose own clients all left cancels it
only if no reader holds the byte after its own.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import stat
import struct
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.filepath import FilePath

from downloaders.errors import (
    DownloadError,
    DownloadTimeout,
    HttpError,
    NotFound,
    http_error,
)
from store.errors import StorageError, local_fault
from store.tempdirs import remove_quietly

__all__ = [
    "CLAIMS_FOLDER",
    "LOCKS_FILE",
    "NO_CLAIM",
    "Claim",
    "Claims",
    "OwnerGone",
    "PeerDownload",
]

log = Logger()

#: The folder of the claims under the storage's ``tmp/`` (not a process's folder: shared).
CLAIMS_FOLDER = "claims"
#: The file in it whose byte-range locks say who downloads what. Never removed: every process
#: of every node must lock the same file.
LOCKS_FILE = "downloads.lock"
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
    """What a follower needs to answer as the owner would (404, 504, 503 with a
    ``Retry-After``, or 502 saying what failed, as the owner's clients are told)."""
    url = getattr(error, "url", "")
    message = getattr(error, "message", type(error).__name__)
    fault = local_fault(error)
    if fault is not None:  # the owner's host (its storage is ours): 503, no source's fault
        return {"kind": "local", "url": url, "errno": fault.errno}
    if isinstance(error, NotFound):
        return {"kind": "not_found", "url": url, "status": error.status}
    if isinstance(error, DownloadTimeout):
        return {"kind": "timeout", "url": url, "what": error.kind, "seconds": error.seconds}
    record = {"kind": "other", "url": url, "message": message}
    if isinstance(error, DownloadError):
        record["summary"] = error.summary
    if isinstance(error, HttpError):
        record.update(kind="http", status=error.status, retry_after=error.retry_after)
    return record


def _error_from(record: dict[str, Any]) -> DownloadError:
    url = str(record.get("url", ""))
    kind = record.get("kind")
    if kind == "not_found":
        return NotFound(url, int(record.get("status", 404)))
    if kind == "timeout":
        return DownloadTimeout(url, str(record.get("what", "read")), float(record["seconds"]))
    if kind == "gone":
        return OwnerGone(url, "the download's owner stopped")
    if kind == "local":
        code = int(record.get("errno", 0))
        local = DownloadError(url, os.strerror(code))
        local.__cause__ = OSError(code, os.strerror(code))  # (what `local_fault` looks for)
        return local
    status, retry_after = record.get("status"), record.get("retry_after")
    if kind == "http" and isinstance(status, int):
        seconds = float(retry_after) if isinstance(retry_after, (int, float)) else None
        return http_error(url, status, retry_after=seconds)
    summary = record.get("summary")
    return DownloadError(
        url,
        str(record.get("message", "upstream failed")),
        summary if isinstance(summary, str) else None,
    )


#: Opening the locks file (never through a symbolic link, never waiting on a FIFO).
_OPEN_LOCKS = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
#: Opening a notice board to write it (`_open_claim_file`: a regular file or nothing).
_OPEN_BOARD = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
#: Opening one to read it (a follower's; its close wakes nobody).
_READ_BOARD = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
#: The notice of a validated download (a constant: no encoder needed).
_DONE = b'{"outcome":"done"}\n'
#: The outcome of a validated body held in memory: read it from storage once the lock is free.
_STORED_LATER = {"outcome": "done", "body": "stored"}
#: ``struct flock`` (Linux): type, whence, start, length, pid (0 for an OFD lock).
_FLOCK = struct.Struct("hhqqi4x")


def _slot(sha256: str) -> int:
    """The byte of the locks file whose exclusive lock owns *sha256*'s download (the next
    byte is its readers'; byte 0 is for nobody). Two artifacts share one only if their first
    60 bits are equal: then one waits for the other, and downloads when it finds nothing."""
    return 4 * (int(sha256[:15], 16) + 1)


def _set_lock(fd: int, kind: int, offset: int) -> bool:
    """Lock (or with ``F_UNLCK`` unlock) the byte at *offset* for the open file *fd*,
    without waiting: False if another open file holds a lock that conflicts."""
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(kind, os.SEEK_SET, offset, 1, 0))
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def _holder(fd: int, offset: int) -> int:
    """The kind of lock another open file holds on the byte at *offset*: ``F_WRLCK``,
    ``F_RDLCK``, or ``F_UNLCK`` (none)."""
    probe = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, offset, 1, 0)
    kind: int = _FLOCK.unpack(fcntl.fcntl(fd, fcntl.F_OFD_GETLK, probe))[0]
    return kind


def _header_pairs(headers: list[tuple[bytes, list[bytes]]] | None) -> list[Any]:
    return [
        [name.decode("latin-1"), [v.decode("latin-1") for v in values]]
        for name, values in headers or []
    ]


class Claim:
    """The owner's side: holds the lock and writes the notice board (see the module)."""

    def __init__(self, path: str, fd: int, root: str, slot: int) -> None:
        #: The notice board's path (the file exists only while someone needs it).
        self.path = path
        self.root = root
        #: The locks file, holding this download's byte.
        self._fd: int | None = fd
        self._slot = slot
        #: The notice board, once opened.
        self._board: int | None = None
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
        """A body held in memory was validated: turn the lock into a shared one (a request
        joining now is a hit) and tell readers, if any, in one notice, the forwarded
        headers, the upstream's status and the outcome; its bytes are in storage once the
        lock is let go (`release`, right after the commit)."""
        self._headers_written = True
        fd = self._fd
        if fd is None:
            return
        try:
            _set_lock(fd, fcntl.F_RDLCK, self._slot)
        except OSError as exc:  # (then a request joining now counts as coalesced: no harm)
            log.debug("cannot share the lock of {path}: {exc}", path=self.path, exc=exc)
        if self._board is not None or self.has_readers():
            self._append({"headers": _header_pairs(headers), "status": status, **_STORED_LATER})

    def failed(self, error: BaseException | None) -> None:
        """Publish a failure (None: cancelled, followers start again) and let go."""
        if self._board is not None or self.has_readers():
            record = _error_record(error) if error is not None else {"kind": "gone"}
            self._append({"outcome": "failed", "error": record})
        self.release()

    def has_readers(self) -> bool:
        """Whether a follower in another process (or node) reads this download now."""
        fd = self._fd
        if fd is None:
            return False
        try:
            return _holder(fd, self._slot + 1) != fcntl.F_UNLCK
        except OSError:
            return True  # (unknown: as if read, so a streamed download is not cut)

    def release(self) -> None:
        """Remove the notice board (a finished download's is never found), then let go of
        the lock, then close: that close wakes the followers, who find the lock free."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        board, self._board = self._board, None
        try:
            if board is not None:
                remove_quietly(self.path)
                os.close(board)
            _set_lock(fd, fcntl.F_UNLCK, self._slot)
        except OSError as exc:  # (the close below lets go all the same)
            log.warn("cannot let go of the claim {path}: {exc}", path=self.path, exc=exc)
        finally:
            os.close(fd)

    def _append(self, record: dict[str, Any]) -> None:
        self._write((json.dumps(record, separators=(",", ":")) + "\n").encode())

    def _write(self, line: bytes) -> None:
        if self._fd is None:
            return
        try:
            if self._board is None:
                self._board = _open_board(self.path)
            os.write(self._board, line)
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
        locks_fd: int | None,
        board_fd: int | None,
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
        #: The locks file (holding this download's readers' byte), None once finished.
        self._locks_fd: int | None = locks_fd
        self._slot = _slot(self.sha256)
        #: The notice board (None if it could not be made: then the lock alone tells).
        self._board_fd: int | None = board_fd
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
        #: Seconds the owner may stream without writing a byte (its remote's
        #: ``sock_read_timeout``, set by the streamer; 0: no limit), and when it last did.
        self.stall_limit = 0.0
        self._progress_at = claims.reactor.seconds()

    @property
    def finished(self) -> bool:
        return self.succeeded or self.error is not None

    @property
    def validated(self) -> bool:
        """Whether the owner validated the body: succeeded, or held in memory and said done
        (readable once its commit let go of the lock). A client joining now waits for no
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
        self._data_fd = data_fd
        self._set_stored_headers(mtime)
        self.written = self.size
        self.succeeded = True

    def _set_stored_headers(self, mtime: float) -> None:
        from twisted.web.http import datetimeToString

        self.headers = [(b"last-modified", [datetimeToString(mtime)])]

    def start(self) -> None:
        self.check()
        if not self.finished:
            self._timer = self.claims.reactor.callLater(self._poll_seconds, self._poll)

    def check(self) -> None:
        """Catch up with the owner: notices, bytes written, outcome, or its death."""
        if self._closed or self.finished or self._locks_fd is None:
            return
        seen = (self._claim_read, self.written)
        outcome = self._read_notices()
        self._open_data()
        if self._data_fd is not None:
            self.written = os.fstat(self._data_fd).st_size
        if outcome is not None and outcome.get("body") == "stored" and self.temp_path is None:
            self._stored_later = True  # (below: the owner may have let go already)
            outcome = None
        if outcome is not None:
            self._settle(outcome)
            return
        holder = _holder(self._locks_fd, self._slot)
        if holder == fcntl.F_UNLCK:
            if self.temp_path is None:  # a body held in memory (or one never seen): stored?
                self._take_stored()
            else:  # the owner's lock is gone and it said nothing: it died (or was killed)
                self._fail(OwnerGone(self.entry.url, "the download's owner stopped"))
            return
        if self.temp_path is not None and self._board_dropped():
            # The owner that announced the temp file died, and the next owner (holding the
            # lock now) removed its notices: the temp file will never be finished.
            self._fail(OwnerGone(self.entry.url, "the download's owner stopped"))
            return
        if holder == fcntl.F_RDLCK:
            self._stored_later = True  # validated and held in memory: only its commit is due
        if self._stalled(seen):
            return
        self._wake()

    def _stalled(self, seen: tuple[int, int]) -> bool:
        """Fail as the owner's read timeout would if, streaming, it wrote nothing (no byte, no
        notice) for longer than that timeout and a second: its upstream cannot wait so long,
        so the owner is stopped or frozen (``SIGSTOP``, a paused machine), and keeps its
        lock, so no death is ever seen. (Before its first byte nothing shows its progress:
        retries and a body held in memory are waited for as long as they take.)"""
        now = self.claims.reactor.seconds()
        if self._data_fd is None or (self._claim_read, self.written) != seen:
            self._progress_at = now  # (nothing streamed yet, or not seen: no verdict)
            return False
        if not self.stall_limit or now - self._progress_at <= self.stall_limit + 1:
            return False
        self._fail(DownloadTimeout(self.entry.url, "read", self.stall_limit))
        return True

    def locks_closed(self) -> None:
        """A descriptor of the locks file was closed (any download's, in any process): if
        this one's owner let go, catch up now. Else only the lock was tested (not the notices,
        nor the clients woken: every cold download elsewhere closes one), and the poll brought
        down to its quickest: a killed owner's lock goes just after the kernel tells of its
        descriptor's close."""
        if self._closed or self.finished or self._locks_fd is None:
            return
        if _holder(self._locks_fd, self._slot) == fcntl.F_UNLCK:
            self.check()
            return
        timer = self._timer
        if timer is None or not timer.active() or self._poll_seconds <= POLL_MIN_SECONDS:
            return
        timer.cancel()
        self._poll_seconds = POLL_MIN_SECONDS
        self._timer = self.claims.reactor.callLater(self._poll_seconds, self._poll)

    def _board_dropped(self) -> bool:
        board = self._board_fd
        return board is not None and os.fstat(board).st_nlink == 0

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
        board = self._board_fd
        if board is None:
            return None
        outcome = None
        while True:
            data = os.pread(board, 65536, self._claim_read)
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
        """The owner of a body it held in memory (or whose notices this follower never saw)
        let go: serve the stored artifact, or start again if it is not there (its commit
        failed, the owner died before it, or failed as this follower came)."""
        fd = self.claims.open_stored(self.sha256)
        if fd is not None:
            info = os.fstat(fd)
            if info.st_size == self.size:
                if self.headers is None:  # no notice read: as a hit answers
                    self._set_stored_headers(info.st_mtime)
                self._data_fd = fd
                self.written = self.size
                self.succeeded = True
                self._finish()
                self._wake()
                return
            os.close(fd)
        self._fail(OwnerGone(self.entry.url, "the download's owner stopped, nothing stored"))

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
        had_board = self._board_fd is not None
        for name in ("_board_fd", "_locks_fd"):  # (the last lets go of the readers' byte)
            fd = getattr(self, name)
            setattr(self, name, None)
            if fd is not None:
                os.close(fd)
        if had_board or isinstance(self.error, OwnerGone):
            # The board this follower made (an owner that saw no reader wrote nothing and
            # left it), or a dead owner's notices: removed unless someone owns or reads them.
            self.claims.sweep(self.sha256)
        if isinstance(self.error, OwnerGone):
            # And a dead owner's temp folder: on another node, no parent process notices.
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
        self._locks_path = os.path.join(self.folder, LOCKS_FILE)
        #: Why the locks file could not be opened, once logged (None: it can be).
        self._locks_problem: str | None = None
        os.makedirs(self.folder, exist_ok=True)
        self._watched: dict[str, int] = {}
        self._by_temp: dict[str, set[PeerDownload]] = {}
        self._by_claim: dict[str, set[PeerDownload]] = {}
        #: The INotify reader (None until needed, False where inotify is unavailable).
        self._notify: Any = None

    def check_locks(self) -> None:
        """Raise ``OSError`` unless ``fcntl`` locks exclude other holders in the claims folder
        (some network filesystems accept the call and lock nothing)."""
        probe = os.path.join(self.folder, f".probe-{os.getpid()}-{os.urandom(4).hex()}")
        fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            if not _set_lock(fd, fcntl.F_WRLCK, 0):
                raise OSError(errno.ENOLCK, "a lock nobody holds cannot be taken")
            other = os.open(probe, os.O_RDWR | os.O_CLOEXEC)
            try:
                if _set_lock(other, fcntl.F_RDLCK, 0):
                    raise OSError(errno.ENOLCK, "a fcntl lock does not exclude another holder")
            finally:
                os.close(other)
        finally:
            os.close(fd)
            os.unlink(probe)

    def claim_or_follow(self, entry: Any, on_done: Callable[[PeerDownload], None]) -> Any:
        """Take the download of *entry*'s artifact (a `Claim`), or follow the process that has
        it (a `PeerDownload`); `NO_CLAIM` where the locks file cannot be opened (a folder
        planted at its path, no descriptor left): the request is served all the same, by a
        download of its own, and the problem is logged."""
        sha256 = entry.sha256
        path = os.path.join(self.folder, sha256)
        slot = _slot(sha256)
        try:
            fd = self._open_locks()
        except OSError as exc:
            problem = f"{exc.strerror or exc}"
            if problem != self._locks_problem:
                self._locks_problem = problem
                log.error(
                    "cannot open {path} ({problem}): downloads are not shared with other "
                    "processes until it can be",
                    path=self._locks_path,
                    problem=problem,
                )
            return NO_CLAIM
        self._locks_problem = None
        try:
            owner = _set_lock(fd, fcntl.F_WRLCK, slot)
        except BaseException:
            os.close(fd)
            raise
        if owner:
            try:
                self._drop_leftovers(path)
            except OSError as exc:  # (best effort: the sweeps try again)
                log.warn("cannot clear the claim {path}: {exc}", path=path, exc=exc)
            claim = Claim(path, fd, self.root, slot)
            stored = self._stored(entry, on_done)
            if stored is None:
                return claim
            # Its owner (another process or node) committed it after the caller looked on
            # disk and let go before we asked: serve the artifact.
            claim.release()
            return stored
        # A reader first, then the notice board: an owner that sees the reader writes to the
        # board this follower reads (made here if it is not there yet).
        try:
            _set_lock(fd, fcntl.F_RDLCK, slot + 1)
            board = _open_claim_file(path, _READ_BOARD | os.O_CREAT)
            if board is None:  # something planted there, now removed
                board = _open_claim_file(path, _READ_BOARD | os.O_CREAT)
        except OSError as exc:  # (then the lock alone tells: stored, or start again)
            log.warn("cannot read the claim {path}: {exc}", path=path, exc=exc)
            board = None
        peer = PeerDownload(self, entry, fd, board, on_done)
        self._watch()
        self._by_claim.setdefault(sha256, set()).add(peer)
        peer.start()
        return peer

    def _open_locks(self) -> int:
        """A new descriptor of the locks file (made if missing; something planted at its
        path is removed first)."""
        path = self._locks_path
        for _ in range(3):
            try:
                return os.open(path, _OPEN_LOCKS)
            except FileNotFoundError:
                try:
                    return os.open(path, _OPEN_LOCKS | os.O_CREAT, 0o644)
                except FileNotFoundError:  # the claims folder itself was removed
                    os.makedirs(self.folder, exist_ok=True)
            except OSError as error:
                if error.errno != errno.ELOOP:
                    raise
                _remove_planted(path, "a symbolic link")
        return os.open(path, _OPEN_LOCKS | os.O_CREAT, 0o644)

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

    def _drop_leftovers(self, path: str, empty_too: bool = False) -> bool:
        """Remove the notices at *path* of an owner that died, with the temp file they name
        (we hold its lock: nobody can be writing them any more); True if a file was removed.
        An empty board is a follower's, made for the owner: it stays unless *empty_too*.
        Nearly always nothing is there: one failed open."""
        try:
            fd = _open_claim_file(path, _READ_BOARD)
        except FileNotFoundError:
            return False
        if fd is None:  # something planted there: removed
            return True
        try:
            notices = b""
            while chunk := os.pread(fd, 65536, len(notices)):
                notices += chunk
        finally:
            os.close(fd)
        if not notices and not empty_too:
            return False
        for line in notices.split(b"\n"):
            try:
                temp = self.temp_path(json.loads(line).get("temp"))
            except (ValueError, AttributeError):
                continue
            remove_quietly(temp)
        remove_quietly(path)
        return True

    def sweep(self, sha256: str | None = None) -> int:
        """Remove the notice boards nobody owns or reads and the temp files they name (left
        by killed owners), all or those of *sha256*; return how many files. The first process
        calls it at start and when a helper died; the last follower of a dead owner for its
        artifact."""
        removed = 0
        try:
            names = os.listdir(self.folder) if sha256 is None else [sha256]
        except FileNotFoundError:
            return 0
        names = [n for n in names if n != LOCKS_FILE and not n.startswith(".")]
        if sha256 is not None and not os.path.lexists(os.path.join(self.folder, sha256)):
            return 0
        if not names:  # (nothing to lock: no locks file made for nothing)
            return 0
        try:
            locks = self._open_locks()
        except OSError as exc:
            log.warn("cannot sweep {folder}: {exc}", folder=self.folder, exc=exc)
            return 0
        try:
            for name in names:
                path = os.path.join(self.folder, name)
                if name.endswith(".readers"):  # left by an earlier version of this protocol
                    remove_quietly(path)
                    removed += 1
                    continue
                try:
                    slot = _slot(name)
                except ValueError:
                    continue  # not ours
                try:
                    if not _set_lock(locks, fcntl.F_WRLCK, slot):  # its owner lives
                        # (an empty board whose follower left or died before it was done)
                        removed += self._drop_unread_board(locks, path, slot)
                        continue
                except OSError:
                    continue
                try:
                    # (A follower still reading it sweeps it itself once done.)
                    if _holder(locks, slot + 1) == fcntl.F_UNLCK:
                        removed += self._drop_leftovers(path, empty_too=True)
                except OSError:
                    pass
                finally:
                    _set_lock(locks, fcntl.F_UNLCK, slot)
        finally:
            os.close(locks)
        return removed

    def _drop_unread_board(self, locks: int, path: str, slot: int) -> int:
        """Remove the board at *path* of a live owner if it is empty and nobody reads it: a
        follower made it and left before the owner wrote to it; an owner that saw no reader
        never will (one that writes later makes it again, and removes it itself when done).
        1 if removed."""
        try:
            info = os.lstat(path)
            if not stat.S_ISREG(info.st_mode) or info.st_size:
                return 0
            if _holder(locks, slot + 1) != fcntl.F_UNLCK:
                return 0
        except OSError:
            return 0
        remove_quietly(path)
        return 1

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
        if full == self._locks_path:  # a descriptor closed: some owner may have let go
            for followed in list(self._by_claim.values()):
                for peer in list(followed):
                    peer.locks_closed()
            return
        if os.path.dirname(full) == self.folder:
            peers = self._by_claim.get(os.path.basename(full))
        else:
            peers = self._by_temp.get(full)
        for peer in list(peers or ()):
            peer.check()

    def close(self) -> None:
        """Stop watching; remove the claims folder if it is empty (a later claim makes it
        again). The locks file stays: another process or node may hold locks in it; a new
        file in its place would let two owners take one download."""
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
    """Open *path*, a notice board, with *flags* (``O_NOFOLLOW``,
    ``O_NONBLOCK``): a descriptor of a regular file, or None where something else was planted
    (a symbolic link, whose target must never be written; a FIFO; a folder), which is removed,
    since no process makes one there."""
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as error:
        if error.errno == errno.ELOOP:
            _remove_planted(path, "a symbolic link")
        elif error.errno == errno.EISDIR:  # (opened to write, or to be made)
            _remove_planted(path, "a folder")
        else:
            raise
        return None
    mode = os.fstat(fd).st_mode
    if stat.S_ISREG(mode):
        return fd
    os.close(fd)
    if stat.S_ISFIFO(mode):
        _remove_planted(path, "a FIFO")
    else:
        _remove_planted(path, "a folder" if stat.S_ISDIR(mode) else "not a regular file")
    return None


def _open_board(path: str) -> int:
    """The notice board at *path* to append to: the one a follower made, or a new one."""
    for _ in range(2):
        fd = _open_claim_file(path, _OPEN_BOARD | os.O_CREAT)
        if fd is not None:
            return fd
    raise OSError(errno.EEXIST, "something keeps being planted there", path)


def _remove_planted(path: str, what: str) -> None:
    """Remove *path* from the claims folder if it still is no regular file (a claim always
    is one: a claim made meanwhile in its place is left alone)."""
    try:
        mode = os.lstat(path).st_mode
        if stat.S_ISREG(mode):
            return
        if stat.S_ISDIR(mode):  # (never through a link inside it: rmtree works by descriptor)
            shutil.rmtree(path)
        else:
            os.unlink(path)
    except FileNotFoundError:
        return
    log.warn("{path} is {what}, not a claim: removed", path=path, what=what)
