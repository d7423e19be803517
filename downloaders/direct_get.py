"""`DirectGetAgent`: GET requests straight to the origin over keep-alive connections, with
responses parsed by llhttp in C (``httptools``).

What it does not do, by design: any method but GET, or a request with a body (those go to the
``fallback`` agent, Twisted's own: HEAD included), proxies (the factory builds a Twisted
``ProxyAgent`` stack for a remote with a proxy, and this client is not in it), HTTP/2,
pipelining, decoding (``Content-Encoding`` is left alone: the bytes are the wire's) or
redirects, auth and cookies (the agents above it do those). Its name says the first two; the
old names (`downloaders.client`, ``Http11Agent``) still import. llhttp parses strictly, with
one leniency (a bare LF ends a line, RFC 9112 section 2.2): unlike Twisted's client it refuses
obsolete header folding, ``Content-Length`` beside ``Transfer-Encoding``, and bytes after a
204/304 (the answer is read, the connection is not reused).

Why it exists: Twisted's client parses each status and header line in Python and keeps a timer
per pooled connection; for small files that parsing is most of a download's CPU (a sync of
2000 files of 16 KiB: 0.6-0.7 s with Twisted's `Agent`, 0.3 s with this client, same file
work, one process). Responses look like Twisted's to whoever reads them (`Response`: ``code``,
``phrase``, ``headers`` without the connection control headers, ``length``, ``deliverBody``),
and failures are Twisted's exception types (``ResponseNeverReceived``, ``ResponseFailed``,
``PotentialDataLoss``), so the agents above it (redirects, auth, rate limit) and
`HttpDownloader` do not know which client answered.

One request (an `_Exchange`) on one connection (a `_Connection`), state by state::

    request(GET) --> take an idle connection of the origin (dropping closed ones and ones
        |            idle over IDLE_TIMEOUT) or connect (endpoint.connect)
        v
    SENT       the head is written; a fresh llhttp parser per exchange
        |  1xx answers are read and skipped (the real answer follows on the same parser)
        v
    HEAD       on_headers_complete: a `Response` fires the request's Deferred. Its length is
        |      Content-Length, 0 for 204/304 (RFC 9110: never a body, whatever the headers),
        |      else UNKNOWN_LENGTH: chunked, or "until close" (then never kept alive)
        v
    BODY       bytes go to the body protocol, or are buffered until `deliverBody`; trailers
        |      of a chunked body go to ``response.trailers``, never into ``headers``: they
        |      come after the body, and the headers were handed over (to
        |      ``headers_ready_callback``, to a streamer's client) before its first byte
        v
    COMPLETE   on_message_complete: the connection goes back to the pool *first* (kept alive:
        |      HTTP/1.1, no ``Connection: close``, not until-close, no stray bytes after the
        |      answer, the reader did not give up), then the body protocol hears ResponseDone
        v
    IDLE       in the pool; a byte arriving now, or a close, drops it from the pool

and the ways out before COMPLETE, each ending the connection (never back in the pool):

* closed before any byte of the answer on a *reused* connection: sent again once on a new
  connection (the server closed an idle one as we used it; GET is idempotent); otherwise
  ``ResponseNeverReceived``;
* the server's answer is not HTTP, or a head over 64 KiB or a header line over 16 KiB:
  `ResponseParseError` inside ``ResponseNeverReceived`` (before the head) or
  ``ResponseFailed`` (in the body); the connection is aborted;
* closed in the body: ``ResponseFailed``, or ``PotentialDataLoss`` for an until-close body
  closed cleanly (its normal end, as Twisted reports it);
* the reader gives up (``stopProducing``, ``loseConnection`` or ``abortConnection`` on its
  transport, as ``readBody``'s cancel does) or the request is cancelled: aborted, the reader
  hears ``ResponseFailed``;
* the body protocol raises: its exception is logged and handed back to it inside
  ``ResponseFailed`` (never as the server's fault), and the connection is aborted.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

import httptools
from twisted.internet import defer, error, protocol, tcp
from twisted.internet.interfaces import ITCPTransport
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import URI, ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IResponse
from zope.interface import implementer

from downloaders.quiet import QuietStart
from downloaders.transports import IStreamTransport
from downloaders.urls import redact_url

__all__ = ["DirectGetAgent", "ResponseParseError"]

#: Headers about the connection, not the content: not in ``response.headers`` (as Twisted).
CONNECTION_HEADERS = frozenset(
    {
        b"content-length",
        b"connection",
        b"keep-alive",
        b"te",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-connection",
    }
)
#: Bytes never sent in a request line (whitespace would split it, CR/LF end it).
_UNSAFE = re.compile(rb"[\x00-\x20\x7f]")
#: Origins whose parsed form is kept (a redirect may lead anywhere: past this, start over).
MAX_ORIGINS = 64
#: An idle connection older than this is closed instead of reused (Twisted's pool: 240 s).
IDLE_TIMEOUT = 240.0
#: Largest status line plus headers accepted (Twisted refuses header lines over 16 KiB).
MAX_HEAD_BYTES = 64 * 1024
MAX_HEADER_LINE = 16 * 1024

_log = Logger()
#: Statuses that never have a body, whatever their headers say (RFC 9110 6.4.1, as Twisted).
NO_BODY_CODES = frozenset({204, 304})


class ResponseParseError(Exception):
    """The upstream's answer is not valid HTTP/1.x (or its head is too large)."""


