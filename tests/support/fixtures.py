"""pytest fixtures for real loopback upstreams and certificates (registered by tests/conftest.py).

Every server a fixture starts is stopped at teardown: its port closed and its connections
aborted, so the shared reactor stays clean for the next test. By default the fixtures also
fail a test that leaves a connection to the upstream open (a client that does not close its
connection pool); set ``server.check_leaks = False`` in a test where that is intended.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import pytest_twisted

from tests.support.certs import Certs, ServerTLS, make_certs
from tests.support.faults import pending_timers
from tests.support.upstream import UpstreamServer

__all__ = [
    "HTTP_CLIENTS",
    "assert_no_temp_files",
    "certs",
    "http_client",
    "parametrize_http_client",
    "tls_upstream",
    "upstream",
    "upstream_factory",
    "use_http_client",
]

#: The clients a `DownloaderFactory`'s GETs can go through: ours (`DirectGetAgent`, llhttp)
#: and Twisted's ``Agent``. Downloader tests run over both, so the two cannot drift apart.
HTTP_CLIENTS = ("direct", "twisted")

#: How long teardown waits for clients to close their connections before calling it a leak.
LEAK_GRACE_SECONDS = 2.0

UpstreamFactory = Callable[..., UpstreamServer]


def _shut_down(servers: list[UpstreamServer]) -> None:
    """Stop every server; then fail if one of them still had connections open."""
    leaks = []
    for server in servers:
        if server.check_leaks:
            idle = pytest_twisted.blockon(server.wait_until_idle(LEAK_GRACE_SECONDS))
            if not idle:
                leaks.append(f"{server.url('/')}: {server.open_connections} open")
        pytest_twisted.blockon(server.stop())
    timers = pending_timers()
    assert not timers, f"fault behaviours left timers running: {timers}"
    if leaks:
        pytest.fail("connections to the upstream were left open: " + "; ".join(leaks))


@pytest.fixture
def upstream_factory() -> Iterator[UpstreamFactory]:
    """A function ``make(tls=None) -> UpstreamServer`` starting more upstreams (mirrors);
    callable from tests and fixtures alike; all are stopped and leak-checked at teardown."""
    servers: list[UpstreamServer] = []

    def make(tls: ServerTLS | None = None) -> UpstreamServer:
        server = UpstreamServer().listen(tls=tls)
        servers.append(server)
        return server

    yield make
    _shut_down(servers)


@pytest.fixture
def upstream(upstream_factory: UpstreamFactory) -> UpstreamServer:
    """A started plain-HTTP :class:`UpstreamServer` on 127.0.0.1."""
    return upstream_factory()


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """A trustme CA with server, wrong-host, untrusted and client certificates as PEM files."""
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def tls_upstream(upstream_factory: UpstreamFactory, certs: Certs) -> UpstreamServer:
    """A started HTTPS :class:`UpstreamServer` whose certificate ``certs.ca_pem`` validates."""
    return upstream_factory(tls=certs.server)


def _leftovers(folder: Path) -> list[str]:
    if not folder.exists():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir())


@pytest.fixture
def assert_no_temp_files() -> Callable[[Path], None]:
    """A function ``check(folder)`` failing if any file is left under ``folder`` (a temp or
    partial-download folder must be empty once a download finished or failed)."""

    def check(folder: Path) -> None:
        left = _leftovers(Path(folder))
        assert not left, f"temporary files left under {folder}: {left}"

    return check


def use_http_client(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the factories built from now on send their GETs through client *name* (one of
    `HTTP_CLIENTS`), until *monkeypatch* undoes it."""
    from downloaders.factory import DownloaderFactory

    if name not in HTTP_CLIENTS:
        raise ValueError(f"no HTTP client {name!r}")
    monkeypatch.setattr(DownloaderFactory, "direct_get", name == "direct")


@pytest.fixture
def http_client(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The client of this test's downloads (``direct`` unless parametrised: see
    `parametrize_http_client`); `DownloaderFactory` uses it, and so does the downloader tests'
    ``agent`` fixture."""
    name = getattr(request, "param", HTTP_CLIENTS[0])
    use_http_client(name, monkeypatch)
    return name


def parametrize_http_client(metafunc: pytest.Metafunc) -> None:
    """``pytest_generate_tests`` of a test folder: a test using ``http_client`` (directly,
    through a fixture or ``pytest.mark.usefixtures``) runs once per client."""
    if "http_client" in metafunc.fixturenames:
        metafunc.parametrize("http_client", HTTP_CLIENTS, indirect=True)
