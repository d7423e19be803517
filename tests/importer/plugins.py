"""A custom importer for the plug-in tests: a JSON listing naming every file's own url."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from zope.interface import implementer

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
