"""The type of a connected stream transport, as this project's protocols use it.

Twisted declares a TCP (or TLS-over-TCP) transport's calls in several interfaces: writing and
closing in `ITCPTransport`, pausing and stopping reads in `IPushProducer`, and ``disconnecting``
in none. `IStreamTransport` joins them so that a protocol can annotate its ``transport`` once
and the type checker sees every call it makes. Nothing provides it at run time: it is a type,
not a contract to adapt to.
"""

from __future__ import annotations

from twisted.internet.interfaces import IPushProducer, ITCPTransport
from zope.interface import Attribute

__all__ = ["IStreamTransport"]


class IStreamTransport(ITCPTransport, IPushProducer):
    """A connected TCP or TLS transport: `ITCPTransport` and `IPushProducer` together."""

    disconnecting = Attribute("True once loseConnection was called (bool).")
