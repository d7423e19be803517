"""The HTTP/1.1 connection as this service needs it: heads on a deadline, no request bodies.

`StreamerChannel` is twisted.web's `HTTPChannel` with the edge rules of a download-only
server, each answered with a real status and ``Connection: close`` instead of Twisted's bare
400 or a silent close:

* a request that announces a body (``Content-Length`` other than 0, or ``Transfer-Encoding:
  chunked``) gets 413 as soon as its head is parsed, before one byte of the body is read (the
  service takes no uploads; Twisted would spool the body to a temporary file first);
* an HTTP/1.1 request without a ``Host`` header, any request with more than one, or with one
  that is not a host and optional port, gets 400 (RFC 9112 §3.2);
* a request line over `HTTPChannel.MAX_LENGTH` gets 414; a header line over it, a head over
  `HTTPChannel.totalHeadersSize` or more than `HTTPChannel.maxHeaders` fields get 431;
* each request head must arrive within ``request_header_timeout`` seconds, counted from the
  connection's start or from the end of the previous response on a keep-alive connection:
  408 when part of a head arrived, a plain close when nothing did (an idle keep-alive
  connection), so slow-drip clients cannot hold connections open.

After a refusal the write side is closed and the rest of what the client sends is read and
discarded for up to `LINGER_SECONDS`, so the client reads the answer instead of a reset.

A response written without a producer (a small body, a short answer) goes to the kernel at
once, its status line and headers in the same ``send`` as its first body bytes, when the
connection is plain TCP and nothing waits in the transport's buffer; what the socket does not
take is left to the transport, as any write with a producer, on TLS or behind queued bytes
(`StreamerChannel.write`).

`ClientLimit` caps connections per client address (``max_connections_per_client``); the site
asks it at accept and answers a connection over the cap with a short 503.

`read_at_accept` makes a listening port read each new connection in the reactor turn that
accepted it: a client sends its request right after connecting, and it is answered without
waiting for the next turn.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from typing import Any, cast

from twisted.internet import tcp, unix
from twisted.internet.interfaces import (
    IAddress,
    IConsumer,
    IHalfCloseableDescriptor,
    ISSLTransport,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python import log as legacy_log
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.http_headers import Headers

from downloaders.transports import IStreamTransport
from streamer.paths import is_host

__all__ = ["LINGER_SECONDS", "ClientLimit", "StreamerChannel", "read_at_accept", "refusal"]

log = Logger()

#: How long a refused connection is drained (read and discarded) before it is closed.
LINGER_SECONDS = 2.0

_REASONS = {
    400: b"Bad Request",
    408: b"Request Timeout",
    413: b"Content Too Large",
    414: b"URI Too Long",
    431: b"Request Header Fields Too Large",
    503: b"Service Unavailable",
}


def refusal(status: int, reason: str) -> bytes:
    """A complete HTTP/1.1 response: *status*, ``Connection: close`` and *reason* as body."""
    body = reason.encode("utf-8") + b"\n"
    return b"".join(
        [
            b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Error")),
            b"Connection: close\r\n",
            b"Content-Type: text/plain; charset=utf-8\r\n",
            b"Cache-Control: no-store\r\n",
            b"Content-Length: %d\r\n\r\n" % len(body),
            body,
        ]
    )


class StreamerChannel(HTTPChannel):
    """`HTTPChannel` with a head deadline, no request bodies and real statuses for
    oversized heads (see the module docstring). The site sets `head_timeout` (seconds;
    0 turns the deadline off) and may set `on_refused` (called with the status and the
    request method, or None before the request line was read) and `on_close`."""

    transport: IStreamTransport  # set by makeConnection
    site: Any  # the StreamerSite that built this channel (set by Site.buildProtocol)

    head_timeout: float = 0.0
    on_refused: Callable[[int, bytes | None], None] | None = None
    on_close: Callable[[], None] | None = None

    #: Tells the time on the clock of `callLater` (the site sets both).
    seconds: Callable[[], float] = staticmethod(time.time)
    _head_timer: Any = None
    #: When the head being waited for must be complete (`seconds`), None while answering.
    _head_deadline: float | None = None
    _host: IAddress | None = None
    _head_lines = 0
    _head_bytes = 0
    _header_fields = 0
    _refused = False
    _linger_timer: Any = None
    #: The last Host header found good on this connection (its next requests carry it too).
    _good_host: bytes | None = None
    #: Whether `writeHeaders` keeps the head back for the body's first bytes (`hold_head`).
    _holding = False
    #: The head kept back, sent with the next write or by `release_head`.
    _head: bytes | None = None

    def getHost(self) -> IAddress:
        """The local address, asked of the socket once per connection (Twisted's `Request`
        asks at every request, a ``getsockname`` each time)."""
        if self._host is None:
            self._host = self.transport.getHost()
        return self._host

    # -- the head deadline ----------------------------------------------------------------

    def connectionMade(self) -> None:
        if self.head_timeout > 0 and (self.timeOut is None or self.head_timeout <= self.timeOut):
            # The deadline closes every connection idle for that long (a head is all it can
            # wait for): Twisted's idle timeout would only add a timer to move per request.
            self.timeOut = None
        super().connectionMade()
        self._arm_head_timer()

    def _arm_head_timer(self) -> None:
        """Start the deadline of the next head. One timer serves all the requests of a
        connection: it stays scheduled, and when it fires before the deadline (which only
        moves later) it is set again for the rest, so a request costs no timer of its own."""
        if self.head_timeout <= 0:
            return
        self._head_deadline = self.seconds() + self.head_timeout
        if self._head_timer is None:
            self._head_timer = self.callLater(self.head_timeout, self._head_due)

    def _cancel_head_timer(self) -> None:
        """A head arrived: no deadline until its response ended (the timer may stay)."""
        self._head_deadline = None

    def _stop_head_timer(self) -> None:
        self._head_deadline = None
        timer, self._head_timer = self._head_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _head_due(self) -> None:
        self._head_timer = None
        deadline = self._head_deadline
        if deadline is None:
            return  # a request is being answered: `requestDone` sets the next deadline
        left = deadline - self.seconds()
        if left > 0:
            self._head_timer = self.callLater(left, self._head_due)
            return
        self._head_deadline = None
        self._head_timed_out()

    def _head_timed_out(self) -> None:
        if self._refused or self.transport is None:
            return
        # Part of a head arrived: whole lines of it, or bytes waiting for their line end.
        if self._head_lines or self._buffer:
            self._refuse(408, "request head not received in time")
        else:
            # Nothing of a request arrived (a fresh or idle keep-alive connection): a 408
            # here could be read as the answer to a request the client is just sending.
            self.setTimeout(None)
            self.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        if self._refused:
            return  # lingering: read and discard
        if data.endswith(b"\r\n\r\n") and self._whole_head(data):
            return
        super().dataReceived(data)

    def _whole_head(self, data: bytes) -> bool:
        """Parse *data* when it is exactly one request head within every limit: the usual
        packet of a client (curl, apt) waiting for its answer. Its header lines go straight
        to `headerReceived` (which validates each, as for any request), skipping the per-line
        loop of `LineReceiver` and of `lineReceived` (a tenth of a warm small request).
        False, having done nothing, for anything else (a partial head, folded lines, a body
        or a second request after it, a head near a limit): the line-by-line path, and its
        refusals, take it."""
        if not (self.line_mode and self.persistent) or self.paused:
            return False
        if self._buffer or self._head_lines:
            return False
        if self._busyReceiving or len(data) > self.totalHeadersSize:
            return False
        request_line, *fields = data[:-4].split(b"\r\n")
        if not request_line or len(request_line) > self.MAX_LENGTH:
            return False
        if len(fields) > self.maxHeaders:
            return False
        for field in fields:
            if not field or len(field) > self.MAX_LENGTH or field[:1] in b" \t":
                return False
        self.resetTimeout()
        HTTPChannel.lineReceived(self, request_line)
        for field in fields:
            if self._refused or self.transport is None or self.transport.disconnecting:
                return True
            if not self.headerReceived(field):
                return True
        if not (self._refused or self.transport is None or self.transport.disconnecting):
            HTTPChannel.lineReceived(self, b"")
        return True

    def requestDone(self, request: Any) -> None:
        # Re-arm before Twisted replays pipelined bytes: they may complete the next head.
        if self.persistent:
            self._arm_head_timer()
        super().requestDone(request)

    def checkPersistence(self, request: Any, version: bytes) -> bool:
        """Twisted's rule (HTTP/1.1 connections persist unless the client said ``close``),
        with ``Connection`` read as the list it is (RFC 9110 §7.6.1): Twisted split only its
        first line, on spaces, so ``TE,close`` or a second line saying ``close`` kept the
        connection open without ``Connection: close`` in the answer."""
        if version != b"HTTP/1.1":
            return False
        values = request.requestHeaders.getRawHeaders(b"connection")
        if values is not None and _says_close(values):
            request.responseHeaders.setRawHeaders(b"connection", [b"close"])
            return False
        return True

    # -- writing ------------------------------------------------------------------------

    def hold_head(self) -> None:
        """Keep the next response head back until the next write (or `release_head`), so
        head and body leave in one ``send``. The request's first write sets it."""
        self._holding = True

    def release_head(self) -> None:
        """Stop holding heads; send a head still held (a response without body bytes)."""
        self._holding = False
        head, self._head = self._head, None
        if head is not None:
            self._send(head)

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: Any) -> None:
        if not isinstance(headers, Headers):
            super().writeHeaders(version, code, reason, headers)
            return
        parts = [version, b" ", code, b" ", reason, b"\r\n"]
        for name, values in headers.getAllRawHeaders():
            for value in values:
                parts += (name, b": ", value, b"\r\n")
        parts.append(b"\r\n")
        head = b"".join(parts)
        if self._holding:
            self._head = head
        else:
            self._send(head)

    def write(self, data: bytes) -> None:
        head, self._head = self._head, None
        self._send(data if head is None else head + data)

    def writeSequence(self, iovec: Any) -> None:
        head, self._head = self._head, None
        if head is None and not self._at_once():
            self.transport.writeSequence(iovec)
        else:
            self._send(b"".join([head or b"", *iovec]))

    def _at_once(self) -> bool:
        """Whether a write may go to the socket now: no producer (so no flow control to keep
        exact), a plain TCP connection open for writing and nothing queued before it."""
        transport: Any = self.transport
        return bool(
            self._requestProducer is None
            and type(transport) is tcp.Server
            and not transport.TLS
            and transport.connected
            and not transport.disconnecting
            and not transport._writeDisconnecting
            and not transport.dataBuffer
            and not transport._tempDataBuffer
        )

    def _send(self, data: bytes) -> None:
        """Write *data*: at once with one ``send`` where `_at_once` allows (a transport's
        write costs two ``epoll_ctl`` and a reactor turn around its ``send``), else, and for
        what the socket did not take, through the transport (which also reports errors)."""
        if data and self._at_once():
            # The transport's own send: 0 for EAGAIN, an exception for an error (which the
            # transport meets again, and reports, as it writes the rest).
            sent = self.transport.writeSomeData(data)  # type: ignore[attr-defined]
            if not isinstance(sent, int):
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
        self.transport.write(data)

    # -- head size limits -----------------------------------------------------------------

    def lineReceived(self, line: bytes) -> None:
        if self._refused:
            return
        if line or self._head_lines:
            self._head_lines += 1
            self._head_bytes += len(line)
            if self._head_lines > 1 and line and line[:1] not in b" \t":
                self._header_fields += 1
            if self._head_bytes > self.totalHeadersSize:
                self._refuse_oversized(request_line=self._head_lines == 1)
                return
            if self._header_fields > self.maxHeaders:
                self._refuse(431, "too many header fields")
                return
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._refuse_oversized(request_line=self._head_lines == 0)

    def _refuse_oversized(self, request_line: bool) -> None:
        if request_line:
            self._refuse(414, "request line too long")
        else:
            self._refuse(431, "request header fields too large")

    # -- no request bodies ----------------------------------------------------------------

    def allHeadersReceived(self) -> None:
        self._cancel_head_timer()
        self._head_lines = self._head_bytes = self._header_fields = 0
        if self.length != 0:
            # Refused before Twisted picks a file for the body or answers Expect: 100-continue.
            self._refuse(413, "request bodies are not accepted")
            return
        if self.requests:
            hosts = self.requests[-1].requestHeaders.getRawHeaders(b"host")
            if hosts is None or hosts[0] != self._good_host or len(hosts) != 1:
                problem = _host_problem(hosts, getattr(self, "_version", None))
                if problem is not None:
                    self._refuse(400, problem)
                    return
                self._good_host = hosts[0] if hosts else None  # (a keep-alive client's next)
        super().allHeadersReceived()

    def allContentReceived(self) -> None:
        if self._refused:  # refused once its head was read: nothing to process
            return
        super().allContentReceived()

    def rawDataReceived(self, data: bytes) -> None:
        if self._refused:
            return
        super().rawDataReceived(data)

    # -- refusing -------------------------------------------------------------------------

    def _respondToBadRequestAndDisconnect(self) -> None:
        # Twisted's own answer to a malformed head is a bare 400 with no headers.
        self._refuse(400, "bad request")

    def _refuse(self, status: int, reason: str) -> None:
        """Answer *status* with ``Connection: close``, then drain and close the connection."""
        if self._refused or self.transport is None:
            return
        self._refused = True
        self.persistent = False
        self._stop_head_timer()
        self.setTimeout(None)
        self.clearLineBuffer()
        if self.on_refused is not None:
            self.on_refused(status, getattr(self, "_command", None))
        peer = self.transport.getPeer()
        log.info(
            "refused a request from {peer}: {status} {reason}",
            peer=getattr(peer, "host", None) or "-",
            status=status,
            reason=reason,
        )
        self.transport.write(refusal(status, reason))
        # The network producer is the transport (or Twisted's stand-in): a consumer too.
        cast(IConsumer, self._networkProducer).unregisterProducer()
        if not _can_half_close(self.transport):
            self.transport.loseConnection()
            return
        # Send the answer and a FIN, keep reading (and discarding) what the client is still
        # sending, so its kernel does not see a reset that could swallow the answer.
        self.transport.loseWriteConnection()
        self.transport.resumeProducing()
        self._linger_timer = self.callLater(LINGER_SECONDS, self._linger_over)

    def _linger_over(self) -> None:
        self._linger_timer = None
        if self.transport is not None:
            self.transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stop_head_timer()
        if self._linger_timer is not None and self._linger_timer.active():
            self._linger_timer.cancel()
        self._linger_timer = None
        super().connectionLost(reason)
        if self.on_close is not None:
            on_close, self.on_close = self.on_close, None
            on_close()


