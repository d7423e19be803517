"""Worker processes that share an ``immediate`` sync's downloads: the syncing process's side.

One Python process runs one thread of Python at a time, and a sync of many small files spends
most of its time in Python (the HTTP client, Deferreds), so it keeps one core busy however many
it has. `SyncWorkers` starts helper processes (forked before the reactor is imported where it
can, on Linux, else ``python -m importer.worker``; see `importer.worker`), each with its own
reactor, connection pool and share of the remote's ``download_concurrency``. The syncing
process hands each worker a file whenever one of its slots is free; the worker downloads,
validates and commits it into the same storage, then says how it ended. The catalog stays the
syncing process's alone. A worker that dies takes nothing with it: its unfinished files are
fetched by the syncing process instead.

Messages are JSON lines over a socket pair (``op`` names the message):

* to a worker: ``config`` (the remote's settings, the storage root), ``fetch`` (a file's
  sources; a worker holds up to `WINDOW_PER_SLOT` files per download slot, the others wait
  for a slot), ``return`` (give back the files that have not started), ``flush`` (commit
  what waits for a batch now);
* from a worker: ``hello`` once it has started, ``ready`` / ``error`` (answering
  ``config``), then per file ``free`` (it no longer takes a place in the worker's window),
  ``stored`` or ``failed``, or ``returned``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any, cast

import attrs
from twisted.internet import defer, protocol, task
from twisted.internet.interfaces import IReactorSocket
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure

from downloaders.transports import IStreamTransport
from store.catalog import CatalogEntry

log = Logger()

#: ``sync_processes = 0`` (auto) uses worker processes for listings of at least this many
#: files: a worker's start (importing Twisted) costs about a third of a second, in which the
#: syncing process alone stores some 700 small files.
AUTO_MIN_FILES = 1000
#: At most this many processes in all when ``sync_processes`` is 0 (one per CPU otherwise).
AUTO_MAX_PROCESSES = 4
#: Longest wait for the workers to exit once their connections are closed.
EXIT_TIMEOUT = 10.0
#: Files handed to a worker ahead of its free download slots, per slot: its slots never wait
#: for the (busy) syncing process to hand out the next file; its own ``download_concurrency``
#: still bounds its connections.
WINDOW_PER_SLOT = 2
#: Longest message line (a file's sources, with every mirror's url).
MAX_LINE = 1 << 20


class WorkerError(Exception):
    """A worker process refused a sync's configuration, or ended."""


def eligible(remote: Any) -> bool:
    """Whether worker processes can share *remote*'s downloads: a configured `Remote` with
    the built-in importer (a custom importer's downloaders may hold state only the syncing
    process has) and no ``rate_limit`` (which every process would apply on its own)."""
    from importer.remote import Remote

    return (
        isinstance(remote, Remote)
        and not remote.importer
        and not remote.rate_limit
        and remote.download_concurrency >= 2
    )


def helper_count(remote: Any, total: int | None = None) -> int:
    """How many worker processes *remote*'s ``sync_processes`` asks for (0: none), for a
    listing of *total* files (None: not known yet)."""
    if remote.policy != "immediate" or not eligible(remote):
        return 0
    wanted = remote.sync_processes
    if wanted == 0:  # auto: one process per CPU, for listings worth it
        if total is not None and total < AUTO_MIN_FILES:
            return 0
        wanted = min(os.cpu_count() or 1, AUTO_MAX_PROCESSES)
    return max(0, min(wanted, remote.download_concurrency) - 1)


def workers_for(remote: Any, total: int | None = None) -> SyncWorkers | None:
    """Started `SyncWorkers` for a sync of *remote* (see `helper_count`), or None."""
    count = helper_count(remote, total)
    return SyncWorkers(count).start() if count else None


def remote_fields(remote: Any, slots: int) -> dict[str, Any]:
    """*remote*'s settings as a worker rebuilds its `Remote`, with *slots* downloads."""
    fields = {a.alias: getattr(remote, a.name) for a in attrs.fields(type(remote)) if a.init}
    fields.update(download_concurrency=slots, sync_processes=1)
    return fields


def encode_sources(sources: list[CatalogEntry]) -> list[list[Any]]:
    return [[e.path, e.remote, e.url, e.size, e.digests, e.position] for e in sources]


