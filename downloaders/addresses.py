"""Keeping a remote's redirects out of internal networks: `AddressGuard`.

A public upstream that redirects to ``http://127.0.0.1:6379/`` or ``http://169.254.169.254/``
must not make us connect there: the status and timing of our answer would make the streamer
a probe of the network it runs in. The rule, per remote:

* It applies unless ``allow_private_redirects`` is set, or the remote's own url names an
  internal host *literally*: an address in an internal range, or ``localhost`` (RFC 6761).
  The remote's host name is not resolved for this decision (a name's answer may change, and
  the decision must not). A remote on a private network addressed by name whose redirects
  stay in that network sets ``allow_private_redirects = true``.
* Then no connection to a host other than the remote's own and its configured mirrors' (a
  redirect target, a mirror a fetched mirror list names) reaches an internal address:
  loopback, link-local, private, shared (100.64/10), unspecified, reserved, multicast; IPv6
  alike; an IPv4 address inside IPv6 (``::ffff:a.b.c.d``, ``::a.b.c.d``, NAT64
  ``64:ff9b::/96``, ``::ffff:0:a.b.c.d``, 6to4) counts as that IPv4 address.
* The check is on the address actually connected to: `CheckedEndpoint` resolves the name
  once, drops internal addresses, and connects only to the addresses it checked (there is no
  second lookup a rebinding DNS server could answer differently). With none left the
  connection fails with `InternalAddressRefused` and nothing is sent anywhere. A redirect to
  an address literal is refused before that, without any lookup (`AddressGuard.refuses`),
  also through a proxy; IPv4 counts in every form ``inet_aton`` takes (``127.1``,
  ``2130706433``, ``0x7f.0.0.1``), which a proxy connects to as it would to ``127.0.0.1``.
  Through a proxy, names are resolved by the proxy: its policy applies.
"""

from __future__ import annotations

# Every lookup (``getaddrinfo``, in a thread) encodes the host name with this codec. Imported
# on first use, its import fails in a process out of descriptors (EMFILE), and Twisted's lookup
# then never answers: the download would hang until a timeout instead of failing at once.
import encodings.idna  # noqa: F401
import ipaddress
import socket
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import urlsplit

import attrs
from twisted.internet import defer, error
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import (
    IAddress,
    IHostnameResolver,
    IHostResolution,
    IReactorPluggableNameResolver,
    IResolutionReceiver,
    IStreamClientEndpoint,
)
from zope.interface import implementer

__all__ = ["AddressGuard", "CheckedEndpoint", "InternalAddressRefused", "is_internal"]

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
#: IPv4-translated addresses (RFC 2765 ``::ffff:0:a.b.c.d``).
_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")
#: Internal, though Python's ``is_global`` says otherwise: deprecated site-local IPv6.
_ALSO_INTERNAL = (ipaddress.ip_network("fec0::/10"),)


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for, if it is one of the forms carrying one."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if int(ip) >> 32 == 0 or ip in _NAT64 or ip in _TRANSLATED:  # ::a.b.c.d, NAT64, SIIT
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _ipv4_shorthand(host: str) -> ipaddress.IPv4Address | None:
    """The IPv4 address *host* writes in a form ``inet_aton`` takes and ``ipaddress`` does
    not (``127.1``, ``2130706433``, ``0x7f.0.0.1``, ``0177.0.0.1``), or None. A proxy (squid
    parses hosts with ``getaddrinfo``), curl and browsers all connect to that address."""
    if not host or host.strip("0123456789abcdefx."):
        return None  # (a name: letters beyond hex digits, or nothing at all)
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


def is_internal(host: str) -> bool:
    """Whether *host* (an address literal, or ``localhost``) is an internal address.

    A name other than ``localhost`` / ``*.localhost`` is not internal here: names are judged
    by the addresses they resolve to (`CheckedEndpoint`).
    """
    host = host.strip("[]").lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(
            host.split("%", 1)[0]
        )
    except ValueError:
        shorthand = _ipv4_shorthand(host)
        if shorthand is None:
            return False
        ip = shorthand
    if isinstance(ip, ipaddress.IPv6Address):
        ip = _embedded_ipv4(ip) or ip
    return not ip.is_global or ip.is_multicast or any(ip in net for net in _ALSO_INTERNAL)


def _host(url: str) -> str:
    try:
        return (urlsplit(url).hostname or "").lower()
    except ValueError:
        return ""


class InternalAddressRefused(error.ConnectError):
    """Every address of a host is internal, and the remote may not reach those."""

    def __init__(self, host: str, addresses: Iterable[str] = ()) -> None:
        self.host = host
        self.addresses = tuple(addresses)
        shown = f" ({', '.join(self.addresses)})" if self.addresses not in ((), (host,)) else ""
        self.text = (
            f"{host}{shown} is an internal address, which this remote may not reach "
            "(allow_private_redirects is off)"
        )
        super().__init__(string=self.text)

    def __str__(self) -> str:
        return self.text


