"""The streamer as a Twisted service: storage, catalog, HTTP site, graceful shutdown.

`StreamerService` builds everything from a `Config` when constructed (so bad settings fail
before anything starts), then at `startService` removes stale temp files, listens on the
configured endpoint and opens the catalog. `stopService` (SIGTERM under twistd) stops
accepting, lets in-flight responses finish for up to ``server.grace_period`` seconds, aborts
the rest, closes the content resource, remotes and catalog, and removes temp files.

The root resource serves ``/metrics`` and ``/healthz`` itself and hands every other path,
whole, to the content resource (wrapped in `SignedResource` when a signing key is set).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
import weakref
from collections.abc import Callable
from typing import Any, cast

from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.abstract import FileDescriptor
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IFileDescriptor, IListeningPort
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.resource import IResource, Resource

from store.catalog import open_catalog, open_for_storage
from store.errors import StorageError
from store.storage import ArtifactStorage
from streamer.channel import ClientLimit, StreamerChannel, read_at_accept
from streamer.claims import Claims
from streamer.config import CONFIG_ENV, Config
from streamer.content import ContentResource
from streamer.logs import RequestLog, twistd_log
from streamer.metrics import Metrics
from streamer.ops import HealthResource, MetricsResource, plain_text
from streamer.paths import RefusedPath, origin_form, request_path
from streamer.processes import (
    ProcessGroup,
    adopted_socket,
    helper_argv,
    helper_lines,
    process_count,
    share_accepts,
    unblock_reopen_signals,
)
from streamer.signing import SignedResource

__all__ = [
    "CannotListen",
    "ContentFactory",
    "RootResource",
    "StreamerRequest",
    "StreamerService",
    "StreamerSite",
    "default_content_factory",
    "exit_status_at_exit",
]

log = Logger()

#: Builds the content resource: called with keyword arguments ``catalog``, ``storage``,
#: ``remotes`` ({name: Remote}), ``config``, ``metrics`` and ``reactor``.
ContentFactory = Callable[..., IResource]
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})
#: After aborting leftover requests, how long to wait for their connections to close.
_ABORT_SETTLE_SECONDS = 2.0


#: The listen queue of a ``tcp:``, ``tcp6:``, ``ssl:`` or ``unix:`` endpoint that sets no
#: ``backlog=`` of its own (nginx's default). Twisted's is 50: of a burst of a thousand new
#: connections most would wait for SYN retries (1 s, 3 s, ...) before being accepted.
LISTEN_BACKLOG = 511


def with_backlog(description: str) -> str:
    """*description* with ``backlog=`` `LISTEN_BACKLOG` added where its endpoint takes one
    and it sets none."""
    kind = description.split(":", 1)[0].strip().lower()
    if kind in ("tcp", "tcp6", "ssl", "unix") and "backlog=" not in description:
        return f"{description}:backlog={LISTEN_BACKLOG}"
    return description


class CannotListen(Exception):
    """The configured endpoint could not be listened on."""


def exit_status_at_exit(status: int) -> None:
    """Make this process exit with *status* once twistd has finished its own clean-up.

    twistd always exits 0 after its reactor stops and offers no hook for a status, so a
    service that fails after start-up registers this last exit handler: it runs after
    twistd's clean-up (pid file, log observers) and ends the process with *status*.
    """

    def exit_now() -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(status)

    atexit.register(exit_now)


class _Answer(Resource):
    """A short plain-text answer: a refused path, or 503 while starting or without content."""

    isLeaf = True

    def __init__(self, reason: str, code: int = 503) -> None:
        super().__init__()
        self._reason = reason
        self._code = code

    def render(self, request: server.Request) -> bytes:
        return plain_text(request, self._code, f"{self._reason}\n")


def default_content_factory(**kwargs: Any) -> IResource:
    """``streamer.content.ContentResource(**kwargs)``: the resource that serves content."""
    return ContentResource(**kwargs)


class RootResource(Resource):
    """``/metrics`` and ``/healthz`` here; every other path goes whole to *content*.

    The path is normalised once (`streamer.paths.request_path`) before anything else: a
    refused one is answered here, ``/./healthz`` is ``/healthz``, and anything below a
    reserved name (``/metrics/x``, ``/healthz/``) is 404.
    """

    def __init__(
        self, content: IResource, ops: dict[bytes, IResource], ready: Callable[[], bool]
    ) -> None:
        super().__init__()
        self._content = content
        self._ops = ops
        self._ready = ready

    def getChildWithDefault(self, path: bytes, request: server.Request) -> IResource:
        try:
            target = request_path(request)
        except RefusedPath as refused:
            return _Answer(refused.reason, refused.status)
        first = target.segments[0].encode("utf-8") if target.segments else b""
        if first in self._ops:
            if len(target.segments) == 1 and not target.folder:
                return self._ops[first]
            return _Answer("not found", 404)
        if not self._ready():
            return _Answer("service not ready")
        # Give the segment back: the content resource sees the full path in postpath.
        assert request.postpath is not None and request.prepath is not None  # set by the Site
        request.postpath.insert(0, request.prepath.pop())
        return self._content

    def render(self, request: server.Request) -> bytes:
        return _Answer("service not ready").render(request)


class StreamerRequest(server.Request):
    """A request that the site tracks (for draining) and logs once when it ends.

    The content resource sets ``cache_status`` to ``"hit"``, ``"miss"`` or ``"coalesced"``.
    """

    cache_status: str | None = None
    #: The upstream's status behind a lazy answer (set by the lazy streamer), for the log.
    upstream_status: int | None = None
    started_at: float = 0.0
    channel: StreamerChannel  # the StreamerSite's connection the request came on

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if path[:1] != b"/":
            absolute = origin_form(path)
            if absolute is not None:  # RFC 9112 §3.2.2: its host replaces the Host header
                path, host = absolute
                self.requestHeaders.setRawHeaders(b"host", [host])
        super().requestReceived(command, path, version)

    def write(self, data: bytes) -> None:
        channel = getattr(self, "channel", None)
        if self.startedWriting or channel is None:
            super().write(data)
            return
        # The first write: its head and body leave together (`StreamerChannel.hold_head`).
        channel.hold_head()
        try:
            super().write(data)
        finally:
            channel.release_head()

    def process(self) -> None:
        site: StreamerSite = self.channel.site
        if site.draining:
            self.site = site
            site.track(self)
            # Say so, and mean it: the channel closes the connection after this response
            # (a keep-alive or pipelining client must not wait on it).
            self.setHeader(b"connection", b"close")
            self.channel.persistent = False
            body = plain_text(self, 503, "shutting down\n")
            self.setHeader(b"content-length", b"%d" % len(body))
            self.write(body)
            self.finish()
            return
        site.track(self)
        super().process()


class StreamerSite(server.Site):
    """A twisted.web Site that counts, logs and can drain its in-flight requests.

    Its connections are `StreamerChannel`s: each request head must arrive within
    *request_header_timeout* seconds (0: no deadline), and a client address may hold at most
    *max_connections_per_client* connections (0: no cap).
    """

    # A plain HTTP/1.1 channel, not Twisted's HTTP/2-negotiating wrapper the base types.
    protocol = StreamerChannel  # type: ignore[assignment]
    requestFactory = StreamerRequest
    displayTracebacks = False

    def __init__(
        self,
        resource: IResource,
        *,
        metrics: Metrics,
        request_log: RequestLog,
        reactor: Any,
        request_header_timeout: float = 0.0,
        max_connections_per_client: int = 0,
    ) -> None:
        super().__init__(resource, reactor=reactor)
        self.metrics = metrics
        self.request_log = request_log
        self.request_header_timeout = request_header_timeout
        self.client_limit = ClientLimit(max_connections_per_client, reactor.seconds)
        self.draining = False
        self.in_flight: set[StreamerRequest] = set()
        self._channels: weakref.WeakSet[Any] = weakref.WeakSet()
        self._idle_waiters: list[defer.Deferred[None]] = []
        self._open = 0  # connections not closed yet
        self._closed_waiters: list[defer.Deferred[None]] = []

    def log(self, request: http.Request) -> None:
        """Access lines are written when the request ends (see `track`), not here."""

    def buildProtocol(self, addr: Any) -> Any:
        release = self.client_limit.admit(addr)
        if release is None:
            return self.client_limit.busy()
        channel = super().buildProtocol(addr)
        channel.head_timeout = self.request_header_timeout
        channel.seconds = self.reactor.seconds
        channel.on_close = lambda: self._closed(release)
        channel.on_refused = self._refused
        self._channels.add(channel)
        self._open += 1
        return channel

    def _closed(self, release: Callable[[], None]) -> None:
        release()
        self._open -= 1
        if not self._open:
            waiters, self._closed_waiters = self._closed_waiters, []
            for d in waiters:
                d.callback(None)

    def all_closed(self, timeout: float) -> defer.Deferred[None]:
        """Fire once every connection is closed (after `close_idle`: their last answers
        written, which stopping the reactor would drop), or after *timeout* seconds."""
        if not self._open:
            return defer.succeed(None)
        closed: defer.Deferred[None] = defer.Deferred()
        self._closed_waiters.append(closed)
        timer = self.reactor.callLater(timeout, closed.callback, None)

        def settled(result: object) -> object:
            if timer.active():
                timer.cancel()
            if closed in self._closed_waiters:
                self._closed_waiters.remove(closed)
            return result

        return closed.addBoth(settled)

    def _refused(self, status: int, method: bytes | None) -> None:
        """Count a request the channel refused before it reached a resource."""
        name = (method or b"").decode("ascii", "replace")
        self.metrics.request_refused(name if name in _METHODS else "other", status)

    def close_idle(self) -> None:
        """Close every connection still open (idle keep-alive ones, after a drain)."""
        for wrapper in list(self._channels):
            # Site wraps each HTTPChannel in a protocol switcher; the channel's own
            # loseConnection unregisters it as the transport's producer, without which the
            # transport would not close.
            channel = getattr(wrapper, "_channel", wrapper)
            close = getattr(channel, "loseConnection", None)
            if close is not None and getattr(channel, "transport", None) is not None:
                close()

    def track(self, request: StreamerRequest) -> None:
        request.started_at = self.reactor.seconds()
        self.in_flight.add(request)
        self.metrics.request_started()
        request.notifyFinish().addBoth(self._done, request)

    def _done(self, result: object, request: StreamerRequest) -> None:
        self.in_flight.discard(request)
        duration = self.reactor.seconds() - request.started_at
        method = request.method.decode("ascii", "replace")
        self.metrics.request_done(
            method if method in _METHODS else "other",
            request.code,
            request.sentLength,
            request.cache_status,
            duration,
        )
        self.request_log.access(request, duration, complete=not isinstance(result, Failure))
        if not self.in_flight:
            waiters, self._idle_waiters = self._idle_waiters, []
            for d in waiters:
                d.callback(None)

    def drain(self, timeout: float) -> defer.Deferred[None]:
        """Stop taking requests; fire when none is in flight, aborting leftovers after *timeout*."""
        self.draining = True
        if not self.in_flight:
            return defer.succeed(None)
        idle: defer.Deferred[None] = defer.Deferred()
        self._idle_waiters.append(idle)
        log.info(
            "waiting up to {timeout}s for {n} request(s) to finish",
            timeout=timeout,
            n=len(self.in_flight),
        )
        timer = self.reactor.callLater(timeout, self.abort_all)

        def settled(result: object) -> object:
            if timer.active():
                timer.cancel()
            return result

        return idle.addBoth(settled)

    def abort_all(self) -> None:
        """Abort the connections of every request still in flight."""
        if self.in_flight:
            log.warn("aborting {n} unfinished request(s)", n=len(self.in_flight))
        for request in list(self.in_flight):
            transport = getattr(request.channel, "transport", None)
            if transport is not None:
                transport.abortConnection()
        # Connections close on the next reactor turn; do not wait forever for stragglers.
        self.reactor.callLater(_ABORT_SETTLE_SECONDS, self._forget_all)

    def _forget_all(self) -> None:
        for request in list(self.in_flight):
            self._done(Failure(ConnectionError("aborted at shutdown")), request)


def _maybe_close(obj: object) -> defer.Deferred[object]:
    """Call ``obj.close()`` if it has one; errors are logged, never raised."""
    close = getattr(obj, "close", None)
    if close is None:
        return defer.succeed(None)
    d = defer.maybeDeferred(close)
    d.addErrback(lambda f: log.failure("closing {obj!r} failed", f, obj=obj))
    return d


class StreamerService(MultiService):
    """Serves the configured content over HTTP; see the module docstring for its life cycle.

    *standalone* (twistd) installs a graceful SIGTERM handler (a second SIGTERM aborts at
    once) and turns start-up failures into one logged line and a non-zero exit status.
    *content_factory* builds the content resource (default: `default_content_factory`).
    """

    def __init__(
        self,
        config: Config,
        *,
        reactor: Any = None,
        content_factory: ContentFactory | None = None,
        metrics: Metrics | None = None,
        standalone: bool = False,
    ) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.config = config
        self.standalone = standalone
        self.metrics = metrics if metrics is not None else Metrics(reactor=reactor)
        self.storage = ArtifactStorage(config.storage.path)
        problem = self.storage.writable_problem()
        if problem is not None:  # serving lazy content would fail on every request
            raise StorageError(f"storage at {self.storage.root} cannot take new files: {problem}")
        self.metrics.watch_temp_dir(self.storage.temp_root)
        self.catalog = open_catalog(
            config.catalog.url,
            config.storage.path,
            reactor=reactor,
            pool_size=config.catalog.pool_size,
        )
        self.remotes = config.remotes_by_name()
        self.request_log = RequestLog.open(
            config.server.access_log, config.server.access_log_json, reactor
        )
        #: Whether access lines go to twistd's log as this process renders them (and as
        #: JSON): see `_access_to_twistd_log`.
        self.access_lines: bool | None = None
        factory = content_factory or default_content_factory
        self.content = factory(
            catalog=self.catalog,
            storage=self.storage,
            remotes=self.remotes,
            config=config,
            metrics=self.metrics,
            reactor=reactor,
        )
        key = config.security.signing_key()
        served = SignedResource(self.content, key, reactor.seconds) if key else self.content
        self.ready = False
        self.stopping = False
        ops: dict[bytes, IResource] = {
            b"metrics": MetricsResource(self.metrics, reactor),
            b"healthz": HealthResource(
                lambda: self.ready and not self.stopping,
                starting=lambda: not (self.ready or self.stopping or self.failure),
                problem=self.storage.writable_problem,
            ),
        }
        #: One download per artifact across every process on this storage folder: this
        #: node's helpers and other nodes (or None). Always on in twistd: any node may share
        #: the folder, and a claim costs microseconds next to an upstream request
        #: (docs/SCALING.md).
        self.claims: Claims | None = None
        lazy = getattr(self.content, "lazy", None)
        if standalone and lazy is not None:
            self.claims = lazy.claims = Claims(self.storage, reactor)
            try:
                self.claims.check_locks()
            except OSError as exc:
                raise StorageError(
                    f"processes: locks do not work in {self.claims.folder} ({exc}); "
                    "set [server] processes = 1 or use a local folder"
                ) from None
        self.root = RootResource(served, ops, lambda: self.ready)
        self.site = StreamerSite(
            self.root,
            metrics=self.metrics,
            request_log=self.request_log,
            reactor=reactor,
            request_header_timeout=config.server.request_header_timeout,
            max_connections_per_client=config.server.max_connections_per_client,
        )
        self.port: IListeningPort | None = None
        #: Why start-up failed after listening (the catalog would not open), else None.
        self.failure: str | None = None
        self._sigterms = 0
        #: The helper processes sharing the socket (the first process of a group only).
        self.group: ProcessGroup | None = None
        #: twistd's SIGUSR1 handler (its log file's rotation), run before ours.
        self._rotate_twistd_log: Any = None
        #: Called with the pid of each helper that ended (the metrics' clean-up).
        self.on_helper_ended: Callable[[int], None] | None = self.metrics.process_ended

    # -- start ----------------------------------------------------------------------------

    def startService(self) -> None:
        # Only what is provably stale: the files of live processes (helpers, a sync) stay.
        removed = self.storage.clean_temp()
        if self.claims is not None:
            self.claims.sweep()
        if self.config.source is None:
            log.info(
                "no configuration file (--config or ${env}): using the embedded defaults",
                env=CONFIG_ENV,
            )
        else:
            log.info("configuration from {source}", source=self.config.source)
        log.info(
            "storage at {storage}, catalog at {catalog}{removed}",
            storage=self.storage.root,
            catalog=self.config.catalog_location(),
            removed=f" (removed {removed} stale temp file(s))" if removed else "",
        )
        self._access_to_twistd_log()
        self._listen()
        super().startService()
        d = open_for_storage(self.catalog, self.storage)
        d.addCallbacks(self._catalog_opened, self._catalog_failed)
        if self.standalone:
            self.reactor.callWhenRunning(self._install_sigterm)

    def _access_to_twistd_log(self) -> None:
        """Under twistd, with no ``access_log`` of its own: write access lines to twistd's log
        without its observers where that log takes lines rendered here
        (`streamer.logs.twistd_log`), a helper's through the first process (which writes them
        as they come, `streamer.processes.helper_lines`). Done once twistd's log is set up."""
        if not self.standalone or self.config.server.access_log:
            return
        if adopted_socket() is not None:
            lines = helper_lines()
            if lines is not None:
                write, json, system = lines
                self.request_log.write_lines(write, json, system, self.reactor)
            return
        target = twistd_log()
        if target is not None:
            write, self.access_lines = target
            self.request_log.write_lines(write, self.access_lines, reactor=self.reactor)

    def _listen(self) -> None:
        description = self.config.server.listen
        adopted = adopted_socket()
        if adopted is not None:
            self._adopt(*adopted)
            return
        outcome: list[object] = []
        endpoint = serverFromString(self.reactor, with_backlog(description))
        endpoint.listen(self.site).addBoth(outcome.append)
        if not outcome:
            raise CannotListen(f"cannot listen on {description!r}: the endpoint did not answer")
        if isinstance(outcome[0], Failure):
            reason = outcome[0].getErrorMessage()
            message = f"cannot listen on {description!r}: {reason}"
            if self.standalone:
                raise SystemExit(f"streamer: {message}")
            raise CannotListen(message)
        self.port = cast(IListeningPort, outcome[0])
        read_at_accept(self.port, self.reactor)
        log.info("listening on {address}", address=self.port.getHost())
        helpers = process_count(self.config.server.processes) - 1
        if self.standalone and helpers > 0:
            self._start_helpers(helpers)

    def _start_helpers(self, helpers: int) -> None:
        """Start *helpers* more processes on this socket (see `streamer.processes`)."""
        assert self.port is not None
        family = type(self.port.getHost()).__name__
        families = {"IPv4Address": "AF_INET", "IPv6Address": "AF_INET6", "UNIXAddress": "AF_UNIX"}
        if family not in families:
            raise SystemExit(f"streamer: processes: cannot share a {family} listener")
        share_accepts(self.port, self.reactor)
        argv = helper_argv(self.config.source) + ["--listen", self.config.server.listen]
        self.group = ProcessGroup(
            helpers,
            cast(IFileDescriptor, self.port).fileno(),
            families[family],
            argv,
            reactor=self.reactor,
            stop_timeout=self.config.server.grace_period + _ABORT_SETTLE_SECONDS + 5.0,
            on_ended=self._helper_ended,
            access_lines=None if self.access_lines is None else self.request_log.relay,
            access_json=bool(self.access_lines),
        )
        self.group.startService()

    def _helper_ended(self, pid: int) -> None:
        """A helper ended: drop its live gauges, and its claims and temp files if it died
        owning downloads (the lock it held is free now)."""
        if self.on_helper_ended is not None:
            self.on_helper_ended(pid)
        swept = self.claims.sweep() if self.claims is not None else 0
        removed = self.storage.clean_stale_temp()  # the folder of a helper that was killed
        if swept or removed:
            log.info(
                "removed {claims} download claim(s) and {files} temp file(s) of a stopped process",
                claims=swept,
                files=removed,
            )

    def _adopt(self, fd: int, family: int) -> None:
        """Serve on the listening socket the first process handed over as *fd*."""
        factory: Any = self.site
        context = getattr(
            serverFromString(self.reactor, self.config.server.listen), "_sslContextFactory", None
        )
        if context is not None:
            from twisted.protocols.tls import TLSMemoryBIOFactory

            factory = TLSMemoryBIOFactory(context, False, self.site)
        try:
            self.port = self.reactor.adoptStreamPort(fd, family, factory)
        except Exception as exc:
            raise SystemExit(f"streamer: cannot adopt the listening socket: {exc}") from None
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)
        read_at_accept(self.port, self.reactor)
        share_accepts(self.port, self.reactor)
        if not self.ready:
            # Accept nothing before the catalog is open: until then every request here would
            # be a 503 "service not ready", while the processes that are ready take the
            # connections waiting on the shared socket (a helper's start, or its restart).
            cast(FileDescriptor, self.port).stopReading()  # an adopted port is one
        log.info("serving on {address} (a helper process)", address=self.port.getHost())

    def _catalog_opened(self, _: object) -> None:
        self.ready = True
        if self.standalone:
            # Started (imports, configuration, catalog): what start-up made is long-lived.
            # Out of the cyclic collector's sight, and its first threshold raised, as for a
            # console command: a process of the group then collected 0-1 times per 1000 cold
            # requests instead of ~17 young and ~2 middle collections and a full one (~60,000
            # objects, ~50 ms) every few thousand.
            from streamer.collector import settle_imports

            settle_imports()
        if self.port is not None and adopted_socket() is not None and not self.stopping:
            self.port.startReading()  # type: ignore[attr-defined]
        log.info("streamer ready")

    def _catalog_failed(self, failure: Failure) -> None:
        self.failure = f"cannot open the catalog: {failure.getErrorMessage()}"
        log.critical("{failure}; stopping", failure=self.failure)
        if self.standalone:
            # A failed start must be visible to operators and systemd: exit status 1.
            exit_status_at_exit(1)
            self.reactor.callWhenRunning(self.reactor.stop)

    def _install_sigterm(self) -> None:
        signal.signal(signal.SIGTERM, self._on_sigterm)
        # Log rotation's usual signals reopen the access log and stop nothing (their
        # default action ended the service at once, cutting every client). twistd rotates
        # its own log file at SIGUSR1 when it writes one: that handler still runs.
        signal.signal(signal.SIGHUP, self._on_reopen_signal)
        rotate = signal.getsignal(signal.SIGUSR1)
        self._rotate_twistd_log = rotate if callable(rotate) else None
        signal.signal(signal.SIGUSR1, self._on_reopen_signal)
        unblock_reopen_signals()

    def _on_reopen_signal(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGUSR1 and self._rotate_twistd_log is not None:
            self._rotate_twistd_log(signum, frame)
        self.reactor.callFromThread(self._reopen_logs, signum)

    def _reopen_logs(self, signum: int) -> None:
        """SIGHUP or SIGUSR1: reopen ``[server] access_log``, in the helpers too."""
        say, name = log.info, signal.Signals(signum).name
        try:
            what = "access log reopened" if self.request_log.reopen() else "no access log file"
        except OSError as exc:  # its folder gone, no room...: the old file is kept
            say, what = log.warn, f"cannot reopen the access log ({exc.strerror or exc})"
        say("{signal}: {what}; still serving (SIGTERM stops)", signal=name, what=what)
        if self.group is not None:
            self.group.signal_helpers(signum)

    def _on_sigterm(self, signum: int, frame: object) -> None:
        self.reactor.callFromThread(self._terminate)

    def _terminate(self) -> None:
        self._sigterms += 1
        if self._sigterms == 1:
            log.info(
                "SIGTERM: stopping gracefully (grace period {grace}s)",
                grace=self.config.server.grace_period,
            )
            self.reactor.stop()
        else:
            log.info("second SIGTERM: aborting in-flight requests now")
            self.site.abort_all()

    # -- stop -----------------------------------------------------------------------------

    @property
    def address(self) -> Any:
        """The listening address (``.port`` for TCP), once started."""
        return self.port.getHost() if self.port is not None else None

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        self.stopping = True
        if self.port is not None:
            yield self.port.stopListening()
            self.port = None
        helpers_stopped = defer.succeed(None)
        if self.group is not None:
            helpers_stopped = defer.maybeDeferred(self.group.stopService)
        yield self.site.drain(self.config.server.grace_period)
        yield helpers_stopped
        self.site.close_idle()
        yield self.site.all_closed(_ABORT_SETTLE_SECONDS)
        yield super().stopService()
        yield _maybe_close(self.content)
        yield _maybe_close(self.claims)
        for remote in self.remotes.values():
            yield _maybe_close(remote)
        yield _maybe_close(self.catalog)
        self.ready = False
        removed = self.storage.close()  # our own temp files only: a sync beside us goes on
        if removed:
            log.info("removed {n} temp file(s)", n=removed)
        self.request_log.close()
        self.metrics.flush()  # what waits (several processes: written every FLUSH_INTERVAL)
        log.info("streamer stopped")
