"""A sync's helper process: `serve` in a child `SyncHelpers` forked, or ``python -m
importer.helpers FD`` where it cannot fork.

It speaks the messages described in `importer.helpers.protocol` over the socket *FD*: for each
``config`` it rebuilds the remote and opens the storage, then fetches every file it is given
with a `FileFetcher` (the code the syncing process runs for its own files) and reports each
outcome. When the connection closes (the sync is over, stopped, or the syncing process
died) it aborts what is in flight, removes its temporary files and exits.
"""

from __future__ import annotations

import collections
import gc
import os
import signal
import socket
import sys
from collections.abc import Sequence
from typing import Any, cast

from twisted.internet import defer, protocol
from twisted.internet.posixbase import PosixReactorBase
from twisted.logger import (
    FilteringLogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure

from downloaders.transports import IStreamTransport
from importer.fetcher import FileFetcher
from importer.helpers.protocol import (
    MAX_LINE,
    SingleProtocolFactory,
    decode_message,
    decode_sources,
    encode_message,
)
from importer.remote import Remote
from store.catalog import CatalogEntry
from store.storage import ArtifactStorage

log = Logger()


class HelperSide(LineReceiver):
    """The helper's end of the connection: one sync (one ``config``) at a time."""

    transport: IStreamTransport  # set by makeConnection

    delimiter = b"\n"
    MAX_LENGTH = MAX_LINE

    def __init__(self) -> None:
        self.remote: Any = None
        self.storage: ArtifactStorage | None = None
        self.fetcher: FileFetcher | None = None
        self.slots = 1
        #: Files given ahead of a free slot, in order: ``(sha256, sources)``.
        self._queue: collections.deque[tuple[str, list[CatalogEntry]]] = collections.deque()
        self._fetching: set[defer.Deferred[None]] = set()
        #: Fires once the connection is gone and everything is cleaned up.
        self.finished: defer.Deferred[None] = defer.Deferred()
        self._previous: defer.Deferred[Any] = defer.succeed(None)
        #: The syncing process has handed out every file of this sync.
        self._handed_out = False
        #: Files stored in this reactor turn, ``[sha256, url]`` each: one message at its end.
        self._stored_files: list[list[str]] = []

    def connectionMade(self) -> None:
        self._send(op="hello", pid=os.getpid())

    def lineReceived(self, line: bytes) -> None:
        message = decode_message(line)
        op = message["op"]
        if op == "fetch":
            if self.fetcher is None:
                raise ValueError("fetch before config")
            entries = decode_sources(message["sources"])
            self._queue.append((entries[0].sha256, entries))
            self._pump()
        elif op == "return":  # every file is handed out: no more are coming
            self._handed_out = True
            self._give_back(set(message["sha256s"]))
        elif op == "flush":
            if self.fetcher is not None:
                self.fetcher.committer.flush()
        elif op == "config":
            self._configure(message["remote"], message["storage"])
        else:
            raise ValueError(f"unknown message {op!r}")

    def _configure(self, fields: dict[str, Any], root: str) -> None:
        self._previous = self._end_sync()
        try:
            remote = Remote(**fields)
            storage = ArtifactStorage(root)
        except Exception as error:
            self._send(op="error", reason=f"cannot configure: {error}")
            return

        def begin(_: Any) -> None:
            self.remote = remote
            self.slots = remote.download_concurrency
            self.storage = storage
            self.fetcher = FileFetcher(remote, storage, self._stored, self._failed)
            self.fetcher.start()
            self._handed_out = False
            self._send(op="ready")

        self._previous.addBoth(begin)

    def _pump(self) -> None:
        """Start queued files while a download slot is free."""
        while self._queue and len(self._fetching) < self.slots and self.fetcher is not None:
            sha256, entries = self._queue.popleft()
            fetching = self.fetcher.fetch(entries)
            if not fetching.called:
                self._fetching.add(fetching)
            fetching.addBoth(self._free, fetching, sha256)

    def _give_back(self, wanted: set[str]) -> None:
        """The syncing process takes back files that have not started here (its own slots
        are idle at the end of a sync: they should not wait behind a slow download here)."""
        kept: collections.deque[tuple[str, list[CatalogEntry]]] = collections.deque()
        for sha256, entries in self._queue:
            if sha256 in wanted:
                self._send(op="returned", sha256=sha256)
            else:
                kept.append((sha256, entries))
        self._queue = kept
        self._close_idle()

    def _close_idle(self) -> defer.Deferred[None] | None:
        """Once no more files are coming, a connection left idle is closed (the syncing
        process downloads the files given back: the connections stay within
        download_concurrency in all); fires once it is closed. None: nothing to close."""
        if self._handed_out and not self._queue and self.fetcher is not None:
            return self.fetcher.close_idle()
        return None

    def _free(self, result: Any, fetching: defer.Deferred[None], sha256: str) -> None:
        self._fetching.discard(fetching)
        if isinstance(result, Failure) and not result.check(defer.CancelledError):
            log.failure("fetching {sha256}", result, sha256=sha256)
        if self.transport is not None and not self.transport.disconnecting:
            self._pump()
            closing = self._close_idle()
            if closing is None:
                self._send(op="free", sha256=sha256)
            else:  # the syncing process may use the place once the connection is closed
                closing.addBoth(lambda _: self._send(op="free", sha256=sha256))

    def _stored(self, sha256: str, url: str) -> None:
        """A file entered storage: said with the others of its batch (they come together,
        as the batch's renames end), in one message once this reactor turn is over: the
        syncing process, the busier one, reads one line per batch instead of one per file."""
        if not self._stored_files:
            from twisted.internet import reactor

            reactor.callLater(0, self._send_stored)
        self._stored_files.append([sha256, url])

    def _send_stored(self) -> None:
        files, self._stored_files = self._stored_files, []
        self._send(op="stored", files=files)

    def _failed(self, sha256: str, url: str, reason: str) -> None:
        self._send(op="failed", sha256=sha256, url=url, reason=reason)

    def _send(self, **message: Any) -> None:
        if self.transport is not None and self.connected:
            self.sendLine(encode_message(message))

    @defer.inlineCallbacks
    def _end_sync(self) -> Any:
        """Abort what is in flight, drop files waiting for a batch, close the remote."""
        self._queue.clear()
        for fetching in list(self._fetching):
            fetching.cancel()
        fetcher, self.fetcher = self.fetcher, None
        remote, self.remote = self.remote, None
        storage, self.storage = self.storage, None
        if fetcher is not None:
            yield fetcher.stop()
        if remote is not None:
            yield remote.close()
        if storage is not None:
            storage.close()  # this process's temporary folder

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.connected = False
        done = self._end_sync()
        done.addErrback(lambda failure: log.failure("stopping", failure))
        done.addBoth(lambda _: self.finished.callback(None))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m importer.helpers FD``: serve the syncing process on the socket *FD*."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or not args[0].isdigit():
        print("usage: python -m importer.helpers FD (started by a sync)", file=sys.stderr)
        return 2
    return serve(int(args[0]))


def serve(fd: int) -> int:
    """Serve the syncing process on the connected socket *fd* until it closes; the exit
    status. Installs and runs this process's reactor: call it in a fresh process (or one
    forked before any reactor was installed)."""
    # Ctrl-C and a terminal's hang-up reach the syncing process too, which decides; the
    # helper stops when the connection closes
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    from twisted.internet import reactor as installed

    reactor = cast(PosixReactorBase, installed)  # (typed as less than it is)
    gc.freeze()  # imports done: out of the collector's sight (a no-op when forked after it)
    warnings = LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)
    observer = FilteringLogObserver(textFileLogObserver(sys.stderr), [warnings])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    side = HelperSide()
    os.set_blocking(fd, False)
    reactor.adoptStreamConnection(fd, socket.AF_UNIX, SingleProtocolFactory(side))
    os.close(fd)
    side.finished.addBoth(lambda _: reactor.stop())
    reactor.run(installSignalHandlers=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
