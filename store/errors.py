"""Errors raised by the store package, and how to tell a local fault from any other."""

from __future__ import annotations

import errno
import os

import attrs


class StorageError(Exception):
    """An artifact could not be stored, found or read; nothing partial was left behind."""


class ArtifactNotFound(StorageError):
    """No artifact with the requested sha256 is in storage."""


class NotARegularFile(ArtifactNotFound):
    """Something other than a regular file (a FIFO, a symbolic link, ...) sits at an
    artifact's path: it is treated as not stored."""


class WrongSize(ArtifactNotFound):
    """The file at an artifact's path has another size than the artifact (cut short or
    grown on disk): it is treated as not stored."""


class PathTaken(StorageError):
    """Something a commit may not replace (a folder) sits at an artifact's path: the
    artifact is not stored, and the thing is left for ``streamer verify`` to move aside."""


class CatalogError(Exception):
    """The catalog could not be opened, read or updated (bad URL, bad entry, database error)."""


class CatalogUnavailable(CatalogError):
    """The catalog's database cannot be reached right now (down, restarting, unreachable).

    Worth retrying later: the streamer answers 503 while it lasts and recovers by itself.
    """


class CatalogRefused(CatalogError):
    """The catalog cannot be used by this code or this node: its schema is newer than this
    code knows, or it belongs to another storage folder. Retrying does not help."""


#: Failures of this host, not of any upstream: what a client is told (503), by errno.
LOCAL_FAULTS = {
    errno.ENOSPC: "storage full",
    errno.EDQUOT: "storage full",
    errno.EROFS: "storage read-only",
    errno.EMFILE: "too many open files",
    errno.ENFILE: "too many open files",
}


@attrs.frozen
class LocalFault:
    """A failure of this host (disk full, read-only storage, out of descriptors)."""

    #: What a client is told: one of the `LOCAL_FAULTS` values.
    reason: str
    errno: int

    @property
    def detail(self) -> str:
        """For logs: the reason with the errno's name and text (``storage full (ENOSPC: ...)``)."""
        name = errno.errorcode.get(self.errno, str(self.errno))
        return f"{self.reason} ({name}: {os.strerror(self.errno)})"

    def __str__(self) -> str:
        return self.detail


def local_fault(error: BaseException | None) -> LocalFault | None:
    """The `LocalFault` behind *error* (itself, or an error it was raised from), or None.

    Looks at ``errno`` of an ``OSError`` and ``osError`` of Twisted's connection errors, along
    the chain of causes, so a temp file write failing inside a download is still recognised.
    """
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        code = error.errno if isinstance(error, OSError) else getattr(error, "osError", None)
        if isinstance(code, int) and code in LOCAL_FAULTS:
            return LocalFault(LOCAL_FAULTS[code], code)
        error = error.__cause__ or error.__context__
    return None
