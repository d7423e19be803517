"""Downloading content units that need several files: a `Group` is reported once all of its
downloads ended, while the downloads of other groups keep running.

`GroupDownloader` pulls groups lazily from any iterable (a generator of millions is fine): at most
``max_pending`` groups are in memory at once, counting those downloading and those finished but
not yet taken by the caller, so a slow consumer also slows the pulling. Download concurrency is
the factory's (its per-remote semaphore). Use it as an async iterator::

    async with GroupDownloader(factory, groups) as results:
        async for result in results:      # GroupResult, in order of completion
            ...                           # break at any point: the rest is cancelled

or with a callback: ``GroupDownloader(factory, groups).run(callback)`` returns a Deferred firing
with a `GroupSummary`; the callback may return a Deferred (the next result waits for it).
`stop()` cancels whatever is in flight (connections aborted, temporary files removed) and
removes the files of finished groups the caller did not take; files of results handed to the
caller are the caller's.
"""

from __future__ import annotations

import contextlib
import os
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import Any

import attrs
from twisted.internet import defer
from twisted.python.failure import Failure

from downloaders.interfaces import IDownloader
from downloaders.result import DownloadResult

__all__ = ["Group", "GroupDownloader", "GroupResult", "GroupSummary"]

#: A download of a group: a built downloader, a url, or ``(url, build kwargs)``.
DownloadSpec = Any
_END = object()


def _remove_files(results: Iterable[DownloadResult | None]) -> None:
    for result in results:
        if result is not None and result.path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(result.path)


@attrs.frozen
class Group:
    """A content unit: a ``key`` the caller knows it by, and the downloads it needs."""

    key: Hashable
    downloads: tuple[DownloadSpec, ...] = attrs.field(converter=tuple)


@attrs.frozen
class GroupResult:
    """How one group ended: ``results[i]`` for ``group.downloads[i]`` (None where it failed)
    and ``errors`` as ``(index, exception)`` pairs; ``ok`` when there is none."""

    group: Group
    results: tuple[DownloadResult | None, ...]
    errors: tuple[tuple[int, BaseException], ...] = ()

    @property
    def key(self) -> Hashable:
        return self.group.key

    @property
    def ok(self) -> bool:
        return not self.errors


@attrs.define
class GroupSummary:
    """Counts of a finished (or stopped) run."""

    succeeded: int = 0
    failed: int = 0
    stopped: bool = False


