"""Helper processes that share an ``immediate`` sync's downloads: starting and ending them.

One Python process runs one thread of Python at a time, and a sync of many small files spends
most of its time in Python (the HTTP client, Deferreds), so it keeps one core busy however many
it has. `SyncHelpers` starts helper processes (forked before the reactor is imported where it
can, on Linux, else ``python -m importer.helpers``; see `importer.helpers.child`), each with its
own reactor, connection pool and share of the remote's ``download_concurrency``. The syncing
process hands each helper a file whenever one of its slots is free
(`importer.helpers.handout`); the helper downloads, validates and commits it into the same
storage, then says how it ended (`importer.helpers.protocol`). The catalog stays the syncing
process's alone. A helper that dies takes nothing with it: its unfinished files are fetched by
the syncing process instead.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any, cast

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorSocket
from twisted.logger import Logger

from importer.helpers.handout import HelperLink
from importer.helpers.protocol import SingleProtocolFactory, remote_fields
from store.catalog import CatalogEntry

__all__ = [
    "AUTO_MAX_PROCESSES",
    "AUTO_MIN_FILES",
    "SyncHelpers",
    "can_fork",
    "eligible",
    "helper_count",
    "helpers_for",
]

log = Logger()

#: ``sync_processes = 0`` (auto) uses helper processes for listings of at least this many
#: files: a helper's start (importing Twisted) costs about a third of a second, in which the
#: syncing process alone stores some 700 small files.
AUTO_MIN_FILES = 1000
#: At most this many processes in all when ``sync_processes`` is 0 (one per CPU otherwise).
AUTO_MAX_PROCESSES = 4
#: Longest wait for the helpers to exit once their connections are closed.
EXIT_TIMEOUT = 10.0
#: How often the syncing process looks for its helpers' exit meanwhile: a helper is gone
#: 4-20 ms after its connection closed, and the command ends only after that.
EXIT_POLL = 0.002


def eligible(remote: Any) -> bool:
    """Whether helper processes can share *remote*'s downloads: a configured `Remote` with
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
    """How many helper processes *remote*'s ``sync_processes`` asks for (0: none), for a
    listing of *total* files (None: not known yet)."""
    if remote.policy != "immediate" or not eligible(remote):
        return 0
    wanted = remote.sync_processes
    if wanted == 0:  # auto: one process per CPU, for listings worth it
        if total is not None and total < AUTO_MIN_FILES:
            return 0
        wanted = min(os.cpu_count() or 1, AUTO_MAX_PROCESSES)
    return max(0, min(wanted, remote.download_concurrency) - 1)


def helpers_for(remote: Any, total: int | None = None) -> SyncHelpers | None:
    """Started `SyncHelpers` for a sync of *remote* (see `helper_count`), or None."""
    count = helper_count(remote, total)
    return SyncHelpers(count).start() if count else None


