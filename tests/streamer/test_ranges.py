"""Unit tests of Range header parsing and the multipart/byteranges framing."""

from __future__ import annotations

import email.parser
import email.policy

import pytest

from streamer.ranges import (
    MAX_RANGE_REVERSALS,
    MAX_RANGES,
    MultipartByteranges,
    UnsatisfiableRange,
    content_range,
    parse_range,
    ranges_length,
    unsatisfiable_content_range,
)


@pytest.mark.parametrize(
    "header, expected",
    [
        (b"bytes=0-0", [(0, 0)]),
        (b"bytes=0-99", [(0, 99)]),
        (b"bytes=10-", [(10, 99)]),
        (b"bytes=-10", [(90, 99)]),
        (b"bytes=-1000", [(0, 99)]),
        (b"bytes=50-1000", [(50, 99)]),
        (b"BYTES=0-9", [(0, 9)]),
        (b"bytes=0-9,", [(0, 9)]),
        (b"bytes=0-9,5-19", [(0, 19)]),
        (b"bytes=0-9,10-19", [(0, 19)]),
        (b"bytes=0-9,200-300", [(0, 9)]),
        (b"bytes=0-,-1", [(0, 99)]),
    ],
)
def test_valid_headers(header, expected):
    assert parse_range(header, 100) == expected


@pytest.mark.parametrize(
    "header, expected",
    [
        ("bytes=0-9,20-29", [(0, 9), (20, 29)]),
        (b"bytes= 0-9 , 20-29 ", [(0, 9), (20, 29)]),
        (b"bytes=20-29,0-9", [(20, 29), (0, 9)]),
        (b"bytes=0-9,-5", [(0, 9), (9995, 9999)]),
        (b"bytes=-5,0-9", [(9995, 9999), (0, 9)]),
        # Merged parts take the place of their first member in the client's order.
        (b"bytes=500-599,0-9,550-649,10-19", [(500, 649), (0, 19)]),
        (b"bytes=500-599,0-9,10-19,590-649", [(500, 649), (0, 19)]),
        (b"bytes=0-9,500-599,450-499,20-29", [(0, 9), (450, 599), (20, 29)]),
    ],
)
def test_several_ranges_keep_the_client_order(header, expected):
    """RFC 9110 section 14.6: parts in the order the client listed them."""
    assert parse_range(header, 10_000) == expected


@pytest.mark.parametrize(
    "header",
    [
        None,
        b"",
        b"bytes",
        b"bytes=",
        b"bytes=,",
        b"bytes=-",
        b"bytes=5-2",
        b"bytes=0-9,5-2",
        b"bytes=a-b",
        b"bytes=1-2-3",
        b"bytes=+1-2",
        b"bytes=0x10-20",
        b"items=0-9",
        b"bytes 0-9",
        b"bytes=0-9;x",
        "bytes=\u0661-\u0662".encode(),
        b"bytes=\xff-1",
        b"bytes=0-" + b"9" * 30,
    ],
)
def test_invalid_headers_are_ignored(header):
    assert parse_range(header, 100) is None


@pytest.mark.parametrize("header", [b"bytes=100-", b"bytes=100-200", b"bytes=-0", b"bytes=500-,-0"])
def test_unsatisfiable(header):
    with pytest.raises(UnsatisfiableRange) as info:
        parse_range(header, 100)
    assert info.value.size == 100


def test_empty_representation_ignores_ranges():
    assert parse_range(b"bytes=0-0", 0) is None
    assert parse_range(b"bytes=-5", 0) is None


def test_thousands_of_identical_ranges_coalesce_to_one():
    header = b"bytes=" + b"0-0," * 4000
    assert parse_range(header, 10) == [(0, 0)]


def test_overlapping_ranges_coalesce():
    header = "bytes=" + ",".join(f"{i}-{i + 10}" for i in range(0, 1000, 5))
    assert parse_range(header, 10_000) == [(0, 1005)]


