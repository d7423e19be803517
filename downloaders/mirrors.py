"""A remote's mirror list: a file of base urls (one a line) fetched once per remote, whose
mirrors a download tries in order after its own url failed.

`MirrorList` resolves the list through the remote's `DownloadContext`, so however many
downloads fail at once, the list is fetched once and shared; a failed fetch is not kept (the
next download asks again). A url under the remote's base (the folder of its ``url``) maps to
``mirror + relative path`` on each mirror; other urls have no alternatives.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import urljoin, urlsplit

from twisted.internet import defer

from downloaders.session import get_small

__all__ = ["MirrorList", "parse_mirror_list"]

#: A mirror list bigger than this is refused (thousands of mirrors fit in far less).
MIRROR_LIST_LIMIT = 1024 * 1024


def parse_mirror_list(text: str) -> list[str]:
    """The http(s) base urls of a mirror list, in order, each ending in ``/``; blank lines and
    ``#`` comments are skipped, as are lines that are not http(s) urls."""
    bases: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            parts = urlsplit(line)
        except ValueError:
            continue
        if parts.scheme not in ("http", "https") or not parts.netloc:
            continue
        base = line if line.endswith("/") else line + "/"
        if base not in bases:
            bases.append(base)
    return bases


class MirrorList:
    """The mirror list at *url* for a remote whose files live under *base*.

    :param context: the remote's `DownloadContext` (the list is resolved there, once).
    :param agent: the remote's agent stack (its TLS, proxy, credentials) to fetch the list.
    :param headers: sent with the request for the list (the factory's User-Agent and Via).
    """

    def __init__(
        self,
        url: str,
        base: str,
        context: Any,
        agent: Any,
        timeout: float = 60.0,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.url = url
        self.headers = dict(headers or {})
        #: Seconds the whole fetch of the list may take.
        self.timeout = timeout
        self.base = urljoin(base, ".")
        self.context = context
        self.agent = agent
        #: Fetches of the list made (for checks).
        self.fetches = 0

    def bases(self) -> defer.Deferred[list[str]]:
        """The mirrors' base urls (fetched on first use, shared by the remote's downloads)."""
        return self.context.resolve_once(("mirror_list", self.url), self._fetch)

    def alternatives(self, url: str) -> defer.Deferred[list[str]]:
        """The urls to try, in order, after *url* failed."""
        if not url.startswith(self.base):
            return defer.succeed([])
        relative = url[len(self.base) :]
        return self.bases().addCallback(
            lambda bases: [base + relative for base in bases if base + relative != url]
        )

    def _fetch(self) -> defer.Deferred[list[str]]:
        self.fetches += 1
        fetching = get_small(
            self.agent,
            self.url,
            limit=MIRROR_LIST_LIMIT,
            timeout=self.timeout,
            headers=self.headers,
            what="mirror list",
        )
        return fetching.addCallback(
            lambda body: parse_mirror_list(body.decode("utf-8", errors="replace"))
        )