@implementer(IAgent)
class DirectGetAgent:
    """GET requests over pooled keep-alive connections made by *endpoint_factory* (an
    ``IAgentEndpointFactory``, so TLS is the endpoints'); other requests go to *fallback*.

    At most *max_idle* idle connections are kept per origin (scheme, host, port). A request
    that finds its reused connection closed by the server before any byte of the answer is
    sent again once, on a new connection (GET is idempotent; Twisted does the same).
    """

    def __init__(
        self,
        endpoint_factory: Any,
        fallback: IAgent,
        max_idle: int = 10,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._endpoints = endpoint_factory
        self._fallback = fallback
        self._max_idle = max_idle
        self._clock = clock
        self._idle: dict[tuple[bytes, bytes, int], list[_Connection]] = {}
        self._origins: dict[bytes, tuple[tuple[bytes, bytes, int], Any, bytes]] = {}

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: Any = None,
    ) -> defer.Deferred[IResponse]:
        if method != b"GET" or bodyProducer is not None:
            return self._fallback.request(method, uri, headers, bodyProducer)
        try:
            origin, target = _split_target(uri)
            known = self._origins.get(origin)
            if known is None:
                known = self._origin(origin)
            key, endpoint, host = known
            head = _request_head(target, host, headers)
        except Exception:
            return defer.fail()
        return _Exchange(self, key, endpoint, head).start()

    def _origin(self, origin: bytes) -> tuple[tuple[bytes, bytes, int], Any, bytes]:
        """Key, endpoint and Host header of an origin (``scheme://netloc``), parsed once: a
        full url parse per request cost as much as the rest of sending it."""
        parsed = URI.fromBytes(origin + b"/")
        key = (parsed.scheme, parsed.host, parsed.port)
        known = (key, self._endpoints.endpointForURI(parsed), origin.split(b"://", 1)[1])
        if len(self._origins) >= MAX_ORIGINS:  # redirects may lead anywhere
            self._origins.clear()
        self._origins[origin] = known
        return known

    def idle_count(self) -> int:
        """How many idle connections are kept."""
        return sum(len(connections) for connections in self._idle.values())

    def close_idle(self) -> defer.Deferred[None]:
        """Close the idle connections; fires once they are closed."""
        closing = []
        for connections in self._idle.values():
            for connection in connections:
                closing.append(connection.lost)
                connection.transport.loseConnection()
        self._idle.clear()
        return defer.gatherResults(closing).addCallback(lambda _: None)

    def _take(self, key: tuple[bytes, bytes, int]) -> _Connection | None:
        connections = self._idle.get(key)
        while connections:
            connection = connections.pop()
            if not connection.usable():
                continue
            if self._clock() - connection.idle_since > IDLE_TIMEOUT:
                connection.transport.loseConnection()  # likely closed at the other end soon
                continue
            return connection
        return None

    def _put(self, key: tuple[bytes, bytes, int], connection: _Connection) -> None:
        connections = self._idle.setdefault(key, [])
        if len(connections) < self._max_idle and connection.usable():
            connection.idle_in = connections
            connection.idle_since = self._clock()
            connections.append(connection)
        else:
            connection.transport.loseConnection()


