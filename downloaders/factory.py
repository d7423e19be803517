"""DownloaderFactory: configured downloaders for one remote, sharing its connections and limits.

The factory composes one ``IAgent`` per remote and hands it to every `HttpDownloader` it builds::

    RedirectingAgent              follow redirects (max_redirects), HTTP(S) only, no loops
      RateLimitedAgent            space request starts (rate_limit per second), when set
        BasicAuthAgent            Authorization for the remote's own origin only, when set
          BearerTokenAgent        answer Bearer challenges, one token per scope per remote
            DirectGetAgent        no proxy_url: GETs on keep-alive connections, parsed by llhttp
              Agent               no proxy_url: the rest (HEAD, requests with a body)
            ProxyingAgent         with a proxy_url: every request (CONNECT for https)

Without a proxy, `DirectGetAgent` and its fallback connect through one
`CachingEndpointFactory` (the remote's TLS policy and `AddressGuard`). Twisted's agents keep
their idle connections in the factory's ``HTTPConnectionPool`` (``factory.pool``),
`DirectGetAgent` its own; `idle_connections` and `close` cover both.

Basic auth sits *under* the redirects, so it is decided per hop. The remote's `AddressGuard`
keeps redirects away from internal addresses (`downloaders.addresses`): literal ones are
refused by the redirect agent, names by the endpoints (on the address actually connected to).
Every download of the factory also takes the remote's `DeferredSemaphore(download_concurrency)`,
so at most that many run (and hold connections) at once, however many are queued.
"""

from __future__ import annotations

import functools
import inspect
import platform
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from twisted.internet import defer, task
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import IReactorThreads
from twisted.web.client import URI, Agent
from twisted.web.error import SchemeNotSupported
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IAgentEndpointFactory
from zope.interface import implementer

import twisted
from downloaders.addresses import AddressGuard, CheckedEndpoint
from downloaders.auth import BasicAuthAgent
from downloaders.base import BaseDownloader
from downloaders.bearer import BearerTokenAgent
from downloaders.context import DownloadContext
from downloaders.digests import DEFAULT_ALLOWED_DIGESTS, check_allowed
from downloaders.direct_get import DirectGetAgent
from downloaders.file import FileDownloader
from downloaders.http import HttpDownloader
from downloaders.mirrors import MirrorList
from downloaders.proxy import ProxyingAgent
from downloaders.quiet import quiet_pool
from downloaders.redirects import RedirectingAgent
from downloaders.session import http_client
from downloaders.tempfiles import TempFilePool
from downloaders.tls import RemoteTLSPolicy
from downloaders.urls import redact_url
from downloaders.version import PROJECT, VERSION
from downloaders.via import append_via, via_entry

__all__ = [
    "CachingEndpointFactory",
    "DownloaderFactory",
    "RateLimitedAgent",
    "RateLimiter",
    "accepted_arguments",
    "project_version",
]


def project_version() -> str:
    """This code's version (`downloaders.version`)."""
    return VERSION


