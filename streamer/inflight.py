"""One shared upstream download of one artifact, teed to a temp file that its followers read.

An `InFlight` runs the remote's black-box downloader with itself as its tap (`downloaders.tap.tap`,
an `ITap`): it relies on nothing but the contract every downloader keeps (`downloaders.interfaces`:
bytes through ``handle_data``, then ``finalize``), so a plugin's own downloader streams as the
built-in ones do. Every chunk is appended to a temp file under the storage's temp folder and the
followers (`streamer.follower.Follower`, one per client) are woken to send what they can. Past
the body's first MiB the writes run on a thread beside the reactor (`downloaders.inorder`, as the
downloader's hashing does), so one stream uses two cores; at most its backlog (2 MiB) waits in
memory. Followers read through `read`, which answers from the chunks in memory (the latest, so
a caught-up client never re-reads, and those not written yet) and from the file otherwise
(`os.pread` on one read-only descriptor shared by all followers). Followers in other processes
(`streamer.claims.PeerDownload`) see only what the file holds, and the outcome is published and
the file committed only once every write is done.

A body to be stored of up to `MEMORY_BODY` bytes (the catalog's size) is held in memory
instead: nothing is readable until it was validated, then followers send it whole, and the
committing thread writes it to a temp file, flushes and renames it with its batch (no file is
opened on the reactor thread for it). Followers in other processes learn that it was validated
from the claim's lock (and its notice, if they came before) and read the stored artifact once
the owner lets go of its claim (`streamer.claims`).

Each follower holds back the last byte of its response until `succeeded` (the downloader
validated size and digests), so no client can receive a complete-looking body, whole or a
range, that turns out to be wrong: on a failure the followers that already sent bytes abort
their connections instead. A downloader that reports success without having passed the
artifact's bytes through ``handle_data`` (or bytes that are not the artifact's) fails the
download at once: followers that sent nothing fail over or answer 502, never wait.
"""

from __future__ import annotations

import collections
import hashlib
import os
from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.failure import Failure

from downloaders.base import BaseDownloader
from downloaders.errors import (
    DigestValidationError,
    DownloadError,
    NotModified,
    SizeValidationError,
)
from downloaders.headers import as_twisted_headers, header_value
from downloaders.inorder import INLINE_BYTES, InOrder
from downloaders.result import keep_date, parse_last_modified
from downloaders.tap import tap
from downloaders.tempfiles import create_temp_file, write_temp_file
from store.errors import PathTaken, local_fault
from store.storage import ARTIFACT_MODE
from streamer.claims import NO_CLAIM

__all__ = ["MEMORY_BODY", "InFlight", "LiveBackoff"]

_log = Logger()

#: ``commit(temp_path, sha256, size, then, write, settle)``: see `InFlight`.
Commit = Callable[..., object]
#: Bodies to be stored up to this many bytes are held in memory until validated (see the
#: module): for them a temp file and its read descriptor cost more than the download's HTTP
#: work, and a client gains nothing from getting their bytes a few microseconds earlier.
MEMORY_BODY = 64 * 1024


class LiveBackoff:
    """A downloader's backoff for a download clients are waiting for.

    Delays are capped at *cap* seconds, so failover stays prompt; but a server's
    ``Retry-After`` is never cut short: the answer is None (no retry), the download ends, and
    the streamer fails over to the next entry, waits for the origin or answers 503.
    """

    def __init__(self, backoff: Any, cap: float) -> None:
        self.backoff = backoff
        self.cap = cap

    def delay(self, attempt: int, retry_after: float | None = None) -> float | None:
        delay = self.backoff.delay(attempt, retry_after)
        if retry_after is not None and retry_after > 0:
            return None
        return None if delay is None else min(self.cap, delay)


