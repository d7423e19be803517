"""PULP_MANIFEST parsing: good files, every kind of bad line, lazy reading."""

import hashlib
import io
import tracemalloc

import pytest

from importer.manifest import (
    ManifestEntry,
    ManifestError,
    parse_manifest,
    read_manifest,
    validate_manifest,
)

SHA_A = hashlib.sha256(b"a").hexdigest()
SHA_B = hashlib.sha256(b"b").hexdigest()


def test_good_manifest_with_tolerated_noise(tmp_path):
    text = (
        f"\ufeffdir/a.txt,{SHA_A},1\r\n"
        "\n"
        "# a comment line, as Pulp allows\n"
        "   \n"
        f"b file.bin,{SHA_B.upper()},2   \r\n"
        f"deep/er/c,{SHA_A},0\n"
        f"huge,{SHA_B},0009223372036854775807\n"
    )
    path = tmp_path / "PULP_MANIFEST"
    path.write_bytes(text.encode())
    expected = [
        ManifestEntry("dir/a.txt", SHA_A, 1),
        ManifestEntry("b file.bin", SHA_B, 2),
        ManifestEntry("deep/er/c", SHA_A, 0),
        ManifestEntry("huge", SHA_B, 2**63 - 1),  # the largest the catalog holds
    ]
    assert list(parse_manifest(io.StringIO(text))) == expected
    assert list(read_manifest(path)) == expected
    assert validate_manifest(path) == 4


def test_non_ascii_paths(tmp_path):
    path = tmp_path / "PULP_MANIFEST"
    path.write_text(f"données/été.txt,{SHA_A},5\n", encoding="utf-8")
    assert list(read_manifest(path)) == [ManifestEntry("données/été.txt", SHA_A, 5)]


BAD_LINES = [
    ("a.txt,{a}", "expected 3 comma-separated fields .* got 2"),
    ("a,b.txt,{a},1", "expected 3 comma-separated fields .* got 4"),
    ("a.txt", "got 1"),
    ("a.txt,{short},1", "sha256 must be 64 hex characters"),
    ("a.txt,{nonhex},1", "sha256 must be 64 hex characters"),
    ("a.txt,,1", "sha256 must be 64 hex characters"),
    ("a.txt,{a},-5", "size must not be negative, got -5"),
    ("a.txt,{a},1.5", "size must be a non-negative integer, got '1.5'"),
    ("a.txt,{a},ten", "non-negative integer, got 'ten'"),
    ("a.txt,{a},", "non-negative integer, got ''"),
    ("a.txt,{a},+3", "non-negative integer, got '\\+3'"),
    # The catalog's size column is a signed 64-bit integer (it was refused there, with
    # "Python int too large to convert to SQLite INTEGER" and no line named).
    ("a.txt,{a},9223372036854775808", "size must be at most 9223372036854775807, got 9223"),
    ("a.txt,{a}," + "9" * 5000, "size must be at most 9223372036854775807, got 9999"),
    ("/etc/passwd,{a},1", "is absolute"),
    ("../escape,{a},1", "'..' component"),
    ("dir/../../escape,{a},1", "'..' component"),
    ("dir/..,{a},1", "'..' component"),
    (",{a},1", "empty relative path"),
    ("dir//a,{a},1", "empty component"),
    ("dir/,{a},1", "empty component"),
    ("./a,{a},1", "'.' component"),
    ("dir\\a.txt,{a},1", "backslash"),
    ("a\x00b,{a},1", "NUL or control character"),
    ("a\tb,{a},1", "NUL or control character"),
    ("a\x1bb,{a},1", "NUL or control character"),
    ("a\x85b,{a},1", "NUL or control character"),
    (" a.txt,{a},1", "leading or trailing whitespace"),
]


@pytest.mark.parametrize(("line", "reason"), BAD_LINES)
def test_bad_line_reports_line_number_and_reason(line, reason):
    lines = [
        f"good/1,{SHA_A},1",
        "",
        f"good/2,{SHA_B},2",
        line.format(a=SHA_A, short="ab" * 10, nonhex="z" * 64),
    ]
    parsed = parse_manifest(lines)
    assert next(parsed).relative_path == "good/1"  # lazily: good lines before the bad one
    assert next(parsed).relative_path == "good/2"
    with pytest.raises(ManifestError, match=reason) as info:
        next(parsed)
    assert info.value.line_number == 4
    assert str(info.value).startswith("PULP_MANIFEST line 4: ")


