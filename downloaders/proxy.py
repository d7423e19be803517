"""Reaching targets through an HTTP forward proxy.

* ``http://`` targets: the request goes to the proxy with an absolute URI (Twisted's
  ``ProxyAgent``), with ``Proxy-Authorization`` added on that hop.
* ``https://`` targets: a ``CONNECT host:port`` tunnel through the proxy, then TLS to the target
  inside it, so the proxy never sees the request. ``Proxy-Authorization`` goes on the CONNECT
  only, never inside the tunnel. Tunnelled connections are pooled like direct ones, keyed by
  target (the pool belongs to one remote, hence to one proxy).

A 407, or any other refusal of the proxy, becomes a `ProxyError`.
"""

from __future__ import annotations

import base64
from typing import Any
from urllib.parse import urlsplit

from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import (
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
    ITLSTransport,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.web.client import Agent, ProxyAgent, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IPolicyForHTTPS
from zope.interface import implementer

from downloaders.errors import ConnectionFailed, ProxyError
from downloaders.quiet import QuietStart

__all__ = ["ProxyingAgent", "TunnelEndpoint", "basic_credentials"]

#: The most a proxy may send in reply to CONNECT before the blank line.
MAX_CONNECT_REPLY = 64 * 1024


def basic_credentials(username: str, password: str) -> bytes:
    """The value of a Basic ``Authorization``/``Proxy-Authorization`` header."""
    token = base64.b64encode(f"{username}:{password}".encode())
    return b"Basic " + token


class _TunnelProtocol(Protocol):
    """Speaks CONNECT to the proxy, then starts TLS and hands the connection to the real
    (HTTP client) protocol, relaying what TLS decrypts to it."""

    transport: ITLSTransport  # a TCP connection to the proxy, set by makeConnection

    def __init__(self, endpoint: TunnelEndpoint, factory: IProtocolFactory) -> None:
        self._endpoint = endpoint
        self._factory = factory
        self._buffer = b""
        self._inner: IProtocol | None = None
        self.established: defer.Deferred[IProtocol] = defer.Deferred(self._cancel)

    def _target(self) -> str:
        return f"https://{self._endpoint.netloc}/"

    def _cancel(self, _: Any) -> None:
        if self.transport is not None:
            self.transport.abortConnection()

    def connectionMade(self) -> None:
        netloc = self._endpoint.netloc.encode("idna")
        lines = [b"CONNECT " + netloc + b" HTTP/1.1", b"Host: " + netloc]
        if self._endpoint.proxy_authorization:
            lines.append(b"Proxy-Authorization: " + self._endpoint.proxy_authorization)
        self.transport.write(b"\r\n".join(lines) + b"\r\n\r\n")

    def dataReceived(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.dataReceived(data)
            return
        if self.established.called:
            return
        self._buffer += data
        head, sep, rest = self._buffer.partition(b"\r\n\r\n")
        if not sep:
            if len(self._buffer) > MAX_CONNECT_REPLY:
                self._fail(ProxyError(self._target(), "proxy sent an oversized CONNECT reply"))
            return
        status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = status_line.split(" ", 2)
        code = parts[1] if len(parts) > 1 else ""
        if not code.isdigit() or not 200 <= int(code) < 300:
            if code == "407":
                message = "proxy authentication required (407): proxy credentials missing or wrong"
            else:
                message = f"proxy refused CONNECT: {status_line[:200]!r}"
            self._fail(ProxyError(self._target(), message))
            return
        self._start_tls(rest)

    def _start_tls(self, rest: bytes) -> None:
        self.transport.startTLS(self._endpoint.tls_creator)
        inner = self._factory.buildProtocol(self.transport.getPeer())
        if inner is None:
            self._fail(ConnectionFailed(self._target(), "connection refused by the client"))
            return
        self._inner = inner
        inner.makeConnection(self.transport)
        self.established.callback(inner)
        if rest:
            inner.dataReceived(rest)

    def _fail(self, error: Exception) -> None:
        if not self.established.called:
            self.established.errback(Failure(error))
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self._inner is not None:
            self._inner.connectionLost(reason)
        elif not self.established.called:
            self.established.errback(
                Failure(ProxyError(self._target(), "proxy closed the connection during CONNECT"))
            )


class _TunnelFactory(QuietStart, Factory):
    """Builds the CONNECT protocol of one tunnel (started and stopped per connection)."""


@implementer(IStreamClientEndpoint)
class TunnelEndpoint:
    """Connects to ``host:port`` through a CONNECT tunnel on ``proxy_endpoint``, with TLS inside.

    The Deferred of ``connect`` fires with the protocol built by the caller's factory once the
    tunnel is open; a proxy refusal fails it with `ProxyError`.
    """

    def __init__(
        self,
        proxy_endpoint: IStreamClientEndpoint,
        host: str,
        port: int,
        tls_creator: Any,
        proxy_authorization: bytes | None = None,
    ) -> None:
        self.proxy_endpoint = proxy_endpoint
        self.netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.tls_creator = tls_creator
        self.proxy_authorization = proxy_authorization

    def __repr__(self) -> str:
        return f"<TunnelEndpoint to {self.netloc} via {self.proxy_endpoint!r}>"

    def connect(self, protocolFactory: IProtocolFactory) -> defer.Deferred[IProtocol]:
        tunnel = _TunnelFactory.forProtocol(lambda: _TunnelProtocol(self, protocolFactory))
        connecting = self.proxy_endpoint.connect(tunnel)

        def opened(protocol: IProtocol) -> defer.Deferred[IProtocol]:
            assert isinstance(protocol, _TunnelProtocol)
            return protocol.established

        return connecting.addCallback(opened)


@implementer(IAgentEndpointFactory)
class _TunnelEndpointFactory:
    def __init__(
        self, proxy_endpoint: Any, policy: IPolicyForHTTPS, authorization: bytes | None
    ) -> None:
        self._proxy_endpoint = proxy_endpoint
        self._policy = policy
        self._authorization = authorization

    def endpointForURI(self, uri: Any) -> TunnelEndpoint:
        host = uri.host.decode("idna") if isinstance(uri.host, bytes) else uri.host
        creator = self._policy.creatorForNetloc(uri.host, uri.port)
        return TunnelEndpoint(self._proxy_endpoint, host, uri.port, creator, self._authorization)


@implementer(IAgent)
class ProxyingAgent:
    """An ``IAgent`` sending every request through one HTTP proxy (see the module docstring)."""

    def __init__(
        self,
        reactor: Any,
        proxy_url: str,
        tls_policy: IPolicyForHTTPS,
        pool: Any,
        *,
        credentials: tuple[str, str] | None = None,
        connect_timeout: float | None = None,
    ) -> None:
        parts = urlsplit(proxy_url)
        if not parts.hostname:
            raise ValueError(f"proxy url {proxy_url!r} names no host")
        endpoint = HostnameEndpoint(
            reactor, parts.hostname, parts.port or 3128, timeout=connect_timeout or 30
        )
        self._authorization = basic_credentials(*credentials) if credentials else None
        self._plain = ProxyAgent(endpoint, reactor, pool)
        self._tunnel = Agent.usingEndpointFactory(
            reactor, _TunnelEndpointFactory(endpoint, tls_policy, self._authorization), pool=pool
        )

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: Any = None,
    ) -> defer.Deferred[Any]:
        if uri.lower().startswith(b"https:"):
            return self._tunnel.request(method, uri, headers, bodyProducer)
        headers = headers.copy() if headers is not None else Headers()
        if self._authorization is not None:
            headers.setRawHeaders(b"proxy-authorization", [self._authorization])
        requesting = self._plain.request(method, uri, headers, bodyProducer)
        return requesting.addCallback(self._check_proxy_answer, uri)

    def _check_proxy_answer(self, response: Any, uri: bytes) -> Any:
        if response.code != 407:
            return response
        error = ProxyError(
            uri.decode("latin-1"),
            "proxy authentication required (407): proxy credentials missing or wrong",
        )

        def fail(_: Any) -> Failure:
            return Failure(error)

        return readBody(response).addBoth(fail)
