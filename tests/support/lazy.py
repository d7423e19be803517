"""Shared set-up for the lazy-streaming tests: a real SQLite catalog, ArtifactStorage in
tmp_path, remotes pointing at the loopback upstream, and the real `ContentResource` (whose
``lazy`` is the `LazyStreamer` under test) in a Site on 127.0.0.1: the content resource
alone, with remotes built in code, where `tests.support.service` runs the whole service
from a configuration file. A pytest plugin (see tests/conftest.py): tests ask for the
``lazy_env`` fixture by name.
"""

from __future__ import annotations

import hashlib
import os
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.web.server import Request, Site

from importer.remote import Remote
from store import ArtifactStorage, CatalogEntry, SQLiteCatalog
from streamer.content import ContentResource
from streamer.lazy import LazyOptions, LazyStreamer
from streamer.metrics import Metrics
from tests.support.upstream import UpstreamServer

__all__ = ["LazyEnv", "lazy_env_fixture", "parse_response", "sha256", "traced_peak"]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _RecordingRequest(Request):
    """Notes ``(path, method, code, cache_status)`` in its site's ``finished`` list once the
    response is complete (what the service's access log and metrics would count)."""

    def finish(self) -> None:
        site = self.channel.site if self.channel is not None else None
        super().finish()
        if site is not None:
            site.finished.append(
                (self.path.decode(), self.method.decode(), self.code, self.cache_status)
            )

    cache_status: str | None = None


class LazyEnv:
    """Everything one test needs; see the module docstring."""

    def __init__(self, tmp_path: Path, upstream: UpstreamServer) -> None:
        self.tmp_path = tmp_path
        self.upstream = upstream
        self.storage = ArtifactStorage(tmp_path / "store")
        self.catalog = SQLiteCatalog(str(tmp_path / "catalog.sqlite3"))
        self.remotes: dict[str, Remote] = {}
        self.metrics = Metrics()
        self.streamer: LazyStreamer = None  # type: ignore[assignment]
        self.port: Any = None

    def start(self, **options: Any) -> LazyEnv:
        self.resource = ContentResource(
            catalog=self.catalog, storage=self.storage, remotes=self.remotes, metrics=self.metrics
        )
        self.remotes = self.resource.remotes
        self.streamer = self.resource.lazy
        assert isinstance(self.streamer, LazyStreamer)
        self.streamer.options = LazyOptions(**options)
        site = Site(self.resource, timeout=None)
        site.requestFactory = _RecordingRequest
        site.finished = self.finished = []
        site.noisy = False
        self.port = reactor.listenTCP(0, site, interface="127.0.0.1")
        return self

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port.getHost().port}/{path.lstrip('/')}"

    def remote(self, name: str, server: UpstreamServer | None = None, **settings: Any) -> Remote:
        server = server or self.upstream
        settings.setdefault("max_retries", 0)
        remote = Remote(name=name, url=server.url("/PULP_MANIFEST"), **settings)
        self.remotes[name] = remote
        return remote

    @defer.inlineCallbacks
    def publish(
        self,
        path: str,
        body: bytes,
        *remotes: tuple[str, str],
        digest: str | None = None,
        size: int | None = None,
    ) -> Any:
        """Catalog *path* with one entry per (remote, url): sha256 and size of *body*, or the
        given *digest* and *size* (for generated bodies never held in memory)."""
        size = len(body) if size is None else size
        for position, (name, url) in enumerate(remotes):
            entry = CatalogEntry(
                path, name, url, size, {"sha256": digest or sha256(body)}, position=position
            )
            existing = yield self.catalog.entries_for_remote(name)
            yield self.catalog.replace_remote(name, [*existing, entry])

    def temp_files(self) -> list[str]:
        return sorted(os.listdir(self.storage.temp_dir))

    def stored(self, body: bytes) -> bool:
        return self.storage.has(sha256(body))

    @defer.inlineCallbacks
    def stop(self) -> Any:
        if self.streamer is not None:
            self.resource.close()
        if self.port is not None:
            yield self.port.stopListening()
        for remote in self.remotes.values():
            yield remote.close()
        yield self.catalog.close()


@pytest.fixture(name="lazy_env")
def lazy_env_fixture(tmp_path: Path, upstream: UpstreamServer) -> Any:
    env = LazyEnv(tmp_path, upstream)
    pytest_twisted.blockon(env.catalog.open())
    yield env
    pytest_twisted.blockon(env.stop())


def parse_response(raw: bytes) -> tuple[int, dict[str, list[str]], bytes]:
    """(status, {lower-case name: [values]}, body) of one raw HTTP/1.1 response (curl -i)."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    return int(lines[0].split()[1]), headers, body


def traced_peak(start: bool) -> int:
    """Start tracemalloc (returns 0) or stop it and return the peak traced bytes."""
    if start:
        tracemalloc.start()
        tracemalloc.reset_peak()
        return 0
    _current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak
