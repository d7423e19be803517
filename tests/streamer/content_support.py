"""A real content server for the stored-content tests: `ContentResource` in a twisted.web Site
on 127.0.0.1 (port 0), a real SQLite catalog and artifact storage under tmp_path, and curl."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import attrs
from twisted.internet import defer, reactor
from twisted.web import server

from importer.remote import Remote
from store import ArtifactStorage, CatalogEntry, SQLiteCatalog
from streamer.content import ContentResource
from tests.support.clients import run_curl

__all__ = ["ContentServer", "CurlResponse", "start_content_server"]


class _RecordingSite(server.Site):
    """A Site that remembers its channels, so tests can look at server-side transports."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.channels: list[Any] = []

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        self.channels.append(channel)
        return channel


@attrs.frozen
class CurlResponse:
    status: int
    headers: dict[str, list[str]]
    body: bytes
    exit_code: int

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[-1] if values else None


def _parse_curl_output(stdout: bytes) -> tuple[int, dict[str, list[str]], bytes]:
    head, _, body = stdout.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1]) if lines and lines[0].startswith("HTTP/") else 0
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    return status, headers, body


@attrs.define
class ContentServer:
    """The running server and what it serves; `add` puts content into catalog and storage."""

    root: Path
    catalog: SQLiteCatalog
    storage: ArtifactStorage
    resource: ContentResource
    site: _RecordingSite
    port: Any
    remotes: dict[str, Remote]
    _entries: dict[str, list[CatalogEntry]] = attrs.field(factory=dict)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port.getHost().port}"

    @defer.inlineCallbacks
    def add(self, path: str, data: bytes, *, remote: str = "fixtures", stored: bool = True) -> Any:
        """Catalog *data* at *path* (under the remote's base path), stored or lazy-only."""
        sha256 = hashlib.sha256(data).hexdigest()
        if stored:
            source = self.root / "incoming"
            source.write_bytes(data)
            self.storage.import_file(str(source))
            source.unlink()
        entry = CatalogEntry(
            path=path,
            remote=remote,
            url=f"http://127.0.0.1:9/{path}",
            size=len(data),
            digests={"sha256": sha256},
            stored=stored,
        )
        entries = [e for e in self._entries.get(remote, []) if e.path != path] + [entry]
        self._entries[remote] = entries
        yield self.catalog.replace_remote(remote, entries)
        return entry

    def curl(self, target: str, *args: str) -> defer.Deferred[CurlResponse]:
        """``curl -i --path-as-is ARGS base+target``; fires with a CurlResponse."""
        d = run_curl("-i", "-g", "--path-as-is", *args, self.base + target, timeout=20)
        return d.addCallback(lambda r: CurlResponse(*_parse_curl_output(r.stdout), r.exit_code))

    def server_transports(self) -> list[Any]:
        channels = (getattr(c, "_channel", c) for c in self.site.channels)
        found = (getattr(c, "transport", None) for c in channels)
        return [t for t in found if t is not None]

    @defer.inlineCallbacks
    def stop(self) -> Any:
        for transport in self.server_transports():
            transport.abortConnection()
        yield self.port.stopListening()
        yield self.catalog.close()


@defer.inlineCallbacks
def start_content_server(
    root: Path, *, config: Any = None, base_paths: tuple[str, ...] = ("fixtures",)
) -> Any:
    """Start a content server with remotes named like *base_paths* (one each)."""
    storage = ArtifactStorage(root / "storage")
    catalog = SQLiteCatalog(str(root / "catalog.sqlite3"))
    yield catalog.open()
    remotes = {
        base: Remote(
            name=base.replace("/", "-"),
            url=f"http://127.0.0.1:9/{base}/PULP_MANIFEST",
            base_path=base,
            max_retries=0,
        )
        for base in base_paths
    }
    remotes = {r.name: r for r in remotes.values()}
    resource = ContentResource(
        catalog=catalog, storage=storage, remotes=remotes, config=config, reactor=reactor
    )
    site = _RecordingSite(resource)
    site.noisy = False
    site.displayTracebacks = False
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    return ContentServer(root, catalog, storage, resource, site, port, remotes)


def open_fds_to(path: str) -> int:
    """How many of this process's file descriptors point at *path* (Linux /proc)."""
    count = 0
    folder = "/proc/self/fd"
    for name in os.listdir(folder):
        try:
            if os.readlink(os.path.join(folder, name)) == path:
                count += 1
        except OSError:
            continue
    return count