def _split_target(uri: bytes) -> tuple[bytes, bytes]:
    """``(scheme://netloc, path?query)`` of an absolute url, the fragment dropped."""
    start = uri.index(b"://") + 3
    end = len(uri)
    for mark in (b"/", b"?", b"#"):
        found = uri.find(mark, start, end)
        if found >= 0:
            end = found
    origin, target = uri[:end], uri[end:].partition(b"#")[0]
    if not target.startswith(b"/"):
        target = b"/" + target
    if end == start or b"@" in origin or _UNSAFE.search(target):
        raise ValueError(f"not a url this client sends: {redact_url(uri.decode('latin-1'))}")
    return origin, target


def _request_head(target: bytes, host: bytes, headers: Headers | None) -> bytes:
    lines = [b"GET " + target + b" HTTP/1.1", b"Host: " + host]
    if headers is not None:
        for name, values in headers.getAllRawHeaders():
            if name.lower() == b"host":
                continue
            lines.extend(name + b": " + value for value in values)
    lines.append(b"\r\n")
    return b"\r\n".join(lines)


class _Exchange:
    """One request: a connection (reused or new), the head sent, the answer parsed."""

    def __init__(
        self, agent: DirectGetAgent, key: tuple[bytes, bytes, int], endpoint: Any, head: bytes
    ) -> None:
        self.agent = agent
        self.key = key
        self.endpoint = endpoint
        self.head = head
        self.done: defer.Deferred[IResponse] = defer.Deferred(self._cancel)
        self.connection: _Connection | None = None
        self.connecting: defer.Deferred[Any] | None = None
        self.response: Response | None = None
        self.retried = False

    def start(self) -> defer.Deferred[IResponse]:
        connection = self.agent._take(self.key)
        if connection is not None:
            self._send(connection, reused=True)
        else:
            self._connect()
        return self.done

    def _connect(self) -> None:
        self.connecting = self.endpoint.connect(_Factory())
        self.connecting.addCallbacks(self._connected, self._connect_failed)

    def _connected(self, connection: _Connection) -> None:
        self.connecting = None
        self._send(connection, reused=False)

    def _connect_failed(self, failure: Failure) -> None:
        self.connecting = None
        if not self.done.called:
            self.done.errback(failure)

    def _send(self, connection: _Connection, reused: bool) -> None:
        self.connection = connection
        self.reused = reused
        connection.begin(self)
        connection.send(self.head)

    def _cancel(self, _: defer.Deferred[IResponse]) -> None:
        if self.connecting is not None:
            self.connecting.cancel()
        elif self.connection is not None:
            self.connection.transport.abortConnection()

    # Called by the connection -------------------------------------------------------------

    def head_received(self, response: Response) -> None:
        self.response = response
        if not self.done.called:
            self.done.callback(response)
        else:  # cancelled meanwhile: nobody reads this body
            response.deliverBody(_Ignore())

    def finished(self, keep_alive: bool) -> None:
        """The whole answer arrived: the connection goes back to the pool first, so a request
        made from the body's end (the next file) can reuse it."""
        connection, self.connection = self.connection, None
        response = self.response
        assert response is not None
        if connection is not None:
            connection.end()
            if keep_alive and not response.aborted:
                self.agent._put(self.key, connection)
            else:
                connection.transport.loseConnection()
        response._end(Failure(ResponseDone("Response body fully received")))

    def lost(self, reason: Failure, received_any: bool) -> None:
        """The connection ended before the answer was complete."""
        self.connection = None
        if self.response is not None:
            self.response._lost(reason)
            return
        if self.reused and not received_any and not self.retried and not self.done.called:
            self.retried = True  # the server closed an idle connection as we used it
            self._connect()
            return
        if not self.done.called:
            self.done.errback(ResponseNeverReceived([reason]))


