"""A custom importer for the plug-in tests: a JSON listing naming every file's own url."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import treq
from zope.interface import implementer

from downloaders import BaseDownloader, DownloadError
from importer import IImporter
from store import CatalogEntry


@implementer(IImporter)
class JsonListingImporter:
    """The remote's url is a JSON list of ``{"path", "url", "sha256", "size"}`` objects."""

    def __init__(self, remote: Any) -> None:
        self.remote = remote
        self.downloaders_built = 0

    def fetch_listing(self, temp_dir: str | None) -> Any:
        d = self.get_downloader(url=self.remote.url, temp_dir=temp_dir).run()
        return d.addCallback(lambda result: result.path)

    def _items(self, path: str) -> list[dict[str, Any]]:
        with open(path, encoding="utf-8") as f:
            return json.load(f)

    def validate_listing(self, path: str) -> int:
        items = self._items(path)
        for number, item in enumerate(items, start=1):
            if set(item) != {"path", "url", "sha256", "size"}:
                raise ValueError(f"item {number}: expected path, url, sha256 and size")
        return len(items)

    def catalog_entries(self, path: str, is_stored: Any) -> Iterator[CatalogEntry]:
        for item in self._items(path):
            yield CatalogEntry(
                path=f"{self.remote.base_path}/{item['path']}",
                remote=self.remote.name,
                url=item["url"],
                size=item["size"],
                digests={"sha256": item["sha256"]},
                stored=is_stored(item["sha256"]),
            )

    def get_downloader(self, url: str | None = None, entry: Any = None, **kwargs: Any) -> Any:
        self.downloaders_built += 1
        if entry is not None:
            url = entry.url
            kwargs.update(expected_size=entry.size, expected_digests=entry.digests)
        return self.remote.downloader_factory().build(url, **kwargs)


class NotAnImporter:
    """Has the right shape but does not declare IImporter."""

    def __init__(self, remote: Any) -> None:
        self.remote = remote


@implementer(IImporter)
class CarelessImporter(JsonListingImporter):
    """Hands out downloaders that do not check the entry's size and digest."""

    def get_downloader(self, url: str | None = None, entry: Any = None, **kwargs: Any) -> Any:
        return self.remote.downloader_factory().build(url or entry.url, **kwargs)


class OwnClientDownloader(BaseDownloader):
    """A plugin's downloader written by Pulp's documentation alone: it fetches with its own
    client (treq, not the remote's agent) and only passes the bytes to ``handle_data`` and
    calls ``finalize``; it takes none of the built-in downloaders' keywords."""

    async def _run(self, extra_data: Any = None) -> None:
        response = await treq.get(
            self.url, headers={"X-Client": "own"}, unbuffered=True, persistent=False
        )
        if response.code != 200:
            raise DownloadError(self.url, f"HTTP {response.code}")
        await treq.collect(response, self.handle_data)
        self.finalize()


class DuckDownloader:
    """No `BaseDownloader` at all: only the contract (``run``, ``handle_data``, ``finalize``)."""

    def __init__(self, url: str, expected_size: int) -> None:
        self.url = url
        self.expected_size = expected_size
        self.received = b""

    def handle_data(self, data: bytes) -> None:
        self.received += data

    def finalize(self) -> None:
        if len(self.received) != self.expected_size:
            raise DownloadError(self.url, "wrong size")

    async def run(self, extra_data: Any = None) -> Any:
        response = await treq.get(
            self.url, headers={"X-Client": "duck"}, unbuffered=True, persistent=False
        )
        await treq.collect(response, self.handle_data)
        self.finalize()
        return self.received


class SilentDownloader(BaseDownloader):
    """Breaks the contract: downloads into a file of its own and never calls ``handle_data``."""

    async def _run(self, extra_data: Any = None) -> None:
        response = await treq.get(self.url, persistent=False)
        self.body = await response.content()


@implementer(IImporter)
class OwnClientImporter(JsonListingImporter):
    """Hands out `OwnClientDownloader` objects, dropping any keyword it does not know (as a
    plugin written from the seeds may)."""

    def get_downloader(self, url: str | None = None, entry: Any = None, **ignored: Any) -> Any:
        if entry is None:
            return OwnClientDownloader(url)
        return OwnClientDownloader(entry.url, dict(entry.digests), entry.size)


@implementer(IImporter)
class DuckImporter(OwnClientImporter):
    def get_downloader(self, url: str | None = None, entry: Any = None, **ignored: Any) -> Any:
        return DuckDownloader(entry.url, entry.size)


@implementer(IImporter)
class SilentImporter(OwnClientImporter):
    """Its downloaders expect nothing (no size, no digest) and never call ``handle_data``."""

    def get_downloader(self, url: str | None = None, entry: Any = None, **ignored: Any) -> Any:
        return SilentDownloader(url or entry.url)


class LyingDuckDownloader(DuckDownloader):
    """Passes other bytes than the upstream's (same size) to handle_data, validates nothing."""

    async def run(self, extra_data: Any = None) -> Any:
        response = await treq.get(self.url, unbuffered=True, persistent=False)
        await treq.collect(response, lambda data: self.handle_data(data[::-1]))
        return self.received


@implementer(IImporter)
class LyingDuckImporter(OwnClientImporter):
    def get_downloader(self, url: str | None = None, entry: Any = None, **ignored: Any) -> Any:
        return LyingDuckDownloader(entry.url, entry.size)
