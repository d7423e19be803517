"""Host names for tests without /etc/hosts: a resolver that answers some names from a table.

`MappedNames` answers the names it maps (to loopback addresses, so no traffic leaves the
machine) and passes every other name to the resolver it replaces. Installed on the reactor
(`mapped_names`), it is what every ``HostnameEndpoint`` of the process resolves through: the
service under test connects by name exactly as it would with real DNS.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from twisted.internet import reactor
from twisted.internet._resolver import HostResolution
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IHostnameResolver
from zope.interface import implementer

__all__ = ["MappedNames", "mapped_names"]


@implementer(IHostnameResolver)
class MappedNames:
    """Answers the names of *names* (``{name: [address, ...]}``) with their addresses, in
    that order; any other name goes to *fallback*."""

    def __init__(self, names: Mapping[str, Sequence[str]], fallback: Any) -> None:
        self.names = {name.lower(): list(addresses) for name, addresses in names.items()}
        self.fallback = fallback
        #: Every name looked up through this resolver, in order.
        self.lookups: list[str] = []

    def resolveHostName(
        self,
        resolutionReceiver: Any,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Any = None,
        transportSemantics: str = "TCP",
    ) -> Any:
        self.lookups.append(hostName)
        addresses = self.names.get(hostName.lower())
        if addresses is None:
            return self.fallback.resolveHostName(
                resolutionReceiver, hostName, portNumber, addressTypes, transportSemantics
            )
        resolution = HostResolution(hostName)
        resolutionReceiver.resolutionBegan(resolution)
        for address in addresses:
            kind = IPv6Address if ":" in address else IPv4Address
            resolutionReceiver.addressResolved(kind("TCP", address, portNumber))
        resolutionReceiver.resolutionComplete()
        return resolution


@contextmanager
def mapped_names(names: Mapping[str, Sequence[str]]) -> Iterator[MappedNames]:
    """Resolve *names* through a `MappedNames` on the global reactor, until the block ends."""
    resolver = MappedNames(names, reactor.nameResolver)
    previous = reactor.installNameResolver(resolver)
    try:
        yield resolver
    finally:
        reactor.installNameResolver(previous)