class _Connection(protocol.Protocol):
    """One keep-alive connection; parses the answer of its current `_Exchange`."""

    transport: IStreamTransport  # set by makeConnection

    def __init__(self) -> None:
        self.exchange: _Exchange | None = None
        self.idle_in: list[_Connection] | None = None
        self.idle_since = 0.0
        self.lost: defer.Deferred[None] = defer.Deferred()
        self._closed = False

    def connectionMade(self) -> None:
        # A request is one small write: never hold it back for an ACK (Nagle), as Twisted's
        # own client does not either.
        if ITCPTransport.providedBy(self.transport):
            self.transport.setTcpNoDelay(True)

    def usable(self) -> bool:
        return not self._closed and self.transport is not None and not self.transport.disconnecting

    def send(self, data: bytes) -> None:
        """Write a request head: on a plain TCP connection with nothing queued, at once with
        one ``send``; otherwise (TLS, a partial send, an error) through the transport.

        A request is one small write. Given to the transport, it waits for the reactor's
        next turn, with two ``epoll_ctl`` calls to ask for and drop writability around its
        ``send``: per small file, a syscall pair and a turn of Python for nothing."""
        transport: Any = self.transport
        if (
            type(transport) is tcp.Client
            and transport.connected
            and not transport.disconnecting
            and not transport.dataBuffer
            and not transport._tempDataBuffer
        ):
            try:
                sent = transport.socket.send(data)
            except OSError:  # EAGAIN, or an error the transport reports as it writes
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
        transport.write(data)

    def begin(self, exchange: _Exchange) -> None:
        self.idle_in = None
        self.exchange = exchange
        self.parser = httptools.HttpResponseParser(self)
        # A bare LF ends a line too (RFC 9112 section 2.2 lets a recipient accept it, and
        # Twisted's client does): old servers and scripts still send them.
        self.parser.set_dangerous_leniencies(lenient_optional_cr_before_lf=True)
        self.head_bytes = 0
        self.received_any = False
        self.completed = False
        self.keep_alive = False
        self._new_message()

    def _new_message(self) -> None:
        self.head_size = 0
        self.skipping = False
        self.phrase = b""
        self.headers = Headers()
        self.length: Any = UNKNOWN_LENGTH
        self.chunked = False
        self.close_asked = False
        self.until_close = False
        self.in_trailers = False
        #: Body bytes still to come of a Content-Length body (not chunked, not a 1xx).
        self.body_left = 0

    def end(self) -> None:
        self.exchange = None

    def dataReceived(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:  # bytes nobody asked for: the connection is not safe to reuse
            self.transport.loseConnection()
            return
        self.received_any = True
        if self.body_left:
            self._body_bytes(exchange, data)
            return
        if exchange.response is None:  # still in the head: bound what may be buffered
            if self.head_bytes > MAX_HEAD_BYTES:
                self._bad(ResponseParseError("response head too large"))
                return
            self.head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, _BodyProtocolRaised):
                return  # the body's reader failed, not the server: reported to it already
            if not self.completed:
                ours = exc.__context__  # a limit of ours, raised from a callback: its words
                if not isinstance(ours, ResponseParseError):
                    ours = ResponseParseError(f"invalid HTTP response: {exc}")
                self._bad(ours)
                return
            self.keep_alive = False  # bytes after the answer: not safe to reuse
        if self.completed:
            self.completed = False
            exchange.finished(self.keep_alive)

    def _body_bytes(self, exchange: _Exchange, data: bytes) -> None:
        """The rest of a body of known length, past the packet that ended the head: handed
        over as received, without llhttp (whose ``on_body`` would copy every byte)."""
        left = self.body_left
        if len(data) > left:  # bytes after the answer: not safe to reuse
            self.keep_alive = False
            data = data[:left]
        self.body_left = left - len(data)
        assert exchange.response is not None
        if not exchange.response._data(data):
            return  # the body's reader failed: the connection is being aborted
        if not self.body_left:
            exchange.finished(self.keep_alive)

    def _bad(self, exc: Exception) -> None:
        self.parse_failure = Failure(exc)
        self.transport.abortConnection()

    # httptools callbacks -------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.completed:  # a second answer to one request
            raise ResponseParseError("unexpected bytes after the response")

    def on_status(self, status: bytes) -> None:
        self.phrase = status

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_size += len(name) + len(value) + 4
        if len(name) + len(value) > MAX_HEADER_LINE or self.head_size > MAX_HEAD_BYTES:
            raise ResponseParseError("response header too large")
        if self.in_trailers:
            assert self.exchange is not None and self.exchange.response is not None
            self.exchange.response.trailers.addRawHeader(name, value)
            return
        lower = name.lower()
        if lower in CONNECTION_HEADERS:
            if lower == b"content-length":
                try:
                    self.length = int(value)
                except ValueError:
                    raise ResponseParseError("invalid Content-Length") from None
            elif lower == b"transfer-encoding" and b"chunked" in value.lower():
                self.chunked = True
            elif lower == b"connection" and b"close" in value.lower():
                self.close_asked = True
            return
        self.headers.addRawHeader(name, value)

    def on_headers_complete(self) -> None:
        code = self.parser.get_status_code()
        if 100 <= code < 200:  # informational: the real answer follows
            self.skipping = True
            return
        if code in NO_BODY_CODES:  # llhttp ends these after the head; so does the answer
            self.length = 0
            self.chunked = False
        elif self.chunked:
            self.length = UNKNOWN_LENGTH
        self.until_close = self.length is UNKNOWN_LENGTH and not self.chunked
        self.in_trailers = True  # any header from now on is a trailer of a chunked body
        version = self.parser.get_http_version()
        response = Response(
            version=(b"HTTP", int(version[0]), int(version[2])),
            code=code,
            phrase=self.phrase,
            headers=self.headers,
            length=self.length,
            transport=self.transport,
        )
        self.keep_alive = version == "1.1" and not self.close_asked and not self.until_close
        if isinstance(self.length, int) and not self.chunked:
            self.body_left = self.length
        assert self.exchange is not None
        self.exchange.head_received(response)

    def on_body(self, body: bytes) -> None:
        if self.skipping or not body:
            return
        if self.body_left:  # (a Content-Length body: llhttp never passes more than that)
            self.body_left -= len(body)
        assert self.exchange is not None and self.exchange.response is not None
        if not self.exchange.response._data(body):
            raise _BodyProtocolRaised()  # stop parsing: the connection is being aborted

    def on_message_complete(self) -> None:
        if self.skipping:  # after a 1xx the real answer follows on the same parser
            self._new_message()
        else:
            self.completed = True  # finished in `dataReceived`, once the parser returned

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self._closed = True
        if self.idle_in is not None and self in self.idle_in:
            self.idle_in.remove(self)
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            parse_failure = getattr(self, "parse_failure", None)
            if (
                parse_failure is None
                and exchange.response is not None
                and getattr(self, "until_close", False)
                and not exchange.response.aborted
                and reason.check(error.ConnectionDone)
            ):
                exchange.response._end(Failure(PotentialDataLoss()))
            else:
                exchange.lost(parse_failure or reason, self.received_any)
        self.lost.callback(None)


