"""A scriptable upstream HTTP(S) server on twisted.web, listening on 127.0.0.1 port 0.

Tests register a behaviour (see :mod:`tests.support.faults`) per path, or a folder served as a
static tree, then point clients at ``server.url(path)``. The server records every request per
path and counts TCP connections, so tests can assert "one upstream request" or "no connection
left open".
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple
from urllib.parse import unquote

from twisted.internet import defer
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.web import static
from twisted.web.http import Request
from twisted.web.resource import Resource
from twisted.web.server import Site

from tests.support.certs import ServerTLS
from tests.support.faults import Behaviour, RenderResult, Status

__all__ = ["RecordedRequest", "UpstreamServer"]


class RecordedRequest(NamedTuple):
    """One request as the upstream saw it: method (``"GET"``) and headers (lower-case names;
    repeated headers joined with ``", "``). Unpacks as ``(method, headers)``."""

    method: str
    headers: dict[str, str]


def _normalise(path: str) -> str:
    return path if path.startswith("/") else "/" + path


class _TrackedConnection(ProtocolWrapper):
    """Unregisters only after the wrapped protocol has handled the loss, so a test woken by
    "no connection open" sees the server's own clean-up (timers cancelled) already done."""

    def connectionLost(self, reason: Failure) -> None:
        self.wrappedProtocol.connectionLost(reason)
        self.factory.unregisterProtocol(self)


class _ConnectionTracker(WrappingFactory):
    """Wraps the site factory to count TCP connections: open now, ever, and the peak."""

    protocol = _TrackedConnection
    noisy = False

    def __init__(self, wrapped: Factory, server: UpstreamServer) -> None:
        super().__init__(wrapped)
        self._server = server

    def registerProtocol(self, p: ProtocolWrapper) -> None:
        super().registerProtocol(p)
        self._server._opened()

    def unregisterProtocol(self, p: ProtocolWrapper) -> None:
        super().unregisterProtocol(p)
        self._server._closed()


class _Root(Resource):
    """Dispatches every request by its exact path to the registered behaviour or tree."""

    isLeaf = True

    def __init__(self, server: UpstreamServer) -> None:
        super().__init__()
        self._server = server

    def render(self, request: Request) -> RenderResult:
        path = request.path.decode("latin-1")
        self._server._record(path, request)
        behaviour = self._server._behaviours.get(path)
        if behaviour is not None:
            return behaviour.render(request)
        for prefix, folder in self._server._trees.items():
            if path.startswith(prefix):
                return _serve_from_tree(folder, path[len(prefix) :], request)
        return Status(404).render(request)


def _serve_from_tree(folder: Path, relative: str, request: Request) -> RenderResult:
    """A file under ``folder`` via static.File; anything outside it or a folder gives 404."""
    root = folder.resolve()
    target = (root / unquote(relative).lstrip("/")).resolve()
    if not target.is_relative_to(root) or not target.is_file():
        return Status(404).render(request)
    return static.File(str(target)).render(request)


