"""treq where it serves: a remote's metadata and API requests, on the remote's own agent stack.

`http_client(agent, semaphore)` is a ``treq.HTTPClient`` over the agent stack a factory composed
(same pool, TLS, proxy, credentials, bearer tokens, rate limit), under the remote's concurrency
limit. treq decodes ``Content-Encoding: gzip``, parses JSON and keeps cookies, which is what a
listing or an API answer wants.

Artifact bytes never go through it: treq always puts a ``ContentDecoderAgent`` in front, which
would store the gunzipped bytes of a ``.gz`` served with ``Content-Encoding: gzip`` (a digest
mismatch), and it costs more per request than a whole small download on the raw agent
(docs/DESIGN.md has the figures). The downloaders stay on the raw agent.

`fetch_to_file` is the built-in importer's way of fetching a listing through such a client:
streamed to a temporary file, with the remote's retries and an idle timeout.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from hyperlink import EncodedURL
from treq.client import HTTPClient
from twisted.internet import defer, task
from twisted.internet.abstract import isIPAddress
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.components import proxyForInterface
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IResponse
from zope.interface import implementer

from downloaders import errors
from downloaders.retry import Backoff
from downloaders.tempfiles import create_temp_file
from downloaders.transports import IStreamTransport

__all__ = [
    "BodyTooBig",
    "DefaultHeadersAgent",
    "LimitedAgent",
    "fetch_to_file",
    "get_small",
    "http_client",
]


class _Client(HTTPClient):
    """treq's client, for a URL whose host is an IP address too: treq makes every URL a URI
    with hyperlink, which IDNA-encodes the host. ``::1`` is no IDNA label (hyperlink issue
    68): such a request failed before it was sent. ``127.0.0.1`` is its own encoding, but the
    first encoding in a process loads the IDNA mapping tables (2-3 ms, before a sync's
    listing is even asked for)."""

    def request(self, method: str, url: Any, **kwargs: Any) -> Any:
        return super().request(method, _uri_ready(url), **kwargs)


class _LiteralHostURL(EncodedURL):
    """A URL whose host is an IP address: made a URI as any other, its host kept as it is."""

    def to_uri(self) -> EncodedURL:
        uri = EncodedURL.to_uri(self.replace(host=""))  # (an empty host is not encoded)
        return uri.replace(host=self.host)


def _uri_ready(url: Any) -> Any:
    """*url* as treq may take it: a text or bytes URL whose host is an IP address becomes a
    `_LiteralHostURL`; anything else is left as it is."""
    if isinstance(url, bytes | str):
        text = url.decode("ascii") if isinstance(url, bytes) else url  # as treq decodes it
        host = EncodedURL.from_text(text).host
        if ":" in host or isIPAddress(host):
            return _LiteralHostURL.from_text(text)
    return url


def http_client(
    agent: IAgent, semaphore: Any = None, headers: Mapping[str, str] | None = None
) -> HTTPClient:
    """A ``treq.HTTPClient`` over *agent*, each request holding a slot of *semaphore* (if
    any) until its body ended, and carrying *headers* (the remote's ``User-Agent`` and
    ``headers``) unless it names them itself."""
    if semaphore is not None:
        agent = LimitedAgent(agent, semaphore)
    if headers:
        agent = DefaultHeadersAgent(agent, headers)
    return _Client(agent)


@implementer(IAgent)
class DefaultHeadersAgent:
    """Adds *headers* to each request that does not set them itself."""

    def __init__(self, agent: IAgent, headers: Mapping[str, str]) -> None:
        self._agent = agent
        self._headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: Any = None,
    ) -> defer.Deferred[Any]:
        headers = headers.copy() if headers is not None else Headers()
        for name, value in self._headers:
            if not headers.hasHeader(name):
                headers.setRawHeaders(name, [value])
        return self._agent.request(method, uri, headers, bodyProducer)


@implementer(IAgent)
class LimitedAgent:
    """Each request takes a slot of a `DeferredSemaphore` and gives it back once its response
    body ended (or the request failed): the same limit as the remote's downloads."""

    def __init__(self, agent: IAgent, semaphore: defer.DeferredSemaphore) -> None:
        self._agent = agent
        self._semaphore = semaphore

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: Any = None,
    ) -> defer.Deferred[Any]:
        semaphore = self._semaphore

        def released(failure: Failure) -> Failure:
            semaphore.release()
            return failure

        def send(_: Any) -> defer.Deferred[Any]:
            return self._agent.request(method, uri, headers, bodyProducer).addCallbacks(
                lambda response: _ReleasingResponse(response, semaphore.release), released
            )

        return semaphore.acquire().addCallback(send)


