"""Scriptable upstream behaviours: what one registered path does on the wire.

Each behaviour is an attrs class with ``render(request)``, called by
:class:`tests.support.upstream.UpstreamServer` for every request to its path, exactly like
``twisted.web.resource.IResource.render``: it returns bytes or ``NOT_DONE_YET``.

Docstrings state the exact wire effect. "Headers" means the status line and headers as written
by twisted.web (``Date``, ``Server`` and ``Content-Type`` included). Low-level faults write to or
close the raw transport underneath twisted.web. Every timer a behaviour starts goes through
:func:`call_later`, which cancels it when the request finishes or its connection is lost, so a
test never leaves a dirty reactor behind.
"""

from __future__ import annotations

import gzip
import hashlib
import re
import socket
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
from twisted.internet import tcp
from twisted.internet.interfaces import IDelayedCall, IPushProducer
from twisted.web import static
from twisted.web.http import RESPONSES, Request, stringToDatetime
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

__all__ = [
    "Behaviour",
    "CloseEarly",
    "ChunkedNoLastChunk",
    "Delay",
    "Generated",
    "Gated",
    "Gzip",
    "HugeHeaders",
    "ManyHeaders",
    "Redirect",
    "RedirectLoop",
    "RedirectTo",
    "RequireBasicAuth",
    "ResetAfter",
    "ResetBeforeHeaders",
    "Serve",
    "ServeFile",
    "Status",
    "Steps",
    "StatusThenServe",
    "StallAfterHeaders",
    "StallMidBody",
    "Trickle",
    "WrongBytes",
    "WrongSize",
    "call_later",
    "close_after_flush",
    "pending_timers",
    "reset_after_flush",
]

RenderResult = bytes | int
DEFAULT_TYPE = "application/octet-stream"


class Behaviour:
    """Base of all behaviours: ``render(request)`` answers one request on a registered path."""

    def render(self, request: Request) -> RenderResult:
        raise NotImplementedError


# --- plumbing -------------------------------------------------------------------------------


def call_later(request: Request, delay: float, fn: Callable[..., Any], *args: Any) -> IDelayedCall:
    """``reactor.callLater`` whose call is cancelled when ``request`` finishes or is lost."""
    from twisted.internet import reactor

    calls: list[IDelayedCall] | None = getattr(request, "_support_timers", None)
    if calls is None:
        calls = []
        request._support_timers = calls  # type: ignore[attr-defined]
        request.notifyFinish().addBoth(_cancel_all, calls)
    call = reactor.callLater(delay, fn, *args)
    calls[:] = [c for c in calls if c.active()]
    calls.append(call)
    return call


def _cancel_all(result: object, calls: list[IDelayedCall]) -> None:
    for call in calls:
        if call.active():
            call.cancel()
    calls.clear()


def pending_timers() -> list[IDelayedCall]:
    """Reactor calls still scheduled by behaviours (should be none once connections closed)."""
    from twisted.internet import reactor

    return [
        call
        for call in reactor.getDelayedCalls()
        if getattr(call.func, "__module__", "") == __name__
        or type(getattr(call.func, "__self__", None)).__module__ == __name__
    ]


def is_gone(request: Request) -> bool:
    """True once the request finished or its client went away."""
    return bool(request.finished or request._disconnected)


def _transport(request: Request) -> Any:
    """The connection's byte transport (TCP, or TLS over TCP) underneath twisted.web."""
    return request.channel.transport


def _tcp_transport(request: Request) -> Any:
    """The TCP transport at the bottom of the wrappers (TLS, connection tracking)."""
    transport = _transport(request)
    while not isinstance(transport, tcp.Connection):
        transport = transport.transport
    return transport