class UpstreamServer:
    """A loopback HTTP(S) server whose paths do what the test registered.

    ``start()``/``stop()`` return Deferreds. ``stop()`` stops listening, aborts every open
    connection and fires once all of them are closed, so nothing outlives the test.
    """

    def __init__(self) -> None:
        self._host = "127.0.0.1"
        self._behaviours: dict[str, Behaviour] = {}
        self._trees: dict[str, Path] = {}
        self._log: dict[str, list[RecordedRequest]] = {}
        self._order: list[tuple[str, RecordedRequest]] = []
        self._port: IListeningPort | None = None
        self._tracker: _ConnectionTracker | None = None
        self._idle_waiters: list[defer.Deferred[bool]] = []
        self.tls: ServerTLS | None = None
        #: Whether the test fixtures fail a test that leaves a connection open.
        self.check_leaks = True
        self.open_connections = 0
        self.total_connections = 0
        self.max_concurrent_connections = 0

    # --- lifecycle ------------------------------------------------------------------------

    def start(self, tls: ServerTLS | None = None) -> defer.Deferred[UpstreamServer]:
        """Listen on 127.0.0.1, a free port; HTTPS when ``tls`` is given."""
        return defer.succeed(self.listen(tls))

    def listen(self, tls: ServerTLS | None = None, interface: str = "127.0.0.1") -> UpstreamServer:
        """Like :meth:`start`, but synchronous (listening on TCP is immediate); on
        *interface* (``"::1"``: `url` then names the host ``[::1]``)."""
        from twisted.internet import reactor

        site = Site(_Root(self), timeout=None)
        site.noisy = False
        factory: Factory = site
        if tls is not None:
            factory = TLSMemoryBIOFactory(tls.options(), False, site)
            factory.noisy = False
        self.tls = tls
        self._tracker = _ConnectionTracker(factory, self)
        self._port = reactor.listenTCP(0, self._tracker, interface=interface)
        self._host = f"[{interface}]" if ":" in interface else interface
        return self

    def stop(self) -> defer.Deferred[None]:
        """Stop listening and abort open connections; fires when all are closed."""
        port, self._port = self._port, None
        stopped = defer.maybeDeferred(port.stopListening) if port else defer.succeed(None)
        self.abort_connections()
        return defer.gatherResults([stopped, self.wait_until_idle()]).addCallback(lambda _: None)

    def abort_connections(self) -> None:
        """Reset every open connection now (``connectionLost`` follows asynchronously)."""
        if self._tracker is not None:
            for wrapper in list(self._tracker.protocols):
                wrapper.transport.abortConnection()

    def wait_until_idle(self, timeout: float | None = None) -> defer.Deferred[bool]:
        """Fire with True once no connection is open, or with False after ``timeout``."""
        from twisted.internet import reactor

        if self.open_connections == 0:
            return defer.succeed(True)
        waiter: defer.Deferred[bool] = defer.Deferred()
        self._idle_waiters.append(waiter)
        if timeout is not None:
            timer = reactor.callLater(timeout, self._give_up, waiter)

            def cancel_timer(result: bool) -> bool:
                if timer.active():
                    timer.cancel()
                return result

            waiter.addBoth(cancel_timer)
        return waiter

    def _give_up(self, waiter: defer.Deferred[bool]) -> None:
        if waiter in self._idle_waiters:
            self._idle_waiters.remove(waiter)
            waiter.callback(False)

    # --- scripting ------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the upstream server is not listening")
        return self._port.getHost().port

    def url(self, path: str = "/", host: str | None = None) -> str:
        """The absolute URL of ``path`` on this server (https when started with TLS), by the
        address it listens on unless *host* names it otherwise."""
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://{host or self._host}:{self.port}{_normalise(path)}"

    def register(self, path: str, behaviour: Behaviour) -> str:
        """Make requests for ``path`` (exact match, query ignored) use ``behaviour``; returns
        the path's URL."""
        self._behaviours[_normalise(path)] = behaviour
        return self.url(path)

    def serve_tree(self, prefix: str, folder: Path) -> str:
        """Serve the files under ``folder`` at ``prefix/<relative path>``; returns the URL of
        ``prefix/``. Missing files and folders give 404; ``..`` cannot leave ``folder``."""
        prefix = _normalise(prefix).rstrip("/") + "/"
        self._trees[prefix] = Path(folder)
        return self.url(prefix)

    # --- observing ------------------------------------------------------------------------

    def requests(self, path: str) -> list[RecordedRequest]:
        """Requests received for ``path`` so far, oldest first."""
        return list(self._log.get(_normalise(path), []))

    def all_requests(self) -> list[tuple[str, RecordedRequest]]:
        """Every request received, as ``(path, RecordedRequest)``, oldest first."""
        return list(self._order)

    def clear_log(self) -> None:
        self._log.clear()
        self._order.clear()

    def _record(self, path: str, request: Request) -> None:
        headers = {
            name.decode("latin-1").lower(): ", ".join(v.decode("latin-1") for v in values)
            for name, values in request.requestHeaders.getAllRawHeaders()
        }
        entry = RecordedRequest(request.method.decode("latin-1"), headers)
        self._log.setdefault(path, []).append(entry)
        self._order.append((path, entry))

    def _opened(self) -> None:
        self.open_connections += 1
        self.total_connections += 1
        self.max_concurrent_connections = max(
            self.max_concurrent_connections, self.open_connections
        )

    def _closed(self) -> None:
        self.open_connections -= 1
        if self.open_connections == 0:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(True)
