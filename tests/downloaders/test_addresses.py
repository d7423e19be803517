"""`downloaders.addresses`: which addresses count as internal, and which remotes are checked."""

from __future__ import annotations

import pytest

from downloaders.addresses import AddressGuard, is_internal
from importer.remote import Remote


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "127.8.9.10",
        "localhost",
        "LOCALHOST",
        "api.localhost",
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
    ],
)
def test_internal_addresses(host):
    assert is_internal(host)


@pytest.mark.parametrize(
    "host", ["8.8.8.8", "151.101.1.1", "2606:4700::1111", "::ffff:8.8.8.8", "example.org", ""]
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