class _BodyProtocolRaised(Exception):
    """Raised to llhttp from ``on_body`` to stop parsing after the body protocol raised."""


class _Factory(QuietStart, protocol.Factory):
    protocol = _Connection


class _Ignore(protocol.Protocol):
    transport: IStreamTransport  # set by makeConnection

    def connectionMade(self) -> None:
        self.transport.stopProducing()


class _BodyTransport:
    """What a body protocol gets as ``transport``: flow control and abort over the
    connection (``transport`` is the connection's own, for code that tunes its reads)."""

    def __init__(self, response: Response, transport: Any) -> None:
        self.response = response
        self.transport = transport

    def pauseProducing(self) -> None:
        if not self.response.ended:  # (an ended response's connection may serve another)
            self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        if not self.response.ended:
            self.transport.resumeProducing()

    def stopProducing(self) -> None:
        """Give up the rest of the body: the connection cannot be reused, so it is aborted."""
        self.abortConnection()

    def loseConnection(self) -> None:
        """Give up the rest of the body and close the connection (nothing is left to write:
        the request was sent, so this is an abort too). Once the body ended: nothing."""
        self.abortConnection()

    def abortConnection(self) -> None:
        """Give up the rest of the body (``readBody``'s cancel): the body protocol hears
        ``ResponseFailed``. Once the body ended the connection is not its own: nothing."""
        if not self.response.ended:
            self.response.aborted = True
            self.transport.abortConnection()