def test_too_many_distinct_ranges_are_ignored():
    # Parts of 1000 bytes, so the multipart body stays smaller than the representation.
    ok = "bytes=" + ",".join(f"{i * 2000}-{i * 2000 + 999}" for i in range(MAX_RANGES))
    assert len(parse_range(ok, 10_000_000)) == MAX_RANGES
    too_many = "bytes=" + ",".join(f"{i * 2000}-{i * 2000 + 999}" for i in range(MAX_RANGES + 1))
    assert parse_range(too_many, 10_000_000) is None


def test_zchunk_like_requests_are_served():
    """~150 small disjoint chunks at once, as zchunk's downloader asks: one multipart answer."""
    header = "bytes=" + ",".join(f"{i * 400}-{i * 400 + 99}" for i in range(150))
    assert parse_range(header, 65_536) == [(i * 400, i * 400 + 99) for i in range(150)]


def test_many_overlapping_ranges_covering_the_file_are_one_range():
    header = "bytes=" + ",".join(f"{i * 437}-{i * 437 + 999}" for i in reversed(range(150)))
    assert parse_range(header, 65_536) == [(0, 65_535)]


def test_a_multipart_body_longer_than_the_file_gives_the_whole_file():
    # 700 one-byte parts of a 64 KiB file: ~80 KiB of framing for 700 bytes.
    header = "bytes=" + ",".join(f"{i * 90}-{i * 90}" for i in range(700))
    assert parse_range(header, 65_536) is None
    # The same parts in a file where they are worth it are served.
    assert len(parse_range(header, 1_000_000)) == 700
    # The content type named in every part counts.
    few = "bytes=" + ",".join(f"{i * 90}-{i * 90}" for i in range(500))
    assert len(parse_range(few, 65_536)) == 500
    assert parse_range(few, 65_536, b"application/" + b"x" * 100) is None


def test_many_ranges_out_of_order_are_ignored():
    ascending = [f"{i * 1000}-{i * 1000 + 99}" for i in range(MAX_RANGE_REVERSALS + 2)]
    shuffled = ascending[::2] + ascending[1::2]  # one reversal
    assert len(parse_range("bytes=" + ",".join(shuffled), 100_000)) == len(ascending)
    descending = ascending[::-1]  # MAX_RANGE_REVERSALS + 1 reversals
    assert parse_range("bytes=" + ",".join(descending[1:]), 100_000) is not None
    assert parse_range("bytes=" + ",".join(descending), 100_000) is None


def test_too_many_specs_are_ignored_without_work():
    assert parse_range(b"bytes=" + b"0-0," * 6000, 10) is None


def test_content_range_values():
    assert content_range(0, 9, 100) == b"bytes 0-9/100"
    assert unsatisfiable_content_range(100) == b"bytes */100"
    assert ranges_length([(0, 9), (20, 29)]) == 20


def test_multipart_body_parses_as_mime():
    data = bytes(range(256)) * 4
    ranges = parse_range(b"bytes=0-9,100-199,-5", len(data))
    body_spec = MultipartByteranges(ranges, len(data), "text/plain")
    body = (
        b"".join(prefix + data[first : last + 1] for prefix, first, last in body_spec.parts())
        + body_spec.trailer
    )
    assert len(body) == body_spec.content_length
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + body_spec.header_value + b"\r\n\r\n" + body
    )
    parts = list(message.iter_parts())
    assert [p["Content-Range"] for p in parts] == [
        "bytes 0-9/1024",
        "bytes 100-199/1024",
        "bytes 1019-1023/1024",
    ]
    assert [p.get_payload(decode=True) for p in parts] == [
        data[0:10],
        data[100:200],
        data[1019:],
    ]
    assert all(p.get_content_type() == "text/plain" for p in parts)


def test_boundaries_are_random():
    a = MultipartByteranges([(0, 1), (5, 6)], 10)
    b = MultipartByteranges([(0, 1), (5, 6)], 10)
    assert a.boundary != b.boundary
    assert a.content_type == b"application/octet-stream"