def decode_sources(data: list[list[Any]]) -> list[CatalogEntry]:
    return [
        CatalogEntry(path=path, remote=remote, url=url, size=size, digests=digests, position=pos)
        for path, remote, url, size, digests, pos in data
    ]


class SyncWorkers:
    """*count* worker processes for syncs, started by `start` (no reactor needed yet: a
    command starts them first thing, so they import Twisted while it does) and used by
    `sync_remote` through `serve`, one remote after another. `close` ends them."""

    def __init__(self, count: int, python: str | None = None) -> None:
        self.count = count
        self.python = python or sys.executable
        self._spawned: list[tuple[Any, socket.socket]] = []
        self._links: list[WorkerLink] | None = None

    def start(self) -> SyncWorkers:
        """Start the processes now (once); returns self. A process that cannot be started
        (no memory, a process limit) is a warning, not an error: the sync then runs with the
        workers that did start, or alone."""
        while len(self._spawned) < self.count:
            try:
                self._spawned.append(self._spawn())
            except OSError as error:
                log.warn("cannot start a sync worker process: {error}", error=error)
                self.count = len(self._spawned)
        return self

    def _spawn(self) -> tuple[Any, socket.socket]:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        if can_fork():  # (the other workers' sockets are not the new one's to hold)
            return _fork(ours, theirs, [sock for _p, sock in self._spawned]), ours
        try:
            process = subprocess.Popen(  # our own interpreter and module
                [self.python, "-m", "importer.worker", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                env=_child_environment(),
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        return process, ours

    def serve(
        self,
        remote: Any,
        storage: Any,
        on_stored: Callable[[str, str], None],
        on_failed: Callable[[str, str, str], None],
        fallback: Callable[[list[CatalogEntry]], defer.Deferred[None]],
    ) -> list[WorkerLink]:
        """Configure the live workers for one sync of *remote* into *storage*; return them.

        The syncing process keeps about half a share of ``download_concurrency``, the links
        split the rest (`WorkerLink.slots`); each joins once its ``ready`` fires. Outcomes
        go to *on_stored* and *on_failed*; a dead worker's unfinished files go to
        *fallback*. An empty list for a remote the workers cannot serve (see `eligible`), when
        no worker is alive, or when ``download_concurrency`` leaves the workers no slot.
        """
        if not eligible(remote):
            return []
        links = [link for link in self._connect() if link.alive]
        if not links:
            return []
        # The syncing process also reads the listing, writes the catalog and hands out the
        # files: it keeps half a share of the connections (3 of 10 beside one worker: 5-10%
        # faster than 5, in interleaved runs) and the workers split the rest.
        concurrency = remote.download_concurrency
        own = max(1, concurrency // (2 * len(links) + 1))
        slots = (concurrency - own) // len(links)
        if not slots:
            return []
        fields = remote_fields(remote, slots)
        for link in links:
            link.configure(fields, storage.root, slots, on_stored, on_failed, fallback)
        return links

    def wait_started(self) -> defer.Deferred[None]:
        """Fires once every worker has started (said hello) or ended."""
        started = [link.started for link in self._connect()]
        return defer.gatherResults(started).addCallback(lambda _: None)

    @property
    def links(self) -> list[WorkerLink]:
        """The workers' connections (empty until the first `serve`)."""
        return list(self._links or [])

    @property
    def processes(self) -> list[Any]:
        """The worker processes (``pid``, ``poll()``), in start order."""
        return [process for process, _sock in self._spawned]

    def _connect(self) -> list[WorkerLink]:
        if self._links is None:
            from twisted.internet import reactor

            self._links = []
            for process, sock in self._spawned:
                link = WorkerLink(process)
                sock.setblocking(False)
                cast(IReactorSocket, reactor).adoptStreamConnection(
                    sock.fileno(), socket.AF_UNIX, SingleProtocolFactory(link)
                )
                sock.close()  # the reactor has its own copy of the descriptor
                self._links.append(link)
        return self._links

    def close(self) -> defer.Deferred[None]:
        """Close the connections (each worker then stops: downloads in flight are aborted,
        their temporary files removed) and wait for the processes to exit."""
        if self._links is None:  # never connected: closing our end is the signal
            for _process, sock in self._spawned:
                sock.close()
        else:
            for link in self._links:
                link.close()
        return self._reap()

    @defer.inlineCallbacks
    def _reap(self) -> Any:
        from twisted.internet import reactor

        processes = [process for process, _sock in self._spawned]
        waited = 0.0
        while any(p.poll() is None for p in processes) and waited < EXIT_TIMEOUT:
            yield task.deferLater(reactor, 0.01, lambda: None)
            waited += 0.01
        for process in processes:
            if process.poll() is None:
                log.warn("sync worker {pid} did not exit: killed", pid=process.pid)
                process.kill()
                process.wait()


def can_fork() -> bool:
    """Whether a worker can be forked from this process as it is: on Linux, before any
    reactor is installed and while no other thread runs (a fork then copies nothing a worker
    must not touch, and the worker needs no second start of Python and its imports: ready in
    milliseconds instead of a third of a second). Otherwise workers are started afresh
    (macOS too: system libraries there are not safe to use in a forked child)."""
    return (
        sys.platform.startswith("linux")
        and "twisted.internet.reactor" not in sys.modules
        and threading.active_count() == 1
    )


def _fork(
    ours: socket.socket, theirs: socket.socket, others: list[socket.socket]
) -> _ForkedProcess:
    pid = os.fork()
    if pid == 0:  # the worker: it never returns from here
        status = 1
        try:
            for sock in [ours, *others]:
                sock.close()
            from importer.worker import serve

            status = serve(theirs.detach())
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(status)
    theirs.close()
    return _ForkedProcess(pid)


class _ForkedProcess:
    """The part of `subprocess.Popen` `SyncWorkers` uses, for a forked worker."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self) -> int:
        if self.returncode is None:
            _pid, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def kill(self) -> None:
        if self.returncode is None:
            os.kill(self.pid, signal.SIGKILL)


def _child_environment() -> dict[str, str]:
    """Our environment, with the folder holding this package first on the module path (the
    worker runs the same code as the syncing process)."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH", "")) if p)
    return env