def _says_close(values: list[bytes]) -> bool:
    """Whether the ``Connection`` header lines *values* hold the ``close`` option."""
    return any(
        option.strip(b" \t").lower() == b"close" for value in values for option in value.split(b",")
    )


#: The answer to an HTTP/1.1 request without a Host header or with several.
_ONE_HOST = "an HTTP/1.1 request needs exactly one Host header"


def _host_problem(hosts: list[bytes] | None, version: bytes | None) -> str | None:
    """Why a request with these Host header values is answered 400, or None. RFC 9112 §3.2:
    an HTTP/1.1 request without one, any request with more than one or with one that is not
    a host and port (``a b``, ``a/b``, ``u@h``; empty is allowed). Twisted serves them all."""
    http11 = version == b"HTTP/1.1"
    if hosts is None:
        return _ONE_HOST if http11 else None
    if len(hosts) != 1:
        return _ONE_HOST if http11 else "a request may carry one Host header only"
    if hosts[0] and not is_host(hosts[0]):
        return "the Host header is not a host"
    return None


def _can_half_close(transport: Any) -> bool:
    """True for a plain TCP or UNIX socket. A TLS transport is a wrapper that claims its
    socket's interfaces and forwards unknown attributes to it: half-closing that socket
    would cut the TLS stream under the answer."""
    return IHalfCloseableDescriptor.providedBy(transport) and not ISSLTransport.providedBy(
        transport
    )


