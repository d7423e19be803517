"""Serve a stored artifact: headers, conditional requests, ranges, and a flow-controlled body.

The body is sent by `FileRangesProducer`, a pull producer: the transport asks for the next
chunk only once it has written the previous one, so a slow client never makes the process
buffer the file. The file is closed when the body is complete or the client goes away.
"""

from __future__ import annotations

import mimetypes
import os
from collections import deque
from collections.abc import Callable, Iterable
from typing import BinaryIO

from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.web.http import datetimeToString, stringToDatetime
from twisted.web.server import Request
from zope.interface import implementer

from streamer.ranges import (
    MultipartByteranges,
    UnsatisfiableRange,
    content_range,
    parse_range,
    unsatisfiable_content_range,
)

__all__ = [
    "CHUNK_SIZE",
    "FileRangesProducer",
    "Senders",
    "client_gone",
    "content_type_for",
    "etag_for",
    "evaluate_conditions",
    "if_range_allows",
    "respond_text",
    "serve_file",
    "widen_sends",
]

#: Bytes read from disk and handed to the transport at a time. Large chunks mean fewer reactor
#: turns (and syscalls) per byte: with `widen_sends`, one chunk is one ``send`` when the socket
#: takes it. A slow client holds at most one chunk in memory (the producer is pulled).
CHUNK_SIZE = 1024 * 1024
#: The first chunk of a body is this small, so the head and the first bytes leave after one
#: short read and send (a 1 MiB first chunk delays the first byte by its read, copy and send:
#: measured 3 ms on a warm 1 MiB file); each next one is twice the last, up to `CHUNK_SIZE`
#: and to the body's share of `SEND_BUDGET`.
FIRST_CHUNK = 64 * 1024
#: Bodies up to this size are sent in one write instead of through a producer.
SMALL_BODY = 64 * 1024
#: The bytes all the bodies this process is sending read at a time, together: a slow client
#: holds the chunk its transport has not sent yet, and 1,000 of them holding 1 MiB each would
#: be 1 GiB. 16 MiB is 16 clients at a full chunk; each gets at least `FIRST_CHUNK`.
SEND_BUDGET = 16 * 1024 * 1024