def close_after_flush(request: Request) -> None:
    """Send what is already written, then close cleanly: TLS close_notify (if TLS) and a FIN.

    The TCP transport is closed too, because TLS alone would wait for the client's
    close_notify, which a client still expecting body bytes never sends. HTTPChannel's own
    producer registration is dropped first: while it is registered, a transport whose buffer
    filled resumes it when the buffer drains instead of closing.
    """
    for transport in (_transport(request), _tcp_transport(request)):
        if getattr(transport, "producer", None) is not None:
            transport.unregisterProducer()
        transport.loseConnection()


def reset_after_flush(request: Request) -> None:
    """Send what is already written, then reset the TCP connection (RST, never a FIN).

    ``abortConnection`` alone would drop bytes still buffered; instead SO_LINGER (1, 0) makes
    the kernel's close send a RST, and skipping the orderly ``shutdown`` keeps a FIN from going
    out first. Under TLS no close_notify is sent either.
    """
    tcp = _tcp_transport(request)
    tcp.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    tcp._shouldShutdown = False  # twisted.internet.tcp: no shutdown(2) (a FIN) before close
    tcp.loseConnection()


def _start(
    request: Request,
    status: int,
    headers: Mapping[str, str],
    length: int | None,
    content_type: str | None = DEFAULT_TYPE,
) -> None:
    """Set status and headers; ``length=None`` leaves Content-Length out (chunked on 1.1)."""
    request.setResponseCode(status)
    if content_type is not None:
        request.setHeader(b"content-type", content_type.encode("latin-1"))
    for name, value in headers.items():
        request.setHeader(name.encode("latin-1"), value.encode("latin-1"))
    if length is not None:
        request.setHeader(b"content-length", b"%d" % length)


def _send_headers(request: Request) -> None:
    """Put the status line and headers on the wire now, with no body byte."""
    request.write(b"")


