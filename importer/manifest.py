"""The PULP_MANIFEST format: one ``relative_path,sha256,size`` line per file.

Parsing is lazy (one line at a time) so a 100,000-line manifest is never held in memory;
only the set of paths seen so far is kept, to refuse duplicates. Every bad line raises
ManifestError naming the line number and the reason. Blank lines, lines starting with
``#`` (as Pulp allows), trailing whitespace, CRLF line ends and a UTF-8 BOM are tolerated.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator

import attrs

from store.catalog import MAX_SIZE

MANIFEST_NAME = "PULP_MANIFEST"

#: A line every check passes at a glance: a path of plain segments (ASCII letters, digits
#: and ``_-+~@=``, dots but not first, one slash between two), a sha256, a size of at most
#: 18 digits (under `MAX_SIZE`), the line's end. Anything else (a comment, a BOM, spaces,
#: any other character) takes the full checks, which also word what is wrong.
_PLAIN_LINE = re.compile(
    rb"((?:[A-Za-z0-9_+~@=-][A-Za-z0-9_.+~@=-]*/)*[A-Za-z0-9_+~@=-][A-Za-z0-9_.+~@=-]*)"
    rb",[0-9a-fA-F]{64},[0-9]{1,18}\r?\n?"
)
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_DIGITS = re.compile(r"[0-9]+")
# C0 controls, DEL and C1 controls: never part of a path we serve.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def unservable(text: str) -> str | None:
    """Why *text*, as part of a served path, could never be asked for (the streamer refuses
    requests holding a NUL, control character or backslash), or None."""
    if _CONTROL.search(text):
        return "contains a NUL or control character"
    if "\\" in text:
        return "contains a backslash"
    return None


class ManifestError(ValueError):
    """A manifest line is malformed; ``line_number`` says which (1-based)."""

    def __init__(self, line_number: int, reason: str, source: str = MANIFEST_NAME) -> None:
        self.line_number = line_number
        self.reason = reason
        self.source = source
        super().__init__(f"{source} line {line_number}: {reason}")


@attrs.frozen
class ManifestEntry:
    """One file listed in a manifest: where it lives relative to the manifest, its digest, size."""

    relative_path: str
    sha256: str
    size: int


def _path_problem(path: str) -> str | None:
    """Return why *path* is not a safe relative path, or None when it is fine."""
    if not path:
        return "empty relative path"
    problem = unservable(path)
    if problem:
        return f"relative path {path!r} {problem}"
    if path != path.strip():
        return f"relative path {path!r} has leading or trailing whitespace"
    if path.startswith("/"):
        return f"relative path {path!r} is absolute"
    for part in path.split("/"):
        if part == "..":
            return f"relative path {path!r} has a '..' component"
        if part == ".":
            return f"relative path {path!r} has a '.' component"
        if not part:
            return f"relative path {path!r} has an empty component (// or a trailing /)"
    return None


def parse_line(
    line: str, line_number: int, source: str = MANIFEST_NAME, check: bool = True
) -> ManifestEntry | None:
    """Parse one manifest line; None for a blank or comment line, ManifestError if bad.

    ``check=False`` skips the checks of path, digest and size, for a line of a listing that
    `validate_manifest` accepted already (a sync reads its listing three times)."""
    line = line.rstrip()
    if not line or line.startswith("#"):
        return None
    fields = line.split(",")
    if len(fields) != 3:
        raise ManifestError(
            line_number,
            f"expected 3 comma-separated fields (relative_path,sha256,size), got {len(fields)}",
            source,
        )
    path, digest, size_text = fields[0], fields[1].strip(), fields[2].strip()
    if check:
        _check_fields(path, digest, size_text, line_number, source)
    return ManifestEntry(relative_path=path, sha256=digest.lower(), size=int(size_text))


def _check_fields(path: str, digest: str, size_text: str, line_number: int, source: str) -> None:
    problem = _path_problem(path)
    if problem:
        raise ManifestError(line_number, problem, source)
    if not _HEX64.fullmatch(digest):
        raise ManifestError(
            line_number, f"sha256 must be 64 hex characters, got {digest[:80]!r}", source
        )
    if not _DIGITS.fullmatch(size_text):
        if size_text.startswith("-") and _DIGITS.fullmatch(size_text[1:]):
            reason = f"size must not be negative, got {size_text}"
        else:
            reason = f"size must be a non-negative integer, got {size_text[:40]!r}"
        raise ManifestError(line_number, reason, source)
    if len(size_text.lstrip("0")) > len(str(MAX_SIZE)) or int(size_text) > MAX_SIZE:
        raise ManifestError(
            line_number, f"size must be at most {MAX_SIZE}, got {size_text[:40]}", source
        )


def parse_manifest(
    lines: Iterable[str | bytes], source: str = MANIFEST_NAME, check: bool = True
) -> Iterator[ManifestEntry]:
    """Yield a ManifestEntry per file line of *lines* (text or UTF-8 bytes), lazily.

    Raises ManifestError at the first bad line, including a relative path listed twice.
    ``check=False``: the lines were checked before (see `parse_line`); nothing is checked
    again, duplicates included.
    """
    seen: dict[str, int] = {}
    for line_number, raw in enumerate(lines, start=1):
        entry = _parse_raw(raw, line_number, source, check)
        if entry is None:
            continue
        if check:
            _first_listing(seen, entry.relative_path, line_number, source)
        yield entry


def _parse_raw(
    raw: str | bytes, line_number: int, source: str, check: bool
) -> ManifestEntry | None:
    """`parse_line` of a line as read (UTF-8 bytes or text; the first may begin with a BOM)."""
    if isinstance(raw, bytes):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ManifestError(line_number, f"not valid UTF-8 ({exc.reason})", source)
    else:
        line = raw
    if line_number == 1:
        line = line.removeprefix("\ufeff")
    return parse_line(line, line_number, source, check)


def _first_listing(seen: dict[str, int], relative: str, line_number: int, source: str) -> None:
    """Note *relative* as listed on *line_number*; ManifestError if it was listed before."""
    first = seen.setdefault(relative, line_number)
    if first != line_number:
        raise ManifestError(
            line_number,
            f"duplicate relative path {relative!r} (first listed on line {first})",
            source,
        )


def read_manifest(
    path: str | os.PathLike[str], check: bool = True, source: str | None = None
) -> Iterator[ManifestEntry]:
    """Yield the entries of the manifest file at *path*, reading it lazily (``check``: see
    `parse_manifest`). Errors name *source* (default: the file's name)."""
    source = source or os.path.basename(os.fspath(path)) or MANIFEST_NAME
    with open(path, "rb") as f:
        yield from parse_manifest(f, source, check)


def validate_manifest(path: str | os.PathLike[str], source: str | None = None) -> int:
    """Check the whole manifest file at *path*; return its number of entries.

    Lets a sync fail on a bad line before it touches the catalog, then re-read the file
    lazily with ``read_manifest``. Errors name *source* (default: the file's name; a sync's
    listing is a temporary file, so it names the listing as published).
    """
    source = source or os.path.basename(os.fspath(path)) or MANIFEST_NAME
    seen: dict[str, int] = {}
    count = 0
    plain = _PLAIN_LINE.fullmatch
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, start=1):
            # Most lines are plain (see `_PLAIN_LINE`): one match settles them, without an
            # entry made or each check run in turn (this pass is on a sync's way to its
            # first download). The others are parsed and checked as `read_manifest` does.
            matched = plain(raw)
            if matched is not None:
                relative = matched[1].decode("ascii")
            else:
                entry = _parse_raw(raw, line_number, source, check=True)
                if entry is None:
                    continue
                relative = entry.relative_path
            _first_listing(seen, relative, line_number, source)
            count += 1
    return count
