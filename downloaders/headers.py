"""Response headers as plugin writers know them: a dict of ``name -> value`` strings.

`ResponseHeaders` is what ``headers_ready_callback`` receives and what ``DownloadResult.headers``
holds: a real ``dict`` (``dict(h)``, ``h.items()``, JSON, equality) whose lookups ignore case
(``h["content-type"]`` finds ``Content-Type``). A name sent several times has its values joined
with ``", "`` (RFC 9110 section 5.3). The Twisted ``Headers`` it was made from stay available as
``raw``, and ``getRawHeaders`` / ``hasHeader`` answer as Twisted's do, so code written against
the older Twisted-typed headers keeps working; ``getall`` / ``getone`` answer as the multidict
of aiohttp's responses does (what Pulp's ``DownloadResult.headers`` is), a value per field line.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from twisted.web.http_headers import Headers

__all__ = ["ResponseHeaders", "as_response_headers", "as_twisted_headers", "header_value"]


def _text(value: bytes | str) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else value


def _lower(name: bytes | str) -> str:
    return _text(name).lower()


class ResponseHeaders(dict):
    """``str -> str``, looked up case-insensitively; see the module docstring."""

    __slots__ = ("_names", "raw")

    def __init__(self, items: Mapping[str, str] | Iterable[tuple[str, str]] = (), raw: Any = None):
        super().__init__()
        self._names: dict[str, str] = {}
        self.raw = raw
        pairs = items.items() if isinstance(items, Mapping) else items
        for name, value in pairs:
            self[name] = value

    @classmethod
    def from_twisted(cls, headers: Headers) -> ResponseHeaders:
        """From Twisted ``Headers`` (names as the server sent them, in canonical case)."""
        made = cls(raw=headers)
        for name, values in headers.getAllRawHeaders():
            made[_text(name)] = ", ".join(_text(v) for v in values)
        return made

    # Case-insensitive dict -----------------------------------------------------------------

    def __setitem__(self, name: str, value: str) -> None:
        name = _text(name)
        key = name.lower()
        old = self._names.get(key)
        if old is not None and old != name:
            super().__delitem__(old)
        self._names[key] = name
        super().__setitem__(name, _text(value))

    def __getitem__(self, name: str) -> str:
        return super().__getitem__(self._names.get(_lower(name), name))

    def __delitem__(self, name: str) -> None:
        super().__delitem__(self._names.pop(_lower(name)))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, (str, bytes)) and _lower(name) in self._names

    def get(self, name: bytes | str, default: Any = None) -> Any:
        stored = self._names.get(_lower(name))
        return default if stored is None else super().__getitem__(stored)

    def pop(self, name: str, *default: Any) -> Any:
        stored = self._names.pop(_lower(name), None)
        if stored is None:
            if default:
                return default[0]
            raise KeyError(name)
        return super().pop(stored)

    # dict.setdefault defaults to None; a header value is always a str.
    def setdefault(self, name: str, default: str = "") -> str:  # type: ignore[override]
        if name not in self:
            self[name] = default
        return self[name]

    def update(self, *others: Any, **more: str) -> None:
        for other in others:
            pairs = other.items() if isinstance(other, Mapping) else other
            for name, value in pairs:
                self[name] = value
        for name, value in more.items():
            self[name] = value

    def copy(self) -> ResponseHeaders:
        return ResponseHeaders(self, raw=self.raw)

    def clear(self) -> None:
        super().clear()
        self._names.clear()

    # What Twisted's Headers answer ----------------------------------------------------------

    def getRawHeaders(self, name: bytes | str, default: Any = None) -> Any:
        """As ``twisted.web.http_headers.Headers.getRawHeaders`` (bytes for a bytes name)."""
        if self.raw is not None:
            return self.raw.getRawHeaders(name, default)
        value = self.get(name)
        if value is None:
            return default
        return [value.encode("latin-1")] if isinstance(name, bytes) else [value]

    def hasHeader(self, name: bytes | str) -> bool:
        return name in self

    # What aiohttp's headers (a multidict, Pulp's DownloadResult.headers) answer -------------

    def getall(self, name: bytes | str, *default: Any) -> Any:
        """Every value sent for *name*, one per field line, in order; *default* (else
        KeyError) when there was none."""
        values = self.getRawHeaders(_text(name))
        if not values:
            if default:
                return default[0]
            raise KeyError(name)
        return [_text(value) for value in values]

    def getone(self, name: bytes | str, *default: Any) -> Any:
        """The first value sent for *name*; *default* (else KeyError) when there was none."""
        values = self.getall(name, None)
        if values is None:
            if default:
                return default[0]
            raise KeyError(name)
        return values[0]


def as_response_headers(headers: Any) -> ResponseHeaders | None:
    """*headers* (Twisted ``Headers``, any mapping, or None) as `ResponseHeaders`."""
    if headers is None or isinstance(headers, ResponseHeaders):
        return headers
    if isinstance(headers, Headers):
        return ResponseHeaders.from_twisted(headers)
    return ResponseHeaders(headers)


def header_value(headers: Any, name: str) -> str | None:
    """The value of *name* in *headers* (any of: `ResponseHeaders`, Twisted ``Headers``, a
    plain mapping of any case), or None."""
    if headers is None:
        return None
    get_raw = getattr(headers, "getRawHeaders", None)
    if get_raw is not None:
        values = get_raw(name.encode("latin-1"))
        if not values:
            return None
        return _text(values[0]) if len(values) == 1 else ", ".join(_text(v) for v in values)
    wanted = name.lower()
    for key, value in headers.items():
        if _lower(key) == wanted:
            return _text(value)
    return None


def as_twisted_headers(headers: Any) -> Headers | None:
    """Twisted ``Headers`` for *headers* (returned as they are when they already are)."""
    if headers is None or isinstance(headers, Headers):
        return headers
    raw = getattr(headers, "raw", None)
    if isinstance(raw, Headers):
        return raw
    made = Headers()
    for name, value in headers.items():
        made.addRawHeader(_text(name).encode("latin-1"), _text(value).encode("latin-1"))
    return made
