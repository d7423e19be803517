"""`downloaders.addresses`: which addresses count as internal, and which remotes are checked."""

from __future__ import annotations

import pytest
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock

from downloaders.addresses import AddressGuard, CheckedEndpoint, InternalAddressRefused, is_internal
from importer.remote import Remote
from tests.support.resolver import MappedNames


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "127.8.9.10",
        "localhost",
        "LOCALHOST",
        "api.localhost",
        "localhost.",
        "0.0.0.0",
        "10.0.0.1",
        "172.16.5.4",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "224.0.0.1",
        "::1",
        "[::1]",
        "::",
        "fe80::1",
        "fe80::1%eth0",
        "fd00::2",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "::127.0.0.1",
        "64:ff9b::a00:1",
        "2002:c0a8:101::",
        "ff02::1",
        "fec0::1",
        "::ffff:0:7f00:1",
        # IPv4 shorthands (inet_aton's forms): a proxy connects to 127.0.0.1 / 10.0.0.1
        "127.1",
        "2130706433",
        "0x7f000001",
        "0x7f.0.0.1",
        "0177.0.0.1",
        "10.1",
        "0",
    ],
)
def test_internal_addresses(host):
    assert is_internal(host)


@pytest.mark.parametrize(
    "host",
    [
        "8.8.8.8",
        "151.101.1.1",
        "2606:4700::1111",
        "::ffff:8.8.8.8",
        "example.org",
        "",
        "134744072",  # 8.8.8.8 as one number
        "0x8.0x8.0x8.0x8",
        "cafe",
        "deadbeef.example",
        "1.2.3.4.5",
    ],
)
def test_public_addresses_and_names(host):
    assert not is_internal(host)


@pytest.mark.parametrize(
    ("url", "extra", "active"),
    [
        ("https://repo.example.org/PULP_MANIFEST", {}, True),
        ("https://repo.example.org/PULP_MANIFEST", {"allow_private_redirects": True}, False),
        ("http://127.0.0.1:8000/PULP_MANIFEST", {}, False),
        ("http://[::1]:8000/PULP_MANIFEST", {}, False),
        ("http://localhost/PULP_MANIFEST", {}, False),
        ("http://10.0.0.5/PULP_MANIFEST", {}, False),
        ("http://mirror.lan/PULP_MANIFEST", {}, True),  # a name is not resolved for this
    ],
)
def test_the_guard_applies_unless_the_remote_names_an_internal_host(url, extra, active):
    guard = AddressGuard.for_remote(Remote(name="r", url=url, **extra))
    assert guard.active is active


def test_the_remotes_own_hosts_and_mirrors_are_never_checked():
    remote = Remote(
        name="r",
        url="https://Repo.Example.org/m",
        mirrors=["http://10.0.0.7/m/", "http://cache/"],
        mirror_list="https://lists.example.org/mirrors.txt",
    )
    guard = AddressGuard.for_remote(remote)
    assert guard.own_hosts == {"repo.example.org", "10.0.0.7", "cache", "lists.example.org"}
    assert not guard.checks("repo.example.org") and not guard.checks("10.0.0.7")
    assert guard.checks("cdn.example.net")
    assert guard.refuses("http://127.0.0.1/x") and not guard.refuses("http://10.0.0.7/x")
    assert not guard.refuses("http://cdn.example.net/x")  # names: checked when connecting


def connect_by_name(addresses: list[str]):
    """`CheckedEndpoint` to ``name.test`` (resolving to *addresses*) on a memory reactor:
    the connection attempts it makes are recorded, none is sent anywhere."""
    reactor = MemoryReactorClock()
    reactor.installNameResolver(MappedNames({"name.test": addresses}, fallback=None))
    connecting = CheckedEndpoint(reactor, "name.test", 80, timeout=5).connect(
        Factory.forProtocol(Protocol)
    )
    reactor.advance(1)  # past happy eyeballs' attempt delay
    return connecting, [client[0] for client in reactor.tcpClients]


def test_a_name_is_connected_to_on_its_public_addresses_only():
    # What a rebinding server would need: the check and the connection on one lookup.
    connecting, attempts = connect_by_name(["127.0.0.1", "93.184.216.34", "::1", "fd00::5"])
    assert attempts == ["93.184.216.34"]
    connecting.cancel()
    connecting.addErrback(lambda _: None)


def test_a_name_with_internal_addresses_only_is_refused_before_any_connection():
    connecting, attempts = connect_by_name(["127.0.0.1", "::ffff:10.0.0.1"])
    assert attempts == []
    failure = []
    connecting.addErrback(failure.append)
    [refused] = failure
    assert refused.check(InternalAddressRefused)
    assert "name.test (127.0.0.1, ::ffff:10.0.0.1) is an internal address" in str(refused.value)