class _Busy(Protocol):
    """Answers a connection over the per-client cap with a short 503 and closes it."""

    transport: IStreamTransport  # set by makeConnection

    def connectionMade(self) -> None:
        self.transport.write(refusal(503, "too many connections from this address"))
        self.transport.loseConnection()


class ClientLimit:
    """At most *cap* open connections per client host (0: no cap).

    Refusals are logged once per host per *log_interval* seconds, with the count since the
    last line, so a flood costs one log line, not one per connection.
    """

    def __init__(self, cap: int, seconds: Callable[[], float], log_interval: float = 60.0):
        self.cap = cap
        self._seconds = seconds
        self._log_interval = log_interval
        self._open: collections.Counter[str] = collections.Counter()
        #: host -> (time of its last log line, refusals since then)
        self._refused: dict[str, tuple[float, int]] = {}

    def admit(self, addr: IAddress) -> Callable[[], None] | None:
        """Count a new connection from *addr*: a callable to call once it closes, or None
        when *addr* is over the cap."""
        host = getattr(addr, "host", None)
        if not self.cap or not host:
            return _nothing
        if self._open[host] >= self.cap:
            self._note_refusal(host)
            return None
        self._open[host] += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._open[host] -= 1
                if self._open[host] <= 0:
                    del self._open[host]

        return release

    def busy(self) -> Protocol:
        """The protocol for a refused connection."""
        return _Busy()

    def open_connections(self, host: str) -> int:
        return self._open.get(host, 0)

    def _note_refusal(self, host: str) -> None:
        now = self._seconds()
        last, count = self._refused.get(host, (None, 0))
        count += 1
        if last is None or now - last >= self._log_interval:
            log.warn(
                "refusing connections from {host}: over max_connections_per_client ({cap}); "
                "{count} refused since the last report",
                host=host,
                cap=self.cap,
                count=count,
            )
            self._refused[host] = (now, 0)
            self._forget_quiet_hosts(now)
        else:
            self._refused[host] = (last, count)

    def _forget_quiet_hosts(self, now: float) -> None:
        stale = [h for h, (t, _) in self._refused.items() if now - t >= 2 * self._log_interval]
        for h in stale:
            del self._refused[h]


