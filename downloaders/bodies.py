"""`discard_body`: the one way a response body nobody wants is let go.

Two cases, one call: a body worth draining (a redirect's few bytes) is read to its end, so
the connection can go back to the pool; a body not worth it (an attempt already over, an
error body over the limit) is aborted at once, losing that connection rather than reading it.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure

from downloaders.transports import IStreamTransport

__all__ = ["discard_body"]


class _Discard(Protocol):
    transport: IStreamTransport  # set by makeConnection

    def __init__(self, abort: bool) -> None:
        self.abort = abort
        self.done: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        if self.abort:
            self.transport.stopProducing()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.done.callback(None)


def discard_body(response: Any, *, abort: bool = False) -> defer.Deferred[None]:
    """Let *response*'s body go: read to its end and dropped, or with *abort* stopped at once.
    Fires (None) when the body ended either way."""
    protocol = _Discard(abort)
    response.deliverBody(protocol)
    return protocol.done