class SingleProtocolFactory(protocol.ServerFactory):
    """Builds the one protocol instance it was given (for ``adoptStreamConnection``)."""

    def __init__(self, instance: protocol.Protocol) -> None:
        self.instance = instance

    def buildProtocol(self, addr: Any) -> protocol.Protocol:
        return self.instance


@attrs.define
class _Task:
    sources: list[CatalogEntry]
    #: Fires when the worker's download slot is free; None once it has.
    free: defer.Deferred[None] | None


class WorkerLink(LineReceiver):
    """The syncing process's end of one worker's connection."""

    transport: IStreamTransport  # set by makeConnection

    delimiter = b"\n"
    MAX_LENGTH = MAX_LINE

    def __init__(self, process: Any) -> None:
        self.process = process
        self.alive = True
        self.slots = 0
        #: Files this worker stored (all syncs): for logs and tests.
        self.stored = 0
        #: Fires when the worker has started (its first message) or ended.
        self.started: defer.Deferred[None] = defer.Deferred()
        #: Fires once the worker is configured for the current sync (fails if it cannot be).
        self.ready: defer.Deferred[None] | None = None
        self._tasks: dict[str, _Task] = {}
        self._idle: list[defer.Deferred[None]] = []
        self._closing = False
        self._on_stored: Callable[[str, str], None] = _ignore
        self._on_failed: Callable[[str, str, str], None] = _ignore
        self._fallback: Callable[[list[CatalogEntry]], defer.Deferred[None]] | None = None

    # Used by the sync ------------------------------------------------------------------------

    @property
    def window(self) -> int:
        """How many files the worker may hold at once (downloading or waiting for a slot)."""
        return self.slots * WINDOW_PER_SLOT

    def configure(
        self,
        fields: dict[str, Any],
        root: str,
        slots: int,
        on_stored: Callable[[str, str], None],
        on_failed: Callable[[str, str, str], None],
        fallback: Callable[[list[CatalogEntry]], defer.Deferred[None]],
    ) -> None:
        self.slots = slots
        self.ready = defer.Deferred()
        self._on_stored, self._on_failed, self._fallback = on_stored, on_failed, fallback
        self._send({"op": "config", "remote": fields, "storage": root})

    def fetch(self, sources: list[CatalogEntry]) -> defer.Deferred[None]:
        """Have the worker fetch a file; fires when the worker's download slot is free."""
        if not self.alive:
            assert self._fallback is not None
            return self._fallback(sources)
        free: defer.Deferred[None] = defer.Deferred()
        self._tasks[sources[0].sha256] = _Task(sources, free)
        self._send({"op": "fetch", "sources": encode_sources(sources)})
        return free

    def finish(self) -> defer.Deferred[None]:
        """Commit the worker's last files now; fires once every file it was given ended."""
        if not self._tasks or not self.alive:
            return defer.succeed(None)
        self._send({"op": "flush"})
        idle: defer.Deferred[None] = defer.Deferred()
        self._idle.append(idle)
        return idle

    def reclaim(self) -> None:
        """Take back the files the worker holds but has not started (they would wait behind
        its downloads while this process has slots free: the end of a sync)."""
        waiting = [sha256 for sha256, task_ in self._tasks.items() if task_.free is not None]
        if waiting and self.alive:
            self._send({"op": "return", "sha256s": waiting})

    def _fetch_here(self, task_: _Task | None) -> None:
        if task_ is None:
            return
        assert self._fallback is not None
        again = self._fallback(task_.sources)
        if task_.free is not None:
            again.chainDeferred(task_.free)

    def abort(self) -> None:
        """The sync is being stopped: end the worker (its files in flight are dropped)."""
        self._closing = True
        self._tasks.clear()
        if self.transport is not None:
            self.transport.abortConnection()

    def close(self) -> None:
        self._closing = True
        if self.alive and self.transport is not None:
            self.transport.loseConnection()

    # The connection --------------------------------------------------------------------------

    def _send(self, message: dict[str, Any]) -> None:
        self.sendLine(json.dumps(message, separators=(",", ":")).encode())

    def lineReceived(self, line: bytes) -> None:
        try:
            message = json.loads(line)
            op = message["op"]
            if op == "hello":
                self._fire(self.started)
            elif op == "ready":
                if self.ready is not None:
                    self._fire(self.ready)
            elif op == "error":
                self._worker_failed(WorkerError(message["reason"]))
            elif op == "free":
                self._free(self._tasks.get(message["sha256"]))
            elif op == "returned":
                self._fetch_here(self._tasks.pop(message["sha256"], None))
            elif op == "stored":
                self.stored += 1
                self._end(message["sha256"])
                self._on_stored(message["sha256"], message["url"])
            elif op == "failed":
                self._end(message["sha256"])
                self._on_failed(message["sha256"], message["url"], message["reason"])
            else:
                raise ValueError(f"unknown message {op!r}")
        except Exception as error:  # a worker that speaks nonsense is not trusted further
            log.failure("bad message from sync worker {pid}", Failure(), pid=self.process.pid)
            self._worker_failed(WorkerError(f"bad message: {error}"))
            self.transport.abortConnection()
        if not self._tasks:
            idle, self._idle = self._idle, []
            for waiter in idle:
                self._fire(waiter)

    def _free(self, task_: _Task | None) -> None:
        if task_ is not None and task_.free is not None:
            free, task_.free = task_.free, None
            self._fire(free)

    def _end(self, sha256: str) -> None:
        self._free(self._tasks.pop(sha256, None))

    def _worker_failed(self, error: WorkerError) -> None:
        log.warn("sync worker {pid}: {error}", pid=self.process.pid, error=error)
        if self.ready is not None and not self.ready.called:
            self.ready.errback(error)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._worker_failed(WorkerError("message too long"))
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.alive = False
        self._fire(self.started)
        if self.ready is not None and not self.ready.called:
            self.ready.errback(WorkerError("the worker process ended"))
        tasks, self._tasks = self._tasks, {}
        if tasks and not self._closing:
            log.warn(
                "sync worker {pid} ended unexpectedly; its {count} unfinished file(s) are "
                "fetched by the syncing process instead",
                pid=self.process.pid,
                count=len(tasks),
            )
            for task_ in tasks.values():
                self._fetch_here(task_)
        idle, self._idle = self._idle, []
        for waiter in idle:
            self._fire(waiter)

    @staticmethod
    def _fire(d: defer.Deferred[None]) -> None:
        if not d.called:
            d.callback(None)


def _ignore(*args: Any) -> None:
    pass