class Senders:
    """How many bodies this process is sending now (stored files and followers of a
    download), and each one's share of `SEND_BUDGET` per read.

    Followers that know their kernel's room (`streamer.sendroom`) share the budget another
    way: what they read and their transports did not hand to the kernel yet (*in transit*:
    the kernel had room for it, so it leaves in the next reactor turn) stays within it, and
    one that finds it spent waits (`wait`) until bytes in transit leave (`release`)."""

    count = 0
    in_transit = 0
    _waiting: deque[Callable[[], None]] = deque()

    @classmethod
    def share(cls) -> int:
        return max(FIRST_CHUNK, SEND_BUDGET // max(1, cls.count))

    @classmethod
    def unspent(cls) -> int:
        """What is left of `SEND_BUDGET` once the bytes in transit are counted."""
        return SEND_BUDGET - cls.in_transit

    @classmethod
    def take(cls, size: int) -> None:
        """*size* bytes go in transit."""
        cls.in_transit += size

    @classmethod
    def wait(cls, resume: Callable[[], None]) -> None:
        """Call *resume* once bytes in transit left."""
        cls._waiting.append(resume)

    @classmethod
    def release(cls, size: int) -> None:
        """*size* bytes in transit left (or will never go): wake those waiting, in turn,
        while some budget is unspent."""
        cls.in_transit -= size
        while cls._waiting and cls.unspent() > 0:
            cls._waiting.popleft()()


_log = Logger()

#: Types of compressed files: mimetypes reports these as an "encoding" of the inner type,
#: but we serve the stored bytes as they are, so the type is the compressed format itself.
_ENCODING_TYPES = {
    "gzip": "application/gzip",
    "bzip2": "application/x-bzip2",
    "xz": "application/x-xz",
    "compress": "application/x-compress",
    "br": "application/x-brotli",
}


def content_type_for(served_path: str) -> bytes:
    """The ``Content-Type`` for a served path, by its extension (octet-stream if unknown)."""
    # mimetypes reads at most the last two suffixes of a name (".tar.gz": a type and an
    # encoding; ".tgz" stands for both; leading dots start no suffix): the answer for each
    # pair is worked out once.
    suffixes = served_path.rpartition("/")[2].lstrip(".").split(".")[1:]
    key = ".".join(suffixes[-2:])
    found = _TYPES_BY_SUFFIX.get(key)
    if found is None:
        kind, encoding = mimetypes.guess_type("x." + key if key else "x", strict=False)
        if encoding is not None:
            kind = _ENCODING_TYPES.get(encoding, "application/octet-stream")
        found = (kind or "application/octet-stream").encode("ascii")
        if len(_TYPES_BY_SUFFIX) < _TYPES_CACHED:
            _TYPES_BY_SUFFIX[key] = found
    return found


#: `content_type_for`'s answers by a name's last two suffixes (at most this many remembered).
_TYPES_BY_SUFFIX: dict[str, bytes] = {}
_TYPES_CACHED = 1024


def etag_for(sha256: str) -> bytes:
    """The strong ``ETag`` of an artifact, stored or lazy: its quoted sha256. The same bytes
    always have the same tag, whoever served them, so a client can revalidate a cold answer
    against the stored copy (and the other way round)."""
    return b'"' + sha256.encode("ascii") + b'"'


def widen_sends(request: Request, limit: int = CHUNK_SIZE) -> None:
    """Let the client's TCP transport hand up to *limit* bytes to the kernel per ``send``.

    Twisted's TCP transports send at most ``SEND_LIMIT`` (128 KiB) per reactor turn; a body
    of large chunks then costs several turns per chunk. Raising it for this one connection
    halves the CPU of a fast download (measured in bench/stream_bench.py); what is buffered
    stays bounded by the producer, not by this limit. Transports without the attribute
    (TLS wrappers, test doubles) are left alone.
    """
    transport = getattr(getattr(request, "channel", None), "transport", None)
    current = getattr(transport, "SEND_LIMIT", None)
    if isinstance(current, int) and current < limit:
        transport.SEND_LIMIT = limit  # type: ignore[union-attr]


def client_gone(request: Request) -> bool:
    """True when nothing more can be sent: the response is finished or the client left."""
    return bool(request.finished) or request.channel is None


def respond_text(
    request: Request,
    status: int,
    text: str,
    headers: dict[bytes, bytes] | None = None,
    reason: bytes | None = None,
) -> None:
    """Finish *request* with *status* (and *reason*, for a status Twisted has no phrase
    for) and a short ``text/plain`` body (if it is still open)."""
    if client_gone(request):
        return
    body = (text.rstrip("\n") + "\n").encode("utf-8")
    request.setResponseCode(status, reason)
    for name, value in (headers or {}).items():
        request.setHeader(name, value)
    request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
    request.setHeader(b"Content-Length", b"%d" % len(body))
    request.setHeader(b"X-Content-Type-Options", b"nosniff")
    request.write(body)
    request.finish()


def _etags(value: bytes) -> list[bytes]:
    return [tag.strip() for tag in value.split(b",") if tag.strip()]


def _weak_equal(tag: bytes, etag: bytes) -> bool:
    return tag.removeprefix(b"W/") == etag.removeprefix(b"W/")


def _header_date(request: Request, name: bytes) -> int | None:
    value = request.getHeader(name)
    if not value:
        return None
    try:
        return stringToDatetime(value)
    except Exception:  # a malformed date is ignored, as RFC 9110 requires
        return None


def evaluate_conditions(request: Request, etag: bytes, mtime: int | None) -> int | None:
    """Evaluate the preconditions of RFC 9110 section 13.2.2 for a strong *etag* and *mtime*.

    Returns 412 (a failed If-Match / If-Unmodified-Since), 304 (If-None-Match /
    If-Modified-Since say the client's copy is current), or None (serve normally). With
    *mtime* None (lazy content: no local modification time) the date conditions are ignored.
    """
    if_match = request.getHeader(b"if-match")
    if if_match is not None:
        tags = _etags(if_match)
        if b"*" not in tags and etag not in tags:
            return 412
    else:
        since = _header_date(request, b"if-unmodified-since")
        if since is not None and mtime is not None and mtime > since:
            return 412
    if_none_match = request.getHeader(b"if-none-match")
    if if_none_match is not None:
        tags = _etags(if_none_match)
        if b"*" in tags or any(_weak_equal(tag, etag) for tag in tags):
            return 304
    elif request.method in (b"GET", b"HEAD"):
        since = _header_date(request, b"if-modified-since")
        if since is not None and mtime is not None and mtime <= since:
            return 304
    return None


def if_range_allows(request: Request, etag: bytes, mtime: int | None) -> bool:
    """True when the Range header may be honoured: no If-Range, or it names this version
    (by its strong *etag*, or by its *mtime* when that is known)."""
    value = request.getHeader(b"if-range")
    if value is None:
        return True
    value = value.strip()
    if value.startswith((b'"', b"W/")):
        return value == etag  # strong comparison; a weak tag never matches
    since = _header_date(request, b"if-range")
    return since is not None and mtime is not None and since == mtime


@implementer(IPushProducer)
class FileRangesProducer:
    """Write ``(prefix, offset, length)`` segments of an open file, then *trailer*, then finish.

    A whole body is one segment ``(b"", 0, size)``; a multipart body has one segment per part
    with its delimiter and headers as prefix. The file is closed when done or stopped.

    A push producer: it writes the next chunk whenever the transport is not paused, and the
    transport pauses it as soon as more than its buffer size waits (one chunk, as a rule) and
    resumes it once that is sent. The first chunk leaves with the head, from `start`, in the
    turn that read the request; twisted.web drives a pull producer through a `Cooperator`
    instead (a timed call and a generator step per chunk, the first one a turn later).
    """

    def __init__(
        self,
        request: Request,
        fileobj: BinaryIO,
        segments: Iterable[tuple[bytes, int, int]],
        trailer: bytes = b"",
        chunk_size: int = CHUNK_SIZE,
        *,
        clock: IReactorTime | None = None,
        stall_timeout: float | None = None,
    ) -> None:
        self._request = request
        self._clock = clock
        self._stall_timeout = stall_timeout
        self._stall_timer: IDelayedCall | None = None
        self._file: BinaryIO | None = fileobj
        self._segments = deque(segments)
        self._trailer = trailer
        self._chunk_size = chunk_size
        #: The size of the next read: `FIRST_CHUNK` first (not more than *chunk_size*).
        self._next_size = min(FIRST_CHUNK, chunk_size)
        self._offset = 0
        self._remaining = 0
        self._counted = False
        self._paused = False

    def start(self) -> None:
        """Register with the request and write the first chunk; the transport asks for the
        next ones as it sends."""
        self._request.notifyFinish().addBoth(lambda _: self._close())
        Senders.count += 1
        self._counted = True
        widen_sends(self._request, self._chunk_size)
        self._request.registerProducer(self, True)
        self.resumeProducing()

    def _arm_stall_timer(self) -> None:
        """(Re)start the no-progress timer: a client that reads nothing for that long is cut."""
        if self._clock is None or not self._stall_timeout or self._file is None:
            return
        if self._stall_timer is not None and self._stall_timer.active():
            self._stall_timer.reset(self._stall_timeout)
        else:
            self._stall_timer = self._clock.callLater(self._stall_timeout, self._stalled)

    def _stalled(self) -> None:
        self._stall_timer = None
        _log.info("client made no progress for {seconds}s; closing", seconds=self._stall_timeout)
        self._abort()

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        """Write chunks until the transport pauses us or the body is done."""
        self._paused = False
        if self._file is None:
            return
        self._arm_stall_timer()
        while not self._paused and self._file is not None:
            self._write_next()

    def _write_next(self) -> None:
        """Write the next chunk of the body, or finish it."""
        assert self._file is not None
        prefix = b""
        while self._remaining == 0:
            if not self._segments:
                self._done(prefix + self._trailer)
                return
            segment_prefix, self._offset, self._remaining = self._segments.popleft()
            prefix += segment_prefix
        try:
            size = min(self._next_size, Senders.share(), self._remaining)
            data = os.pread(self._file.fileno(), size, self._offset)
        except OSError as exc:
            _log.error("reading a stored artifact failed: {error}", error=exc)
            data = b""
        if not data:
            self._abort()
            return
        self._next_size = min(self._chunk_size, self._next_size * 2)
        self._offset += len(data)
        self._remaining -= len(data)
        self._request.write(prefix + data if prefix else data)

    def stopProducing(self) -> None:
        self._close()

    def _done(self, last: bytes) -> None:
        self._close()
        if last:
            self._request.write(last)
        self._request.unregisterProducer()
        if self._request.channel is not None:
            self._request.finish()

    def _abort(self) -> None:
        """The file ended early or failed: cut the connection so the client sees an error."""
        self._close()
        self._request.unregisterProducer()
        transport = getattr(self._request, "transport", None)
        if transport is not None:
            transport.abortConnection()

    def _close(self) -> None:
        if self._counted:
            self._counted = False
            Senders.count -= 1
        if self._stall_timer is not None and self._stall_timer.active():
            self._stall_timer.cancel()
        self._stall_timer = None
        fileobj, self._file = self._file, None
        if fileobj is not None:
            fileobj.close()


def serve_file(
    request: Request,
    fileobj: BinaryIO,
    *,
    sha256: str,
    served_path: str,
    x_accel_redirect: str | None = None,
    clock: IReactorTime | None = None,
    stall_timeout: float | None = None,
) -> None:
    """Answer *request* (GET or HEAD) with the stored artifact open as *fileobj*.

    Takes ownership of *fileobj*. Sets ETag, Last-Modified, Content-Type, Accept-Ranges;
    answers 304/412 for preconditions, 206 for one or several ranges, 416 for unsatisfiable
    ones. With *x_accel_redirect* (the full header value) the body is left to a fronting
    nginx: the answer carries that header and no body. A client that takes no bytes for
    *stall_timeout* seconds (timed on *clock*) has its connection cut.
    """
    if client_gone(request):
        fileobj.close()
        return
    try:
        stat = os.fstat(fileobj.fileno())
    except BaseException:
        fileobj.close()
        raise
    size = stat.st_size
    mtime = int(stat.st_mtime)
    etag = etag_for(sha256)
    ctype = content_type_for(served_path)
    request.setHeader(b"ETag", etag)
    request.setHeader(b"Last-Modified", datetimeToString(mtime))
    request.setHeader(b"Accept-Ranges", b"bytes")

    status = evaluate_conditions(request, etag, mtime)
    if status == 412:
        fileobj.close()
        respond_text(request, 412, "precondition failed")
        return
    if status == 304:
        fileobj.close()
        request.setResponseCode(304)
        request.finish()
        return
    request.setHeader(b"Content-Type", ctype)
    if x_accel_redirect:
        fileobj.close()
        request.setHeader(b"X-Accel-Redirect", x_accel_redirect.encode("utf-8"))
        request.setHeader(b"Content-Length", b"0")
        request.finish()
        return

    ranges = None
    range_header = request.getHeader(b"range")
    if (
        range_header is not None
        and request.method == b"GET"
        and if_range_allows(request, etag, mtime)
    ):
        try:
            ranges = parse_range(range_header, size, ctype)
        except UnsatisfiableRange:
            fileobj.close()
            respond_text(
                request,
                416,
                "range not satisfiable",
                {b"Content-Range": unsatisfiable_content_range(size)},
            )
            return

    trailer = b""
    if ranges is None:
        segments = [(b"", 0, size)]
        length = size
    elif len(ranges) == 1:
        first, last = ranges[0]
        request.setResponseCode(206)
        request.setHeader(b"Content-Range", content_range(first, last, size))
        segments = [(b"", first, last - first + 1)]
        length = last - first + 1
    else:
        body = MultipartByteranges(ranges, size, ctype)
        request.setResponseCode(206)
        request.setHeader(b"Content-Type", body.header_value)
        segments = [(prefix, first, last - first + 1) for prefix, first, last in body.parts()]
        trailer = body.trailer
        length = body.content_length
    request.setHeader(b"Content-Length", b"%d" % length)
    if request.method == b"HEAD" or length == 0:
        fileobj.close()
        request.finish()
        return
    if length <= SMALL_BODY:
        _write_small(request, fileobj, segments, trailer)
        return
    FileRangesProducer(
        request, fileobj, segments, trailer, clock=clock, stall_timeout=stall_timeout
    ).start()


def _write_small(
    request: Request, fileobj: BinaryIO, segments: list[tuple[bytes, int, int]], trailer: bytes
) -> None:
    """Send a body of at most `SMALL_BODY` bytes in one write: no producer, no extra turns.

    Bounded by the socket buffers (the kernel takes it whole), so flow control has nothing
    to do here; a short read means the artifact changed under us, and the client is cut.
    """
    parts = []
    try:
        for prefix, offset, size in segments:
            data = os.pread(fileobj.fileno(), size, offset)
            if len(data) != size:
                raise OSError(f"short read: {len(data)} of {size} bytes")
            parts += [prefix, data]
    except OSError as exc:
        _log.error("reading a stored artifact failed: {error}", error=exc)
        transport = getattr(request, "transport", None)
        if transport is not None:
            transport.abortConnection()
        return
    finally:
        fileobj.close()
    parts.append(trailer)
    request.write(b"".join(parts))
    request.finish()