class SyncHelpers:
    """*count* helper processes for syncs, started by `start` (no reactor needed yet: a
    command starts them first thing, so they import Twisted while it does) and used by
    `sync_remote` through `serve`, one remote after another. `close` ends them."""

    def __init__(self, count: int, python: str | None = None) -> None:
        self.count = count
        self.python = python or sys.executable
        self._spawned: list[tuple[Any, socket.socket]] = []
        self._links: list[HelperLink] | None = None

    def start(self) -> SyncHelpers:
        """Start the processes now (once); returns self. A process that cannot be started
        (no memory, a process limit) is a warning, not an error: the sync then runs with the
        helpers that did start, or alone."""
        if self.count and can_fork():
            import_for_fork()
        while len(self._spawned) < self.count:
            try:
                self._spawned.append(self._spawn())
            except OSError as error:
                log.warn("cannot start a sync helper process: {error}", error=error)
                self.count = len(self._spawned)
        return self

    def _spawn(self) -> tuple[Any, socket.socket]:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        if can_fork():  # (the other helpers' sockets are not the new one's to hold)
            return _fork(ours, theirs, [sock for _p, sock in self._spawned]), ours
        try:
            process = subprocess.Popen(  # our own interpreter and module
                [self.python, "-m", "importer.helpers", str(theirs.fileno())],
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
    ) -> list[HelperLink]:
        """Configure the live helpers for one sync of *remote* into *storage*; return them.

        The syncing process keeps about half a share of ``download_concurrency``, the links
        split the rest (`HelperLink.slots`); each joins once its ``ready`` fires. Outcomes
        go to *on_stored* and *on_failed*; a dead helper's unfinished files go to
        *fallback*. An empty list for a remote the helpers cannot serve (see `eligible`), when
        no helper is alive, or when ``download_concurrency`` leaves the helpers no slot.
        """
        if not eligible(remote):
            return []
        links = [link for link in self._connect() if link.alive]
        if not links:
            return []
        # The syncing process also reads the listing, writes the catalog and hands out the
        # files: it keeps half a share of the connections (3 of 10 beside one helper: 5-10%
        # faster than 5, in interleaved runs) and the helpers split the rest.
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
        """Fires once every helper has started (said hello) or ended."""
        started = [link.started for link in self._connect()]
        return defer.gatherResults(started).addCallback(lambda _: None)

    @property
    def links(self) -> list[HelperLink]:
        """The helpers' connections (empty until the first `serve`)."""
        return list(self._links or [])

    @property
    def processes(self) -> list[Any]:
        """The helper processes (``pid``, ``poll()``), in start order."""
        return [process for process, _sock in self._spawned]

    def _connect(self) -> list[HelperLink]:
        if self._links is None:
            from twisted.internet import reactor

            self._links = []
            for process, sock in self._spawned:
                link = HelperLink(process)
                sock.setblocking(False)
                cast(IReactorSocket, reactor).adoptStreamConnection(
                    sock.fileno(), socket.AF_UNIX, SingleProtocolFactory(link)
                )
                sock.close()  # the reactor has its own copy of the descriptor
                self._links.append(link)
        return self._links

    def close(self) -> defer.Deferred[None]:
        """Close the connections (each helper then stops: downloads in flight are aborted,
        their temporary files removed) and wait for the processes to exit."""
        if self._links is None:  # never connected: closing our end is the signal
            for _process, sock in self._spawned:
                sock.close()
        else:
            for link in self._links:
                link.close()
        return self._reap()

    def disconnected(self) -> defer.Deferred[None]:
        """Fires once this process's end of every helper connection is closed (after `close`:
        on the reactor's next turn), when every helper has been told to stop."""
        lost = [link.lost for link in self._links or []]
        return defer.gatherResults(lost).addCallback(lambda _: None)

    @defer.inlineCallbacks
    def _reap(self) -> Any:
        from twisted.internet import reactor

        processes = [process for process, _sock in self._spawned]
        waited = 0.0
        while any(p.poll() is None for p in processes) and waited < EXIT_TIMEOUT:
            yield task.deferLater(reactor, EXIT_POLL, lambda: None)
            waited += EXIT_POLL
        for process in processes:
            if process.poll() is None:
                log.warn("sync helper {pid} did not exit: killed", pid=process.pid)
                process.kill()
                process.wait()


def can_fork() -> bool:
    """Whether a helper can be forked from this process as it is: on Linux, before any
    reactor is installed and while no other thread runs (a fork then copies nothing a helper
    must not touch, and the helper needs no second start of Python and its imports: ready in
    milliseconds instead of a third of a second). Otherwise helpers are started afresh
    (macOS too: system libraries there are not safe to use in a forked child)."""
    return (
        sys.platform.startswith("linux")
        and "twisted.internet.reactor" not in sys.modules
        and threading.active_count() == 1
    )


def import_for_fork() -> None:
    """Import here what a forked helper runs and a sync has not imported yet: the helper's
    own module and the platform's reactor module (imported, not installed). The syncing
    process imports the reactor anyway; every helper forked afterwards starts with both,
    instead of importing them again after the fork (some 28 M instructions, 5-15 ms, of
    each helper's start)."""
    import twisted.internet.default  # noqa: F401

    import importer.helpers.child  # noqa: F401


def _fork(
    ours: socket.socket, theirs: socket.socket, others: list[socket.socket]
) -> _ForkedProcess:
    pid = os.fork()
    if pid == 0:  # the helper: it never returns from here
        status = 1
        try:
            for sock in [ours, *others]:
                sock.close()
            from importer.helpers.child import serve

            status = serve(theirs.detach())
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(status)
    theirs.close()
    return _ForkedProcess(pid)


class _ForkedProcess:
    """The part of `subprocess.Popen` `SyncHelpers` uses, for a forked helper."""

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
    helper runs the same code as the syncing process)."""
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH", "")) if p)
    return env
