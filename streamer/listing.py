"""HTML listings of catalog folders (like Pulp's content app).

Every name is html-escaped in text and percent-encoded in links, and the page is sent with a
Content-Security-Policy that allows no script at all, so a hostile file name cannot inject
markup or script.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from html import escape
from urllib.parse import quote

import attrs
from twisted.web.server import Request

from store import ListingItem
from streamer.static import client_gone

__all__ = [
    "LISTING_HEADERS",
    "FolderPage",
    "ListingCache",
    "render_listing",
    "respond_listing",
    "respond_page",
]

#: Headers of every listing page.
LISTING_HEADERS = {
    b"Content-Type": b"text/html; charset=utf-8",
    b"Content-Security-Policy": b"default-src 'none'; style-src 'unsafe-inline'",
    b"X-Content-Type-Options": b"nosniff",
    b"Referrer-Policy": b"no-referrer",
}

_STYLE = (
    "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
    "td{padding:0.1em 1.5em 0.1em 0}td.size{text-align:right}"
)


def render_listing(url_path: str, items: Iterable[ListingItem]) -> bytes:
    """The HTML page listing *items* of the folder served at *url_path* (ending in ``/``).

    Folders come first, then files, each group by name; links are relative to the folder.
    """
    title = escape(f"Index of {url_path}")
    rows = []
    if url_path != "/":
        rows.append('<tr><td><a href="../">../</a></td><td class="size"></td></tr>')
    for item in sorted(items, key=lambda i: (not i.is_dir, i.name)):
        href = quote(item.name, safe="") + ("/" if item.is_dir else "")
        label = escape(item.name) + ("/" if item.is_dir else "")
        size = "" if item.is_dir or item.size is None else str(item.size)
        rows.append(
            f'<tr><td><a href="{escape(href)}">{label}</a></td><td class="size">{size}</td></tr>'
        )
    page = (
        "<!DOCTYPE html>\n"
        f'<html><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{_STYLE}</style></head>\n"
        f"<body><h1>{title}</h1>\n<table>\n" + "\n".join(rows) + "\n</table>\n</body></html>\n"
    )
    return page.encode("utf-8")


def respond_listing(request: Request, url_path: str, items: Iterable[ListingItem]) -> None:
    """Finish *request* (GET or HEAD) with the listing page of *items*."""
    if client_gone(request):
        return
    respond_page(request, render_listing(url_path, items))


def respond_page(request: Request, body: bytes) -> None:
    """Finish *request* (GET or HEAD) with a listing page rendered by `render_listing`."""
    if client_gone(request):
        return
    for name, value in LISTING_HEADERS.items():
        request.setHeader(name, value)
    request.setHeader(b"Content-Length", b"%d" % len(body))
    request.write(body)
    request.finish()


@attrs.frozen
class FolderPage:
    """A folder as the catalog lists it: whether it has an ``index.html``, and its page."""

    has_index: bool
    body: bytes


class ListingCache:
    """Rendered folder pages, each valid while the catalog's ``listing_version`` stays the one
    it was rendered under (a sync that changes what listings show, in any process, changes
    it). Listing a folder of 50,000 entries costs about 0.3 s of CPU (the catalog walk and the
    HTML); a repeated GET of it then costs a primary-key read. At most *max_bytes* of pages
    are kept, the least recently used dropped first."""

    def __init__(self, max_bytes: int = 64 * 1024 * 1024) -> None:
        self.max_bytes = max_bytes
        self._pages: OrderedDict[str, tuple[str, FolderPage]] = OrderedDict()
        self._bytes = 0

    def get(self, path: str, version: str) -> FolderPage | None:
        """The page of folder *path* if it was rendered under *version*, else None."""
        cached = self._pages.get(path)
        if cached is None or cached[0] != version:
            return None
        self._pages.move_to_end(path)
        return cached[1]

    def put(self, path: str, version: str, page: FolderPage) -> None:
        self._drop(path)
        if len(page.body) > self.max_bytes:
            return
        self._pages[path] = (version, page)
        self._bytes += len(page.body)
        while self._bytes > self.max_bytes:
            self._drop(next(iter(self._pages)))

    def _drop(self, path: str) -> None:
        cached = self._pages.pop(path, None)
        if cached is not None:
            self._bytes -= len(cached[1].body)
