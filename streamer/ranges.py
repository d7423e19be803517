"""HTTP Range requests (RFC 9110 section 14): parse a ``Range`` header into byte ranges, and
write ``Content-Range`` values and ``multipart/byteranges`` bodies.

Shared by stored (static) and lazy serving, so both answer ranges the same way.

Abuse protection: overlapping and adjacent ranges are coalesced (so ``bytes=0-0,0-0,...``
thousands of times is one part), a header with more than `MAX_RANGES` distinct parts or more
than `MAX_RANGE_SPECS` specs is ignored (a plain 200), and a syntactically invalid header
(including a reversed range such as ``5-2``) is ignored as RFC 9110 requires.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

import attrs

__all__ = [
    "MAX_RANGES",
    "MAX_RANGE_SPECS",
    "MultipartByteranges",
    "UnsatisfiableRange",
    "content_range",
    "parse_range",
    "ranges_length",
    "unsatisfiable_content_range",
]

#: More distinct parts than this (after coalescing): ignore the header, serve the whole body.
MAX_RANGES = 100
#: More comma-separated specs than this: ignore the header without coalescing them.
MAX_RANGE_SPECS = 5000
#: Longer numbers than this are not byte positions anyone can mean; the header is invalid.
_MAX_DIGITS = 19

_SPEC = re.compile(r"^(\d*)-(\d*)$")


class UnsatisfiableRange(ValueError):
    """No range of a valid ``Range`` header overlaps the representation: answer 416 with
    ``Content-Range: bytes */<size>`` (see `unsatisfiable_content_range`)."""

    def __init__(self, size: int) -> None:
        super().__init__(f"no requested range overlaps the {size} bytes available")
        self.size = size


def parse_range(header_value: bytes | str | None, size: int) -> list[tuple[int, int]] | None:
    """Parse a ``Range`` header value for a representation of *size* bytes.

    Returns a sorted list of inclusive ``(first, last)`` byte positions with overlapping and
    adjacent ranges coalesced, or None when the header must be ignored (absent, invalid, not
    in ``bytes``, too many parts, or an empty representation): serve a plain 200 then.
    Raises `UnsatisfiableRange` when the header is valid but no range overlaps the content
    (answer 416).
    """
    if header_value is None:
        return None
    if isinstance(header_value, bytes):
        try:
            header_value = header_value.decode("ascii")
        except UnicodeDecodeError:
            return None
    unit, sep, range_set = header_value.partition("=")
    if not sep or unit.strip().lower() != "bytes":
        return None
    specs = range_set.split(",")
    if len(specs) > MAX_RANGE_SPECS:
        return None
    wanted: list[tuple[int, int]] = []
    seen_spec = False
    for raw in specs:
        spec = raw.strip(" \t")
        if not spec:
            continue  # RFC 9110 list syntax: empty elements are allowed and ignored
        match = _SPEC.match(spec)
        if match is None:
            return None
        first_text, last_text = match.groups()
        if len(first_text) > _MAX_DIGITS or len(last_text) > _MAX_DIGITS:
            return None
        seen_spec = True
        if first_text:
            first = int(first_text)
            if last_text:
                last = int(last_text)
                if last < first:
                    return None  # invalid range-spec: the whole header is ignored
                last = min(last, size - 1)
            else:
                last = size - 1
            if first < size:
                wanted.append((first, last))
        elif last_text:
            suffix = int(last_text)
            if suffix > 0 and size > 0:
                wanted.append((max(0, size - suffix), size - 1))
        else:
            return None  # a lone "-"
    if not seen_spec:
        return None
    if size == 0:
        return None  # nothing to select from: the whole (empty) body is the answer
    if not wanted:
        raise UnsatisfiableRange(size)
    merged = _coalesce(wanted)
    if len(merged) > MAX_RANGES:
        return None
    return merged


def _coalesce(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sort *ranges* and merge those that overlap or touch."""
    ranges = sorted(ranges)
    merged = [ranges[0]]
    for first, last in ranges[1:]:
        prev_first, prev_last = merged[-1]
        if first <= prev_last + 1:
            if last > prev_last:
                merged[-1] = (prev_first, last)
        else:
            merged.append((first, last))
    return merged


def ranges_length(ranges: list[tuple[int, int]]) -> int:
    """Number of content bytes the inclusive *ranges* select."""
    return sum(last - first + 1 for first, last in ranges)


def content_range(first: int, last: int, size: int) -> bytes:
    """The ``Content-Range`` value for one satisfied range: ``bytes first-last/size``."""
    return b"bytes %d-%d/%d" % (first, last, size)


def unsatisfiable_content_range(size: int) -> bytes:
    """The ``Content-Range`` value of a 416 answer: ``bytes */size``."""
    return b"bytes */%d" % (size,)


def _make_boundary() -> str:
    return os.urandom(16).hex()


def _as_bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode("latin-1")


@attrs.frozen
class MultipartByteranges:
    """The framing of a ``multipart/byteranges`` body for several ranges of one representation.

    Send ``Content-Type: <header_value>`` and ``Content-Length: <content_length>``; then for
    each ``(prefix, first, last)`` of `parts` write *prefix* followed by the content bytes
    *first*..*last* (inclusive); finally write `trailer`.
    """

    ranges: tuple[tuple[int, int], ...] = attrs.field(converter=tuple)
    size: int
    content_type: bytes = attrs.field(converter=_as_bytes, default=b"application/octet-stream")
    boundary: str = attrs.field(factory=_make_boundary)

    @property
    def header_value(self) -> bytes:
        """The response's ``Content-Type`` value."""
        return b"multipart/byteranges; boundary=" + self.boundary.encode("ascii")

    def part_header(self, first: int, last: int) -> bytes:
        """The delimiter and headers written before the bytes of one part."""
        return b"".join(
            [
                b"\r\n--",
                self.boundary.encode("ascii"),
                b"\r\nContent-Type: ",
                self.content_type,
                b"\r\nContent-Range: ",
                content_range(first, last, self.size),
                b"\r\n\r\n",
            ]
        )

    @property
    def trailer(self) -> bytes:
        """The closing delimiter written after the last part."""
        return b"\r\n--" + self.boundary.encode("ascii") + b"--\r\n"

    def parts(self) -> Iterator[tuple[bytes, int, int]]:
        """Yield ``(prefix, first, last)`` for each range, in order."""
        for first, last in self.ranges:
            yield self.part_header(first, last), first, last

    @property
    def content_length(self) -> int:
        """The exact length of the whole body (prefixes, content bytes and trailer)."""
        return (
            sum(len(self.part_header(first, last)) for first, last in self.ranges)
            + ranges_length(list(self.ranges))
            + len(self.trailer)
        )
