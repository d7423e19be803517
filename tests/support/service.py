"""The whole service in-process, for hostile-client and security tests.

`ServiceEnv` writes a real TOML configuration under tmp_path (listening on a free loopback
port, one ``fixtures`` remote at the fault upstream, optionally a signing key), starts the real
`StreamerService` (its Site, root resource, signed-URL check, content resource, lazy streamer,
SQLite catalog and artifact storage) and offers stored and lazy content to request. The
``make_service`` fixture starts them (a pytest plugin: see tests/conftest.py). The other way
to run the service under test is a ``twistd`` child: tests/support/twistd.py.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer

from store import CatalogEntry
from streamer.config import load_config
from streamer.service import StreamerService
from tests.support.polling import until
from tests.support.upstream import UpstreamServer

__all__ = ["ServiceEnv", "make_service", "open_fds"]

SIGNING_KEY = b"0123456789abcdef-fault-tests-key"


def open_fds() -> int:
    """File descriptors open in this process now (Linux /proc)."""
    return len(os.listdir("/proc/self/fd"))


class ServiceEnv:
    """A running `StreamerService` whose ``fixtures`` remote points at *upstream*."""

    def __init__(
        self,
        tmp_path: Path,
        upstream: UpstreamServer,
        *,
        policy: str = "on_demand",
        stall_timeout: float = 1.0,
        signed: bool = False,
        remote_extra: str = "",
        security_extra: str = "",
        server_extra: str = "",
        listen: str = "tcp:0:interface=127.0.0.1",
        catalog_url: str = "",
        upstream_host: str = "127.0.0.1",
    ) -> None:
        self.tmp_path = tmp_path
        self.upstream = upstream
        key_line = ""
        if signed:
            key_file = tmp_path / "signing.key"
            key_file.write_bytes(SIGNING_KEY)
            key_line = f'signing_key_file = "{key_file.name}"\n'
        config = tmp_path / "streamer.toml"
        config.write_text(
            "[server]\n"
            f'listen = "{listen}"\n'
            "grace_period = 1\n"
            f"stall_timeout = {stall_timeout}\n" + server_extra + "[storage]\n"
            'path = "var"\n'
            + (f'[catalog]\nurl = "{catalog_url}"\n' if catalog_url else "")
            + "[security]\n"
            + key_line
            + security_extra
            + "[[remotes]]\n"
            'name = "fixtures"\n'
            f'url = "{upstream.url("/PULP_MANIFEST", host=upstream_host)}"\n'
            f'policy = "{policy}"\n'
            "max_retries = 0\n"
            "sock_read_timeout = 2\n" + remote_extra
        )
        self.config = load_config(config, environ={})
        self.service = StreamerService(self.config)
        self._entries: list[CatalogEntry] = []

    @property
    def key(self) -> bytes:
        return SIGNING_KEY

    @property
    def storage(self) -> Any:
        return self.service.storage

    @property
    def catalog(self) -> Any:
        return self.service.catalog

    @property
    def lazy(self) -> Any:
        return self.service.content.lazy

    @property
    def port(self) -> int:
        return self.service.address.port

    def url(self, target: str) -> str:
        return f"http://127.0.0.1:{self.port}/{target.lstrip('/')}"

    async def start(self) -> ServiceEnv:
        self.service.startService()
        await until(lambda: self.service.ready, what="the service ready")
        return self

    async def stop(self) -> None:
        await self.service.stopService()

    async def add(self, path: str, data: bytes, *, stored: bool, url: str = "") -> CatalogEntry:
        """Catalog *data* at ``fixtures/<path>``, stored on disk or lazy (fetched from *url*)."""
        sha256 = hashlib.sha256(data).hexdigest()
        if stored:
            source = self.tmp_path / "incoming"
            source.write_bytes(data)
            self.storage.import_file(str(source))
            source.unlink()
        entry = CatalogEntry(
            f"fixtures/{path}",
            "fixtures",
            url or self.upstream.url(f"/never/{path}"),
            len(data),
            {"sha256": sha256},
            stored=stored,
        )
        self._entries = [e for e in self._entries if e.path != entry.path] + [entry]
        await self.catalog.replace_remote("fixtures", list(self._entries))
        return entry

    def temp_files(self) -> list[str]:
        return sorted(os.listdir(self.storage.temp_dir))

    def in_flight_requests(self) -> int:
        return len(self.service.site.in_flight)


@pytest.fixture
def make_service(tmp_path, upstream):
    """``make_service(server=None, **options)``: a started `ServiceEnv` in a fresh folder,
    proxying *server* (default: the ``upstream`` fixture); every one is stopped at teardown."""
    started: list[ServiceEnv] = []

    def make(server=None, **options) -> defer.Deferred[ServiceEnv]:
        folder = tmp_path / f"service{len(started)}"
        folder.mkdir()
        env = ServiceEnv(folder, server or upstream, **options)
        started.append(env)
        return defer.ensureDeferred(env.start())

    yield make
    for env in started:
        pytest_twisted.blockon(defer.ensureDeferred(env.stop()))