class GroupDownloader:
    """Runs the downloads of many groups in parallel; see the module docstring.

    :param factory: a `DownloaderFactory` building the downloads given as urls.
    :param groups: an iterable of `Group` (pulled lazily).
    :param max_pending: groups in memory at once (default: twice the download concurrency).
    """

    def __init__(
        self, factory: Any, groups: Iterable[Group], *, max_pending: int | None = None
    ) -> None:
        limit = getattr(getattr(factory, "semaphore", None), "limit", 10)
        self.factory = factory
        self.max_pending = max_pending if max_pending is not None else max(2 * limit, 2)
        if self.max_pending < 1:
            raise ValueError("max_pending must be >= 1")
        self._groups: Iterator[Group] = iter(groups)
        self._exhausted = False
        self._stopped = False
        self._pending = 0  # pulled, not yet taken by the caller
        self._in_flight: dict[int, list[defer.Deferred[Any]]] = {}
        self._finishing: dict[int, defer.Deferred[Any]] = {}
        self._ready: deque[GroupResult] = deque()
        self._source_error: Failure | None = None
        self._waiter: defer.Deferred[Any] | None = None
        self.summary = GroupSummary()
        #: The most groups ever in memory at once (for observing the bound).
        self.peak_pending = 0

    # Caller side ---------------------------------------------------------------------------------

    def __aiter__(self) -> GroupDownloader:
        return self

    async def __anext__(self) -> GroupResult:
        self._fill()
        if not self._ready and not self._finished():
            self._waiter = defer.Deferred()
            await self._waiter
        if not self._ready:
            source_error, self._source_error = self._source_error, None
            if source_error is not None and not self._stopped:
                source_error.raiseException()
            raise StopAsyncIteration
        item = self._ready.popleft()
        self._pending -= 1
        self._fill()
        return item

    async def __aenter__(self) -> GroupDownloader:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.stop()

    def run(self, callback: Callable[[GroupResult], Any]) -> defer.Deferred[GroupSummary]:
        """Call ``callback(result)`` for every group as it completes; fire with the summary.

        If the callback raises, everything stops and the Deferred fails with that error.
        Cancelling the Deferred stops too.
        """

        async def loop() -> GroupSummary:
            try:
                async for result in self:
                    await defer.maybeDeferred(callback, result)
            finally:
                await self.stop()
            return self.summary

        return defer.ensureDeferred(loop())

    def fetch(self, timeout: float | None = None) -> list[GroupResult]:
        """From plain code: run every group and return their results, in order of completion
        (as `BaseDownloader.fetch` is for one download). All results are kept: for a bounded
        input; a generator of millions wants `run` or ``async for``."""
        from downloaders.base import blocking

        def start() -> defer.Deferred[list[GroupResult]]:
            results: list[GroupResult] = []
            return self.run(results.append).addCallback(lambda _: results)

        return blocking(start, timeout, "", "GroupDownloader.fetch()", "run() or async for")

    def stop(self) -> defer.Deferred[None]:
        """Pull no more groups, cancel the downloads in flight; fires when they all ended."""
        if not self._stopped:
            self.summary.stopped = not self._finished()
            self._stopped = True
            close = getattr(self._groups, "close", None)
            if close is not None:
                close()
            for downloads in list(self._in_flight.values()):
                for running in downloads:
                    running.cancel()
            # Finished groups the caller never took: their files are nobody's.
            while self._ready:
                _remove_files(self._ready.popleft().results)
            self._wake()
        ending = list(self._finishing.values())
        return defer.gatherResults(ending, consumeErrors=True).addBoth(lambda _: None)

    # Engine ------------------------------------------------------------------------------------

    def _finished(self) -> bool:
        return self._stopped or (self._exhausted and self._pending == len(self._ready))

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            waiter.callback(None)

    def _fill(self) -> None:
        while not self._stopped and not self._exhausted and self._pending < self.max_pending:
            try:
                group = next(self._groups)
            except StopIteration:
                self._exhausted = True
                break
            except Exception:
                # A broken source is reported to the caller, after the groups before it.
                self._exhausted = True
                self._source_error = Failure()
                break
            self._pending += 1
            self.peak_pending = max(self.peak_pending, self._pending)
            self._start(group)
        if self._exhausted and self._pending == len(self._ready):
            self._wake()

    def _start(self, group: Group) -> None:
        downloads = [self._launch(spec) for spec in group.downloads]
        token = id(downloads)
        self._in_flight[token] = downloads
        finishing = defer.DeferredList(downloads, consumeErrors=True)
        self._finishing[token] = finishing
        finishing.addCallback(self._group_done, group, token)

    def _launch(self, spec: DownloadSpec) -> defer.Deferred[DownloadResult]:
        try:
            if IDownloader.providedBy(spec):
                downloader = spec
            elif isinstance(spec, str):
                downloader = self.factory.build(spec)
            else:
                url, kwargs = spec
                downloader = self.factory.build(url, **dict(kwargs or {}))
            return downloader.run()
        except Exception:
            return defer.fail()

    def _group_done(self, outcomes: list[tuple[bool, Any]], group: Group, token: int) -> None:
        del self._in_flight[token]
        del self._finishing[token]
        results = tuple(value if ok else None for ok, value in outcomes)
        if self._stopped:
            _remove_files(results)
            return
        errors = tuple((i, value.value) for i, (ok, value) in enumerate(outcomes) if not ok)
        result = GroupResult(group, results, errors)
        if result.ok:
            self.summary.succeeded += 1
        else:
            self.summary.failed += 1
        self._ready.append(result)
        self._wake()
