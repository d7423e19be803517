"""HTTP Range requests (RFC 9110 section 14): parse a ``Range`` header into byte ranges, and
write ``Content-Range`` values and ``multipart/byteranges`` bodies.

Shared by stored (static) and lazy serving, so both answer ranges the same way.

Ranges that overlap or touch are merged first (``bytes=0-0,0-0,...`` thousands of times is one
part; 150 overlapping ranges covering the file are one range), and the merged parts keep the
client's order (RFC 9110 section 14.6: each takes the place of its first member). Then the
limits against range amplification (Apache's rule, CVE-2011-3192) apply to what is left, not
to the raw list, and a request over any of them gets the whole representation (a plain 200,
which RFC 9110 allows for any Range header):

* more than `MAX_RANGE_SPECS` comma-separated specs: ignored without parsing them;
* more than `MAX_RANGES` parts after merging (zchunk asks for ~150 at once);
* a multipart body longer than the whole representation (many small ranges: their framing
  would cost more than the file itself);
* more than `MAX_RANGE_REVERSALS` parts that start before the part sent before them (many
  ranges out of ascending order, which RFC 9110 section 14.2 names as a sign of attack).

A syntactically invalid header (including a reversed range such as ``5-2``) is ignored as
RFC 9110 requires.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterable, Iterator

import attrs

__all__ = [
    "MAX_RANGES",
    "MAX_RANGE_REVERSALS",
    "MAX_RANGE_SPECS",
    "MultipartByteranges",
    "UnsatisfiableRange",
    "content_range",
    "parse_range",
    "ranges_length",
    "unsatisfiable_content_range",
]

#: More distinct parts than this (after merging): ignore the header, serve the whole body.
#: Enough for zchunk and other delta clients (~150 parts, at most 256 in librepo), and each
#: part costs a segment and ~120 bytes of framing in memory while its answer is sent.
MAX_RANGES = 1000
#: More parts than this starting before their predecessor: ignore the header (Apache's
#: ``MaxRangeReversals`` default).
MAX_RANGE_REVERSALS = 20
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


def parse_range(
    header_value: bytes | str | None,
    size: int,
    content_type: bytes | str = b"application/octet-stream",
) -> list[tuple[int, int]] | None:
    """Parse a ``Range`` header value for a representation of *size* bytes of *content_type*
    (the type each part of a multipart answer would name).

    Returns inclusive ``(first, last)`` byte positions with overlapping and adjacent ranges
    merged, in the client's order; or None when the header must be ignored (absent, invalid,
    not in ``bytes``, over one of the module's limits, or an empty representation): serve a
    plain 200 then. Raises `UnsatisfiableRange` when the header is valid but no range
    overlaps the content (answer 416).
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
    if len(merged) == 1:
        return merged
    if len(merged) > MAX_RANGES or _reversals(merged) > MAX_RANGE_REVERSALS:
        return None
    if MultipartByteranges(merged, size, content_type).content_length > size:
        return None  # the whole representation is the smaller answer
    return merged


def _coalesce(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Merge the *ranges* that overlap or touch; each merged range takes the place of the
    first of its members in the client's order (RFC 9110 section 14.6)."""
    # [first, last, position of the earliest member], built in ascending order of first.
    merged: list[list[int]] = []
    for position in sorted(range(len(ranges)), key=ranges.__getitem__):
        first, last = ranges[position]
        if merged and first <= merged[-1][1] + 1:
            top = merged[-1]
            top[1] = max(top[1], last)
            top[2] = min(top[2], position)
        else:
            merged.append([first, last, position])
    merged.sort(key=lambda item: item[2])
    return [(first, last) for first, last, _ in merged]


def _reversals(ranges: list[tuple[int, int]]) -> int:
    """How many of *ranges* start before the range listed before them."""
    return sum(1 for before, after in itertools.pairwise(ranges) if after[0] < before[0])


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


def _as_ranges(value: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    return tuple(value)


def _as_bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode("latin-1")


@attrs.frozen
class MultipartByteranges:
    """The framing of a ``multipart/byteranges`` body for several ranges of one representation.

    Send ``Content-Type: <header_value>`` and ``Content-Length: <content_length>``; then for
    each ``(prefix, first, last)`` of `parts` write *prefix* followed by the content bytes
    *first*..*last* (inclusive); finally write `trailer`.
    """

    ranges: tuple[tuple[int, int], ...] = attrs.field(converter=_as_ranges)
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