@attrs.frozen
class AddressGuard:
    """What one remote may connect to (see the module docstring).

    :param active: False when the remote may reach internal addresses anyway.
    :param own_hosts: the hosts of the remote's own url, its ``mirrors`` and its
        ``mirror_list`` url (all configured by the operator), never checked. The mirrors a
        fetched mirror list names are the upstream's word: checked like redirect targets.
    """

    active: bool
    own_hosts: frozenset[str] = frozenset()

    @classmethod
    def for_remote(cls, remote: Any) -> AddressGuard:
        """The guard of a remote (anything with ``url``, ``allow_private_redirects`` and,
        optionally, ``mirrors``)."""
        own = _host(remote.url)
        configured = [
            remote.url,
            getattr(remote, "mirror_list", ""),
            *getattr(remote, "mirrors", ()),
        ]
        hosts = frozenset(h for h in map(_host, configured) if h)
        allowed = bool(getattr(remote, "allow_private_redirects", False))
        return cls(active=not allowed and not is_internal(own), own_hosts=hosts)

    def checks(self, host: str) -> bool:
        """Whether connections to *host* must avoid internal addresses."""
        return self.active and host.lower() not in self.own_hosts

    def refuses(self, url: str) -> bool:
        """Whether *url* names an internal address literally (no lookup) that the remote may
        not reach."""
        host = _host(url)
        return self.checks(host) and is_internal(host)


@implementer(IResolutionReceiver)
class _Collect:
    def __init__(self) -> None:
        self.addresses: list[Any] = []
        self.done: defer.Deferred[list[Any]] = defer.Deferred()

    def resolutionBegan(self, resolution: Any) -> None:
        pass

    def addressResolved(self, address: Any) -> None:
        self.addresses.append(address)

    def resolutionComplete(self) -> None:
        if not self.done.called:  # not cancelled meanwhile
            self.done.callback(self.addresses)


@implementer(IHostnameResolver)
class _Resolved:
    """A resolver that answers with addresses already known (those `CheckedEndpoint` kept)."""

    def __init__(self, addresses: list[Any]) -> None:
        self._addresses = addresses

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Sequence[type[IAddress]] | None = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        resolution = _Finished(hostName)
        resolutionReceiver.resolutionBegan(resolution)
        for address in self._addresses:
            resolutionReceiver.addressResolved(address)
        resolutionReceiver.resolutionComplete()
        return resolution


@implementer(IHostResolution)
@attrs.frozen
class _Finished:
    """What `_Resolved` answers with: a resolution already complete."""

    name: str

    def cancel(self) -> None:
        """Nothing is in progress: nothing to cancel."""


@implementer(IReactorPluggableNameResolver)
class _WithResolver:
    """The reactor, seen through *resolver* by a `HostnameEndpoint` (everything else is the
    reactor's own)."""

    def __init__(self, reactor: Any, resolver: Any) -> None:
        self._reactor = reactor
        self.nameResolver = resolver

    def installNameResolver(self, resolver: Any) -> Any:
        raise NotImplementedError("a fixed view of the reactor")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)


@implementer(IStreamClientEndpoint)
class CheckedEndpoint:
    """A `HostnameEndpoint` that connects only to the non-internal addresses of its host.

    The name is resolved through the reactor's resolver; the endpoint then races connections
    to the kept addresses as `HostnameEndpoint` does (happy eyeballs), without a new lookup.
    """

    def __init__(self, reactor: Any, host: str, port: int, timeout: float | None = None) -> None:
        self._reactor = reactor
        self._host = host
        self._port = port
        self._timeout: dict[str, Any] = {} if timeout is None else {"timeout": timeout}

    def connect(self, protocolFactory: Any) -> defer.Deferred[Any]:
        collect = _Collect()
        self._reactor.nameResolver.resolveHostName(collect, self._host, portNumber=self._port)
        return collect.done.addCallback(self._connect_to, protocolFactory)

    def _connect_to(self, addresses: list[Any], factory: Any) -> defer.Deferred[Any]:
        kept = [a for a in addresses if not is_internal(a.host)]
        if not kept:
            if addresses:
                raise InternalAddressRefused(self._host, [a.host for a in addresses])
            raise error.DNSLookupError(f"no results for hostname lookup: {self._host}")
        reactor = _WithResolver(self._reactor, _Resolved(kept))
        endpoint = HostnameEndpoint(reactor, self._host, self._port, **self._timeout)
        return endpoint.connect(factory)