def _chunks(data: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def _single_range(header: bytes | None, total: int) -> tuple[int, int] | None | str:
    """Parse a single ``bytes=a-b`` range: (first, last), None (ignore it) or "unsatisfiable"."""
    if header is None:
        return None
    match = _RANGE.match(header.decode("latin-1").strip())
    if match is None:
        return None  # multiple or malformed ranges: answer 200 with the whole body
    first_s, last_s = match.groups()
    if not first_s and not last_s:
        return None
    if not first_s:
        suffix = int(last_s)
        if suffix == 0:
            return "unsatisfiable"
        return max(0, total - suffix), total - 1
    first = int(first_s)
    last = int(last_s) if last_s else total - 1
    if first >= total or last < first:
        return "unsatisfiable"
    return first, min(last, total - 1)


# --- success --------------------------------------------------------------------------------


@attrs.frozen
class Serve(Behaviour):
    """A correct response with ``body``.

    Wire: ``status`` (200), Content-Type, optional ETag/Last-Modified, extra ``headers``, and
    ``Content-Length: len(body)`` then the body. With ``chunked=True`` (HTTP/1.1 clients) no
    Content-Length: the body goes out as ``chunk_size`` chunks and the terminating 0-chunk.
    HEAD: same headers, no body. Unless chunked, ``Accept-Ranges: bytes`` and one range
    ``bytes=a-b``/``a-``/``-n`` gives 206 with Content-Range; an unsatisfiable range gives 416
    with ``Content-Range: bytes */N``; several ranges are ignored (200). ``If-None-Match``
    equal to the ETag gives 304; without ``If-None-Match``, an ``If-Modified-Since`` not
    earlier than ``last_modified`` gives 304 (with the ETag and Last-Modified, no body).
    """

    body: bytes
    headers: Mapping[str, str] = attrs.field(factory=dict)
    chunked: bool = False
    content_type: str = DEFAULT_TYPE
    etag: str | None = None
    last_modified: str | None = None
    status: int = 200
    chunk_size: int = 65536

    def render(self, request: Request) -> RenderResult:
        headers = dict(self.headers)
        if self.etag is not None:
            headers["ETag"] = self.etag
        if self.last_modified is not None:
            headers["Last-Modified"] = self.last_modified
        if self.etag is not None and request.getHeader(b"if-none-match") == self.etag.encode():
            _start(request, 304, headers, None, content_type=None)
            return b""
        if self._not_modified_since(request):
            _start(request, 304, headers, None, content_type=None)
            return b""
        body, status = self.body, self.status
        if self.chunked:
            _start(request, status, headers, None, self.content_type)
            _send_headers(request)
            for chunk in _chunks(body, self.chunk_size):
                request.write(chunk)
            request.finish()
            return NOT_DONE_YET
        headers["Accept-Ranges"] = "bytes"
        if status == 200:
            wanted = _single_range(request.getHeader(b"range"), len(body))
            if wanted == "unsatisfiable":
                headers["Content-Range"] = f"bytes */{len(body)}"
                _start(request, 416, headers, 0, self.content_type)
                return b""
            if isinstance(wanted, tuple):
                first, last = wanted
                headers["Content-Range"] = f"bytes {first}-{last}/{len(body)}"
                body, status = body[first : last + 1], 206
        _start(request, status, headers, len(body), self.content_type)
        return b"" if request.method == b"HEAD" else body

    def _not_modified_since(self, request: Request) -> bool:
        since = request.getHeader(b"if-modified-since")
        if since is None or self.last_modified is None or request.getHeader(b"if-none-match"):
            return False
        try:
            return stringToDatetime(since) >= stringToDatetime(self.last_modified.encode())
        except ValueError:
            return False


@attrs.frozen
class ServeFile(Behaviour):
    """A file from disk through ``twisted.web.static.File``.

    Wire: 200 with Content-Length, Content-Type by extension (or ``content_type``),
    Last-Modified, Accept-Ranges; Range (single and multipart) and HEAD as static.File does;
    the body is streamed with a producer, so big files cost no memory.
    """

    path: Path
    content_type: str | None = None

    def render(self, request: Request) -> RenderResult:
        resource = static.File(str(self.path), defaultType=self.content_type or DEFAULT_TYPE)
        if self.content_type is not None:
            resource.type = self.content_type
        return resource.render(request)


@implementer(IPushProducer)
class _BlockProducer:
    """Writes blocks into a request while the transport accepts them (push flow control)."""

    def __init__(self, request: Request, blocks: Iterator[bytes]) -> None:
        self._request = request
        self._blocks = blocks
        self._paused = False
        self._done = False

    def resumeProducing(self) -> None:
        self._paused = False
        while not self._paused and not self._done:
            block = next(self._blocks, None)
            if block is None:
                self._done = True
                self._request.unregisterProducer()
                self._request.finish()
                return
            self._request.write(block)

    def pauseProducing(self) -> None:
        self._paused = True

    def stopProducing(self) -> None:
        self._done = True


@attrs.frozen
class Generated(Behaviour):
    """``size`` deterministic pseudo-random bytes, streamed with flow control.

    Wire: 200, Content-Type, ``Content-Length: size``, then the bytes, produced only as fast
    as the client reads (a push producer), so a 1 GiB body costs the server ~64 KiB of
    memory. ``sha256()`` and ``chunks()`` give the expected digest and content.
    """

    size: int
    seed: bytes = b"upstream"
    block_size: int = 65536
    content_type: str = DEFAULT_TYPE

    def _block(self) -> bytes:
        out = bytearray()
        counter = 0
        while len(out) < self.block_size:
            out += hashlib.sha512(self.seed + counter.to_bytes(8, "big")).digest()
            counter += 1
        return bytes(out[: self.block_size])

    def chunks(self) -> Iterator[bytes]:
        """The body, block by block."""
        block = self._block()
        full, rest = divmod(self.size, self.block_size)
        for _ in range(full):
            yield block
        if rest:
            yield block[:rest]

    def sha256(self) -> str:
        """Hex sha256 of the whole body."""
        digest = hashlib.sha256()
        for chunk in self.chunks():
            digest.update(chunk)
        return digest.hexdigest()

    def render(self, request: Request) -> RenderResult:
        _start(request, 200, {}, self.size, self.content_type)
        if request.method == b"HEAD":
            return b""
        producer = _BlockProducer(request, self.chunks())
        request.registerProducer(producer, True)
        request.notifyFinish().addErrback(lambda _: producer.stopProducing())
        producer.resumeProducing()
        return NOT_DONE_YET


@attrs.frozen
class Gzip(Behaviour):
    """A ``.gz`` file's exact bytes, labelled ``Content-Encoding: gzip``.

    Wire: 200, ``Content-Type: application/gzip``, ``Content-Encoding: gzip``,
    ``Content-Length: len(body)``, then ``body`` unchanged. A client that decodes transparently
    stores different bytes than the published digest of ``body``. ``Gzip.of(payload)`` makes
    ``body`` reproducibly (mtime 0).
    """

    body: bytes
    content_type: str = "application/gzip"

    @classmethod
    def of(cls, payload: bytes) -> Gzip:
        return cls(gzip.compress(payload, mtime=0))

    def render(self, request: Request) -> RenderResult:
        _start(request, 200, {"Content-Encoding": "gzip"}, len(self.body), self.content_type)
        return b"" if request.method == b"HEAD" else self.body


# --- status and redirects -------------------------------------------------------------------


@attrs.frozen
class Status(Behaviour):
    """Always answer ``code``.

    Wire: ``code`` with ``headers``, ``Content-Type: text/plain`` and a short body
    ``b"<code> from upstream\\n"`` (no body on HEAD), framed by ``framing``:

    * ``"length"``: with its Content-Length;
    * ``"chunked"``: ``Transfer-Encoding: chunked`` and the terminating 0-chunk (an
      HTTP/1.1 request; HTTP/1.0 gets a close-delimited body);
    * ``"close"``: neither Content-Length nor chunked, ``Connection: close``, and the body
      ends when the connection closes (a clean FIN after the bytes; RFC 9112 section 6.3).
    """

    code: int
    headers: Mapping[str, str] = attrs.field(factory=dict)
    framing: str = attrs.field(
        default="length", validator=attrs.validators.in_(("length", "chunked", "close"))
    )

    def render(self, request: Request) -> RenderResult:
        body = b"%d from upstream\n" % self.code
        head = request.method == b"HEAD"
        if self.framing == "length":
            _start(request, self.code, self.headers, len(body), "text/plain")
            return b"" if head else body
        if self.framing == "chunked":
            _start(request, self.code, self.headers, None, "text/plain")
            if not head:
                request.write(body)
            request.finish()
            return NOT_DONE_YET
        _write_raw_head(request, self.code, {**self.headers, "Connection": "close"})
        if not head:
            _transport(request).write(body)
        close_after_flush(request)
        return NOT_DONE_YET


def _write_raw_head(request: Request, code: int, headers: Mapping[str, str]) -> None:
    """Write an ``HTTP/1.1`` status line and *headers* (plus a text/plain Content-Type)
    straight to the transport, bypassing twisted.web's framing: no Content-Length, no
    chunking, so whatever follows is a close-delimited body."""

    phrase = RESPONSES.get(code, b"Status")
    lines = [b"HTTP/1.1 %d %s" % (code, phrase), b"Content-Type: text/plain"]
    lines += [f"{name}: {value}".encode("latin-1") for name, value in headers.items()]
    _transport(request).write(b"\r\n".join(lines) + b"\r\n\r\n")


@attrs.define
class StatusThenServe(Behaviour):
    """The first ``times`` requests get ``status``; later ones are handled by ``then``.

    Wire (first ``times`` requests): like :class:`Status`, plus ``Retry-After`` when
    ``retry_after`` is given (an int of seconds, or a string such as an HTTP-date sent as is).
    ``served`` counts the failed answers given so far.
    """

    status: int
    times: int
    then: Behaviour
    retry_after: int | str | None = None
    served: int = 0

    def render(self, request: Request) -> RenderResult:
        if self.served >= self.times:
            return self.then.render(request)
        self.served += 1
        headers = {} if self.retry_after is None else {"Retry-After": str(self.retry_after)}
        return Status(self.status, headers).render(request)


@attrs.define
class Steps(Behaviour):
    """Request N is handled by ``steps[N]``; the last step repeats for all later requests.

    Use it for "fault once, then succeed" (for example ``Steps([ResetAfter(..), Serve(..)])``).
    """

    steps: Sequence[Behaviour]
    calls: int = 0

    def render(self, request: Request) -> RenderResult:
        step = self.steps[min(self.calls, len(self.steps) - 1)]
        self.calls += 1
        return step.render(request)


@attrs.frozen
class Redirect(Behaviour):
    """Wire: ``status`` (302) with ``Location: location`` (sent verbatim) and an empty body."""

    location: str
    status: int = 302

    def render(self, request: Request) -> RenderResult:
        _start(request, self.status, {"Location": self.location}, 0, "text/plain")
        return b""


@attrs.frozen
class RedirectTo(Redirect):
    """A redirect to any location, e.g. ``file:///etc/passwd`` (a client must refuse it).
    Wire: as :class:`Redirect`."""


@attrs.frozen
class RedirectLoop(Behaviour):
    """Endless redirects: ``302`` with ``Location: <this path>?hop=N+1``, forever.

    The path stays the same (the query string does not select a behaviour), so every hop lands
    here again; clients must give up after their redirect limit.
    """

    status: int = 302

    def render(self, request: Request) -> RenderResult:
        hop = int((request.args.get(b"hop") or [b"0"])[0]) + 1
        location = request.path.decode("latin-1") + f"?hop={hop}"
        return Redirect(location, self.status).render(request)


@attrs.frozen
class RequireBasicAuth(Behaviour):
    """Wire: 401 with ``WWW-Authenticate: Basic realm="upstream"`` unless the request's Basic
    credentials are ``username``/``password``; then ``then`` answers."""

    username: str
    password: str
    then: Behaviour

    def render(self, request: Request) -> RenderResult:
        if (
            request.getUser() == self.username.encode()
            and request.getPassword() == self.password.encode()
        ):
            return self.then.render(request)
        return Status(401, {"WWW-Authenticate": 'Basic realm="upstream"'}).render(request)


@attrs.frozen
class HugeHeaders(Behaviour):
    """Wire: 200 with one ``X-Huge`` header line whose value is ``n_bytes`` of ``a``, then
    ``body`` with its Content-Length. Twisted's client gives up on header lines over 16 KiB."""

    n_bytes: int
    body: bytes = b"ok\n"

    def render(self, request: Request) -> RenderResult:
        return Serve(self.body, headers={"X-Huge": "a" * self.n_bytes}).render(request)


@attrs.frozen
class ManyHeaders(Behaviour):
    """Wire: 200 with ``count`` distinct headers ``X-H-<i>: <i>``, then ``body``."""

    count: int
    body: bytes = b"ok\n"

    def render(self, request: Request) -> RenderResult:
        headers = {f"X-H-{i}": str(i) for i in range(self.count)}
        return Serve(self.body, headers=headers).render(request)


# --- broken bodies --------------------------------------------------------------------------


@attrs.frozen
class ResetAfter(Behaviour):
    """Wire: 200 with ``Content-Length: len(body)``, the first ``n`` body bytes, a pause of
    ``delay`` seconds, then a TCP reset (RST, no FIN, no TLS close_notify; see
    :func:`reset_after_flush`). ``n`` larger than the body sends it all, then resets. Clients
    see "connection reset" (curl exit 56). The pause lets the client read the ``n`` bytes
    first: a kernel drops unread received data when a RST arrives."""

    n: int
    body: bytes
    delay: float = 0.05

    def render(self, request: Request) -> RenderResult:
        _start(request, 200, {}, len(self.body), DEFAULT_TYPE)
        _send_headers(request)
        if self.n:
            request.write(self.body[: self.n])
        if self.delay > 0:
            call_later(request, self.delay, self._reset, request)
        else:
            reset_after_flush(request)
        return NOT_DONE_YET

    def _reset(self, request: Request) -> None:
        if not is_gone(request):
            reset_after_flush(request)


@attrs.frozen
class ResetBeforeHeaders(Behaviour):
    """Wire: nothing at all; the request is read, then the connection is reset (RST)."""

    def render(self, request: Request) -> RenderResult:
        reset_after_flush(request)
        return NOT_DONE_YET


@attrs.frozen
class CloseEarly(Behaviour):
    """Wire: 200 with ``Content-Length: len(body)``, the first ``n`` bytes, then a clean close
    (after flushing: TLS close_notify when on TLS, then FIN; see :func:`close_after_flush`).
    The body is short of its Content-Length: curl exit 18."""

    n: int
    body: bytes

    def render(self, request: Request) -> RenderResult:
        _start(request, 200, {}, len(self.body), DEFAULT_TYPE)
        _send_headers(request)
        if self.n:
            request.write(self.body[: self.n])
        close_after_flush(request)
        return NOT_DONE_YET


@attrs.frozen
class ChunkedNoLastChunk(Behaviour):
    """Wire: 200 with ``Transfer-Encoding: chunked``, ``body`` as chunks of ``chunk_size``,
    then a clean close (as in :class:`CloseEarly`) without the terminating
    ``0\\r\\n\\r\\n`` chunk. Needs an HTTP/1.1 request (HTTP/1.0 gets the raw body then a
    close, which is indistinguishable from success). curl reports exit 18."""

    body: bytes
    chunk_size: int = 1024

    def render(self, request: Request) -> RenderResult:
        _start(request, 200, {}, None, DEFAULT_TYPE)
        _send_headers(request)
        for chunk in _chunks(self.body, self.chunk_size):
            request.write(chunk)
        close_after_flush(request)
        return NOT_DONE_YET


def _corrupt(body: bytes) -> bytes:
    if not body:
        raise ValueError("cannot corrupt an empty body")
    middle = len(body) // 2
    return body[:middle] + bytes([body[middle] ^ 0xFF]) + body[middle + 1 :]


@attrs.frozen
class WrongBytes(Behaviour):
    """Wire: a correct-looking 200 with ``Content-Length: len(body)`` and ``len(body)`` bytes,
    but the middle byte of ``body`` is flipped: right size, wrong digest. ``served`` holds the
    bytes actually sent."""

    body: bytes

    @property
    def served(self) -> bytes:
        return _corrupt(self.body)

    def render(self, request: Request) -> RenderResult:
        return Serve(self.served).render(request)


@attrs.frozen
class WrongSize(Behaviour):
    """Wire: a clean 200 whose Content-Length matches what is sent, but what is sent is
    ``body`` plus ``extra`` bytes of ``x`` (or, for a negative ``extra``, ``body`` cut short):
    a size mismatch against the published size, without any protocol error."""

    body: bytes
    extra: int = 1

    @property
    def served(self) -> bytes:
        if self.extra >= 0:
            return self.body + b"x" * self.extra
        return self.body[: self.extra]

    def render(self, request: Request) -> RenderResult:
        return Serve(self.served).render(request)


# --- slow and stalled -----------------------------------------------------------------------


@attrs.frozen
class StallAfterHeaders(Behaviour):
    """Wire: 200 with ``Content-Length: len(body)``, then nothing, with the connection held
    open until the client closes it (or the server stops)."""

    body: bytes = b"never sent\n"

    def render(self, request: Request) -> RenderResult:
        _start(request, 200, {}, len(self.body), DEFAULT_TYPE)
        _send_headers(request)
        return NOT_DONE_YET


@attrs.frozen
class StallMidBody(Behaviour):
    """Wire: 200 with ``Content-Length: len(body)``, the first ``n`` bytes, then nothing, with
    the connection held open until the client closes it (or the server stops)."""

    n: int
    body: bytes

    def render(self, request: Request) -> RenderResult:
        _start(request, 200, {}, len(self.body), DEFAULT_TYPE)
        _send_headers(request)
        request.write(self.body[: self.n])
        return NOT_DONE_YET


@attrs.frozen
class Delay(Behaviour):
    """Wire: nothing for ``seconds`` (not even headers), then ``then`` answers. The timer is
    cancelled if the client goes away first."""

    seconds: float
    then: Behaviour

    def render(self, request: Request) -> RenderResult:
        call_later(request, self.seconds, self._answer, request)
        return NOT_DONE_YET

    def _answer(self, request: Request) -> None:
        if is_gone(request):
            return
        _finish_with(request, self.then.render(request))


def _finish_with(request: Request, result: RenderResult) -> None:
    """Complete a deferred render as twisted.web would have for ``result``."""
    if result == NOT_DONE_YET:
        return
    if request.method != b"HEAD" and not request.responseHeaders.hasHeader(b"content-length"):
        request.setHeader(b"content-length", b"%d" % len(result))
    request.write(result)
    request.finish()


@attrs.frozen
class Trickle(Behaviour):
    """Wire: 200 with ``Content-Length: len(body)`` sent at once, then the body at about
    ``bytes_per_sec`` (1 byte per second for ``Trickle(body, 1)``): a piece every
    ``interval`` seconds via ``reactor.callLater``. When the client goes away the pending
    timer is cancelled and nothing more is written."""

    body: bytes
    bytes_per_sec: float = 1.0
    interval: float = 0.05

    def render(self, request: Request) -> RenderResult:
        _start(request, 200, {}, len(self.body), DEFAULT_TYPE)
        _send_headers(request)
        if request.method == b"HEAD":
            request.finish()
            return NOT_DONE_YET
        piece = max(1, int(self.bytes_per_sec * self.interval))
        call_later(request, piece / self.bytes_per_sec, self._tick, request, 0, piece)
        return NOT_DONE_YET

    def _tick(self, request: Request, offset: int, piece: int) -> None:
        if is_gone(request):
            return
        if offset >= len(self.body):
            request.finish()
            return
        request.write(self.body[offset : offset + piece])
        call_later(request, piece / self.bytes_per_sec, self._tick, request, offset + piece, piece)


@attrs.define
class Gated(Behaviour):
    """Requests wait (no byte sent) until the test calls ``release()``; then ``then`` answers
    each of them, and later requests go straight through. ``waiting`` counts parked requests.
    Useful to hold N concurrent requests in flight (coalescing tests)."""

    then: Behaviour
    released: bool = False
    _parked: list[Request] = attrs.field(factory=list)

    @property
    def waiting(self) -> int:
        return len(self._parked)

    def release(self) -> None:
        self.released = True
        parked, self._parked = self._parked, []
        for request in parked:
            if not is_gone(request):
                _finish_with(request, self.then.render(request))

    def render(self, request: Request) -> RenderResult:
        if self.released:
            return self.then.render(request)
        self._parked.append(request)
        request.notifyFinish().addErrback(lambda _: self._forget(request))
        return NOT_DONE_YET

    def _forget(self, request: Request) -> None:
        if request in self._parked:
            self._parked.remove(request)


def http_date(value: str) -> int:
    """Seconds since the epoch for an HTTP-date (for checking Retry-After arithmetic)."""
    return stringToDatetime(value.encode("latin-1"))
