"""HTML listings of catalog folders (like Pulp's content app).

Every name is html-escaped in text and percent-encoded in links, and the page is sent with a
Content-Security-Policy that allows no script at all, so a hostile file name cannot inject
markup or script.
"""

from __future__ import annotations

from collections.abc import Iterable
from html import escape
from urllib.parse import quote

from twisted.web.iweb import IRequest

from store import ListingItem
from streamer.static import client_gone

__all__ = ["LISTING_HEADERS", "render_listing", "respond_listing"]

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


def respond_listing(request: IRequest, url_path: str, items: Iterable[ListingItem]) -> None:
    """Finish *request* (GET or HEAD) with the listing page of *items*."""
    if client_gone(request):
        return
    body = render_listing(url_path, items)
    for name, value in LISTING_HEADERS.items():
        request.setHeader(name, value)
    request.setHeader(b"Content-Length", b"%d" % len(body))
    request.write(body)
    request.finish()
