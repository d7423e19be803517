"""Fetch one file of a sync into storage: its sources in order, then a batched commit.

A `FileFetcher` is what runs per file both in the syncing process and in its helper
processes (`importer.helpers.child`): the outcome of each file is reported through two callables,
so the same code counts a file in the sync's report or sends it to the syncing process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from downloaders.errors import DownloadError, describe_error
from downloaders.result import keep_upstream_date
from store.batches import BatchCommitter
from store.catalog import CatalogEntry
from store.storage import ARTIFACT_MODE
from store.tempdirs import remove_quietly

log = Logger()

#: ``on_stored(sha256, url)``: the content is in storage (downloaded from *url*).
Stored = Callable[[str, str], None]
#: ``on_failed(sha256, url, reason)``: no source could provide it, or it could not be stored.
Failed = Callable[[str, str, str], None]


class FileFetcher:
    """Downloads files for *remote* and commits them into *storage* in batches.

    `fetch` tries a file's sources (catalog entries of one path, in order) and fires when its
    download slot is free again: as soon as the file waits for its commit batch, unless
    ``max_backlog`` files wait already. Every file then ends in exactly one of *on_stored* or
    *on_failed*, unless the fetch or its commit is cancelled (a sync being stopped).
    """

    #: Downloads finished but not yet committed before `fetch` waits for the committer.
    max_backlog = 256
    #: Seconds a commit batch gathers files (`BatchCommitter`'s ``delay``).
    commit_delay = 0.2

    def __init__(self, remote: Any, storage: Any, on_stored: Stored, on_failed: Failed) -> None:
        self.remote = remote
        self.storage = storage
        self.on_stored = on_stored
        self.on_failed = on_failed
        # A sync's process serves nobody meanwhile: renames run in the reactor thread. Its
        # download slots are free while a file waits for its batch, so batches gather longer
        # than a server's: fewer flushes, and fewer hand-overs to the flushing thread.
        self.committer = BatchCommitter(storage, delay=self.commit_delay, inline_renames=True)
        #: Commits under way (the download slots are free meanwhile).
        self.pending: set[defer.Deferred[None]] = set()
        self._factory: Any = None

    def start(self) -> None:
        """Before the first `fetch`: temporary files are created with the artifacts' mode
        (the commit then needs no chmod), inline: a create costs less than handing the GIL to
        a thread and back (measured in bench/RESULTS.md)."""
        make = getattr(self.remote, "downloader_factory", None)  # a duck-typed remote may not
        if make is not None:
            self._factory = make()
            self._factory.temp_files(self.storage.temp_dir, mode=ARTIFACT_MODE, ahead=0)

    def finish(self) -> defer.Deferred[None]:
        """Commit what waits for a batch now; fires when every commit under way has ended."""
        self.committer.flush()  # no more files are coming

        @defer.inlineCallbacks
        def drain() -> Any:
            while self.pending:
                yield defer.DeferredList(list(self.pending), consumeErrors=True)

        return drain()

    def close_idle(self) -> defer.Deferred[None]:
        """Close the connections kept for reuse (no more files are coming to this fetcher:
        they would only hold a place of download_concurrency); fires once closed."""
        if self._factory is None:
            return defer.succeed(None)
        return self._factory.close_idle()

    def stop(self) -> defer.Deferred[None]:
        """Drop the files still waiting for a batch (removed, never committed), then stop
        using the temporary files set up by `start`."""
        for pending in list(self.pending):
            pending.cancel()
        if self._factory is None:
            return defer.succeed(None)
        factory, self._factory = self._factory, None
        return factory.release_temp_files(self.storage.temp_dir)

    def fetch(self, sources: list[CatalogEntry]) -> defer.Deferred[None]:
        """Try each source in order; hand the first valid file to the group committer.

        Fires when the download slot is free again. Plain callbacks, not a coroutine: this
        runs once per file, and a generator with its Deferreds cost more than the rest.
        """
        return self._try_source(sources, 0, [])

    def _try_source(
        self, sources: list[CatalogEntry], index: int, problems: list[tuple[str, str]]
    ) -> defer.Deferred[None]:
        if index == len(sources):  # every source failed
            if len(problems) == 1:
                url, reason = problems[0]
            else:
                url = sources[0].url
                reason = "; ".join(f"{url}: {why}" for url, why in problems)
            self.on_failed(sources[0].sha256, url, reason)
            return defer.succeed(None)
        entry = sources[index]
        try:
            downloader = self.remote.get_downloader(entry=entry, temp_dir=self.storage.temp_dir)
            running = downloader.run()
        except Exception:
            return self._source_failed(Failure(), sources, index, problems)
        args = (sources, index, problems)
        return running.addCallbacks(
            self._downloaded, self._source_failed, callbackArgs=args, errbackArgs=args
        )

    def _source_failed(
        self,
        failure: Failure,
        sources: list[CatalogEntry],
        index: int,
        problems: list[tuple[str, str]],
    ) -> Any:
        if failure.check(defer.CancelledError) or not failure.check(Exception):
            return failure
        url = sources[index].url
        assert failure.value is not None  # a Failure always holds its exception
        problems.append((url, describe_error(failure.value)))
        if len(sources) > 1:
            log.info("{url}: {reason}; trying the next source", url=url, reason=problems[-1][1])
        return self._try_source(sources, index + 1, problems)

    def _downloaded(
        self,
        result: Any,
        sources: list[CatalogEntry],
        index: int,
        problems: list[tuple[str, str]],
    ) -> Any:
        entry = sources[index]
        try:
            self._check(result, entry)
        except Exception:
            return self._source_failed(Failure(), sources, index, problems)
        keep_upstream_date(result.path, result)
        # Flush + atomic rename, in batches: even a cancelled or killed sync never leaves a
        # partial artifact. The slot is free meanwhile, unless too many files wait.
        stored = self.committer.commit(result.path, entry.sha256, entry.size)
        stored.addCallbacks(
            self._stored, self._not_stored, callbackArgs=(entry,), errbackArgs=(entry,)
        )
        self.pending.add(stored)
        stored.addBoth(self._settled, stored)
        if len(self.pending) > self.max_backlog:  # the slot waits for this file's batch
            self.committer.hurry()
            return stored
        return None

    def _settled(self, result: Any, stored: defer.Deferred[None]) -> Any:
        self.pending.discard(stored)
        return result

    @staticmethod
    def _check(result: Any, entry: CatalogEntry) -> None:
        """Refuse a result whose bytes are not the entry's (a custom downloader that skipped
        validation): it must never be committed under the entry's sha256."""
        attributes = result.artifact_attributes
        if attributes.get("sha256") != entry.sha256 or attributes.get("size") != entry.size:
            remove_quietly(result.path)
            raise DownloadError(entry.url, "the downloader did not validate size and sha256")

    def _stored(self, _: None, entry: CatalogEntry) -> None:
        self.on_stored(entry.sha256, entry.url)

    def _not_stored(self, failure: Failure, entry: CatalogEntry) -> None:
        if not failure.check(defer.CancelledError):  # cancelled: the sync is being stopped
            self.on_failed(entry.sha256, entry.url, f"cannot store: {failure.getErrorMessage()}")