@implementer(IResponse)
class Response:
    """A response as Twisted's agent gives it; the body is buffered until `deliverBody`."""

    request = None
    previousResponse = None

    def __init__(
        self,
        version: tuple[bytes, int, int],
        code: int,
        phrase: bytes,
        headers: Headers,
        length: Any,
        transport: Any,
    ) -> None:
        self.version = version
        self.code = code
        self.phrase = phrase
        self.headers = headers
        self.length = length
        self._transport = transport
        self._protocol: protocol.Protocol | None = None
        self._buffer: list[bytes] = []
        self._ending: Failure | None = None
        #: Trailer fields of a chunked body, filled in before the body protocol hears the end
        #: (never merged into ``headers``, which the caller had in hand already).
        self.trailers = Headers()
        self.ended = False
        self.aborted = False
        self._delivered = False

    def setPreviousResponse(self, response: IResponse) -> None:
        self.previousResponse = response

    def deliverBody(self, protocol: protocol.Protocol) -> None:
        if self._protocol is not None or self._delivered:
            raise RuntimeError("the body of this response was delivered already")
        self._protocol = protocol
        self._delivered = True
        protocol.makeConnection(_BodyTransport(self, self._transport))
        buffered, self._buffer = self._buffer, []
        for data in buffered:
            if not self._data(data):
                return
        if self._ending is not None:
            ending, self._ending = self._ending, None
            self._protocol = None
            _tell_end(protocol, ending)

    def _data(self, data: bytes) -> bool:
        """Hand *data* to the body protocol (or buffer it); False if the protocol raised."""
        body = self._protocol
        if body is None:
            self._buffer.append(data)
            return True
        try:
            body.dataReceived(data)
        except Exception:
            self._raised(body, Failure())
            return False
        return True

    def _raised(self, body: protocol.Protocol, failure: Failure) -> None:
        """The body protocol raised: the reader's fault, not the server's. The protocol hears
        ``ResponseFailed`` carrying its own exception, the exception is logged, and the
        connection (its answer not read to the end) is aborted, never reused."""
        _log.failure("the body protocol {body!r} raised; connection aborted", failure, body=body)
        self._protocol = None
        self._ending = None
        if not self.ended:
            self.ended = True
            self.aborted = True
            self._transport.abortConnection()
        _tell_end(body, Failure(ResponseFailed([failure])))

    def _end(self, reason: Failure) -> None:
        if self.ended:
            return
        self.ended = True
        if self._protocol is None:
            self._ending = reason
        else:  # (and no cycle through the body protocol keeps it alive after)
            body, self._protocol = self._protocol, None
            _tell_end(body, reason)

    def _lost(self, reason: Failure) -> None:
        self._end(Failure(ResponseFailed([reason])))


def _tell_end(body: protocol.Protocol, reason: Failure) -> None:
    """``body.connectionLost(reason)``; what it raises is logged (the answer is over either way,
    and the connection under it may be serving the next request already)."""
    try:
        body.connectionLost(reason)
    except Exception:
        _log.failure("the body protocol {body!r} raised in connectionLost", body=body)