@implementer(IAgentEndpointFactory)
class CachingEndpointFactory:
    """Plain TCP for ``http``, TLS with *tls_policy* for ``https``: one endpoint per
    ``(scheme, host, port)``, made once and reused.

    Twisted's own factory builds a new ``HostnameEndpoint`` (IDNA-encoding the host) and a
    new TLS creator for every request; a sync of thousands of files from one host paid that
    for each file. Endpoints are reusable (each ``connect`` resolves the name afresh), so the
    cache changes nothing but the cost. At most *limit* origins are kept (redirects may lead
    anywhere); past that the cache starts over. With a *guard*, the hosts it checks get a
    `CheckedEndpoint`: never a connection to an internal address.
    """

    def __init__(
        self,
        reactor: Any,
        tls_policy: Any,
        connect_timeout: float | None,
        limit: int = 64,
        guard: AddressGuard | None = None,
    ) -> None:
        self._reactor = reactor
        self._tls_policy = tls_policy
        self._timeout: dict[str, Any] = (
            {} if connect_timeout is None else {"timeout": connect_timeout}
        )
        self._limit = limit
        self._guard = guard
        self._endpoints: dict[tuple[bytes, bytes, int], Any] = {}

    def endpointForURI(self, uri: URI) -> Any:
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            endpoint = self._make(uri)
            if len(self._endpoints) >= self._limit:
                self._endpoints.clear()
            self._endpoints[key] = endpoint
        return endpoint

    def _make(self, uri: URI) -> Any:
        if uri.scheme not in (b"http", b"https"):
            raise SchemeNotSupported(f"unsupported scheme: {uri.scheme!r}")
        try:
            host = uri.host.decode("ascii")
        except UnicodeDecodeError:
            url = redact_url(uri.toBytes().decode("latin-1"))
            raise ValueError(f"the host of {url} is not ASCII") from None
        endpoint: Any
        if self._guard is not None and self._guard.checks(host):
            endpoint = CheckedEndpoint(self._reactor, host, uri.port, **self._timeout)
        elif 0 < uri.port < 65536 and isIPAddress(host):
            endpoint = TCP4ClientEndpoint(self._reactor, host, uri.port, **self._timeout)
        elif 0 < uri.port < 65536 and "%" not in host and isIPv6Address(host):
            # (a zone, "%25eth0" in a url, goes through the resolver, which reports it)
            endpoint = TCP6ClientEndpoint(self._reactor, host, uri.port, **self._timeout)
        else:
            endpoint = HostnameEndpoint(self._reactor, host, uri.port, **self._timeout)
        if uri.scheme == b"http":
            return endpoint
        return wrapClientTLS(self._tls_policy.creatorForNetloc(uri.host, uri.port), endpoint)


class RateLimiter:
    """At most ``rate`` starts per second, spaced ``1/rate`` apart: a throttler in Pulp's sense
    (``acquire()`` fires when it is the caller's turn; ``release()`` has nothing to give back).

    The factory's limiter for a remote's ``rate_limit`` (``factory.throttler``): its agent
    stack takes a turn per request, and a plugin's own client may take turns from the same one.
    """

    def __init__(self, rate: float, reactor: Any) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be > 0, not {rate!r}")
        self.interval = 1.0 / rate
        self._reactor = reactor
        self._next = 0.0

    def acquire(self) -> defer.Deferred[None]:
        """Fire when the next start is allowed."""
        wait = self.wait()
        if wait <= 0:
            return defer.succeed(None)
        return task.deferLater(self._reactor, wait, lambda: None)

    def wait(self) -> float:
        """Take the next turn; the seconds until it comes (0: now)."""
        now = self._reactor.seconds()
        start = max(now, self._next)
        self._next = start + self.interval
        return start - now

    def release(self) -> None:
        """Nothing to give back: a turn is spent when it starts."""


@implementer(IAgent)
class RateLimitedAgent:
    """Starts at most ``rate`` requests per second, spacing them ``1/rate`` apart."""

    def __init__(self, agent: IAgent, rate: float | RateLimiter, reactor: Any) -> None:
        self._agent = agent
        self.limiter = rate if isinstance(rate, RateLimiter) else RateLimiter(rate, reactor)
        self._reactor = reactor

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: Any = None,
    ) -> defer.Deferred[Any]:
        wait = self.limiter.wait()
        if wait <= 0:
            return self._agent.request(method, uri, headers, bodyProducer)
        return task.deferLater(
            self._reactor, wait, self._agent.request, method, uri, headers, bodyProducer
        )