class InFlight:
    """The download of the artifact *entry* describes, through *remote*'s downloader.

    :param store: commit the validated file to *storage* and mark it stored in *catalog*
        (``on_demand``); otherwise the temp file is deleted at the end (``streamed``), and
        the download is cancelled as soon as no follower is left.
    :param on_failure: called with ``(entry, error)`` when the download fails (not when it is
        cancelled): the streamer puts the entry on a cooldown and counts the failure.
    :param on_done: called once with this InFlight when it no longer takes new followers.
    :param retry_delay_cap: the longest backoff between two attempts (clients are waiting);
        applied, with no retry before a ``Retry-After`` (`LiveBackoff`), to a downloader that
        has a ``backoff`` (the built-in ones); None: as built.
    :param commit: ``commit(temp_path, sha256, size, then, write, settle)``, which calls
        ``settle(None)`` in the reactor thread once the file is in storage and marked stored
        in the catalog (``settle(error)`` if not), having called *then* (the claim's release)
        right after it entered storage, in the thread that committed it (the streamer's
        shared `store.batches.BatchCommitter`, so many small artifacts share one flush, one
        catalog call and one reactor call); for a body held in memory *temp_path* is None and
        *write()*, called in that thread first, makes the file and returns its path. By
        default one ``storage.commit`` in a thread, then *catalog*'s ``mark_stored``.
    :param condition: request headers making the download conditional (a client's
        ``If-Modified-Since``), added to a downloader that has ``request_headers`` (the
        built-in HTTP one); `conditional` says whether they were. An upstream 304 then ends
        the download with `NotModified`: nothing stored, no cooldown (not a failure).
    :param memory_body: a body to be stored of up to this many bytes is held in memory until
        validated (see the module; 0: never).
    :param on_response: called with this InFlight once an upstream response with a body
        was accepted (its headers checked), before any byte: a conditional download may then
        be shared (a client joining it can no longer get a 304 it did not ask for).
    :param forward: further request headers, added as a *condition* is (the ``Via`` of the
        client request that started the download, with ours appended: `downloaders.via`).
    """

    def __init__(
        self,
        entry: Any,
        remote: Any,
        storage: Any,
        catalog: Any,
        *,
        store: bool,
        on_failure: Callable[[Any, BaseException], None],
        on_done: Callable[[InFlight], None],
        retry_delay_cap: float | None = None,
        commit: Commit | None = None,
        condition: Mapping[str, str] | None = None,
        on_response: Callable[[InFlight], None] | None = None,
        claim: Any = NO_CLAIM,
        memory_body: int = MEMORY_BODY,
        forward: Mapping[str, str] | None = None,
    ) -> None:
        self.entry = entry
        #: This download's `streamer.claims.Claim` when other processes may follow it.
        self.claim = claim
        self.remote = remote
        self.storage = storage
        self.catalog = catalog
        self.store = store
        self.sha256: str = entry.sha256
        self.size: int = entry.size
        #: Forwarded upstream headers (set once they arrived), shared by late joiners.
        self.headers: Any = None
        #: The upstream's status for those headers, when the downloader tells it (an HTTP
        #: downloader's ``response.code``); for access logs only.
        self.upstream_status: int | None = None
        #: Bytes written to the temp file so far.
        self.written = 0
        self.succeeded = False
        self.error: BaseException | None = None
        self.followers: set[Any] = set()
        self.path: str | None = None
        self._on_failure = on_failure
        self._on_done = on_done
        self._retry_delay_cap = retry_delay_cap
        self._commit = commit or self._commit_in_thread
        self._condition = dict(condition or {})
        self._forward = forward
        self._on_response = on_response
        #: Whether the upstream request carries `condition` (set by `start`).
        self.conditional = False
        self._write_fd: int | None = None
        self._read_fd: int | None = None
        #: The chunks of a body held in memory (`MEMORY_BODY`), None otherwise or once over.
        #: Whether the body is held in memory until validated (not written to a temp file).
        self.in_memory = store and self.size <= memory_body
        self._body: list[bytes] | None = [] if self.in_memory else None
        #: That body, whole, once validated (what followers read).
        self._memory: bytes | None = None
        #: This process's temp folder (where a body held in memory will be written).
        self._temp_dir = ""
        #: ``(offset, chunk)`` of the latest chunk, and of every later one the spool has not
        #: written yet (followers read those from here: the file has not got them).
        self._chunks: collections.deque[tuple[int, bytes]] = collections.deque()
        #: Writes the chunks of a large body beside the reactor (made past its first MiB).
        self._spool: InOrder | None = None
        #: The offset of the first chunk given to the spool.
        self._spool_from = 0
        self._running: defer.Deferred[Any] | None = None
        #: Whether the commit is under way, and who waits for its end (`settled`).
        self._committing = False
        self._settling: list[defer.Deferred[None]] = []
        self._cancelled = False
        self._done_called = False
        self._downloader: Any = None
        #: sha256 of the bytes seen, for downloaders whose digests are not ours to trust.
        self._hasher: Any = None

    # -- life cycle -----------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        """True once the download succeeded, failed or was cancelled."""
        return self.succeeded or self.error is not None or self._cancelled

    def start(self, headers_filter: Callable[[Any], Any]) -> None:
        """Open the temp file and start the download. Failures arrive through the followers.

        *headers_filter* turns the upstream response headers into what followers forward.
        """
        self._headers_filter = headers_filter
        try:
            self.storage.check_room(self.size)  # never start what cannot be stored
            self._temp_dir = self.storage.temp_dir  # (made here, in the reactor thread)
            if self._body is None:
                # One os.open, already with the artifacts' mode (the commit needs no chmod).
                self._write_fd, self.path = create_temp_file(self._temp_dir, ARTIFACT_MODE)
                self._read_fd = os.open(self.path, os.O_RDONLY)
                self.claim.announce(self.path)
            # Only the entry: a plugin's get_downloader may take nothing else.
            downloader = self.remote.get_downloader(entry=self.entry)
            tap(downloader, self)
            self._downloader = downloader
            if not isinstance(downloader, BaseDownloader):
                self._hasher = hashlib.sha256()
            self.conditional = _add_headers(downloader, self._condition)
            if self._forward:
                _add_headers(downloader, self._forward)
            backoff = getattr(downloader, "backoff", None)
            if self._retry_delay_cap is not None and callable(getattr(backoff, "delay", None)):
                downloader.backoff = LiveBackoff(backoff, self._retry_delay_cap)
            self._running = defer.maybeDeferred(downloader.run)
        except Exception as error:
            self._running = defer.fail(error)
        self._running.addCallbacks(self._downloaded, self._failed)

    def cancel(self) -> None:
        """Stop the download (nobody needs it any more): no cooldown, nothing stored."""
        if self.finished:
            return
        self._cancelled = True
        self._done()
        if self._running is not None:
            self._running.cancel()

    def settled(self) -> defer.Deferred[None]:
        """Fire once the download and its commit to storage (if any) are over."""
        if self._running is None:
            return defer.succeed(None)
        settled: defer.Deferred[None] = defer.Deferred()

        def fire(result: Any) -> Any:
            if self._committing:
                self._settling.append(settled)
            else:
                settled.callback(None)
            return result

        self._running.addBoth(fire)
        return settled

    # -- the downloader's tap ---------------------------------------------------------------

    def headers_ready(self, headers: Any) -> None:
        """Keep the headers to forward; refuse a Content-Length other than the catalog's
        size now, before any byte went to a client (so the request can still fail over)."""
        code = getattr(getattr(self._downloader, "response", None), "code", None)
        self.upstream_status = code if isinstance(code, int) else None
        length = (header_value(headers, "content-length") or "").strip()
        if length.isdigit() and int(length) != self.size:
            raise SizeValidationError(int(length), self.size, url=self.entry.url)
        self.headers = self._headers_filter(as_twisted_headers(headers))
        if self._on_response is not None:
            self._on_response(self)

    def write(self, data: bytes) -> None:
        """Take one chunk: wake the followers, who read it from memory until it is on disk,
        and append it to the temp file (in its first MiB right after the followers sent what
        they could, so a cold response's first bytes wait for no write; past it on a thread
        beside the reactor); or keep it with the body held in memory."""
        received = self.written + len(data)
        if received > self.size:
            raise SizeValidationError(received, self.size, url=self.entry.url)
        if self._body is not None:  # nothing to tell anyone before it was validated
            data = bytes(data)
            if self._hasher is not None:
                self._hasher.update(data)
            self._body.append(data)
            self.written = received
            return
        if self._write_fd is None:
            raise OSError("the download was stopped")
        data = bytes(data)
        spool = self._spool
        if spool is None and received > INLINE_BYTES:
            spool = self._spool = InOrder(self._append)
            self._spool_from = self.written
        if spool is None:
            # The clients first (they read the chunk from memory), then the notice and the
            # file: a cold response's first bytes wait for neither.
            self._chunks.clear()
            self._chunks.append((self.written, data))
            self.written = received
            self._wake_or_cancel()
            if self.finished:  # (a client leaving cancelled a `streamed` download)
                return
            self.claim.headers(self.headers, self.upstream_status)
            self._append(data)
            return
        self.claim.headers(self.headers, self.upstream_status)  # (a first chunk over 1 MiB)
        spool.put(data)  # raises what a write on the thread raised (a full disk)
        self._forget_flushed(self._spool_from + spool.done)
        self._chunks.append((self.written, data))
        self.written = received
        self._wake_or_cancel()

    def _wake_or_cancel(self) -> None:
        """Wake the followers; a `streamed` download with none here is cancelled unless a
        follower in another process reads it."""
        if not self.followers and not self.store:  # only readers in other processes left
            self._cancel_unless_read()
            return
        self._wake()

    def _append(self, data: bytes) -> None:
        """Hash (for a downloader that is not ours) and write one chunk to the temp file;
        in order, on the reactor thread or on the spool's."""
        if self._hasher is not None:
            self._hasher.update(data)
        fd = self._write_fd
        assert fd is not None  # closed only once the spool stopped
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]

    def _forget_flushed(self, flushed: int) -> None:
        """Drop the chunks kept in memory that are on disk now, except the latest (which
        followers that keep up read without a ``pread``)."""
        chunks = self._chunks
        while chunks:
            start, chunk = chunks[0]
            if start + len(chunk) > flushed:
                return
            chunks.popleft()

    def finalized(self) -> None:
        """The downloader validated what it passed on; `_succeeded` checks it was all."""

    @property
    def restartable(self) -> bool:
        """Whether the downloader may try again (retry, mirror) after passing us headers or
        bytes: only a body held in memory, of which nobody got anything yet (`ITap`)."""
        return self._body is not None

    def restart(self) -> None:
        """Forget the headers and bytes of a failed attempt: the next one reports its own."""
        if self._body is not None:
            self._body.clear()
            self.written = 0
            if self._hasher is not None:
                self._hasher = hashlib.sha256()

    def _broken_contract(self) -> DownloadError | None:
        """Why a download that reported success cannot be served or stored, if it cannot: not
        every byte passed through ``handle_data``, or the bytes are not the artifact's."""
        url = self.entry.url
        if self.written != self.size:
            text = (
                f"the downloader finished after passing {self.written} of {self.size} bytes "
                "through handle_data()"
            )
            return DownloadError(url, text, text)  # no url or host: fit for the client too
        if self._hasher is not None:
            actual = self._hasher.hexdigest()
            if actual != self.sha256:
                return DigestValidationError(actual, self.sha256, url=url, algorithm="sha256")
            return None
        attributes = self._downloader.artifact_attributes
        if attributes.get("sha256") != self.sha256 or attributes.get("size") != self.size:
            text = "the downloader did not validate size and sha256"
            return DownloadError(url, text, text)
        return None

    # -- what followers use -------------------------------------------------------------------

    def readable(self) -> int:
        """How many bytes followers may read: what was written (never more than the size);
        of a body held in memory, nothing before it was validated."""
        if self.succeeded:
            return self.size
        if self._body is not None:
            return 0
        return min(self.written, self.size)

    def read(self, offset: int, length: int) -> bytes:
        """Up to *length* bytes at *offset* (below `readable`): from a chunk kept in memory
        (the latest, and those the spool has not written yet) if one holds *offset*, else from
        the file."""
        memory = self._memory
        if memory is not None:
            return memory if offset == 0 and length >= len(memory) else memory[offset:][:length]
        for start, chunk in reversed(self._chunks):
            if offset >= start:
                if offset >= start + len(chunk):
                    break
                begin = offset - start
                if begin == 0 and length >= len(chunk):
                    return chunk
                return chunk[begin : begin + length]
        if self._read_fd is None:
            raise OSError("the temp file is closed")
        return os.pread(self._read_fd, length, offset)

    def add(self, follower: Any) -> None:
        self.followers.add(follower)

    def remove(self, follower: Any) -> None:
        """Forget a follower; cancel a `streamed` download nobody reads any more."""
        self.followers.discard(follower)
        if self.followers:
            return
        if not self.store:
            self._cancel_unless_read()
        self._close_read_if_unused()

    def _cancel_unless_read(self) -> None:
        """Cancel a `streamed` download that no client of this process reads, unless a
        follower in another process does: looked at when the last client left, then at each
        chunk while readers elsewhere keep it going (they leave without telling)."""
        if not self.finished and not self.claim.has_readers():
            self.cancel()

    # -- outcomes ----------------------------------------------------------------------------

    def _wake(self) -> None:
        for follower in list(self.followers):
            follower.progress()

    def _downloaded(self, result: Any) -> defer.Deferred[None] | None:
        """The downloader validated: once the spool wrote every chunk, conclude."""
        spool = self._spool
        if spool is None:
            return self._succeeded(result)
        from twisted.internet import reactor  # (the one running: installed by now)

        writing = spool.drained(reactor)
        return writing.addCallbacks(lambda _: self._succeeded(result), self._failed)

    def _succeeded(self, result: Any) -> defer.Deferred[None] | None:
        broken = self._broken_contract()
        self._downloader = None  # it holds us as its tap: no cycle left for the collector
        if broken is not None:
            self._failed(Failure(broken))
            return None
        self._close_write()
        self.succeeded = True
        body, self._body = self._body, None
        if body is not None:
            self._memory = body[0] if len(body) == 1 else b"".join(body)
            self.claim.stored_later(self.headers, self.upstream_status)
        else:
            self.claim.headers(self.headers, self.upstream_status)
            self.claim.succeeded()
        self._wake()  # caught-up followers take the last byte from memory, not the file
        self._chunks.clear()
        if not self.store:
            self._done()
            self._discard_temp()
            self.claim.release()
            return None
        # The claim is let go in the committing thread, right after the rename: its last
        # close frees a file that reached the disk, which waits for the journal.
        self._committing = True
        if self._memory is not None:
            write = _writer(self._temp_dir, self._memory, self._upstream_date(result))
            self._commit(None, self.sha256, self.size, self.claim.release, write, self._stored)
        else:
            assert self.path is not None  # the temp file, made when the download started
            keep_date(self.path, self._upstream_date(result))
            self._commit(self.path, self.sha256, self.size, self.claim.release, None, self._stored)
        return None

    def _upstream_date(self, result: Any) -> float | None:
        """The date the clients were sent (the forwarded ``Last-Modified``, already no later
        than the moment it arrived), else the result's: the stored copy answers with it."""
        values = dict(self.headers or []).get(b"last-modified")
        if values:
            return parse_last_modified(values[0])
        return getattr(result, "last_modified", None)

    def _commit_in_thread(
        self,
        path: str | None,
        sha256: str,
        size: int,
        then: Callable[[], object],
        write: Callable[[], str] | None,
        settle: Callable[[Any], object],
    ) -> None:
        def commit() -> None:
            temp = path if write is None else write()
            assert temp is not None
            self.storage.commit(temp, sha256, size)
            then()

        marked = threads.deferToThread(commit)
        marked.addCallback(lambda _: self.catalog.mark_stored(sha256))
        marked.addBoth(lambda result: settle(result if isinstance(result, Failure) else None))

    def _stored(self, error: BaseException | Failure | None) -> None:
        """The commit's end: stored (*error* None) or not; then nobody waits for it (even if
        telling raised: the committer logs that, `settled` must fire still)."""
        self._committing = False
        try:
            if error is None:
                if self.path is not None:
                    # The read descriptor follows the renamed inode: followers keep reading it.
                    self.path = self.storage.path_for(self.sha256)
            else:
                self._not_stored(error if isinstance(error, Failure) else Failure(error))
        finally:
            try:
                self._settle()
            finally:
                waiting, self._settling = self._settling, []
                for settled in waiting:
                    settled.callback(None)

    def _failed(self, failure: Failure) -> None:
        self._downloader = None
        self._close_write()
        self._body = None
        self._chunks.clear()
        self._discard_temp()
        error = failure.value
        assert error is not None  # a Failure always holds its exception
        if isinstance(error, NotModified) and not self.conditional:
            # A 304 nobody asked for is no answer: the source failed, and no client may
            # receive it as one.
            error = DownloadError(self.entry.url, "HTTP 304 to an unconditional request")
        self.claim.failed(None if self._cancelled else error)
        if not self._cancelled:
            self.error = error
            if not isinstance(error, NotModified):  # else: the client's copy is current
                self._on_failure(self.entry, error)
        self._done()
        for follower in list(self.followers):
            follower.failed(error)
        return None

    def _settle(self) -> None:
        """Stored or not: take no more followers, and let go of the claim (if the committing
        thread did not already)."""
        self._done()
        self.claim.release()

    def _not_stored(self, failure: Failure) -> None:
        """The commit failed (its clients were answered): this host's fault (a full disk, a
        read-only storage, no descriptor) is one line with the errno, a folder at the
        artifact's path (`PathTaken`) one line saying so, anything else a failure with its
        traceback. The claim is let go either way: the next request, here
        or in another process, downloads it again."""
        fault = local_fault(failure.value)
        if fault is not None:
            _log.error("not stored {sha256}: {fault}", sha256=self.sha256, fault=fault.detail)
        elif failure.check(PathTaken):  # (a folder there, e.g.: left for streamer verify)
            _log.error("not stored {sha256}: {fault}", sha256=self.sha256, fault=failure.value)
        else:
            _log.failure("storing the artifact failed ({sha256})", failure, sha256=self.sha256)

    # -- clean-up ---------------------------------------------------------------------------

    def _done(self) -> None:
        """Take no more followers; the read descriptor closes once the last one left."""
        if not self._done_called:
            self._done_called = True
            self._on_done(self)
        self._close_read_if_unused()

    def _close_write(self) -> None:
        if self._spool is not None:
            self._spool.close()  # after the write under way, if any: then nothing writes
        fd, self._write_fd = self._write_fd, None
        if fd is not None:
            os.close(fd)

    def _close_read(self) -> None:
        fd, self._read_fd = self._read_fd, None
        if fd is not None:
            os.close(fd)

    def _close_read_if_unused(self) -> None:
        if self._done_called and not self.followers:
            self._close_read()

    def _discard_temp(self) -> None:
        if self.path is not None:
            self.storage.discard(self.path)


def _writer(folder: str, body: bytes, mtime: float | None) -> Callable[[], str]:
    """What writes a body held in memory to a new temp file in *folder* (dated *mtime*), in the
    committing thread, returning its path."""
    return lambda: write_temp_file(folder, body, ARTIFACT_MODE, mtime)


def _add_headers(downloader: Any, condition: Mapping[str, str]) -> bool:
    """Add *condition* (headers) to *downloader*'s request headers, in place of those of the
    same names; False if it has none to add to (a plugin's downloader: its request goes out
    as built, unconditional)."""
    headers = getattr(downloader, "request_headers", None)
    if not condition or not isinstance(headers, dict):
        return False
    for name in list(headers):
        if name.lower() in {n.lower() for n in condition}:
            del headers[name]
    headers.update(condition)
    return True
