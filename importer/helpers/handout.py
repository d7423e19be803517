"""The syncing process's hand-out of files to its helper processes: `HelperLink`, its end of
one helper's connection (`importer.helpers.protocol`).

The sync gives a link a file whenever one of the helper's slots is free (`HelperLink.fetch`),
takes back what has not started once the listing is exhausted (`reclaim`), and re-fetches a
dead helper's unfinished files itself (the *fallback*). Outcomes come back as ``stored`` or
``failed`` and go to the sync's callbacks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet import defer, protocol
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure

from downloaders.transports import IStreamTransport
from importer.helpers.protocol import (
    MAX_LINE,
    WINDOW_PER_SLOT,
    HelperError,
    decode_message,
    encode_message,
    encode_sources,
)
from store.catalog import CatalogEntry

__all__ = ["HelperLink"]

log = Logger()


@attrs.define
class _Task:
    sources: list[CatalogEntry]
    #: Fires when the helper's download slot is free; None once it has.
    free: defer.Deferred[None] | None


class HelperLink(LineReceiver):
    """The syncing process's end of one helper's connection."""

    transport: IStreamTransport  # set by makeConnection

    delimiter = b"\n"
    MAX_LENGTH = MAX_LINE

    def __init__(self, process: Any) -> None:
        self.process = process
        self.alive = True
        self.slots = 0
        #: Files this helper stored (all syncs): for logs and tests.
        self.stored = 0
        #: Fires when the helper has started (its first message) or ended.
        self.started: defer.Deferred[None] = defer.Deferred()
        #: Fires once the connection is closed (this end: the helper is then stopping).
        self.lost: defer.Deferred[None] = defer.Deferred()
        #: Fires once the helper is configured for the current sync (fails if it cannot be).
        self.ready: defer.Deferred[None] | None = None
        self._tasks: dict[str, _Task] = {}
        self._idle: list[defer.Deferred[None]] = []
        self._closing = False
        self._on_stored: Callable[[str, str], None] = _ignore
        self._on_failed: Callable[[str, str, str], None] = _ignore
        self._fallback: Callable[[list[CatalogEntry]], defer.Deferred[None]] | None = None

    # Used by the sync ------------------------------------------------------------------------

    @property
    def held(self) -> frozenset[str]:
        """The sha256 of each file the helper holds (downloading, waiting for a slot or for
        its commit), for tests and logs."""
        return frozenset(self._tasks)

    @property
    def in_flight(self) -> int:
        """Files handed to the helper whose download slot is not free yet (downloading, or
        waiting for a slot there): at most `slots` of them hold a connection."""
        return sum(1 for task_ in self._tasks.values() if task_.free is not None)

    @property
    def window(self) -> int:
        """How many files the helper may hold at once (downloading or waiting for a slot)."""
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
        """Have the helper fetch a file; fires when the helper's download slot is free."""
        if not self.alive:
            assert self._fallback is not None
            return self._fallback(sources)
        free: defer.Deferred[None] = defer.Deferred()
        self._tasks[sources[0].sha256] = _Task(sources, free)
        self._send({"op": "fetch", "sources": encode_sources(sources)})
        return free

    def finish(self) -> defer.Deferred[None]:
        """Commit the helper's last files now; fires once every file it was given ended."""
        if not self._tasks or not self.alive:
            return defer.succeed(None)
        self._send({"op": "flush"})
        idle: defer.Deferred[None] = defer.Deferred()
        self._idle.append(idle)
        return idle

    def reclaim(self) -> None:
        """Take back the files the helper holds but has not started (they would wait behind
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
        """The sync is being stopped: end the helper (its files in flight are dropped)."""
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
        self.sendLine(encode_message(message))

    def lineReceived(self, line: bytes) -> None:
        try:
            message = decode_message(line)
            op = message["op"]
            if op == "hello":
                self._fire(self.started)
            elif op == "ready":
                if self.ready is not None:
                    self._fire(self.ready)
            elif op == "error":
                self._helper_failed(HelperError(message["reason"]))
            elif op == "free":
                self._free(self._tasks.get(message["sha256"]))
            elif op == "returned":
                self._fetch_here(self._tasks.pop(message["sha256"], None))
            # The outcome is counted before the slot is let go (the last file's slot ends the
            # sync, whose report is then read), and after the task is dropped (a twin of the
            # same sha256 may be handed out as it is counted).
            elif op == "stored":  # the files of a commit batch
                for sha256, url in message["files"]:
                    self.stored += 1
                    ended = self._tasks.pop(sha256, None)
                    self._on_stored(sha256, url)
                    self._free(ended)
            elif op == "failed":
                ended = self._tasks.pop(message["sha256"], None)
                self._on_failed(message["sha256"], message["url"], message["reason"])
                self._free(ended)
            else:
                raise ValueError(f"unknown message {op!r}")
        except Exception as error:  # a helper that speaks nonsense is not trusted further
            log.failure("bad message from sync helper {pid}", Failure(), pid=self.process.pid)
            self._helper_failed(HelperError(f"bad message: {error}"))
            self.transport.abortConnection()
        if not self._tasks:
            idle, self._idle = self._idle, []
            for waiter in idle:
                self._fire(waiter)

    def _free(self, task_: _Task | None) -> None:
        if task_ is not None and task_.free is not None:
            free, task_.free = task_.free, None
            self._fire(free)

    def _helper_failed(self, error: HelperError) -> None:
        log.warn("sync helper {pid}: {error}", pid=self.process.pid, error=error)
        if self.ready is not None and not self.ready.called:
            self.ready.errback(error)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._helper_failed(HelperError("message too long"))
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.alive = False
        self._fire(self.started)
        self._fire(self.lost)
        if self.ready is not None and not self.ready.called:
            self.ready.errback(HelperError("the helper process ended"))
        tasks, self._tasks = self._tasks, {}
        if tasks and not self._closing:
            log.warn(
                "sync helper {pid} ended unexpectedly; its {count} unfinished file(s) are "
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
