"""A synced mirror for real-client tests: the real `StreamerService` in-process (see
`tests.support.service.ServiceEnv`), its ``fixtures`` remote synced by the real importer
from a loopback upstream that publishes files and their PULP_MANIFEST. Holds no tests.

Files are published at ``/<quoted relative path>`` upstream and served at
``/fixtures/<relative path>`` by the streamer; the upstream records every request, so tests
can assert "fetched exactly once".
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import quote

from importer import sync_remote
from tests.support.faults import Behaviour, Serve
from tests.support.polling import holds_within
from tests.support.service import ServiceEnv
from tests.support.upstream import UpstreamServer

__all__ = ["Mirror", "sha256"]

BASE = "fixtures"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def client_env() -> dict[str, str]:
    """This environment without proxy, pip or streamer settings (clients talk to loopback
    directly and read no user configuration)."""
    dropped = ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "ftp_proxy")
    env = {
        name: value
        for name, value in os.environ.items()
        if name.lower() not in dropped and not name.startswith(("PIP_", "STREAMER_"))
    }
    env["PIP_CONFIG_FILE"] = os.devnull  # pip: read no configuration file at all
    return env


class Mirror:
    """The streamer serving ``files`` (relative path -> bytes) lazily from *upstream*.

    ``behaviours`` overrides how the upstream answers for some paths (the manifest still
    lists ``files[path]``'s digest and size).
    """

    def __init__(
        self,
        tmp_path: Path,
        upstream: UpstreamServer,
        files: Mapping[str, bytes],
        behaviours: Mapping[str, Behaviour] | None = None,
        policy: str = "on_demand",
    ) -> None:
        self.upstream = upstream
        self.files = dict(files)
        behaviours = behaviours or {}
        for relative, data in self.files.items():
            behaviour = behaviours.get(relative) or Serve(data)
            upstream.register(self.upstream_path(relative), behaviour)
        manifest = "".join(f"{p},{sha256(d)},{len(d)}\n" for p, d in self.files.items())
        upstream.register("/PULP_MANIFEST", Serve(manifest.encode(), content_type="text/csv"))
        folder = tmp_path / "service"
        folder.mkdir()
        self.env = ServiceEnv(folder, upstream, policy=policy, stall_timeout=5.0)

    async def start(self) -> Mirror:
        await self.env.start()
        remote = self.env.service.remotes[BASE]
        report = await sync_remote(remote, self.env.catalog, self.env.storage)
        assert report.ok, report
        return self

    async def stop(self) -> None:
        await self.env.stop()

    # -- addresses ----------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self.env.port

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT/fixtures/`` (the folder listing)."""
        return self.env.url(f"{BASE}/")

    def url(self, relative: str) -> str:
        return self.env.url(f"{BASE}/{quote(relative)}")

    @staticmethod
    def upstream_path(relative: str) -> str:
        return "/" + quote(relative)

    # -- observations -------------------------------------------------------------------

    def upstream_gets(self, relative: str) -> int:
        """GET requests the upstream received for *relative* so far."""
        return sum(r.method == "GET" for r in self.upstream.requests(self.upstream_path(relative)))

    def upstream_requests(self, relative: str) -> list[str]:
        """Methods (and Range headers) of every upstream request for *relative*."""
        return [
            f"{r.method} {r.headers.get('range', '')}".strip()
            for r in self.upstream.requests(self.upstream_path(relative))
        ]

    def is_stored(self, relative: str) -> bool:
        return self.env.storage.has(sha256(self.files[relative]))

    def stored_bytes(self, relative: str) -> bytes:
        with self.env.storage.open(sha256(self.files[relative])) as f:
            return f.read()

    async def stored_soon(self, relative: str, timeout: float = 5.0) -> bool:
        """True once *relative* is committed to storage (that follows the response)."""
        return await holds_within(lambda: self.is_stored(relative), timeout)

    def temp_files(self) -> list[str]:
        return self.env.temp_files()
