"""Client factories that say "Starting factory" at debug level, not info.

Twisted logs ``Starting factory <...>`` and ``Stopping factory <...>`` at info level whenever a
``Factory`` with ``noisy = True`` (the default) starts or stops. A client factory starts with
each new upstream connection, so a busy streamer's log was mostly these lines. The factories
of this package use `QuietStart` (the same lines, at debug level), and `quiet_pool` is an
``HTTPConnectionPool`` whose connection factory does too.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger
from twisted.web.client import HTTPConnectionPool, _HTTP11ClientFactory

__all__ = ["QuietStart", "quiet_pool"]

_log = Logger()


class QuietStart:
    """Mix into a ``Factory``: its start and stop are logged at debug level only."""

    noisy = False

    def startFactory(self) -> None:
        _log.debug("Starting factory {factory!r}", factory=self)

    def stopFactory(self) -> None:
        _log.debug("Stopping factory {factory!r}", factory=self)


class _QuietHTTP11ClientFactory(QuietStart, _HTTP11ClientFactory):
    """Twisted's connection factory of ``HTTPConnectionPool``, logging at debug level."""


def quiet_pool(reactor: Any, persistent: bool = True) -> HTTPConnectionPool:
    """An ``HTTPConnectionPool`` whose connections' factories log at debug level."""
    pool = HTTPConnectionPool(reactor, persistent=persistent)
    pool._factory = _QuietHTTP11ClientFactory
    return pool