@functools.cache
def accepted_arguments(cls: type) -> frozenset[str] | None:
    """The keyword arguments *cls* takes, following ``**kwargs`` up its classes' ``__init__``s
    (a subclass passing them on to `BaseDownloader` takes what it takes); None if unknown."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass is object:
            break
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        try:
            parameters = inspect.signature(init).parameters.values()
        except (TypeError, ValueError):
            return None
        names.update(
            p.name
            for p in parameters
            if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        )
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
            break
    return frozenset(names)


class _StaticOrBound:
    """``DownloaderFactory.user_agent()`` as in Pulp (a static method: ours alone), and
    ``factory.user_agent()`` on an instance (ours, then the remote's own)."""

    def __init__(self, function: Any) -> None:
        self.function = function
        self.__doc__ = function.__doc__

    def __get__(self, instance: Any, owner: Any = None) -> Any:
        return functools.partial(self.function, instance)


class DownloaderFactory:
    """Builds downloaders for one remote (a `RemoteSettings`, or anything with its attributes).

    :param downloader_overrides: ``{scheme: class}`` replacing the default class of a scheme
        (``http``, ``https``, ``file``) or adding one (``{"ftp": MyDownloader}``). `build`
        gives each class only the arguments it takes, so a plain `BaseDownloader` subclass
        gets no HTTP settings.
    :param allowed_digests: the digest algorithms downloads may check (default: the remote's
        ``allowed_digests``, else sha224, sha256, sha384, sha512).
    :param temp_dir: where downloaders put their temporary files (default: the current
        working folder, as Pulp's downloaders do).

    Shared by every downloader built here: the agent stack (``agent``, also ``session``: one
    pool, TLS, proxy, credentials), the semaphore (``download_concurrency``), the rate limiter
    (``throttler``, when the remote has a ``rate_limit``) and the `DownloadContext`
    (``context``).
    """

    #: GETs without a proxy go through `DirectGetAgent` (llhttp, the default); False sends
    #: them through Twisted's ``Agent`` like every other request (the tests run the
    #: downloaders both ways; see docs/DESIGN.md for what each costs).
    direct_get: bool = True

    default_classes: Mapping[str, type[BaseDownloader]] = {
        "http": HttpDownloader,
        "https": HttpDownloader,
        "file": FileDownloader,
    }

    def __init__(
        self,
        remote: Any,
        downloader_overrides: Mapping[str, type[BaseDownloader]] | None = None,
        *,
        reactor: Any = None,
        temp_dir: str | None = None,
        allowed_digests: Any = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self.remote = remote
        self.reactor = reactor
        self.temp_dir = temp_dir
        self.classes = {**self.default_classes, **(downloader_overrides or {})}
        concurrency = remote.download_concurrency
        self.semaphore = defer.DeferredSemaphore(concurrency)
        self.pool = quiet_pool(reactor)
        self.pool.maxPersistentPerHost = max(concurrency, 2)
        self.tls_policy = RemoteTLSPolicy.from_settings(remote)
        if allowed_digests is None:
            allowed_digests = getattr(remote, "allowed_digests", None)
        self.allowed_digests = (
            DEFAULT_ALLOWED_DIGESTS if allowed_digests is None else check_allowed(allowed_digests)
        )
        rate = getattr(remote, "rate_limit", 0)
        #: The remote's rate limiter (``acquire``/``release``), None without a ``rate_limit``.
        self.throttler = RateLimiter(rate, reactor) if rate else None
        #: State shared by this remote's downloads (`DownloadContext`).
        self.context = DownloadContext()
        #: Which internal addresses the remote's redirects may not reach.
        self.guard = AddressGuard.for_remote(remote)
        self._direct: DirectGetAgent | None = None
        self._user_agent = self.user_agent()
        #: What every request of the remote carries: our User-Agent and, with a ``via``
        #: pseudonym, our ``Via`` entry (`downloaders.via`: a loop back to us is refused).
        self.base_headers = {"User-Agent": self._user_agent}
        via = getattr(remote, "via", "")
        if via:
            self.base_headers["Via"] = via_entry(via)
        self.agent = self._compose_agent()
        #: The same agent stack, by the name Pulp's session has.
        self.session = self.agent
        mirror_list = getattr(remote, "mirror_list", "")
        #: The remote's `MirrorList` (a ``mirror_list`` setting), or None.
        self.mirror_list = (
            MirrorList(
                mirror_list,
                remote.url,
                self.context,
                self.agent,
                timeout=remote.sock_read_timeout or 60.0,
                headers=self.base_headers,
            )
            if mirror_list
            else None
        )
        self._headers = merge_headers({"User-Agent": self._user_agent}, remote.headers)
        if via:
            append_via(self._headers, via)  # after a Via the remote's headers set
        self._http_client: Any = None
        #: One `TempFilePool` per temporary folder, made on first use.
        self._temp_pools: dict[str, TempFilePool] = {}

    # Agent ---------------------------------------------------------------------------------------

    def _compose_agent(self) -> IAgent:
        remote = self.remote
        connect_timeout = remote.connect_timeout or None
        agent: IAgent
        if remote.proxy_url:
            agent = ProxyingAgent(
                self.reactor,
                remote.proxy_url,
                self.tls_policy,
                self.pool,
                credentials=remote.proxy_credentials(),
                connect_timeout=connect_timeout,
            )
        else:
            endpoints = CachingEndpointFactory(
                self.reactor, self.tls_policy, connect_timeout, guard=self.guard
            )
            # GETs on our own keep-alive client (responses parsed in C); HEAD and anything
            # with a body on Twisted's, and everything when `direct_get` is False. Proxied
            # requests (above) stay on Twisted's client.
            agent = Agent.usingEndpointFactory(self.reactor, endpoints, pool=self.pool)
            if self.direct_get:
                agent = self._direct = DirectGetAgent(
                    endpoints, agent, max_idle=self.pool.maxPersistentPerHost
                )
        login = (remote.username, remote.password) if remote.username else None
        #: Answers Bearer challenges (token flow), one token request per scope per remote.
        self.bearer = BearerTokenAgent(
            agent,
            self.context,
            remote.url,
            login,
            timeout=remote.sock_read_timeout or 60.0,
            headers=self.base_headers,
        )
        agent = self.bearer
        if remote.username:
            agent = BasicAuthAgent(agent, remote.url, remote.username, remote.password)
        if self.throttler is not None:
            agent = RateLimitedAgent(agent, self.throttler, self.reactor)
        return RedirectingAgent(agent, getattr(remote, "max_redirects", 10), guard=self.guard)

    # Public API ----------------------------------------------------------------------------------

    @_StaticOrBound
    def user_agent(self: Any = None) -> str:
        """``twisted-streamer/V (Python X; Twisted Y)``; called on a factory, followed by its
        remote's own ``user_agent``."""
        ours = (
            f"{PROJECT}/{project_version()} "
            f"(Python {platform.python_version()}; Twisted {twisted.__version__})"
        )
        theirs = getattr(self.remote, "user_agent", "") if self is not None else ""
        return f"{ours} {theirs}" if theirs else ours

    def http_client(self) -> Any:
        """A ``treq.HTTPClient`` over this remote's agent stack (same pool, TLS, proxy,
        credentials, bearer tokens, rate limit) and its concurrency limit: for listings,
        metadata and API requests, where treq's gzip decoding, JSON and cookies are welcome.
        Artifact bytes belong to the downloaders `build` makes (see `downloaders.session`)."""
        if self._http_client is None:
            self._http_client = http_client(self.agent, self.semaphore, self._headers)
        return self._http_client

    def build(self, url: str, **kwargs: Any) -> BaseDownloader:
        """A downloader for ``url`` carrying the remote's settings; ``kwargs`` (expected_digests,
        expected_size, writer, headers_ready_callback, method, headers, ...) pass through and
        win over the remote's values.

        A download into a temporary folder with a `TempFilePool` (see `temp_files`) takes its
        file from the pool.
        """
        scheme = url[: url.find(":")].lower() if ":" in url else ""
        if not scheme.isalpha():
            scheme = urlsplit(url).scheme.lower()
        cls = self.classes.get(scheme)
        if cls is None:
            raise ValueError(f"no downloader for the url scheme {scheme!r}")
        options: dict[str, Any] = {
            "semaphore": self.semaphore,
            "max_retries": self.remote.max_retries,
            "temp_dir": self.temp_dir,
            "reactor": self.reactor,
            "allowed_digests": self.allowed_digests,
            "context": self.context,
        }
        if scheme == "file":
            options["allowed_import_paths"] = getattr(self.remote, "allowed_import_paths", ())
        else:
            extra = kwargs.pop("headers", None)
            options.update(
                agent=self.agent,
                session=self.agent,
                mirror_source=self.mirror_list,
                headers=merge_headers(self._headers, extra) if extra else self._headers,
                connect_timeout=self.remote.connect_timeout,
                sock_read_timeout=self.remote.sock_read_timeout,
                total_timeout=self.remote.total_timeout,
            )
        # (mypy takes a class's instance __hash__ for the class's own: a class is hashable.)
        accepted = accepted_arguments(cls)  # type: ignore[arg-type]
        if accepted is not None and not options.keys() <= accepted:
            options = {name: value for name, value in options.items() if name in accepted}
        options.update(kwargs)
        if self._temp_pools and options.get("writer") is None and "temp_files" not in options:
            pool = self._temp_pools.get(options.get("temp_dir"))  # type: ignore[arg-type]
            if pool is not None and (accepted is None or "temp_files" in accepted):
                options["temp_files"] = pool
        return cls(url, **options)

    def temp_files(self, folder: str, mode: int = 0o600, ahead: int | None = None) -> TempFilePool:
        """Create temporary files for *folder* ahead, off the reactor thread, until
        `release_temp_files`: downloads built for that folder take theirs from this
        `TempFilePool`. For bulk work (a sync of many files); the pool keeps a few empty
        files in *folder* meanwhile. *mode*: the files' permissions (see `TempFilePool`).
        *ahead*: how many files to keep ready (default: 8 per download slot, at least 64);
        0 creates each file inline, with *mode*, without a thread."""
        pool = self._temp_pools.get(folder)
        if pool is None:
            threaded = IReactorThreads.providedBy(self.reactor)
            size = max(64, 8 * self.remote.download_concurrency) if ahead is None else ahead
            pool = TempFilePool(folder, size, reactor=self.reactor if threaded else None, mode=mode)
            self._temp_pools[folder] = pool
            pool.fill()
        return pool

    def release_temp_files(self, folder: str) -> defer.Deferred[None]:
        """Stop creating files ahead for *folder* and remove the unused ones."""
        pool = self._temp_pools.pop(folder, None)
        return pool.close() if pool is not None else defer.succeed(None)

    def idle_connections(self) -> int:
        """Keep-alive connections kept for reuse (both clients'), for checks and metrics."""
        idle = sum(len(c) for c in self.pool._connections.values())
        return idle + (self._direct.idle_count() if self._direct is not None else 0)

    def close_idle(self) -> defer.Deferred[None]:
        """Close the keep-alive connections kept for reuse (both clients'); fires when they
        are closed. The factory stays usable: a later download connects anew."""
        closing = [self.pool.closeCachedConnections()]
        if self._direct is not None:
            closing.append(self._direct.close_idle())
        return defer.gatherResults(closing).addCallback(lambda _: None)

    def close(self) -> defer.Deferred[None]:
        """Remove the temporary files made ahead and not used, and close the pool's idle
        connections; fires when they are closed."""
        closing = [pool.close() for pool in self._temp_pools.values()]
        self._temp_pools.clear()
        closing.append(self.close_idle())
        return defer.gatherResults(closing).addCallback(lambda _: None)


def merge_headers(*layers: Mapping[str, str]) -> dict[str, str]:
    """Later layers win, names compared case-insensitively (one ``User-Agent``, never two)."""
    merged: dict[str, tuple[str, str]] = {}
    for layer in layers:
        for name, value in layer.items():
            merged[name.lower()] = (name, value)
    return dict(merged.values())
