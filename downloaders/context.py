"""State shared by the downloads of one remote: what one download learns, the others reuse.

Concurrent downloads of one remote share more than a connection pool: an auth token, a resolved
mirror list, anything a plugin's downloader computes once per remote. The factory gives every
downloader it builds the same `DownloadContext` (``downloader.context``).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure

__all__ = ["DownloadContext"]


class DownloadContext:
    """Values resolved once per remote, and a place for a plugin's own shared state.

    `resolve_once` is the helper: the first caller for a key computes the value, callers that
    arrive meanwhile wait on the same computation, later callers get the value at once. A
    failure is not kept: the next caller computes again. `forget` drops a value that went
    stale (an expired token).
    """

    def __init__(self) -> None:
        #: Resolved values by key.
        self.values: dict[Hashable, Any] = {}
        #: Anything else a plugin wants to share between the downloads of one remote.
        self.shared: dict[Hashable, Any] = {}
        self._waiting: dict[Hashable, list[defer.Deferred[Any]]] = {}
        #: How many computations each key started (for checks and metrics).
        self.computed: dict[Hashable, int] = {}

    def resolve_once(
        self, key: Hashable, compute: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> defer.Deferred[Any]:
        """A Deferred of the value for *key*: ``compute(*args, **kwargs)`` (a value, a
        Deferred or a coroutine) the first time, shared by everyone asking while it runs.

        Cancelling the returned Deferred stops waiting; the computation goes on for others.
        """
        if key in self.values:
            return defer.succeed(self.values[key])
        waiter: defer.Deferred[Any] = defer.Deferred()
        waiting = self._waiting.get(key)
        if waiting is not None:
            waiting.append(waiter)
            return waiter
        self._waiting[key] = [waiter]
        self.computed[key] = self.computed.get(key, 0) + 1
        defer.maybeDeferred(compute, *args, **kwargs).addBoth(self._resolved, key)
        return waiter

    def _resolved(self, result: Any, key: Hashable) -> None:
        waiting = self._waiting.pop(key, [])
        if not isinstance(result, Failure):
            self.values[key] = result
        for waiter in waiting:
            if waiter.called:  # cancelled by its caller
                continue
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)

    def forget(self, key: Hashable, stale: Any = None) -> None:
        """Drop the value of *key*, so the next `resolve_once` computes it again. With
        *stale*, only if the value is still that one (a value another download already
        refreshed is kept)."""
        if key in self.values and (stale is None or self.values[key] == stale):
            del self.values[key]