class _ReleasingResponse(proxyForInterface(IResponse)):  # type: ignore[misc]
    """A response whose ``deliverBody`` gives the slot back when the body ends."""

    def __init__(self, original: IResponse, release: Any) -> None:
        super().__init__(original)
        self._release = release

    def deliverBody(self, protocol: Any) -> None:
        self.original.deliverBody(_Releasing(protocol, self._release))


class _Releasing(Protocol):
    """Passes everything to *protocol*; calls *release* once the body ended."""

    def __init__(self, protocol: Any, release: Any) -> None:
        self._protocol = protocol
        self._release = release

    def makeConnection(self, transport: Any) -> None:
        self.transport = transport
        self._protocol.makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        self._protocol.dataReceived(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()
        self._protocol.connectionLost(reason)


def fetch_to_file(
    client: HTTPClient,
    url: str,
    folder: str,
    *,
    max_retries: int = 3,
    read_timeout: float = 60.0,
    connect_timeout: float = 60.0,
    max_size: int | None = None,
    backoff: Backoff | None = None,
    reactor: Any = None,
) -> defer.Deferred[str]:
    """GET *url* with *client* into a new temporary file in *folder*; fire with its path.

    A status >= 400 is the `HttpError` for it; retryable failures (429, 5xx, connection errors,
    no byte for *read_timeout* seconds) are tried again up to *max_retries* times, with
    *backoff*. The file holds the decoded body (treq undoes a ``Content-Encoding: gzip``).
    A body (decoded) of more than *max_size* bytes is a `DownloadError`, not tried again: an
    upstream that sends without end (or a gzip bomb) cannot fill the disk. Nothing is left
    in *folder* after a failure.
    """
    if reactor is None:
        from twisted.internet import reactor as _reactor

        reactor = _reactor
    backoff = backoff or Backoff()

    @defer.inlineCallbacks
    def attempts() -> Any:
        attempt = 0
        while True:
            try:
                path = yield _fetch_once(
                    client, url, folder, read_timeout, connect_timeout, max_size, reactor
                )
                return path
            except errors.DownloadError as error:
                if not error.retryable or attempt >= max_retries:
                    raise
                delay = backoff.delay(attempt, getattr(error, "retry_after", None))
                attempt += 1
                yield task.deferLater(reactor, delay, lambda: None)

    return attempts()


class _Body(Protocol):
    """Passes a response body to *sink* (None: drops it); ``done`` fires at its end. Past
    *limit* bytes it stops: dropping, ``done`` fires; keeping, ``done`` fails with
    `BodyTooBig`. `abort` stops it (a timeout): ``done`` then fails (dropping: fires)."""

    transport: IStreamTransport  # set by makeConnection

    def __init__(self, sink: Any, limit: int | None = None) -> None:
        self.sink = sink
        self.limit = 64 * 1024 if limit is None and sink is None else limit
        self.received = 0
        self.done: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        if self.limit is not None and self.received > self.limit:
            if self.sink is not None and not self.done.called:
                self.done.errback(BodyTooBig(self.limit))
            self.abort()
        elif self.sink is not None:
            self.sink(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss) or self.sink is None:
            self.done.callback(None)
        else:
            self.done.errback(reason)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()


class BodyTooBig(Exception):
    """A small document (a token, a mirror list) was bigger than its limit."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"bigger than {limit} bytes")


def get_small(
    agent: IAgent,
    url: str,
    *,
    limit: int,
    timeout: float,
    headers: Mapping[str, str] | None = None,
    what: str = "request",
    reactor: Any = None,
) -> defer.Deferred[bytes]:
    """GET a small document through *agent* (treq: gzip decoded): its body, at most *limit*
    bytes, all within *timeout* seconds. Anything else is a `DownloadError` saying *what*
    failed (``"mirror list"``, ``"bearer token request"``), and the connection is dropped."""
    if reactor is None:
        from twisted.internet import reactor as _reactor

        reactor = _reactor
    chunks: list[bytes] = []
    state: dict[str, Any] = {"body": None, "timed_out": False}
    sent: dict[bytes | str, bytes | str] = {}
    sent.update(headers or {})
    asked = _Client(agent).get(url, headers=sent, unbuffered=True)

    def expire() -> None:
        state["timed_out"] = True
        if state["body"] is not None:
            state["body"].abort()
        else:
            asked.cancel()

    timer = reactor.callLater(timeout, expire) if timeout else None

    def answered(response: Any) -> defer.Deferred[Any]:
        keep = response.code == 200
        body = state["body"] = _Body(chunks.append if keep else None, limit if keep else None)
        response.deliverBody(body)
        if keep:
            return body.done
        return body.done.addCallback(lambda _: _fail(f"answered {response.code}"))

    def _fail(problem: str) -> Any:
        raise errors.DownloadError(url.split("?", 1)[0], f"{what} failed: {problem}")

    def failed(failure: Failure) -> Any:
        if state["timed_out"]:
            return _fail(f"no answer within {timeout:g}s")
        if failure.check(errors.DownloadError):
            return failure
        return _fail(str(failure.value) or type(failure.value).__name__)

    def stop_timer(result: Any) -> Any:
        if timer is not None and timer.active():
            timer.cancel()
        return result

    done = asked.addCallback(answered)
    done.addCallback(lambda _: b"".join(chunks))
    done.addErrback(failed)
    return done.addBoth(stop_timer)


@defer.inlineCallbacks
def _fetch_once(
    client: HTTPClient,
    url: str,
    folder: str,
    read_timeout: float,
    connect_timeout: float,
    max_size: int | None,
    reactor: Any,
) -> Any:
    from downloaders.http import _describe_failure, _retry_after, _text, _translate

    timer: Any = None
    timed_out: list[bool] = []
    request = client.get(url, unbuffered=True)
    body: _Body | None = None

    def expire() -> None:
        timed_out.append(True)
        if body is not None:
            body.abort()
        else:
            request.cancel()

    def touch() -> None:
        if timer is not None and timer.active():
            timer.reset(read_timeout)

    if read_timeout:
        timer = reactor.callLater(read_timeout, expire)
    fd, path = None, None
    try:
        try:
            response = yield request
        except Exception:
            failure = Failure()
            if timed_out:
                raise errors.DownloadTimeout(url, "read", read_timeout) from None
            raise _translate(url, failure, connect_timeout) from None
        touch()
        if response.code >= 300:
            body = _Body(None)
            response.deliverBody(body)
            yield body.done  # the status is the news, not its body
            raise errors.http_error(
                url,
                response.code,
                _text(response.phrase),
                response.headers,
                _retry_after(response.headers),
            )
        fd, path = create_temp_file(folder)
        out = fd  # (fd becomes None once closed; the writer only runs before that)

        def write(data: bytes) -> None:
            touch()
            view = memoryview(data)
            while view:
                view = view[os.write(out, view) :]

        body = _Body(write, max_size)
        response.deliverBody(body)
        try:
            yield body.done
        except BodyTooBig:
            raise errors.DownloadError(url, f"listing bigger than {max_size} bytes") from None
        except Exception:
            failure = Failure()
            if timed_out:
                raise errors.DownloadTimeout(url, "read", read_timeout) from None
            reason = _describe_failure(failure)  # not the repr of Twisted's list of failures
            raise errors.TruncatedBody(url, f"listing body incomplete: {reason}") from None
        os.close(fd)
        fd = None
        done, path = path, None
        return done
    finally:
        if timer is not None and timer.active():
            timer.cancel()
        if fd is not None:
            os.close(fd)
        if path is not None:
            os.unlink(path)
