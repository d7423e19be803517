"""HttpDownloader: one url over HTTP(S) through an ``IAgent``, streamed into `handle_data`.

The agent is the caller's ``session`` (a `DownloaderFactory`'s stack: its GETs go through
`downloaders.direct_get.DirectGetAgent`, the rest and anything proxied through
``twisted.web.client``) or, without one, a Twisted ``Agent`` of our own behind a
`RedirectingAgent` (through a ``ProxyingAgent`` when ``proxy`` is given). The body is
delivered chunk by chunk through ``IResponse.deliverBody`` into our own protocol, never
buffered whole. No agent here decodes content (none is a ``ContentDecoderAgent``) and we do
not ask for compression, so the bytes stored are the bytes on the wire: a ``.gz`` served with
``Content-Encoding: gzip`` keeps its published sha256.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping
from typing import Any

from twisted.internet import defer, error, tcp
from twisted.internet.interfaces import IDelayedCall, IReactorTCP
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IResponse

from downloaders import errors
from downloaders.addresses import InternalAddressRefused
from downloaders.base import DONE, BaseDownloader, credentials
from downloaders.bodies import discard_body
from downloaders.quiet import quiet_pool
from downloaders.redirects import RedirectingAgent
from downloaders.retry import parse_retry_after
from downloaders.settings import SENSITIVE_HEADERS
from downloaders.urls import origin

METHODS = ("GET", "HEAD")

#: Error bodies (status >= 400) up to this size are read and dropped, so the connection can
#: go back to the pool; bigger ones cost the connection instead of the bandwidth.
ERROR_BODY_LIMIT = 64 * 1024

_shared_pool: HTTPConnectionPool | None = None


def default_pool(reactor: Any) -> HTTPConnectionPool:
    """The persistent pool shared by downloaders built without an agent on the global reactor
    (a script's downloads reuse connections); any other reactor gets a pool of its own."""
    global _shared_pool
    from twisted.internet import reactor as global_reactor

    if reactor is not global_reactor:
        return quiet_pool(reactor)
    if _shared_pool is None:
        _shared_pool = quiet_pool(reactor)
    return _shared_pool


class HttpDownloader(BaseDownloader):
    """Download an ``http://`` or ``https://`` url with GET (or HEAD).

    The positional parameters are Pulp's: ``url, session, auth, proxy, proxy_auth,
    headers_ready_callback, headers, throttler, max_retries``; `BaseDownloader`'s
    (``expected_digests``, ``expected_size``, ``semaphore``, ...) are keywords here.

    :param session: the ``IAgent`` that sends the request and shares connections (the
        factory's agent stack carries TLS, proxy, redirects, credentials and the remote's
        pool; ``factory.agent``). None: an ``Agent`` following redirects, on a persistent pool
        shared by such downloaders. The response that reaches us is final: a 3xx is an
        `HttpError`. ``agent=`` is the older name of this parameter.
    :param auth: ``(user, password)`` for Basic auth (or anything with ``login`` and
        ``password``, as ``aiohttp.BasicAuth``); sent to the url's origin only, never to a
        redirect target elsewhere.
    :param proxy: an ``http://host:port`` proxy url for this download (https goes through a
        CONNECT tunnel); it has its own agent, so ``session`` is then not used.
    :param proxy_auth: ``(user, password)`` for the proxy (or its url's userinfo).
    :param headers_ready_callback: called once with the response headers, a dict of
        ``name -> value`` (case-insensitive: `ResponseHeaders`).
    :param headers: extra request headers, ``{name: value}``.
    :param throttler: anything with ``acquire()`` (a Deferred, a coroutine or None) and
        ``release()``: acquired before each request, released when the attempt ends (the
        factory's `RateLimiter` for a remote's ``rate_limit`` is one).
    :param max_retries: further attempts after a retryable failure (429, 5xx, connection
        errors, timeouts). Default 3.
    :param method: ``"GET"``, or ``"HEAD"`` for headers only (no body, no validation).
    :param connect_timeout: seconds to establish the connection (only for an agent of the
        downloader's own; the factory's agent carries the remote's). Default 60.
    :param sock_read_timeout: seconds without any byte (headers or body) before giving up with
        ``DownloadTimeout(kind="read")``; 0 disables it. Default 60. It measures idle time, so
        a long healthy download (hours, at any speed above one byte a minute) is never cut,
        while a dead or stalled upstream is caught within a minute.
    :param total_timeout: seconds for a whole attempt (``kind="total"``). Default 0: no limit,
        because no single figure fits both a 1 KiB file and a 10 GiB one; set it per remote
        when a bound on the whole transfer matters more than finishing.

    Each timeout is per attempt; a `DownloadTimeout` is retried like a connection error.

    Credentials in the url's userinfo become a Basic ``Authorization`` header unless ``auth``
    or an ``Authorization`` header is given; they never appear in the request line, results or
    error messages.
    """

    def __init__(
        self,
        url: str,
        session: IAgent | None = None,
        auth: Any = None,
        proxy: str | None = None,
        proxy_auth: Any = None,
        headers_ready_callback: Any = None,
        headers: Mapping[str, str] | None = None,
        throttler: Any = None,
        max_retries: int = 3,
        *,
        agent: IAgent | None = None,
        mirror_source: Any = None,
        method: str = "GET",
        connect_timeout: float = 60.0,
        sock_read_timeout: float = 60.0,
        total_timeout: float = 0.0,
        **kwargs: Any,
    ) -> None:
        # (an agent, the usual session, has ``request``: no need to ask if it is a Mapping)
        if (auth is not None or proxy is not None or not hasattr(session, "request")) and (
            _old_positional_order(session, auth, proxy)
        ):
            # HttpDownloader(url, expected_digests, expected_size, semaphore): the order before
            # Pulp's; still understood.
            for name, value in zip(
                ("expected_digests", "expected_size", "semaphore"),
                (session, auth, proxy),
                strict=True,
            ):
                if value is not None:
                    kwargs.setdefault(name, value)
            session = auth = proxy = None
        super().__init__(
            url,
            headers_ready_callback=headers_ready_callback,
            max_retries=max_retries,
            **kwargs,
        )
        method = method.upper()
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
        if None in (connect_timeout, sock_read_timeout, total_timeout) or (
            min(connect_timeout, sock_read_timeout, total_timeout) < 0
        ):
            for name, value in (
                ("connect_timeout", connect_timeout),
                ("sock_read_timeout", sock_read_timeout),
                ("total_timeout", total_timeout),
            ):
                if value is None or value < 0:
                    raise ValueError(f"{name} must be >= 0, not {value!r}")
        self.method = method
        self.request_headers = dict(headers or {})
        self.connect_timeout = connect_timeout
        self.sock_read_timeout = sock_read_timeout
        self.total_timeout = total_timeout
        #: ``(user, password)`` sent as Basic auth to the url's origin, or None.
        self.auth = None if auth is None else credentials(auth, "auth")
        self.proxy = proxy or None
        self.proxy_auth = None if proxy_auth is None else credentials(proxy_auth, "proxy_auth")
        self.throttler = throttler
        #: Where to go after this url failed (the factory's `MirrorList` for a remote with a
        #: ``mirror_list``): anything with ``alternatives(url)`` firing with urls to try.
        self.mirror_source = mirror_source
        #: The url the bytes came from (a mirror's, after a failover).
        self.served_from = self.url
        if session is None:
            session = agent
        if self.proxy is not None:
            session = self._proxy_agent()
        elif session is None:
            session = self._default_agent()
        #: The ``IAgent`` requests go through (``agent`` is the same object).
        self.session = self.agent = session
        #: The last response (status in ``.code``), None before the first one.
        self.response: IResponse | None = None

    def _proxy_agent(self) -> IAgent:
        from twisted.web.client import BrowserLikePolicyForHTTPS

        from downloaders.proxy import ProxyingAgent

        assert self.proxy  # called only for a remote with a proxy
        reactor = self._connecting_reactor()
        login = self.proxy_auth or _userinfo_credentials(self.proxy)
        proxying = ProxyingAgent(
            reactor,
            self.proxy,
            BrowserLikePolicyForHTTPS(),
            default_pool(reactor),
            credentials=login,
            connect_timeout=self.connect_timeout or None,
        )
        return RedirectingAgent(proxying)

    def _connecting_reactor(self) -> Any:
        reactor = self.reactor
        if not IReactorTCP.providedBy(reactor):
            # A test Clock drives our timers; connections still need the real reactor.
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        return reactor

    def raise_for_status(self, response: IResponse) -> None:
        """Raise the `HttpError` (`NotFound`, `NotAuthorized`, ...) of a status >= 400. A
        subclass may return instead, for statuses whose body it wants as the content."""
        if response.code >= 400:
            raise errors.http_error(
                self.url,
                response.code,
                _text(response.phrase),
                response.headers,
                _retry_after(response.headers),
            )

    def _default_agent(self) -> IAgent:
        reactor = self._connecting_reactor()
        agent = Agent(
            reactor, connectTimeout=self.connect_timeout or None, pool=default_pool(reactor)
        )
        return RedirectingAgent(agent)

    def _headers(self, url: str | None = None) -> Headers:
        elsewhere = url is not None and url != self.url and origin(url) != origin(self.url)
        headers = Headers()
        for name, value in self.request_headers.items():
            if elsewhere and name.lower() in SENSITIVE_HEADERS:
                continue  # a mirror on another origin (a mirror list's word) gets no secrets
            headers.addRawHeader(name, value)
        login = None if elsewhere else self.auth or self.url_credentials
        if login is not None and not headers.hasHeader(b"authorization"):
            user, password = login
            token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
            headers.addRawHeader(b"authorization", f"Basic {token}".encode("ascii"))
        return headers

    def _run(self, extra_data: Any = None) -> defer.Deferred[None]:
        """One attempt: request, check the status, report headers, stream the body; then, if
        that failed before any byte was handed over, each mirror of the ``mirror_source``."""
        if self.mirror_source is None:
            return _Attempt(self, self.url).start()
        return self._run_with_mirrors()

    @defer.inlineCallbacks
    def _run_with_mirrors(self) -> Any:
        try:
            yield _Attempt(self, self.url).start()
            return
        except errors.DownloadError as error:
            if not self._can_start_over():
                raise
            first = error
        try:
            urls = yield self.mirror_source.alternatives(self.url)
        except Exception:
            raise first from None  # no list now: the download's own error (asked again later)
        for url in urls:
            self._discard()
            self._start_attempt()
            try:
                yield _Attempt(self, url).start()
            except errors.DownloadError:
                if not self._can_start_over():
                    raise
                continue
            self.served_from = url
            return
        raise first

    def finalize(self) -> Any:
        """HEAD fetches no body: no file to keep and nothing to validate."""
        if self.method != "HEAD":
            return super().finalize()
        return DONE

    @property
    def artifact_attributes(self) -> dict[str, Any]:
        if self.method == "HEAD":
            return {"size": 0}
        return super().artifact_attributes


class _ReadDeadlines:
    """The read-idle deadlines of one clock's running attempts, behind one timer.

    A timer per attempt (``callLater``, a ``reset`` per chunk, ``cancel``) cost more than the
    rest of a small download's timing; here an attempt's deadline is a number, moved by each
    byte, and the clock holds one call, due at the soonest deadline it knew of. When it comes,
    the attempts past their deadline time out and it is set again for the soonest left: each
    times out exactly when its own timer would have. Without running attempts nothing is
    pending on the clock (a keeper leaves `_keepers` once it is empty).
    """

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        #: Attempt -> its deadline (clock seconds).
        self.deadlines: dict[_Attempt, float] = {}
        self.call: IDelayedCall | None = None
        #: When ``call`` is due (its clock's float sum may differ from this by a rounding).
        self.when = 0.0

    @staticmethod
    def watch(attempt: _Attempt, clock: Any, seconds: float) -> _ReadDeadlines:
        """Start *attempt*'s deadline, *seconds* from now on *clock*; its keeper."""
        keeper = _keepers.get(clock)
        if keeper is None:
            keeper = _keepers[clock] = _ReadDeadlines(clock)
        deadline = clock.seconds() + seconds
        keeper.deadlines[attempt] = deadline
        if keeper.call is None or deadline < keeper.when:
            keeper._schedule(deadline)
        return keeper

    def touch(self, attempt: _Attempt, seconds: float) -> None:
        """Bytes arrived: *attempt*'s deadline is *seconds* from now."""
        self.deadlines[attempt] = self.clock.seconds() + seconds

    def forget(self, attempt: _Attempt) -> None:
        """*attempt* ended: no deadline any more."""
        deadlines = self.deadlines
        deadlines.pop(attempt, None)
        if not deadlines:
            if self.call is not None:
                self.call.cancel()
                self.call = None
            if _keepers.get(self.clock) is self:
                del _keepers[self.clock]

    def _schedule(self, when: float) -> None:
        if self.call is not None:
            self.call.cancel()
        now = self.clock.seconds()
        delay = max(0.0, when - now)
        if now + delay > when:  # due at *when* at the latest, never a rounding after it
            delay = math.nextafter(delay, 0.0)
        self.when = when
        self.call = self.clock.callLater(delay, self._due)

    def _due(self) -> None:
        self.call = None
        now = max(self.clock.seconds(), self.when)
        late = [attempt for attempt, deadline in self.deadlines.items() if deadline <= now]
        for attempt in late:
            attempt._timed_out("read")  # (which forgets it)
        if self.deadlines and self.call is None:
            self._schedule(min(self.deadlines.values()))


#: The keeper of each clock that has running attempts with a read timeout.
_keepers: dict[Any, _ReadDeadlines] = {}


class _Attempt:
    """The state of one request: its timers, what is in flight, and how it ended.

    ``done`` fires exactly once: with None after the whole body went through `handle_data`,
    or with a `DownloadError`. Whatever ends it first (error, timeout, cancellation) also
    aborts what is still in flight, so no connection outlives the attempt.
    """

    def __init__(self, downloader: HttpDownloader, url: str) -> None:
        self.downloader = downloader
        self.url = url
        self.done: defer.Deferred[None] = defer.Deferred(self._cancelled)
        self.finished = False
        self.received = 0
        self._request: defer.Deferred[IResponse] | None = None
        self._body_transport: Any = None
        self._response: IResponse | None = None
        self._idle: _ReadDeadlines | None = None
        self._total: IDelayedCall | None = None
        self._throttled = False

    def start(self) -> defer.Deferred[None]:
        throttler = self.downloader.throttler
        if throttler is None:
            self._send()
            return self.done
        # Wait for the throttler before the timers start: waiting for our turn is not idle.
        self._request = defer.maybeDeferred(throttler.acquire)
        self._request.addCallbacks(self._acquired, self._request_failed)
        return self.done

    def _acquired(self, _: Any) -> None:
        self._request = None
        if self.finished:
            self.downloader.throttler.release()
            return
        self._throttled = True
        self._send()

    def _send(self) -> None:
        dl = self.downloader
        clock = dl.reactor
        if dl.total_timeout:
            self._total = clock.callLater(dl.total_timeout, self._timed_out, "total")
        if dl.sock_read_timeout:
            self._idle = _ReadDeadlines.watch(self, clock, dl.sock_read_timeout)
        try:
            self._request = dl.agent.request(
                dl.method.encode("ascii"), self.url.encode("utf-8"), dl._headers(self.url), None
            )
        except Exception as exc:
            self.fail(_wrap(self.url, exc))
            return
        self._request.addCallbacks(self._got_response, self._request_failed)

    # Events --------------------------------------------------------------------------------

    def _got_response(self, response: IResponse) -> None:
        self._request = None
        self._response = response
        if self.finished:
            discard_body(response, abort=True)
            return
        self._touch()
        dl = self.downloader
        dl.response = response
        failure = self._status_error(response) if response.code >= 300 else None
        if failure is not None:
            # ``length`` is an int, or Twisted's UNKNOWN_LENGTH (a string: chunked or
            # close-delimited), which the receiver bounds by ERROR_BODY_LIMIT as it reads.
            if isinstance(response.length, int) and response.length > ERROR_BODY_LIMIT:
                discard_body(response, abort=True)
                self.fail(failure)
            else:
                response.deliverBody(_Receiver(self, discard_then=failure))
            return
        try:
            dl.headers_ready(_end_to_end_headers(response))
        except Exception as exc:
            discard_body(response, abort=True)
            self.fail(exc)
            return
        response.deliverBody(_Receiver(self))

    def _status_error(self, response: IResponse) -> BaseException | None:
        """The error a status >= 300 ends the attempt with; None when the downloader's
        `raise_for_status` lets it through (its body is then the content)."""
        if response.code < 400:  # a redirect here was not followed: it is not the content
            return errors.http_error(
                self.url,
                response.code,
                _text(response.phrase),
                response.headers,
                _retry_after(response.headers),
            )
        try:
            self.downloader.raise_for_status(response)
        except Exception as exc:
            return exc
        return None

    def _request_failed(self, failure: Failure) -> None:
        self._request = None
        if not self.finished:
            self.fail(_translate(self.url, failure, self.downloader.connect_timeout))

    def data(self, data: bytes, discard: bool) -> None:
        if self.finished:
            return
        self._touch()
        self.received += len(data)
        if discard:
            if self.received > ERROR_BODY_LIMIT:
                self._abort_body()
            return
        try:
            self.downloader.handle_data(data)
        except Exception as exc:
            self.fail(exc)

    def body_ended(self, reason: Failure, discard_then: BaseException | None) -> None:
        self._body_transport = None
        if self.finished:
            return
        if discard_then is not None:
            self.fail(discard_then)
        elif isinstance(reason.value, (ResponseDone, PotentialDataLoss)):
            # PotentialDataLoss: no Content-Length and not chunked, so the body ends at the
            # close (valid HTTP); expected size and digests still catch a short one.
            self._finish()
            self.done.callback(None)
        else:
            self.fail(self._truncated(reason))

    def _timed_out(self, kind: str) -> None:
        if kind == "read":
            seconds = self.downloader.sock_read_timeout
        else:
            self._total = None
            seconds = self.downloader.total_timeout
        self.fail(errors.DownloadTimeout(self.url, kind, seconds))

    def _cancelled(self, _: defer.Deferred[None]) -> None:
        """Canceller of ``done``: abort; Deferred then fails ``done`` with CancelledError."""
        self._finish()

    # Ending --------------------------------------------------------------------------------

    def fail(self, exc: BaseException) -> None:
        if self.finished:
            return
        self._finish()
        self.done.errback(Failure(exc))

    def _finish(self) -> None:
        """Mark the attempt over: stop the timers and abort whatever is still in flight."""
        self.finished = True
        if self._idle is not None:
            self._idle.forget(self)
            self._idle = None
        if self._total is not None:
            if self._total.active():
                self._total.cancel()
            self._total = None
        if self._request is not None:
            request, self._request = self._request, None
            request.cancel()
        self._abort_body()
        if self._throttled:
            self._throttled = False
            self.downloader.throttler.release()

    def _abort_body(self) -> None:
        transport, self._body_transport = self._body_transport, None
        if transport is not None:
            transport.stopProducing()

    def _touch(self) -> None:
        if self._idle is not None:
            self._idle.touch(self, self.downloader.sock_read_timeout)

    def _truncated(self, reason: Failure) -> errors.DownloadError:
        expected = getattr(self._response, "length", None)
        of = f" of {expected}" if isinstance(expected, int) else ""
        return errors.TruncatedBody(
            self.url,
            f"body truncated after {self.received}{of} bytes: {_describe_failure(reason)}",
        )


class _Receiver(Protocol):
    """Passes body chunks to the attempt; with ``discard_then``, drops them (error bodies)."""

    def __init__(self, attempt: _Attempt, discard_then: BaseException | None = None) -> None:
        self.attempt = attempt
        self.discard_then = discard_then
        self._widened: tuple[tcp.Connection, int] | None = None
        #: Body chunks to receive before reads widen (None: they never do).
        self._narrow: int | None = None

    def connectionMade(self) -> None:
        self.attempt._body_transport = self.transport
        length = getattr(self.attempt._response, "length", UNKNOWN_LENGTH)
        if not isinstance(length, int) or length > tcp.Connection.bufferSize:
            self._narrow = NARROW_CHUNKS
        if self.attempt.finished:
            self.attempt._abort_body()

    def dataReceived(self, data: bytes) -> None:
        if self._narrow is not None:
            self._narrow -= 1
            if self._narrow <= 0:
                self._narrow = None
                self._widened = widen_reads(self.transport)
        self.attempt.data(data, self.discard_then is not None)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._widened is not None:  # the pooled connection's next response may be small
            connection, size = self._widened
            connection.bufferSize = size
        self.attempt.body_ended(reason, self.discard_then)


#: Bytes read from an upstream socket at once for a large body. Twisted reads 64 KiB per turn
#: of the reactor; a body of 1 GiB would take 16,384 turns through the HTTP parser, the
#: digests and the writer. 1 MiB reads make that 1,024 (no more memory per chunk than one
#: read). Bodies that fit in Twisted's 64 KiB keep it: each read allocates its full size
#: first, and a 1 MiB ``recv`` costs about 7 times a 64 KiB one (35 against 5 µs here).
READ_SIZE = 1 << 20
#: Body chunks read at Twisted's size before the reads widen to `READ_SIZE`. The first chunk's
#: bytes are sent to a waiting client at the next reactor turn, after the reads that turn
#: made ready: a 1 MiB read there (hashed and written, 1-2 ms) would come first and delay the
#: client's first byte by as much; a second 64 KiB read costs a tenth of that.
NARROW_CHUNKS = 2


def widen_reads(transport: Any, size: int = READ_SIZE) -> tuple[tcp.Connection, int] | None:
    """Make the TCP connection under a response body read *size* bytes per turn; return the
    connection and its previous read size (to restore), or None if there is no TCP below.

    The body transport is a proxy over the HTTP client protocol's transport, which may be a
    TLS wrapper over TCP: follow the wrappers down to the TCP connection.
    """
    seen = 0
    while transport is not None and seen < 5:
        if isinstance(transport, tcp.Connection):
            previous = transport.bufferSize
            transport.bufferSize = max(previous, size)
            return transport, previous
        transport = getattr(transport, "_producer", None) or getattr(transport, "transport", None)
        seen += 1
    return None


# Turning Twisted's failures into DownloadErrors ---------------------------------------------


def _old_positional_order(session: Any, auth: Any, proxy: Any) -> bool:
    """Whether the positional arguments are (expected_digests, expected_size, semaphore)."""
    if isinstance(session, Mapping):
        return True
    if isinstance(auth, int) and not isinstance(auth, bool):
        return True
    return proxy is not None and not isinstance(proxy, str) and hasattr(proxy, "acquire")


def _userinfo_credentials(url: str) -> tuple[str, str] | None:
    from urllib.parse import unquote, urlsplit

    parts = urlsplit(url)
    if parts.username is None:
        return None
    return unquote(parts.username), unquote(parts.password or "")


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("latin-1")
    return value


def _end_to_end_headers(response: IResponse) -> Headers:
    """The response headers plus ``Content-Length``, which Twisted's parser moves to
    ``response.length``; callers forwarding headers (the streamer) need it back.

    Added in place, not to a copy: the final response is ours alone, and a copy per file
    cost more than the rest of the header handling of a small download."""
    headers = response.headers
    if isinstance(response.length, int) and not headers.hasHeader(b"content-length"):
        headers.setRawHeaders(b"content-length", [b"%d" % response.length])
    return headers


def _retry_after(headers: Headers) -> float | None:
    values = headers.getRawHeaders(b"retry-after")
    return parse_retry_after(values[0]) if values else None


def _reasons(failure: Failure) -> list[Failure]:
    """The failures inside Twisted's wrapper exceptions (ResponseFailed & co), flattened."""
    reasons = getattr(failure.value, "reasons", None)
    if not reasons:
        return [failure]
    out: list[Failure] = []
    for reason in reasons:
        out.extend(_reasons(reason))
    return out


def _describe_failure(failure: Failure) -> str:
    """A short readable reason, e.g. ``connection lost (ConnectionLost)``."""
    texts = []
    for reason in _reasons(failure):
        if type(reason.value).__name__ == "_DataLoss":
            continue
        if isinstance(reason.value, error.ConnectionDone):
            text = "connection closed by the server"
        elif isinstance(reason.value, error.ConnectionLost):
            text = "connection lost"
        else:
            text = str(reason.value).strip().rstrip(".") or type(reason.value).__name__
        texts.append(f"{text} ({type(reason.value).__name__})")
    return "; ".join(dict.fromkeys(texts)) or "connection lost"


def _is_tls_error(failure: Failure) -> bool:
    """A handshake failure: an OpenSSL error or a certificate not matching the host."""
    from OpenSSL.SSL import Error as SSLError
    from service_identity import CertificateError, VerificationError

    tls_errors = (SSLError, VerificationError, CertificateError)
    return any(reason.check(*tls_errors) for reason in _reasons(failure))


def _translate(url: str, failure: Failure, connect_timeout: float) -> BaseException:
    """The `DownloadError` for a request that failed before its response arrived."""
    exc = failure.value
    assert exc is not None  # a Failure always holds its exception
    if isinstance(exc, errors.DownloadError | defer.CancelledError):
        return exc
    if isinstance(exc, error.TimeoutError):
        return errors.DownloadTimeout(url, "connect", connect_timeout)
    if isinstance(exc, InternalAddressRefused):
        return errors.RedirectRefused(url, str(exc), "redirect to a private address refused")
    if isinstance(exc, error.ConnectionRefusedError):
        return errors.ConnectionFailed(url, "connection refused", "connection refused")
    if isinstance(exc, error.DNSLookupError):
        return _connection_failed(url, "DNS lookup failed", failure)
    if _is_tls_error(failure):
        failed = _connection_failed(url, "TLS handshake failed", failure)
        failed.retryable = False  # a certificate does not get better by asking again
        return failed
    if isinstance(exc, error.ConnectError):
        return _connection_failed(url, "cannot connect", failure)
    name = type(exc).__name__
    if name in ("ResponseNeverReceived", "RequestTransmissionFailed", "ResponseFailed"):
        return _connection_failed(url, "no complete response", failure)
    return _wrap(url, exc)


def _connection_failed(url: str, what: str, failure: Failure) -> errors.ConnectionFailed:
    """*what* failed: the summary; the message adds the details (which may name hosts). The
    cause is kept: a connection this host could not make (out of descriptors: EMFILE) is its
    own fault, not the upstream's (`store.errors.local_fault`)."""
    failed = errors.ConnectionFailed(url, f"{what}: {_describe_failure(failure)}", what)
    failed.__cause__ = failure.value
    return failed


def _wrap(url: str, exc: BaseException) -> BaseException:
    """Keep our own errors; wrap anything else in a non-retryable `DownloadError`."""
    if isinstance(exc, errors.DownloadError):
        return exc
    wrapped = errors.DownloadError(url, f"request failed: {type(exc).__name__}: {exc}")
    wrapped.__cause__ = exc
    return wrapped