@pytest.mark.parametrize(("line", "reason"), BAD_LINES)
def test_validate_manifest_refuses_every_bad_line_as_parsing_does(tmp_path, line, reason):
    """`validate_manifest` settles most lines with one match (plain ones); no bad line is
    taken for one: each fails with the same reason and line number."""
    path = tmp_path / "PULP_MANIFEST"
    bad = line.format(a=SHA_A, short="ab" * 10, nonhex="z" * 64)
    path.write_bytes(f"good/1,{SHA_A},1\n\ngood/2,{SHA_B},2\n{bad}\n".encode())
    with pytest.raises(ManifestError, match=reason) as info:
        validate_manifest(path)
    assert info.value.line_number == 4


def test_validate_manifest_counts_plain_and_other_lines_alike(tmp_path):
    """Lines past the plain pattern (a dot first, a BOM, spaces around the digest, an
    upper-case digest, a 19-digit size, CRLF, non-ASCII) count as `read_manifest` reads
    them, and a path listed twice is found whichever way each line was read."""
    lines = [
        f"\ufeff.hidden/a,{SHA_A},1",
        f"a/.b,{SHA_A},1",
        f"a./b-c_d+e~f@g=h,{SHA_B.upper()},2",
        f"spaced, {SHA_A} ,3",
        f"big,{SHA_A},1000000000000000000",
        f"crlf,{SHA_A},4\r",
        f"été,{SHA_A},5",
    ]
    path = tmp_path / "PULP_MANIFEST"
    path.write_bytes("\n".join(lines).encode() + b"\n")
    assert validate_manifest(path) == len(list(read_manifest(path))) == 7
    twice = [  # a plain line, then the same path on a line that is not; both not plain
        (f"plain,{SHA_A},1", f"plain, {SHA_A},1"),
        (f"sp aced,{SHA_A},1", f"sp aced,{SHA_B},2"),
    ]
    for first, again in twice:
        path.write_bytes(f"{first}\nother,{SHA_B},1\n{again}\n".encode())
        with pytest.raises(ManifestError, match="duplicate relative path .* line 1") as info:
            validate_manifest(path)
        assert info.value.line_number == 3


def test_duplicate_relative_path_names_both_lines():
    lines = [f"a,{SHA_A},1", f"b,{SHA_A},1", f"a,{SHA_B},2"]
    with pytest.raises(ManifestError, match="duplicate relative path 'a'.*line 1") as info:
        list(parse_manifest(lines))
    assert info.value.line_number == 3


def test_invalid_utf8_line_in_file(tmp_path):
    path = tmp_path / "PULP_MANIFEST"
    path.write_bytes(f"a,{SHA_A},1\n".encode() + b"b\xff\xfe," + SHA_A.encode() + b",1\n")
    with pytest.raises(ManifestError, match="line 2: not valid UTF-8") as info:
        validate_manifest(path)
    assert info.value.line_number == 2


def test_validate_manifest_fails_on_late_bad_line(tmp_path):
    path = tmp_path / "PULP_MANIFEST"
    with open(path, "w") as f:
        for i in range(5000):
            f.write(f"f/{i},{SHA_A},{i}\n")
        f.write(f"../x,{SHA_A},1\n")
    with pytest.raises(ManifestError, match="line 5001: .*'..' component"):
        validate_manifest(path)


def test_100000_lines_parsed_lazily_in_bounded_memory(tmp_path):
    path = tmp_path / "PULP_MANIFEST"
    n = 100_000
    with open(path, "w") as f:
        for i in range(n):
            f.write(f"pool/d{i % 100}/package-{i:06d}.rpm,{SHA_A},{i}\n")
    size = path.stat().st_size
    tracemalloc.start()
    try:
        count = 0
        total = 0
        for entry in read_manifest(path):  # never all entries in memory at once
            count += 1
            total += entry.size
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == n and total == n * (n - 1) // 2
    # Only the paths seen so far (for the duplicate check) are kept, about 150 bytes a line;
    # holding every parsed entry as well would more than double this (about 3.5x the file size).
    print(f"manifest of {size} bytes, {n} lines: peak traced memory {peak / 2**20:.1f} MiB")
    assert peak < 2 * size