def _nothing() -> None:
    """Release of an uncounted connection."""


def read_at_accept(port: Any, reactor: Any) -> bool:
    """Make the listening *port* (a ``tcp.Port`` or ``unix.Port`` of a poll-like reactor)
    read each connection it accepts in the same reactor turn; False, leaving it as it was,
    for anything else.

    Twisted registers a new connection for reading and returns to the reactor, which finds
    the request there at its next turn (one more ``epoll_wait`` and a pass of its loop before
    the first byte of the answer). A client sends its request right after connecting, so by
    the time the connection is accepted its head is usually waiting: each connection accepted
    is read at once, as the reactor would read it (``_doReadOrWrite`` under the connection's
    log context, so an error or an end of the connection is handled as usual). One
    connection that has sent nothing yet costs one ``recv`` that finds nothing.
    """
    read = getattr(reactor, "_doReadOrWrite", None)
    poll_in = getattr(reactor, "_POLL_IN", None)
    if type(port) not in (tcp.Port, unix.Port) or read is None or poll_in is None:
        return False
    reads: Any = getattr(reactor, "_reads", ())
    make_transport, do_read = port.transport, port.doRead
    accepted: list[Any] = []

    def transport(*args: Any) -> Any:
        made = make_transport(*args)
        accepted.append(made)
        return made

    def doRead() -> Any:
        try:
            return do_read()
        finally:
            made_now = accepted[:]
            accepted.clear()
            for made in made_now:
                fd = made.fileno()
                if made.connected and not made.disconnecting and fd in reads:
                    legacy_log.callWithLogger(made, read, made, fd, poll_in)

    port.transport = transport
    port.doRead = doRead
    return True
